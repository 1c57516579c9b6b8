"""`mamba-bench run` in which rank R exits abruptly (os._exit(1)) right after its N-th record is
written, as a killed process would: DYING_RANK="R:N". Run under torchrun by test_distributed."""
import os
import sys

from mamba_decoder.bench import torchrun
from mamba_decoder.bench.cli import main

rank, after = (int(v) for v in os.environ["DYING_RANK"].split(":"))
measure_each = torchrun.measure_each


def dying(configs, s):
    for i, r in enumerate(measure_each(configs, s), 1):
        yield r   # run_shard writes and fsyncs it before asking for the next one
        if int(os.environ["RANK"]) == rank and i >= after:
            os._exit(1)


torchrun.measure_each = dying
sys.exit(main(sys.argv[1:]))

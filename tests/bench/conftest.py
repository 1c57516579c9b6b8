"""Tiny sizes so the suite's tests run in well under a minute on two CPU cores."""
from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from mamba_decoder.bench.results import BenchmarkResult

TINY = ["--dim", "32", "--seq-lens", "8", "16", "--batch-sizes", "1", "2", "--runs", "2",
        "--warmup", "0", "--no-cuda", "--no-progress"]

# The spec's per-config line; a noisy result may append the high-spread note.
LINE_RE = re.compile(
    r"^(?P<name>.{26}) \| SeqLen: +(?P<seq>\d+) \| Batch: +(?P<batch>\d+) \| "
    r"Latency: +(?P<lat>\d+\.\d\d+)±(?P<std>\d+\.\d\d+) ms \| "
    r"Throughput: +(?P<tp>\d+\.\d\d) tokens/s \| Params: (?P<params>\d+\.\d\d)M"
    r"(?P<spread> \| HIGH SPREAD: IQR \d+% of median \(> 10%\))?$")
FAILED_RE = re.compile(r"^(?P<name>.{26}) \| SeqLen: +\d+ \| Batch: +\d+ \| (?P<status>OOM|ERROR): .+$")


def run(argv, capsys):
    """`mamba-bench ARGV` in this process: (exit code, stdout, stderr)."""
    from mamba_decoder.bench.cli import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def png_dpi(path: Path) -> tuple[float, float]:
    """(x, y) dots per inch from a PNG's pHYs chunk (struct only, no PIL)."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    i = 8
    while i < len(data):
        (length,) = struct.unpack(">I", data[i:i + 4])
        kind = data[i + 4:i + 8]
        if kind == b"pHYs":
            x, y, unit = struct.unpack(">IIB", data[i + 8:i + 17])
            assert unit == 1, "pHYs unit is not metres"
            return x * 0.0254, y * 0.0254
        i += 12 + length
    raise AssertionError(f"{path} has no pHYs chunk")


def make_record(model="Regular Mamba", seq=8, batch=1, samples=(1.0, 1.1, 0.9, 1.0), **kw) -> BenchmarkResult:
    fields = dict(model_name=model, sequence_length=seq, batch_size=batch, dim=32, backend="reference",
                  dtype="float32", device="cpu", num_parameters=1000, active_parameters=1000)
    fields.update(kw)
    return BenchmarkResult.from_samples(list(samples), **fields)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One real tiny sweep through the CLI (records + plots), shared by read-only tests.

    MLABlock at seq 16, batch 2 runs out of memory (injected), so plots and reports meet a failure.
    """
    import torch

    from mamba_decoder.bench import runner
    from mamba_decoder.bench.cli import main

    real = runner.build_model

    def factory(name, dim, backend="reference", max_seq_len=4096):
        m = real(name, dim, backend, max_seq_len=max_seq_len)
        if name == "MLABlock":
            forward = m.forward

            def failing(x):
                if x.shape[:2] == (2, 16):
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
                return forward(x)
            m.forward = failing
        return m

    out = tmp_path_factory.mktemp("run") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "build_model", factory)
        code = main(["run", *TINY, "--output-dir", str(out)])
    assert code == 0
    return out

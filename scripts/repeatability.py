"""Repeatability of speedups across runs of the same sweep (docs/BENCHMARKS.md, issue 14).

    python scripts/repeatability.py RUN_DIR RUN_DIR [RUN_DIR ...] [--mean]

For each config: every run's speedup vs the baseline (median, paired by round where the run was
interleaved) with its 95% interval, and whether each run's speedup lies inside every other run's
interval (and, the weaker test, whether every two runs' intervals overlap); for each model: the geometric-mean speedup per run and the largest relative difference
between two runs. --mean also prints the mean-latency ratio that the suite printed before issue 14.
"""
from __future__ import annotations

import argparse
import itertools
import math

from mamba_decoder.bench.report import baseline_for, geomean_speedups, speedup_ratios
from mamba_decoder.bench.results import load_run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+")
    p.add_argument("--mean", action="store_true", help="also the ratio of mean latencies (the old figure)")
    a = p.parse_args()
    runs = [load_run(d) for d in a.runs]
    base = baseline_for(runs[0])
    per: dict[tuple, list] = {}
    for i, rs in enumerate(runs):
        by_shape = {(r.backend, r.dtype, r.sequence_length, r.batch_size): r for r in rs if r.model_name == base}
        for r, sp, noisy in speedup_ratios(rs):
            b = by_shape.get((r.backend, r.dtype, r.sequence_length, r.batch_size))
            mean = b.latency_ms / r.latency_ms if sp is not None else math.nan
            per.setdefault((r.model_name, r.sequence_length, r.batch_size), []).append((sp, mean))
    covered_all = overlap_all = 0
    print(f"speedup vs {base}: median [95% CI] per run" + ("; mean ratio" if a.mean else ""))
    for key, vals in per.items():
        ok = all(vals[j][0].lo <= vals[i][0].value <= vals[j][0].hi
                 for i, j in itertools.permutations(range(len(vals)), 2))
        covered_all += ok
        overlap_all += all(max(x.lo, y.lo) <= min(x.hi, y.hi)
                           for (x, _), (y, _) in itertools.combinations(vals, 2))
        cells = "  ".join(f"{sp.value:.3g} [{sp.lo:.3g}, {sp.hi:.3g}]" + (f" mean {m:.3g}" if a.mean else "")
                          for sp, m in vals)
        print(f"{key[0]:<18} L={key[1]:<4} B={key[2]:<2} {cells}  covered: {'yes' if ok else 'NO'}")
    print(f"{covered_all} of {len(per)} configs: every run's speedup inside every other run's interval")
    print(f"{overlap_all} of {len(per)} configs: every two runs' intervals overlap")
    geo = [geomean_speedups(rs) for rs in runs]
    for model in geo[0]:
        g = [x[model][0] for x in geo]
        spread = max(x.value for x in g) / min(x.value for x in g) - 1
        line = "  ".join(f"{x.value:.3g} [{x.lo:.3g}, {x.hi:.3g}]" for x in g)
        if a.mean:
            means = []
            for rs in runs:
                by = {(r.sequence_length, r.batch_size): r for r in rs if r.model_name == base}
                v = [by[(r.sequence_length, r.batch_size)].latency_ms / r.latency_ms
                     for r in rs if r.model_name == model and r.ok]
                means.append(math.exp(sum(map(math.log, v)) / len(v)))
            line += "  | mean-ratio geomean: " + ", ".join(f"{m:.3g}" for m in means) \
                + f" (spread {max(means) / min(means) - 1:.0%})"
        print(f"geomean {model}: {line}  spread {spread:.0%}")


if __name__ == "__main__":
    main()

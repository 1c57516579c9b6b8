"""Estimate the spec's default CPU sweep (`python run_benchmark.py --no-cuda`: 60 configs, 5 warm-up
+ 20 timed forwards each) from a short run of the same grid, without loading a shared machine for
the full 10-60 minutes (issue 17). An estimate, not a measurement.

    python run_benchmark.py --no-cuda --no-progress --warmup 1 --runs 2 --output-dir /tmp/short
    python scripts/cpu_sweep_estimate.py /tmp/short --wall-s 123    # the short run's wall time

The default sweep does what the short run did (builds, probes, plots: the short run's wall time)
plus (5 + 20) - (warmup + runs) more forwards per config, each at that config's median here.
`--quiet-gflops` also scales each config's time by its GEMM probe (the record's peak_tflops)
over that rate: what the sweep would take if every part of a forward sped up like the GEMM on a
quiet machine (optimistic: the memory-bound passes speed up less).
"""
import argparse

from mamba_decoder.bench.results import load_run

p = argparse.ArgumentParser()
p.add_argument("run_dir")
p.add_argument("--wall-s", type=float, required=True, help="the short run's wall time in seconds")
p.add_argument("--default-forwards", type=int, default=25, help="warm-up + timed forwards of the default sweep")
p.add_argument("--quiet-gflops", type=float, default=None, help="a quiet machine's probed GEMM rate")
a = p.parse_args()

recs = [r for r in load_run(a.run_dir) if r.ok]
extra = sum((a.default_forwards - r.warmup - r.n_runs) * r.latency_median_ms / 1e3 for r in recs)
print(f"{len(recs)} configs; short run {a.wall_s:.0f} s; + {extra:.0f} s of further forwards "
      f"= default sweep estimate {(a.wall_s + extra) / 60:.1f} min at this run's machine state")
rates = [r.peak_tflops * 1e3 for r in recs if r.peak_tflops]
if rates:
    print(f"GEMM probe across configs: {min(rates):.0f}-{max(rates):.0f} GFLOP/s (median {sorted(rates)[len(rates) // 2]:.0f})")
if a.quiet_gflops:
    fwd = sum(a.default_forwards * r.latency_median_ms / 1e3 * (r.peak_tflops * 1e3 / a.quiet_gflops)
              for r in recs if r.peak_tflops)
    overhead = a.wall_s - sum((r.warmup + r.n_runs) * r.latency_median_ms / 1e3 for r in recs)
    print(f"scaled to a {a.quiet_gflops:.0f} GFLOP/s GEMM probe: {fwd:.0f} s of forwards + {overhead:.0f} s "
          f"of builds, probes and plots (as measured) = {(fwd + overhead) / 60:.1f} min (optimistic)")
by_model = {}
for r in recs:
    by_model[r.model_name] = by_model.get(r.model_name, 0) + a.default_forwards * r.latency_median_ms / 1e3
print("forwards by model at this run's state: " + ", ".join(f"{k} {v:.0f} s" for k, v in by_model.items()))

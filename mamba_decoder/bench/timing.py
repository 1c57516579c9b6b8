"""One timer for the whole suite: warm up, then time a callable run by run.

On CUDA each run is bracketed by CUDA events, and the device is synchronized once per batch of
runs before the events are read, so the figure is device time of the work, not launch time. On the CPU each run is timed with
`time.perf_counter` under a fixed torch thread count, which the caller sets and the record reports.
The timer returns the raw per-run samples in milliseconds; `summarize` turns them into statistics.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..kernels import cpu_gemm

# IQR / median above this marks a result as noisy (the console and the record say so).
HIGH_SPREAD = 0.10


def time_callable(fn: Callable[[], Any], device: torch.device | str = "cpu", *, warmup: int = 5,
                  runs: int = 20, min_time_s: float = 0.0, max_runs: int = 10_000,
                  before_timing: Optional[Callable[[], None]] = None) -> list[float]:
    """Per-run latencies in ms of `fn()` after `warmup` untimed calls.

    Runs at least `runs` times and, when `min_time_s` > 0, keeps going until the timed runs add up
    to `min_time_s` seconds as well (both conditions are met; `max_runs` caps the total).
    `before_timing` runs between warmup and the first timed run (e.g. to reset peak-memory stats).
    """
    if runs < 1 or warmup < 0 or min_time_s < 0:
        raise ValueError(f"runs={runs} must be >= 1, warmup={warmup} >= 0, min_time_s={min_time_s} >= 0")
    device = torch.device(device)
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    if before_timing is not None:
        before_timing()
    samples: list[float] = []
    while len(samples) < runs or (sum(samples) < min_time_s * 1e3 and len(samples) < max_runs):
        todo = runs - len(samples) if len(samples) < runs else min(runs, max_runs - len(samples))
        samples += _cuda_batch(fn, todo, device) if cuda else _cpu_batch(fn, todo)
    return samples


def _cpu_batch(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _cuda_batch(fn: Callable[[], Any], n: int, device: torch.device) -> list[float]:
    """Events around each run and one synchronize after the batch: the host may enqueue the next
    run while the device works, as in a training or serving loop, so each sample is the device's
    time for one run (launch gaps included wherever the host falls behind), as
    triton.testing.do_bench measures it."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(n)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


@dataclass(frozen=True)
class Stats:
    mean: float
    std: float      # sample standard deviation (ddof=1; 0 for a single run)
    median: float
    q1: float
    q3: float
    p10: float
    p90: float
    n: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def high_spread(self) -> bool:
        return self.median > 0 and self.iqr / self.median > HIGH_SPREAD


def summarize(samples_ms: list[float]) -> Stats:
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0 or not np.all(np.isfinite(a)):
        raise ValueError("samples must be a non-empty list of finite numbers")
    q = np.percentile(a, [10, 25, 50, 75, 90])
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return Stats(mean=float(a.mean()), std=std, median=float(q[2]), q1=float(q[1]), q3=float(q[3]),
                 p10=float(q[0]), p90=float(q[4]), n=int(a.size))


def mann_whitney_u(x: list[float], y: list[float]) -> tuple[float, float]:
    """Two-sided Mann-Whitney U test, normal approximation with tie and continuity correction.

    Returns (U of x, p-value). Identical samples give p = 1.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    n1, n2 = x.size, y.size
    if n1 == 0 or n2 == 0:
        raise ValueError("both samples must be non-empty")
    both = np.concatenate([x, y])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(both.size)
    ranks[order] = np.arange(1, both.size + 1)
    values, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    ranks = np.bincount(inverse, ranks)[inverse] / counts[inverse]   # average rank within ties
    u1 = ranks[:n1].sum() - n1 * (n1 + 1) / 2
    n = n1 + n2
    tie = (counts ** 3 - counts).sum() / (n * (n - 1)) if n > 1 else 0.0
    sigma = math.sqrt(n1 * n2 / 12 * ((n + 1) - tie))
    if sigma == 0:
        return float(u1), 1.0
    d = u1 - n1 * n2 / 2
    z = (abs(d) - 0.5) / sigma if abs(d) >= 0.5 else 0.0
    return float(u1), float(min(1.0, math.erfc(z / math.sqrt(2))))


def cpu_gemm_tflops(dtype: torch.dtype = torch.float32, n: int = 1024, runs: int = 3) -> float:
    """This CPU's GEMM rate now (TFLOP/s): the median of `runs` (n x n) x (n x n) products at the
    current thread count, through the library the fast backend's GEMMs use (kernels/cpu_gemm.py:
    oneDNN for fp32, 2x MKL's rate on an AMD Zen 5). On the CPU the suite probes it beside every
    config, so a config's MFU is against what the machine gave in the same minute (a shared
    machine drifts 3x in seconds)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    with torch.inference_mode():
        ms = summarize(time_callable(lambda: cpu_gemm.linear(a, b), "cpu", warmup=1, runs=runs)).median
    return 2 * n ** 3 / (ms * 1e9)

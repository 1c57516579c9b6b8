"""One timer for the whole suite: warm up, then time a callable run by run.

On CUDA each run is bracketed by CUDA events, and the device is synchronized once per batch of
runs before the events are read, so the figure is device time of the work, not launch time. On the CPU each run is timed with
`time.perf_counter` under a fixed torch thread count, which the caller sets and the record reports.
The timer returns the raw per-run samples in milliseconds; `summarize` turns them into statistics.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from scipy import stats

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
    """Two-sided Mann-Whitney U test (scipy, normal approximation with tie and continuity correction).

    Returns (U of x, p-value). Identical samples give p = 1.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size == 0 or y.size == 0:
        raise ValueError("both samples must be non-empty")
    if np.ptp(np.concatenate([x, y])) == 0:   # all tied: no evidence of a difference
        return float(x.size * y.size / 2), 1.0
    res = stats.mannwhitneyu(x, y, alternative="two-sided", method="asymptotic", use_continuity=True)
    return float(res.statistic), float(min(1.0, res.pvalue))


# ---------------------------------------------------------------- interleaved rounds
# Timed runs per config and round when the counts allow (runs=20 -> 10 rounds of 2).
RUNS_PER_ROUND = 2
# The calibration kernel's spread over a shape's rounds ((max - min) / median) above which the
# machine's speed drifted enough to warn.
DRIFT_WARN = 0.25
# A callable whose warm-up calls (the first, with its one-time costs, left out) took less than this
# (ms) gets one untimed call before its timed runs in every round: a short call right after another
# model's (or the calibration kernel's) finds its weights out of cache. Measured on this project's
# CPU (dim 128, L 128-256, 10 rounds of 2): the first run of a round 10-25% slower than the second
# for Regular Mamba, which biased its ratios.
REWARM_BELOW_MS = 20.0


@dataclass
class Timed:
    """What `time_interleaved` measured for one callable: samples (ms) and the round of each, or
    the exception that stopped it (its samples so far are dropped by the caller)."""

    samples: list[float]
    rounds: list[int]
    error: Optional[BaseException] = None


def calibration_kernel(device: torch.device | str = "cpu") -> Callable[[], float]:
    """A fixed small matmul (256 x 256, fp32) timed between rounds: the median of 5 runs in ms.
    The machine's drift is how much this number moves over a run, independent of the models."""
    device = torch.device(device)
    a = torch.randn(256, 256, device=device)

    def run() -> float:
        return float(np.median(time_callable(lambda: a @ a, device, warmup=1, runs=5)))
    return run


def time_interleaved(fns: Sequence[Callable[[], Any]], device: torch.device | str = "cpu", *,
                     warmup: int = 5, runs: int = 20, min_time_s: float = 0.0,
                     max_runs: Sequence[int] | int = 10_000, runs_per_round: int = RUNS_PER_ROUND,
                     calibrate: Optional[Callable[[], float]] = None,
                     around: Optional[Sequence[tuple[Callable[[], None], Callable[[], None]]]] = None,
                     rewarm_below_ms: float = 0.0,
                     ) -> tuple[list[Timed], list[float]]:
    """Time several callables round robin: warm each up, then in each round take `runs_per_round`
    timed runs of each in turn, until each has `runs` samples (and, with `min_time_s`, timed runs
    adding up to that many seconds, capped by its `max_runs`). A slow period of the machine then
    hits every callable alike, and ratios can be paired by round. Round r starts with callable
    r mod n, so none is always the first after the calibration kernel.

    `rewarm_below_ms` > 0: a callable whose warm-up calls (after the first, where there are more)
    averaged less than that gets one untimed call right before its timed runs in each round (its
    caches warm again after the others ran), so an interleaved sample measures the same warm steady
    state as a block of runs does.

    `calibrate()` (e.g. `calibration_kernel`) runs before each round; its values are returned.
    `around[i]` = (start, stop) is called before and after each block of callable i's timed runs
    (e.g. the host memory peak over the blocks). A callable that raises is left out of later
    rounds, its exception kept (KeyboardInterrupt propagates). Returns (one Timed per callable, calibration ms per round).
    """
    if runs < 1 or warmup < 0 or min_time_s < 0 or runs_per_round < 1:
        raise ValueError(f"runs={runs} and runs_per_round={runs_per_round} must be >= 1, "
                         f"warmup={warmup} >= 0, min_time_s={min_time_s} >= 0")
    caps = [max_runs] * len(fns) if isinstance(max_runs, int) else list(max_runs)
    out = [Timed([], []) for _ in fns]
    device = torch.device(device)
    rewarm = [False] * len(fns)
    for i, (f, t) in enumerate(zip(fns, out)):
        try:
            t0 = time.perf_counter()
            for j in range(warmup):
                if j == 1:   # the first call's one-time costs (JIT, compile, library set-up) not counted
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    t0 = time.perf_counter()
                f()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            timed = warmup - (warmup > 1)
            rewarm[i] = warmup > 0 and (time.perf_counter() - t0) * 1e3 / timed < rewarm_below_ms
        except Exception as e:  # noqa: BLE001 -- this callable's failure, not the others'
            t.error = e
    calibration: list[float] = []

    def todo(t: Timed, cap: int) -> int:
        n = len(t.samples)
        if t.error is not None:
            return 0
        if n < runs:
            return min(runs_per_round, runs - n)
        if min_time_s > 0 and sum(t.samples) < min_time_s * 1e3 and n < cap:
            return min(runs_per_round, cap - n)
        return 0
    rnd = 0
    while any(todo(t, c) for t, c in zip(out, caps)):
        if calibrate is not None:
            calibration.append(calibrate())
        n = len(fns)
        for i in [(rnd + j) % n for j in range(n)]:
            f, t, c = fns[i], out[i], caps[i]
            k = todo(t, c)
            if not k:
                continue
            try:
                if rewarm[i]:
                    f()
                if around is not None:
                    around[i][0]()
                got = time_callable(f, device, warmup=0, runs=k)
                if around is not None:
                    around[i][1]()
            except Exception as e:  # noqa: BLE001
                t.error = e
                continue
            t.samples += got
            t.rounds += [rnd] * len(got)
        rnd += 1
    return out, calibration


def drift(calibration_ms: Sequence[float]) -> float:
    """(max - min) / median of the calibration kernel's times over rounds (0 with fewer than 2)."""
    if len(calibration_ms) < 2:
        return 0.0
    a = np.asarray(calibration_ms, float)
    return float((a.max() - a.min()) / np.median(a))


# ---------------------------------------------------------------- ratios with intervals
CONFIDENCE = 0.95
N_RESAMPLES = 2000
# Resamples are drawn in batches of about this many values in all (the arrays of every term
# together): a geometric mean over 8 configs of 10 000 samples each (--min-time) drew 2000 x
# 160 000 at once, 2.95 GB of peak memory for one summary line.
BATCH_VALUES = 1 << 22


@dataclass(frozen=True)
class Ratio:
    """A ratio of median latencies with its 95% bootstrap interval. `paired`: the median over
    rounds of per-round ratios (both measured in the same interleaved rounds); otherwise the
    ratio of the two medians, resampled independently."""

    value: float
    lo: float
    hi: float
    paired: bool

    @property
    def crosses_one(self) -> bool:
        return self.lo <= 1.0 <= self.hi


def _round_medians(samples: Sequence[float], rounds: Sequence[int]) -> dict[int, float]:
    by: dict[int, list[float]] = {}
    for v, r in zip(samples, rounds):
        by.setdefault(r, []).append(v)
    return {r: float(np.median(v)) for r, v in by.items()}


# Fewer shared rounds than this: too few for a bootstrap over rounds; the samples are used instead.
MIN_PAIRED_ROUNDS = 5
# A record merged from several processes (`--processes`, runner.merge_processes) numbers process
# p's round r as p * PROCESS_ROUNDS + r: rounds still pair across models, and the bootstrap reads
# the process of each round from it.
PROCESS_ROUNDS = 1_000_000


def _per_round_ratios(num, num_rounds, den, den_rounds) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(num/den per common round (round medians), each round's process), or None when fewer
    than MIN_PAIRED_ROUNDS rounds are shared."""
    if not num_rounds or not den_rounds or len(num_rounds) != len(num) or len(den_rounds) != len(den):
        return None
    a, b = _round_medians(num, num_rounds), _round_medians(den, den_rounds)
    common = sorted(set(a) & set(b))
    if len(common) < MIN_PAIRED_ROUNDS:
        return None
    return np.array([a[r] / b[r] for r in common]), np.array([r // PROCESS_ROUNDS for r in common])


def _processes_of(rounds, n: int) -> np.ndarray:
    """Each of n samples' process (its round // PROCESS_ROUNDS); all 0 without one round per sample."""
    if not rounds or len(rounds) != n:
        return np.zeros(n, dtype=np.int64)
    return np.asarray(rounds, dtype=np.int64) // PROCESS_ROUNDS


class _Term:
    """One ratio's data for the bootstrap: one array of per-round ratios (paired), or the
    numerator's and denominator's samples (unpaired). `groups`: for each array of `data`, each
    value's process, where the values come from more than one (else None): unpaired samples of a
    --processes run (--order blocked, or too few shared rounds) resample their processes too."""

    def __init__(self, num, den, num_rounds=(), den_rounds=(), paired: bool = True):
        r = _per_round_ratios(num, num_rounds, den, den_rounds) if paired else None
        self.paired = r is not None
        self.data = (r[0],) if r is not None else (np.asarray(num, float), np.asarray(den, float))
        groups = (r[1],) if r is not None else (_processes_of(num_rounds, len(num)),
                                                 _processes_of(den_rounds, len(den)))
        self.groups = groups if any(len(np.unique(g)) > 1 for g in groups) else None

    def stat(self, *arrays, axis=-1):
        if self.paired:
            return np.median(arrays[0], axis=axis)
        return np.median(arrays[0], axis=axis) / np.median(arrays[1], axis=axis)


def _two_level_medians(values: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """N_RESAMPLES bootstrap medians of per-round values measured in several processes, resampled
    on two levels: the processes with replacement, then each drawn process's rounds with
    replacement (scipy's bootstrap resamples one level). The spread between processes, which one
    process's rounds cannot show, is then in the interval. Vectorized as counts: a process drawn
    k times contributes k x its m rounds drawn uniformly, i.e. a multinomial of k*m over them;
    the median of each resample is the weighted median of the sorted values."""
    ids, gi = np.unique(groups, return_inverse=True)
    order = np.argsort(values, kind="stable")
    v, gi = values[order], gi[order]
    cols = [np.flatnonzero(gi == g) for g in range(len(ids))]

    def medians(m: int) -> np.ndarray:      # m resamples
        picks = rng.integers(0, len(ids), size=(m, len(ids)))
        w = np.zeros((m, len(v)), dtype=np.int64)
        for g, c in enumerate(cols):
            k = (picks == g).sum(axis=1) * len(c)
            w[:, c] = rng.multinomial(k, np.full(len(c), 1.0 / len(c)))
        cs = np.cumsum(w, axis=1)
        total = cs[:, -1:]
        lo = np.argmax(cs > (total - 1) // 2, axis=1)
        hi = np.argmax(cs > total // 2, axis=1)
        return (v[lo] + v[hi]) / 2
    return _in_batches(len(v), medians)


def _in_batches(values_per_resample: int, draw) -> np.ndarray:
    """draw(m) for m resamples at a time, N_RESAMPLES in all, concatenated: about BATCH_VALUES
    resampled values in memory at once."""
    step = max(1, BATCH_VALUES // max(1, values_per_resample))
    return np.concatenate([draw(min(step, N_RESAMPLES - i)) for i in range(0, N_RESAMPLES, step)])


def _bootstrap(terms: Sequence[_Term], combine) -> tuple[float, float, float]:
    if any(t.groups is not None for t in terms):
        return _bootstrap_processes(terms, combine)
    data = [a for t in terms for a in t.data]
    sizes = [len(t.data) for t in terms]

    def statistic(*arrays, axis=-1):
        vals, i = [], 0
        for t, n in zip(terms, sizes):
            vals.append(t.stat(*arrays[i:i + n], axis=axis))
            i += n
        return combine(np.stack(vals))
    point = float(statistic(*data))
    if all(np.ptp(a) == 0 for a in data) or any(len(a) < 2 for a in data):
        return point, point, point        # nothing to resample: the interval is the point
    res = stats.bootstrap(data, statistic, n_resamples=N_RESAMPLES, confidence_level=CONFIDENCE,
                          method="percentile", vectorized=True, paired=False,
                          batch=max(1, BATCH_VALUES // sum(len(a) for a in data)), rng=np.random.default_rng(0))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return point, min(lo, point), max(hi, point)


def _bootstrap_processes(terms: Sequence[_Term], combine) -> tuple[float, float, float]:
    """`_bootstrap` where some term's rounds come from several processes: those terms resampled
    on two levels (`_two_level_medians`: per-round ratios, or unpaired the numerator's and the
    denominator's samples each), the others' arrays as scipy's bootstrap does (each resampled
    with replacement); percentile interval, as there."""
    rng = np.random.default_rng(0)
    point = float(combine(np.stack([t.stat(*t.data) for t in terms])))
    stats_ = []
    for t in terms:
        if t.groups is not None:
            meds = [_two_level_medians(a, g, rng) for a, g in zip(t.data, t.groups)]
            stats_.append(meds[0] if t.paired else meds[0] / meds[1])
        else:
            stats_.append(_in_batches(sum(len(a) for a in t.data), lambda m, t=t: t.stat(
                *(a[rng.integers(0, len(a), size=(m, len(a)))] for a in t.data), axis=-1)))
    dist = combine(np.stack(stats_))
    alpha = (1 - CONFIDENCE) / 2
    lo, hi = (float(v) for v in np.quantile(dist, [alpha, 1 - alpha]))
    return point, min(lo, point), max(hi, point)


def ratio(num: Sequence[float], den: Sequence[float], num_rounds: Sequence[int] = (),
          den_rounds: Sequence[int] = (), *, paired: bool = True) -> Ratio:
    """median(num) / median(den) with a 95% bootstrap interval; paired by round when both carry
    the same rounds (`paired` and at least MIN_PAIRED_ROUNDS shared): then the median of
    per-round ratios."""
    t = _Term(num, den, num_rounds, den_rounds, paired)
    v, lo, hi = _bootstrap([t], lambda m: m[0])
    return Ratio(v, lo, hi, t.paired)


def geomean_ratio(parts: Sequence[tuple]) -> Optional[Ratio]:
    """The geometric mean of several ratios with a 95% bootstrap interval (each ratio's data
    resampled independently). `parts`: (num, den, num_rounds, den_rounds, paired) per ratio."""
    if not parts:
        return None
    terms = [_Term(*p) for p in parts]
    v, lo, hi = _bootstrap(terms, lambda m: np.exp(np.mean(np.log(m), axis=0)))
    return Ratio(v, lo, hi, all(t.paired for t in terms))

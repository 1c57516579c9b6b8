import math
import time

import numpy as np
import pytest
import torch

from mamba_decoder.bench.timing import mann_whitney_u, summarize, time_callable


def test_summarize_values():
    s = summarize([1.0, 2.0, 3.0, 4.0, 10.0])
    assert s.mean == pytest.approx(4.0)
    assert s.median == pytest.approx(3.0)
    assert s.std == pytest.approx(np.std([1, 2, 3, 4, 10], ddof=1))
    assert s.iqr == pytest.approx(4.0 - 2.0)
    assert s.p10 == pytest.approx(1.4) and s.p90 == pytest.approx(7.6)
    assert s.high_spread   # IQR 2 / median 3 > 10%
    assert not summarize([10.0, 10.1, 10.2, 10.0]).high_spread


def test_summarize_rejects_empty_and_nan():
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        summarize([1.0, float("nan")])


def test_runs_and_warmup_counted():
    calls = []
    samples = time_callable(lambda: calls.append(1), warmup=3, runs=7)
    assert len(samples) == 7 and len(calls) == 10
    assert all(s >= 0 for s in samples)


def test_min_time_repeats_until_budget():
    samples = time_callable(lambda: time.sleep(0.005), warmup=0, runs=2, min_time_s=0.1)
    assert len(samples) >= 2
    assert sum(samples) >= 100.0            # both conditions met: >= 2 runs and >= 0.1 s
    assert len(samples) <= 25               # and it stops soon after the budget


def test_before_timing_runs_once_after_warmup():
    log = []
    time_callable(lambda: log.append("run"), warmup=2, runs=2, before_timing=lambda: log.append("reset"))
    assert log == ["run", "run", "reset", "run", "run"]


def test_timer_agrees_with_torch_benchmark_timer():
    """Median of our timer within 5% of torch.utils.benchmark.Timer's on the same ~5-20 ms callable.

    Single-threaded (both timers run it at one thread) and interleaved run by run, so a load spike
    from another process hits both timers alike; retried once.
    """
    from torch.utils.benchmark import Timer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(256, 256)
        reps = 1
        while True:   # size the callable to ~8 ms here (min of 3: robust to a loaded machine)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(reps):
                    a @ a
                times.append((time.perf_counter() - t0) * 1e3)
            ms = min(times)
            if ms >= 6 or reps >= 4096:
                break
            reps = max(reps * 2, int(reps * 8 / max(ms, 1e-3)))

        def work():
            for _ in range(reps):
                a @ a
        timer = Timer(stmt="work()", globals={"work": work}, num_threads=1)
        for attempt in range(2):
            ours, theirs = [], []
            time_callable(work, warmup=3, runs=1)
            for _ in range(40):
                ours += time_callable(work, warmup=0, runs=1)
                theirs.append(timer.timeit(1).median * 1e3)
            ratio = float(np.median(ours)) / float(np.median(theirs))
            if abs(ratio - 1) < 0.05:
                return
        pytest.fail(f"medians disagree: ours {np.median(ours):.3f} ms vs torch Timer "
                    f"{np.median(theirs):.3f} ms (callable of {reps} matmuls)")
    finally:
        torch.set_num_threads(threads)


def test_mann_whitney_identical_samples():
    u, p = mann_whitney_u([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0])
    assert u == pytest.approx(8.0) and p == pytest.approx(1.0)
    assert mann_whitney_u([5.0] * 6, [5.0] * 6)[1] == 1.0   # all tied


def test_mann_whitney_known_values():
    # x = 1..3, y = 4..6: U = 0, mu = 4.5, sigma^2 = 9*7/12, continuity-corrected z = 4/sqrt(5.25)
    u, p = mann_whitney_u([1, 2, 3], [4, 5, 6])
    assert u == 0.0
    assert p == pytest.approx(math.erfc(4 / math.sqrt(5.25) / math.sqrt(2)), rel=1e-12)
    assert p == pytest.approx(0.0809, abs=5e-4)
    # with ties: x = [1, 2, 2], y = [2, 3, 4]; ranks 1, 3, 3 | 3, 5, 6 -> U1 = 7 - 6 = 1
    # tie term: t=3 -> (27-3)/(6*5) = 0.8; sigma^2 = 9/12 * (7 - 0.8) = 4.65; z = (4.5 - 1 - 0.5)/sqrt(4.65)
    u, p = mann_whitney_u([1, 2, 2], [2, 3, 4])
    assert u == 1.0
    assert p == pytest.approx(math.erfc(3 / math.sqrt(4.65) / math.sqrt(2)), rel=1e-12)


def test_mann_whitney_fully_separated_is_tiny():
    rng = np.random.default_rng(0)
    x, y = rng.uniform(1, 2, 30), rng.uniform(3, 4, 30)
    u, p = mann_whitney_u(x, y)
    assert u == 0 and p < 1e-9
    assert mann_whitney_u(y, x)[0] == 900 and mann_whitney_u(y, x)[1] == pytest.approx(p)


# ---------------------------------------------------------------- interleaved rounds (issue 14)
def test_time_interleaved_is_round_robin_with_calibration_between_rounds():
    from mamba_decoder.bench.timing import time_interleaved

    log = []
    fns = [lambda n=n: log.append(n) for n in "ab"]
    timed, cal = time_interleaved(fns, warmup=2, runs=5, runs_per_round=2,
                                  calibrate=lambda: log.append("cal") or 1.0)
    # each round starts one callable further on: none is always the first after the calibration
    assert log == ["a", "a", "b", "b"] + ["cal", "a", "a", "b", "b"] + ["cal", "b", "b", "a", "a"] + ["cal", "a", "b"]
    assert cal == [1.0, 1.0, 1.0]
    for t in timed:
        assert t.error is None and len(t.samples) == 5 and t.rounds == [0, 0, 1, 1, 2]


def test_time_interleaved_rewarms_short_calls_each_round_and_not_long_ones():
    import time as _time

    from mamba_decoder.bench.timing import time_interleaved

    log = []

    def short():
        log.append("s")

    def long():
        log.append("l")
        _time.sleep(0.03)
    timed, _ = time_interleaved([short, long], warmup=1, runs=4, runs_per_round=2, rewarm_below_ms=20.0,
                                calibrate=lambda: log.append("|") or 1.0)
    # warm-up s, l; round 0: s (untimed) s s, l l; round 1 starts with l: l l, s (untimed) s s
    assert log == ["s", "l", "|", "s", "s", "s", "l", "l", "|", "l", "l", "s", "s", "s"]
    assert [len(t.samples) for t in timed] == [4, 4]
    log.clear()
    time_interleaved([short], warmup=0, runs=2, runs_per_round=1, rewarm_below_ms=20.0)
    assert log == ["s", "s"]   # no warm-up asked for: no untimed calls either


def test_time_interleaved_rewarm_goes_by_the_steady_warm_up_calls_not_the_first():
    """A short call whose first call pays a one-time cost (a Triton JIT, torch.compile, a cuBLAS
    or oneDNN set-up) is still a short call: it is re-warmed like the others, else the re-warm
    would fall on one backend of a pair and not the other."""
    import time as _time

    from mamba_decoder.bench.timing import time_interleaved

    log = []

    def jitted():
        if not log:
            _time.sleep(0.3)          # the first call compiles
        log.append("j")
    time_interleaved([jitted], warmup=5, runs=2, runs_per_round=2, rewarm_below_ms=20.0)
    assert log == ["j"] * 5 + ["j", "j", "j"]   # warm-up, then per round: one untimed, two timed


def test_time_interleaved_keeps_going_without_the_one_that_fails():
    from mamba_decoder.bench.timing import time_interleaved

    calls = []

    def bad():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
    timed, _ = time_interleaved([bad, lambda: None], warmup=0, runs=6, runs_per_round=2)
    assert isinstance(timed[0].error, RuntimeError) and len(calls) == 3
    assert timed[1].error is None and len(timed[1].samples) == 6


def test_paired_ratio_cancels_drift_that_an_unpaired_one_cannot():
    import numpy as np

    from mamba_decoder.bench.timing import ratio

    rng = np.random.default_rng(1)
    drift = np.repeat(rng.uniform(1, 8, 10), 2)           # the machine's speed, per round of 2 runs
    rounds = list(np.repeat(np.arange(10), 2))
    base = list(2.0 * drift * rng.uniform(0.98, 1.02, 20))
    model = list(1.0 * drift * rng.uniform(0.98, 1.02, 20))
    paired = ratio(base, model, rounds, rounds)
    unpaired = ratio(base, model, rounds, rounds, paired=False)
    assert paired.paired and not unpaired.paired
    assert paired.lo <= paired.value <= paired.hi and abs(paired.value - 2.0) < 0.05
    assert paired.hi - paired.lo < 0.1 and unpaired.hi - unpaired.lo > 1.0
    assert not paired.crosses_one


def test_geomean_ratio_and_its_interval():
    from mamba_decoder.bench.timing import geomean_ratio

    g = geomean_ratio([([2.0, 2.1, 1.9, 2.0], [1.0, 1.0, 1.05, 0.95], (), (), False),
                       ([8.0, 8.2, 7.8, 8.0], [1.0, 1.0, 1.05, 0.95], (), (), False)])
    assert abs(g.value - 4.0) < 0.1 and g.lo <= g.value <= g.hi and 3.0 < g.lo and g.hi < 5.0
    assert geomean_ratio([]) is None


def test_drift_of_the_calibration_kernel():
    from mamba_decoder.bench.timing import drift

    assert drift([1.0]) == 0.0 and drift([1.0, 1.0, 1.0]) == 0.0
    assert abs(drift([1.0, 1.0, 1.5]) - 0.5) < 1e-12


def test_too_few_rounds_are_not_paired():
    from mamba_decoder.bench.timing import MIN_PAIRED_ROUNDS, ratio

    n = MIN_PAIRED_ROUNDS - 1
    rounds = list(range(n))
    r = ratio([2.0, 2.2, 1.8, 2.1][:n], [1.0, 1.1, 0.9, 1.0][:n], rounds, rounds)
    assert not r.paired and r.lo <= r.value <= r.hi
    rounds = list(range(MIN_PAIRED_ROUNDS))
    assert ratio([2.0] * MIN_PAIRED_ROUNDS, [1.0] * MIN_PAIRED_ROUNDS, rounds, rounds).paired


# ---------------------------------------------------------------- several processes (--processes)
def _three_processes(medians=(1.0, 1.05, 1.10), rounds_each=8, seed=2):
    """Per-round ratios num/den from three processes, each round's ratio its process's median
    times 1 +- 0.2%: the spread is between processes, not within one."""
    import numpy as np

    from mamba_decoder.bench.timing import PROCESS_ROUNDS

    rng = np.random.default_rng(seed)
    num, rounds = [], []
    for p, m in enumerate(medians):
        num += list(m * rng.uniform(0.998, 1.002, rounds_each))
        rounds += [p * PROCESS_ROUNDS + r for r in range(rounds_each)]
    return num, [1.0] * len(num), rounds


def test_an_interval_over_processes_covers_the_spread_between_them():
    """Rounds from three processes whose medians are 1.00, 1.05 and 1.10: the two-level bootstrap
    (processes, then rounds) gives an interval from about 1.00 to 1.10, holding every process's
    median; the same values read as one process's rounds give one that misses the last process's
    1.10 (what a rerun in that machine state lands on)."""
    from mamba_decoder.bench.timing import ratio

    num, den, rounds = _three_processes()
    r = ratio(num, den, rounds, rounds)
    assert r.paired and r.lo <= 1.003 and r.hi >= 1.097 and r.lo <= r.value <= r.hi
    one = ratio(num, den, list(range(len(num))), list(range(len(num))))
    assert one.hi < 1.08 and abs(one.value - 1.05) < 0.005


def test_two_level_medians_of_one_process_match_scipys_bootstrap():
    """With the rounds of one process drawn as one group, the two-level resampling is the plain
    bootstrap: its median's 2.5% and 97.5% quantiles agree with scipy's to within one value."""
    import numpy as np
    from scipy import stats

    from mamba_decoder.bench.timing import CONFIDENCE, N_RESAMPLES, _two_level_medians

    rng = np.random.default_rng(3)
    v = np.sort(rng.lognormal(0, 0.3, 41))
    meds = _two_level_medians(v, np.zeros(41, dtype=int), np.random.default_rng(0))
    ref = stats.bootstrap((v,), np.median, n_resamples=N_RESAMPLES, confidence_level=CONFIDENCE,
                          method="percentile", rng=np.random.default_rng(0)).confidence_interval
    q = np.quantile(meds, [0.025, 0.975])
    step = np.diff(v).max()
    assert meds.shape == (N_RESAMPLES,) and set(np.round(meds, 12)) <= set(np.round(v, 12))   # odd n: a value
    assert abs(q[0] - ref.low) <= step and abs(q[1] - ref.high) <= step


def test_geomean_over_processes_is_wider_than_over_rounds():
    from mamba_decoder.bench.timing import geomean_ratio

    num, den, rounds = _three_processes()
    flat = list(range(len(num)))
    g = geomean_ratio([(num, den, rounds, rounds, True)] * 2)
    g1 = geomean_ratio([(num, den, flat, flat, True)] * 2)
    assert g.lo <= 1.01 and g.hi >= 1.09 and g1.hi < 1.08


def test_unpaired_ratios_of_processes_runs_resample_the_processes_too():
    """--order blocked (each config its own rounds_id) and configs with fewer than
    MIN_PAIRED_ROUNDS shared rounds are unpaired; their samples still come from several
    processes, and the interval must cover every process's value as the paired one does (the
    banner and README say every interval resamples the processes). One level over the pooled
    samples gave [1.00, 1.075] for processes at 1.00, 1.05 and 1.10."""
    from mamba_decoder.bench.timing import PROCESS_ROUNDS, geomean_ratio, ratio

    num, den, rounds = _three_processes()
    blocked = ratio(num, den, rounds, rounds, paired=False)
    assert not blocked.paired and blocked.lo <= 1.003 and blocked.hi >= 1.097
    few = [p * PROCESS_ROUNDS for p in range(3) for _ in range(8)]     # one round per process: 3 < 5 shared
    r = ratio(num, den, few, few)
    assert not r.paired and r.lo <= 1.003 and r.hi >= 1.097
    g = geomean_ratio([(num, den, rounds, rounds, False)] * 2)
    assert g.lo <= 1.01 and g.hi >= 1.09
    flat = list(range(len(num)))                                      # one process: one level, as before
    assert ratio(num, den, flat, flat, paired=False).hi < 1.08


def test_bootstraps_draw_their_resamples_in_batches(monkeypatch):
    """Every bootstrap holds about BATCH_VALUES resampled values at once: a geometric mean over 8
    configs of 10 000 samples (--min-time) drew 2000 x 160 000 at once (2.95 GB peak RSS; 0.39
    GB batched). Here with a small budget: scipy's path gets its batch, the processes' path and
    the two-level medians draw in steps, and the interval stays that of the unbatched draw."""
    from mamba_decoder.bench import timing

    rng = np.random.default_rng(1)
    parts = [(list(rng.lognormal(0, 0.1, 400)), list(rng.lognormal(0.1, 0.1, 400)), [], [], False)
             for _ in range(3)]
    rounds = [j // 2 + (timing.PROCESS_ROUNDS if j >= 200 else 0) for j in range(400)]
    procs = [(a, b, rounds, rounds, True) for a, b, _, _, _ in parts]
    whole = [timing.geomean_ratio(parts), timing.geomean_ratio(procs)]
    monkeypatch.setattr(timing, "BATCH_VALUES", 5000)
    batches, real_boot, real_in = [], timing.stats.bootstrap, timing._in_batches
    monkeypatch.setattr(timing.stats, "bootstrap", lambda *a, **k: batches.append(k["batch"]) or real_boot(*a, **k))

    def spy(n, draw):
        return real_in(n, lambda m: batches.append(m * n) or draw(m))
    monkeypatch.setattr(timing, "_in_batches", spy)
    batched = [timing.geomean_ratio(parts), timing.geomean_ratio(procs)]
    assert batches[0] == 5000 // 2400 and all(v <= 5000 for v in batches[1:]) and len(batches) > 10
    for w, b in zip(whole, batched):
        assert b.value == w.value and abs(b.lo - w.lo) < 0.25 * (w.hi - w.lo) and abs(b.hi - w.hi) < 0.25 * (w.hi - w.lo)

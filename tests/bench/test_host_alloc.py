"""The host allocator setting (bench/host_alloc.py): with `retain`, a CPU forward's large buffers
are reused instead of faulting in afresh on every call; `system` keeps glibc's behaviour."""
from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from mamba_decoder.bench import host_alloc
from mamba_decoder.bench.settings import SweepSettings

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="mallopt is glibc's")

# In a fresh process (the setting is process-wide): allocate, touch and free a 64 MiB tensor a few
# times, then count the minor page faults of one more allocate-touch-free.
_PROBE = textwrap.dedent("""
    import resource, sys
    import torch
    from mamba_decoder.bench import host_alloc
    print(host_alloc.apply(sys.argv[1]), file=sys.stderr)
    def once():
        t = torch.empty(16 * 1024 * 1024)   # 64 MiB of fp32
        t.fill_(1.0)
        del t
    for _ in range(3):
        once()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    once()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
""")


def _faults(choice: str) -> int:
    p = subprocess.run([sys.executable, "-c", _PROBE, choice], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return int(p.stdout.strip())


@glibc
def test_retain_reuses_a_freed_64_mib_buffer_and_system_faults_it_in_again():
    pages = 64 * 1024 * 1024 // 4096
    assert _faults("retain") < pages // 20          # reused: (almost) no page faults
    assert _faults("system") > pages * 9 // 10      # mapped afresh: every page faults in


@glibc
def test_apply_switches_both_ways_and_says_what_is_in_effect():
    try:
        assert host_alloc.apply("retain").startswith("retain (glibc")
        host_alloc.release()
        assert host_alloc.apply("system").startswith("system (glibc")
    finally:
        host_alloc.apply(host_alloc.DEFAULT)


def test_a_bad_choice_is_refused_in_one_line():
    with pytest.raises(ValueError, match="host allocator 'jemalloc' is not one of: 'retain', 'system'"):
        host_alloc.apply("jemalloc")
    with pytest.raises(ValueError) as e:
        SweepSettings(host_allocator="jemalloc")
    assert "host allocator" in str(e.value) and "'retain', 'system'" in str(e.value)


@glibc
def test_each_configs_host_peak_is_its_own_with_retain(tmp_path, capsys):
    """Configs of one shape are timed in interleaved rounds: with retain, what one config freed
    stays resident while the next runs, so the timed blocks' VmHWM of a small config held a large
    one's buffers (the fast scan's record showed the reference scan's peak, 1007 MB against 581 MB
    with system at dim 256 B2 L1024). Each config's host peak is its own call's."""
    import json

    from .conftest import run

    argv = ["run", "--dim", "64", "--seq-lens", "1024", "--batch-sizes", "2", "--models", "Regular Mamba",
            "--backend", "reference", "fast", "--runs", "2", "--warmup", "1", "--no-cuda", "--no-progress",
            "--no-plots", "--threads", "2", "--output-dir", str(tmp_path / "out")]
    try:
        code, _, err = run(argv, capsys)
    finally:
        host_alloc.apply(host_alloc.DEFAULT)
    assert code == 0, err
    peak = {r["backend"]: r["host_peak_rss_mb"] for r in map(json.loads, (tmp_path / "out" / "results.jsonl").open())}
    if None in peak.values():
        pytest.skip("no /proc/self/clear_refs: no host peak")
    # the reference scan's (B, L, ED, N) temporaries: (4 B L + 2 B L) ED N 4 bytes = 48 MiB here
    assert peak["fast"] < peak["reference"] - 24, peak

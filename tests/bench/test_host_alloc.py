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

"""Energy and host memory of a timed region: `EnergyMeter` (start / stop around the timed runs).

  * CUDA: NVML's total-energy counter of the device (nvmlDeviceGetTotalEnergyConsumption, mJ
    since the driver loaded; nvidia-ml-py, the optional extra `energy`, imported when first
    used). The whole GPU's energy, idle power included, over the region.
  * CPU: RAPL's package counters (/sys/class/powercap/intel-rapl:N/energy_uj, which also
    reads AMD packages on Linux) where this process may read them: the whole package,
    every process on it included. Where none can be read, no figure (None): never a guess.
  * Peak resident memory of the region (Linux): the process's high-water mark (VmHWM) reset at
    the start (/proc/self/clear_refs) and read at the end; None where it cannot be reset.

The counters move in coarse steps (NVML about every 10-100 ms, RAPL about every 1 ms). So the
suite reads them around one window of back-to-back calls of a config, `ENERGY_WINDOW_S` long, after
its timed rounds (`energy_window`), never around the rounds' blocks of two calls: each such block
saw either none or a whole step of the counter, and a step can hold energy spent between blocks
(an H100 run summed that way gave 110 W and 1385 W for one 700 W card).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

RAPL_ROOT = Path("/sys/class/powercap")
# The energy window of a config: long enough for a hundred steps of NVML's counter at its coarsest.
ENERGY_WINDOW_S = 2.0


@dataclass
class EnergyReading:
    joules: Optional[float]          # energy of the region; None: no counter could be read
    seconds: float                   # wall time of the region
    source: Optional[str]            # "nvml" or "rapl"
    peak_rss_mb: Optional[float]     # host resident memory high-water mark of the region

    @property
    def watts(self) -> Optional[float]:
        return self.joules / self.seconds if self.joules is not None and self.seconds > 0 else None


def _nvml_handle(device: torch.device):
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        try:   # NVML numbers devices without CUDA_VISIBLE_DEVICES: find ours by its PCI address
            p = torch.cuda.get_device_properties(index)
            bus = f"{p.pci_domain_id:08x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
            return pynvml.nvmlDeviceGetHandleByPciBusId(bus)
        except (AttributeError, pynvml.NVMLError):
            return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # noqa: BLE001 -- no NVML here (no driver, a container without it): no figure
        return None


def _rapl_domains() -> list[Path]:
    """The package-level RAPL counters this process can read (intel-rapl:0, intel-rapl:1, ...)."""
    out = []
    for d in sorted(RAPL_ROOT.glob("intel-rapl:*")):
        if d.name.count(":") == 1 and (d / "energy_uj").is_file():
            try:
                int((d / "energy_uj").read_text())
                out.append(d)
            except (OSError, ValueError):
                pass
    return out


def _rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")   # 5: reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def _rss_peak_mb() -> Optional[float]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class EnergyMeter:
    """`start()` before the timed region, `stop()` after it (on CUDA once the device is idle:
    the timer synchronizes) -> EnergyReading."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._nvml = _nvml_handle(self.device) if self.device.type == "cuda" else None
        self._rapl = _rapl_domains() if self.device.type == "cpu" else []
        self._start: Optional[list[int]] = None
        self._rss = False
        self._t0 = 0.0

    @property
    def available(self) -> bool:
        """Whether a counter (NVML or RAPL) can be read here."""
        return self._nvml is not None or bool(self._rapl)

    def _read(self) -> Optional[list[int]]:
        try:
            if self._nvml is not None:
                import pynvml
                return [pynvml.nvmlDeviceGetTotalEnergyConsumption(self._nvml)]   # mJ
            if self._rapl:
                return [int((d / "energy_uj").read_text()) for d in self._rapl]  # uJ
        except Exception:  # noqa: BLE001 -- a counter that stops answering gives no figure
            return None
        return None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._rss = _rss_reset()
        self._start = self._read()
        self._t0 = time.perf_counter()

    def stop(self) -> EnergyReading:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self._t0
        end = self._read()
        joules, source = None, None
        if self._start is not None and end is not None and len(end) == len(self._start):
            if self._nvml is not None:
                joules, source = (end[0] - self._start[0]) / 1e3, "nvml"
            else:
                try:
                    total = 0
                    for d, a, b in zip(self._rapl, self._start, end):
                        if b < a:   # the counter wrapped
                            b += int((d / "max_energy_range_uj").read_text())
                        total += b - a
                    joules, source = total / 1e6, "rapl"
                except (OSError, ValueError):   # the wrap's range unreadable: no figure, never a guess
                    joules, source = None, None
        return EnergyReading(joules, seconds, source, _rss_peak_mb() if self._rss else None)


def energy_window(fn, device: torch.device | str, seconds: float = ENERGY_WINDOW_S,
                  meter: Optional[EnergyMeter] = None) -> tuple[EnergyReading, int]:
    """(reading, calls): `fn()` called back to back for at least `seconds` (host time; on CUDA the
    queue then drains before the counter is read, so the device ran about as long), between one
    counter read each side."""
    meter = meter or EnergyMeter(device)
    meter.start()
    calls, t0 = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
    return meter.stop(), calls


def energy_fields(e: EnergyReading, calls: int, tokens_per_call: Optional[int]) -> dict:
    """A record's energy fields from the reading of `calls` calls (`energy_window`; None where unmeasured)."""
    per_call = e.joules / calls if e.joules is not None and calls else None
    return dict(energy_j=e.joules, energy_per_call_j=per_call,
                energy_per_token_j=per_call / tokens_per_call if per_call is not None and tokens_per_call else None,
                avg_power_w=e.watts, energy_source=e.source, host_peak_rss_mb=e.peak_rss_mb)

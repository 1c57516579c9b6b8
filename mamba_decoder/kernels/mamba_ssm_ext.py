"""mamba_ssm (state-spaces/mamba) and causal_conv1d, optional: whether they import here, and the
one message that says how to get them. The package never needs them; `backend="mamba_ssm"` runs
the Mamba mixer through them on this project's parameters (models/mamba.py)."""
from __future__ import annotations

import functools

INSTALL_HINT = ("backend 'mamba_ssm' needs the mamba_ssm and causal_conv1d CUDA extensions: "
                "pip install mamba-ssm causal-conv1d --no-build-isolation (on a CUDA machine, "
                "with your CUDA build of torch installed first)")


@functools.lru_cache(maxsize=None)
def import_error() -> str | None:
    """None when mamba_ssm's Mamba, its selective-scan extension and causal_conv1d all import;
    else why not (the first failing import)."""
    try:
        import causal_conv1d  # noqa: F401
        import selective_scan_cuda  # noqa: F401
        from mamba_ssm.modules.mamba_simple import Mamba  # noqa: F401
    except Exception as e:  # noqa: BLE001 -- an extension built for another torch raises OSError etc.
        return f"{type(e).__name__}: {e}"
    return None


def require(device=None) -> None:
    """Raise ValueError (the install hint and the cause) unless mamba_ssm runs here; it runs on
    CUDA only."""
    err = import_error()
    if err is not None:
        raise ValueError(f"{INSTALL_HINT} ({err})")
    if device is not None and getattr(device, "type", str(device).split(":")[0]) != "cuda":
        raise ValueError(f"backend 'mamba_ssm' runs on CUDA only (got device {device})")

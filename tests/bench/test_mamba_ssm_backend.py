"""backend="mamba_ssm" where mamba_ssm is absent (CI, any CPU machine): one clear error with the
install hint, exit 2 from the CLI; configs of models with no Mamba mixer are recorded as skipped.
Its numerics against the fast backend are tested on the card (tests/gpu/test_mamba_ssm.py)."""
import pytest

from mamba_decoder import MambaConfig
from mamba_decoder.bench.results import read_jsonl
from mamba_decoder.config import BACKENDS, rest_backend
from mamba_decoder.kernels import mamba_ssm_ext
from mamba_decoder.models import MambaDecoderBlock, MLABlock, RegularMamba
from mamba_decoder.models.mamba import MambaMixer

from .conftest import TINY, run

absent = pytest.mark.skipif(mamba_ssm_ext.import_error() is None, reason="mamba_ssm is installed here")


def test_backend_names():
    assert "mamba_ssm" in BACKENDS
    assert rest_backend("mamba_ssm") == "fast" and rest_backend("reference") == "reference"
    with pytest.raises(ValueError, match="backend='cuda'"):
        rest_backend("cuda")


@absent
@pytest.mark.parametrize("build", [
    lambda: MambaMixer(MambaConfig(d_model=32, n_layers=1), backend="mamba_ssm"),
    lambda: RegularMamba(MambaConfig(d_model=32, n_layers=1), backend="mamba_ssm"),
    lambda: MambaDecoderBlock(32, backend="mamba_ssm"),
], ids=["mixer", "regular", "block"])
def test_absent_mamba_ssm_is_one_error_with_the_install_hint(build):
    with pytest.raises(ValueError, match="pip install mamba-ssm causal-conv1d"):
        build()


def test_mla_block_has_no_mamba_ssm_part():
    with pytest.raises(ValueError, match="MLABlock has no Mamba mixer"):
        MLABlock(dim=32, n_heads=2, backend="mamba_ssm")


@absent
def test_cli_asking_for_absent_mamba_ssm_exits_2(tmp_path, capsys):
    code, out, err = run(["run", *TINY, "--backend", "fast", "mamba_ssm", "--no-plots",
                          "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "pip install mamba-ssm" in lines[0]
    assert "Traceback" not in out + err and not (tmp_path / "o" / "results.jsonl").exists()


def test_models_without_a_mamba_mixer_are_recorded_skipped(tmp_path, capsys, monkeypatch):
    """With mamba_ssm reported present, an MLABlock-only sweep on both backends: the fast configs
    run, the mamba_ssm ones are records with status skipped and the reason, and the run exits 0."""
    monkeypatch.setattr(mamba_ssm_ext, "require", lambda device=None: None)
    code, out, err = run(["run", *TINY, "--models", "MLABlock", "--backend", "fast", "mamba_ssm",
                          "--no-plots", "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 0, err
    recs = read_jsonl(tmp_path / "o" / "results.jsonl")
    by = {}
    for r in recs:
        by.setdefault(r.backend, []).append(r)
    assert all(r.ok for r in by["fast"]) and len(by["fast"]) == 4
    assert [r.status for r in by["mamba_ssm"]] == ["skipped"] * 4
    assert all("no Mamba mixer" in r.message and r.latency_ms is None for r in by["mamba_ssm"])
    assert "SKIPPED: MLABlock has no Mamba mixer" in out
    assert "4 skipped" in out

"""The README's Python snippets run as written, and the spec's modules install as top-level modules."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)


def test_readme_block_snippets_define_what_they_use_and_run():
    blocks = [b for b in _snippets() if "run_scaling_benchmarks" not in b]   # the sweep: test_cli runs it
    assert len(blocks) >= 2
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_spec_modules_are_installed_as_top_level_modules():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib")
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert set(cfg["tool"]["setuptools"]["py-modules"]) == {"benchmark_suite", "run_benchmark"}
    assert any(d.startswith("scipy") for d in cfg["project"]["dependencies"])

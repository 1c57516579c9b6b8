"""The package's import graph, read from its own source (function-local imports included).

- no cycle among the package's modules;
- kernels import no models and no suite code; the library (models, config) imports no suite code
  (directly or through another module);
- plots and reports import no model code, even indirectly (they draw saved records);
- `import mamba_decoder` loads neither matplotlib, tqdm nor triton, and the blocks build and run
  on the CPU with all three made unimportable.
"""
from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "mamba_decoder"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted((ROOT / PKG).rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """The package modules that `name` imports anywhere in its source (top level or in a function)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            # `from pkg import mod` imports the module pkg.mod where there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:   # `import mamba_decoder.x.y` -> its nearest module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _closure(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        for dep in GRAPH[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def _under(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_the_graph_is_read():
    assert f"{PKG}.bench.execute" in GRAPH[f"{PKG}.bench.cli"]   # a sanity check of the reader
    assert f"{PKG}.kernels.mamba_step" in GRAPH[f"{PKG}.models.mamba"]   # a function-local import


def test_no_import_cycle():
    try:
        graphlib.TopologicalSorter(GRAPH).prepare()
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


@pytest.mark.parametrize("layer,forbidden", [
    (f"{PKG}.kernels", (f"{PKG}.models", f"{PKG}.bench")),
    (f"{PKG}.models", (f"{PKG}.bench",)),
    (f"{PKG}.config", (f"{PKG}.models", f"{PKG}.bench")),
])
def test_layers_import_only_downwards(layer, forbidden):
    bad = {(m, d) for m in GRAPH if _under(m, layer) for d in _closure(m) if _under(d, *forbidden)}
    assert not bad, f"{layer} imports {sorted(bad)}"


@pytest.mark.parametrize("module", [f"{PKG}.bench.plots", f"{PKG}.bench.report"])
def test_plots_and_reports_import_no_model_code(module):
    model_code = (f"{PKG}.models", f"{PKG}.kernels", f"{PKG}.bench.registry", f"{PKG}.bench.runner",
                  f"{PKG}.bench.workloads", f"{PKG}.bench.flops")
    bad = sorted(d for d in _closure(module) if _under(d, *model_code))
    assert not bad, f"{module} imports model code: {bad}"


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_import_mamba_decoder_loads_no_matplotlib_tqdm_or_triton():
    # torch itself imports tqdm (torch.hub) when it is installed: what counts is what the package adds
    added = _python("import sys, torch; before = set(sys.modules); import mamba_decoder, mamba_decoder.models; "
                    "print(sorted({m.split('.')[0] for m in set(sys.modules) - before}))")
    for lib in ("matplotlib", "tqdm", "triton"):
        assert f"'{lib}'" not in added, added
    assert _python("import sys, mamba_decoder; print([m for m in ('matplotlib', 'triton') if m in sys.modules])") == "[]"


def test_the_blocks_run_without_matplotlib_tqdm_or_triton():
    code = """
import sys
for lib in ("matplotlib", "tqdm", "triton"):
    sys.modules[lib] = None          # `import lib` now raises ImportError
import torch
from mamba_decoder import MambaConfig, MambaDecoderBlock, MLABlock, MoEConfig, RegularMamba
x = torch.randn(2, 8, 32)
for backend in ("reference", "fast"):
    blocks = [RegularMamba(MambaConfig(d_model=32, n_layers=1), backend=backend),
              MambaDecoderBlock(32, MambaConfig(d_model=32, n_layers=1), MoEConfig(dim=32), backend=backend),
              MLABlock(dim=32, n_heads=2, n_experts=4, n_activated=2, backend=backend)]
    for b in blocks:
        assert b(x).shape == x.shape
print("ok")
"""
    assert _python(code) == "ok"

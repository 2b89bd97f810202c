"""The package layout holds what docs/ARCHITECTURE.md promises: stages import only down the pipeline,
no module imports itself back through others, files stay small, and old import paths still work."""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "distill"

# Pipeline order (docs/ARCHITECTURE.md): a stage may import the shared modules and earlier stages.
STAGES = [
    "losses",
    "models",
    "store",
    "train",
    "classifier",
    "evaluate",
    "workload",
    "route",
    "serve",
    "demos",
    "cli",
]
SHARED = {"data", "prices", "report", "metrics", "extras", "_compat"}
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every ``distill...`` module a file imports, at top level or inside functions."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("distill")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distill"):
            out.add(node.module)
            # `from distill import report` imports the module distill.report
            out |= {f"{node.module}.{a.name}" for a in node.names if node.module.count(".") < 2}
    return out


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


def test_stages_import_only_down_the_pipeline():
    wrong = []
    for name, path in MODULES.items():
        own = _stage(name)
        if own in (None, "__main__"):  # the root package re-exports; `python -m distill` is the CLI
            continue
        for imported in _imports(path):
            other = _stage(imported)
            if other is None or other == own or imported not in MODULES and other not in STAGES:
                continue
            if own in SHARED:
                if other not in SHARED:
                    wrong.append(f"{name} (shared) imports {imported}")
            elif other not in SHARED and STAGES.index(other) > STAGES.index(own):
                wrong.append(f"{name} ({own}) imports {imported} ({other} comes later)")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_modules():
    graph = {n: {i for i in _imports(p) if i in MODULES and i != n} for n, p in MODULES.items()}
    # A package's __init__ naming its own submodules lazily is not an import; only real imports count.
    state: dict[str, int] = {}
    cycles = []

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in graph[n]:
            if state.get(m) == 1:
                cycles.append(" -> ".join([*stack[stack.index(m) :], m]))
            elif m not in state:
                visit(m, [*stack, m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    # A package importing its own submodule from its __init__ (store) is a tree edge, not a cycle back.
    assert not cycles, "\n".join(cycles)


def test_small_files_and_few_loose_modules():
    long = {
        str(p.relative_to(SRC)): n
        for p in SRC.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines: {long}"
    loose = sorted(p.stem for p in SRC.glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert len(loose) <= 6, loose
    assert set(loose) <= SHARED


def test_every_stage_package_says_what_it_owns_and_may_import():
    for stage in STAGES:
        doc = ast.get_docstring(ast.parse((SRC / stage / "__init__.py").read_text())) or ""
        if stage in ("cli", "demos"):
            assert doc, stage
            continue
        assert "May import" in doc and "Owns" in doc, f"distill.{stage}: docstring lacks Owns / May import"


@pytest.mark.parametrize("old", sorted(importlib.import_module("distill._compat").MOVED))
def test_old_import_paths_resolve_to_the_moved_module(old):
    from distill._compat import MOVED

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    new = importlib.import_module(MOVED[old])
    assert module is new  # the same object: patching either name patches both
    assert new.__spec__.name == MOVED[old]  # the real module keeps its own spec
    assert any(issubclass(w.category, DeprecationWarning) and MOVED[old] in str(w.message) for w in seen) or (
        old in importlib.sys.modules  # already imported earlier in this session: no second warning
    )


def test_public_names_keep_working():
    import distill
    import distill.losses
    import distill.store

    for name in ("hinton_loss", "distill_classifier", "calibrate_temperature", "compare", "LOSSES"):
        assert callable(getattr(distill, name)) or isinstance(getattr(distill, name), dict)
    assert callable(distill.losses.fused_linear_kd_loss) and "forward_kl" in distill.losses.LOSSES
    assert callable(distill.store.open)
    from distill.config import TrainConfig  # old paths users may have
    from distill.routing import Router
    from distill.teachers.hf import HFTeacher

    from distill.cli import main
    from distill.train import train

    assert TrainConfig.__module__ == "distill.train.config" and Router.__module__ == "distill.route.router"
    assert HFTeacher.__module__ == "distill.models.hf" and callable(train) and callable(main)

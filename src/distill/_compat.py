"""Import plumbing: lazy package exports, and the old flat module paths kept working for this release.

Two jobs, both without importing anything heavy:

- `lazy_exports`: a package's ``__init__`` names its public objects and the submodule defining each;
  the submodule is imported on first use, so ``import distill.train`` does not pay for torch until
  a name that needs it is touched.
- `MOVED` and `install`: the modules that sat flat in ``distill/`` before the one-package-per-stage
  layout (``distill.config``, ``distill.routing``, ``distill.teachers.hf``, ...) are aliases of their
  new homes. ``import distill.config`` returns the very module object ``distill.train.config`` (not a
  copy), so monkeypatching either name patches both. Each old path warns once with a
  ``DeprecationWarning`` naming the new one. The table is listed in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable
from typing import Any

# old module path -> new module path (every old path that a user may have imported)
MOVED: dict[str, str] = {
    "distill.teachers": "distill.models",
    "distill.teachers.base": "distill.models.base",
    "distill.teachers.hf": "distill.models.hf",
    "distill.teachers.api": "distill.models.api",
    "distill.teachers.http": "distill.models.http",
    "distill.teachers.identity": "distill.models.identity",
    "distill.tiny": "distill.models.tiny",
    "distill._divergence": "distill.losses.divergence",
    "distill.sparse": "distill.losses.sparse",
    "distill.fused": "distill.losses.fused",
    "distill.store_writer": "distill.store.writer",
    "distill.generate": "distill.store.generate",
    "distill.config": "distill.train.config",
    "distill.lmdata": "distill.train.examples",
    "distill.vocab": "distill.train.vocab",
    "distill.checkpoint": "distill.train.checkpoint",
    "distill.distributed": "distill.train.distributed",
    "distill.trackers": "distill.train.trackers",
    "distill.classifier_metrics": "distill.classifier.metrics",
    "distill.runners": "distill.evaluate.runners",
    "distill.memprobe": "distill.evaluate.memprobe",
    "distill.eval_report": "distill.evaluate.report",
    "distill.embed": "distill.workload.embed",
    "distill.coverage": "distill.workload.coverage",
    "distill.scout": "distill.workload.scout",
    "distill.routing": "distill.route.router",
    "distill.route_fit": "distill.route.fit",
    "distill.serve_format": "distill.serve.format",
    "distill.serve_router": "distill.serve.routing",
    "distill.tasks": "distill.demos.tasks",
}


def lazy_exports(
    package: str, modules: dict[str, tuple[str, ...]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for a package whose public names live in submodules.

    ``modules``: defining module (dotted path relative to ``package``, e.g. ``"loop"``) -> the public
    names it defines. A name is imported on first access and then cached in the package's namespace,
    so later lookups are plain attributes.
    """
    namespace = sys.modules[package].__dict__
    exports = {name: f"{package}.{mod}" for mod, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__, sorted(exports)


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to the module now at its new path (the same object)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):  # noqa: D102
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):  # noqa: D102
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; the old path works for this release only",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(new)
        self._real_spec = module.__spec__
        return module

    def exec_module(self, module) -> None:  # noqa: D102
        # The import system stamped the alias's spec on the real module: give it its own back.
        module.__spec__ = self._real_spec


_FINDER = _MovedFinder()


def install() -> None:
    """Put the old-path finder first on ``sys.meta_path`` (idempotent)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)

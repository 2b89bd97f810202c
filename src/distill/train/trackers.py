"""Experiment trackers for `distill train`, through `accelerate`'s trackers (``--log-with``).

Where each tracker writes, when the user has not said otherwise:

- ``tensorboard``: event files under ``OUT/trackers/distill/`` (accelerate's ``logging_dir`` is
  ``OUT/trackers``, the run is named ``distill``); ``tensorboard --logdir OUT/trackers`` shows them.
- ``mlflow``: the run goes to ``MLFLOW_TRACKING_URI`` when that is set (a server, a database);
  otherwise to a local file store ``OUT/mlruns`` (experiment ``distill``), readable with
  ``mlflow ui --backend-store-uri OUT/mlruns`` or ``mlflow.MlflowClient(tracking_uri=...)``.
- the others (``wandb``, ``aim``, ...) are configured by their own environment variables.

``metrics.jsonl`` in ``OUT`` is always written; trackers receive the same values at the same steps.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from distill.extras import pip_command

PROJECT = "distill"
"""Project name given to ``accelerator.init_trackers``: TensorBoard's run directory, MLflow's experiment."""

# Package that must be importable for each tracker (any one of the tuple).
_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "comet_ml": ("comet_ml",)}
_PIP = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny"}


def logging_dir(out: str | Path) -> Path:
    """Directory given to accelerate as ``logging_dir`` (file-based trackers write below it)."""
    return Path(out) / "trackers"


def check_trackers(names: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the tracker when its package is not installed.

    accelerate drops an unavailable tracker with a log line and trains on; asking for one that
    cannot work is an error here instead, before any model is loaded.
    """
    for name in names:
        if not any(importlib.util.find_spec(m) for m in _MODULES.get(name, (name,))):
            pip = _PIP.get(name, name)
            raise ValueError(
                f"--log-with {name}: the {name!r} package is not installed (pip install {pip}, "
                f"or {pip_command('track')})"
            )


@contextmanager
def tracker_env(names: Sequence[str], out: str | Path) -> Iterator[None]:
    """Environment the trackers in ``names`` need while a run in ``out`` lasts; restored afterwards.

    MLflow without ``MLFLOW_TRACKING_URI`` would write ``./mlruns`` in the working directory, and
    MLflow 3 refuses its file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set: point it at
    ``OUT/mlruns`` and opt in, for this run only. A tracking URI the user set is left alone.
    """
    changes: dict[str, str] = {}
    if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
        changes["MLFLOW_TRACKING_URI"] = (Path(out).resolve() / "mlruns").as_uri()
        changes["MLFLOW_ALLOW_FILE_STORE"] = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "true")
    before = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


__all__ = ["PROJECT", "check_trackers", "logging_dir", "tracker_env"]

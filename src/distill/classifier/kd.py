"""Classic soft-label distillation of a classifier (Hinton et al., 2015).

The pieces, top to bottom:

- ``mlp`` builds a small multi-layer perceptron (``MLP``); ``save_classifier`` / ``load_classifier``
  store it as ``model.safetensors`` + ``config.json`` (no pickle);
- ``distill_classifier`` trains a student on a teacher's soft labels (``hinton_loss``);
  ``train_classifier`` trains on hard labels (the teacher itself, or the baseline student);
  both run the one training loop ``_train_loop``;
- measuring the result (``calibrate_temperature``, ``compare``) lives in `distill.classifier.metrics`.

Inputs are float feature matrices ``(n, d)`` (numpy arrays or tensors); labels are integer class ids
``(n,)``. Everything runs on CPU in float32 and is deterministic for a given seed.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses import hinton_loss

IGNORE_INDEX = -100
CONFIG_FORMAT = "distill.classifier/1"

# A teacher is a model, any callable from a float batch (B, d) to logits (B, C), or logits computed earlier.
TeacherLike = nn.Module | Callable[[Tensor], Tensor] | np.ndarray | Tensor


# --------------------------------------------------------------------------------------------- models


class MLP(nn.Sequential):
    """Linear -> ReLU (-> Dropout) -> ... -> Linear. ``sizes`` = [inputs, hidden..., classes]."""

    def __init__(self, sizes: Sequence[int], dropout: float = 0.0):
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or any(s <= 0 for s in sizes):
            raise ValueError(f"sizes must list >= 2 positive layer widths, got {list(sizes)}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
        super().__init__(*layers)
        self.sizes = sizes
        self.dropout = float(dropout)


def mlp(sizes: Sequence[int], *, dropout: float = 0.0, seed: int | None = None) -> MLP:
    """Build an ``MLP``; with ``seed`` its initial weights depend only on the seed (global RNG untouched)."""
    if seed is None:
        return MLP(sizes, dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP(sizes, dropout)


def count_parameters(model: Any) -> int | None:
    """Number of parameters of a ``torch.nn.Module``; ``None`` for any other callable."""
    if isinstance(model, nn.Module):
        return sum(p.numel() for p in model.parameters())
    return None


def save_classifier(model: MLP, path: str | Path) -> Path:
    """Save an ``MLP`` to directory ``path``: ``config.json`` (layer sizes) + ``model.safetensors``."""
    from safetensors.torch import save_file

    if not isinstance(model, MLP):
        raise ValueError(
            f"save_classifier saves distill MLPs (built by distill.classifier.mlp), got {type(model)}"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"format": CONFIG_FORMAT, "kind": "mlp", "sizes": model.sizes, "dropout": model.dropout}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_classifier(path: str | Path) -> MLP:
    """Load a classifier saved by ``save_classifier``; returned in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    config_path, weights_path = path / "config.json", path / "model.safetensors"
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"not a saved classifier: {p} is missing")
    from distill.data import read_document

    config = read_document(config_path, "classifier config")
    if config.get("format") != CONFIG_FORMAT or config.get("kind") != "mlp":
        raise ValueError(f"{config_path}: expected format {CONFIG_FORMAT!r} kind 'mlp', got {config}")
    model = MLP(config["sizes"], config.get("dropout", 0.0))
    model.load_state_dict(load_file(str(weights_path)))
    return model.eval()


# ----------------------------------------------------------------------------------------- validation


def _features(X: Any, name: str) -> Tensor:
    x = torch.as_tensor(np.asarray(X) if not isinstance(X, Tensor) else X)
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D array (rows, features), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows)")
    x = x.detach().to(torch.float32)
    bad = ~torch.isfinite(x).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        raise ValueError(f"{name} has NaN or infinite values in {len(rows)} rows (first: row {int(rows[0])})")
    return x


def _labels(y: Any, n: int, n_classes: int, name: str, allow_ignore: bool) -> Tensor:
    t = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) (one label per row), got {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must be integer class ids, got dtype {t.dtype}")
    t = t.to(torch.long)
    ok = (t >= 0) & (t < n_classes)
    if allow_ignore:
        ok |= t == IGNORE_INDEX
    if not bool(ok.all()):
        rows = (~ok).nonzero().flatten()
        allowed = f"[0, {n_classes - 1}]" + (f" or {IGNORE_INDEX}" if allow_ignore else "")
        raise ValueError(
            f"{name} must be in {allowed}; {len(rows)} rows are not (first: row {int(rows[0])} = {int(t[rows[0]])})"
        )
    return t


def _logits(z: Any, n: int | None, name: str) -> Tensor:
    t = torch.as_tensor(np.asarray(z) if not isinstance(z, Tensor) else z).detach().to(torch.float32)
    if t.dim() != 2 or (n is not None and t.shape[0] != n):
        rows = "n" if n is None else n
        raise ValueError(
            f"{name} must have shape ({rows}, C) (one row of logits per input), got {tuple(t.shape)}"
        )
    bad = ~torch.isfinite(t).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        raise ValueError(f"{name} has NaN or infinite logits in {len(rows)} rows (first: row {int(rows[0])})")
    return t


@torch.no_grad()
def predict_logits(model: Any, X: Any, *, batch_size: int = 1024, name: str = "model") -> Tensor:
    """Logits ``(n, C)`` of a module or callable on ``X`` ``(n, d)``, in eval mode (mode restored after)."""
    x = _features(X, "X")
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    try:
        out = torch.cat([torch.as_tensor(model(x[i : i + batch_size])) for i in range(0, len(x), batch_size)])
    finally:
        if was_training:
            model.train()
    return _logits(out, len(x), f"{name} output")


def _teacher_logits(teacher: TeacherLike, X: Tensor, name: str) -> Tensor:
    if isinstance(teacher, np.ndarray | Tensor):
        return _logits(teacher, len(X), name)
    if not callable(teacher):
        raise ValueError(
            f"{name} must be a torch.nn.Module, a callable or an (n, C) array, got {type(teacher)}"
        )
    # The teacher is frozen: run it once over the whole set, not once per epoch.
    return predict_logits(teacher, X, name=name)


# ----------------------------------------------------------------------------------------- training


def _train_loop(
    model: nn.Module,
    X: Tensor,
    *,
    labels: Tensor | None,
    teacher_logits: Tensor | None,
    temperature: float,
    alpha: float,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    X_val: Tensor | None,
    y_val: Tensor | None,
    val_teacher_logits: Tensor | None,
    progress: Any,
    description: str,
) -> dict[str, Any]:
    """The one training loop: Adam over shuffled mini-batches; soft (+hard) loss if teacher logits given.

    Returns the history: per epoch the mean training loss and, when validation data is given, the
    validation accuracy and top-1 agreement with the teacher.
    """
    history: dict[str, Any] = {"epoch": [], "train_loss": []}
    if y_val is not None:
        history["val_accuracy"] = []
    if val_teacher_logits is not None:
        history["val_agreement"] = []
    task = progress.add_task(description or "training", total=epochs) if progress is not None else None
    start = time.perf_counter()
    # fork_rng: the seed fixes init-independent randomness (shuffling, dropout) without touching the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        n = len(X)
        for epoch in range(1, epochs + 1):
            model.train()
            total, seen = 0.0, 0
            for idx in torch.randperm(n, generator=gen).split(batch_size):
                out = model(X[idx])
                if teacher_logits is None:
                    loss = F.cross_entropy(out, labels[idx])
                else:
                    batch_labels = None if labels is None else labels[idx]
                    loss = hinton_loss(
                        out, teacher_logits[idx], batch_labels, temperature=temperature, alpha=alpha
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
                seen += len(idx)
            history["epoch"].append(epoch)
            history["train_loss"].append(total / seen)
            if X_val is not None and (y_val is not None or val_teacher_logits is not None):
                pred = predict_logits(model, X_val).argmax(1)
                if y_val is not None:
                    history["val_accuracy"].append(float((pred == y_val).float().mean()))
                if val_teacher_logits is not None:
                    history["val_agreement"].append(
                        float((pred == val_teacher_logits.argmax(1)).float().mean())
                    )
            if task is not None:
                progress.advance(task)
    model.eval()
    history["seconds"] = time.perf_counter() - start
    if task is not None:
        progress.remove_task(task)
    return history


def _check_training_args(epochs: int, batch_size: int, lr: float, seed: int) -> None:
    if int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if not (math.isfinite(float(lr)) and float(lr) > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not isinstance(seed, int | np.integer):
        raise ValueError(f"seed must be an int, got {seed!r}")


def _check_student_width(student: nn.Module, X: Tensor, n_classes: int, what: str) -> None:
    if not isinstance(student, nn.Module):
        raise ValueError(f"student must be a torch.nn.Module, got {type(student)}")
    width = predict_logits(student, X[:1], name="student").shape[1]
    if width != n_classes:
        raise ValueError(f"student outputs {width} classes but {what} has {n_classes}")


def distill_classifier(
    teacher: TeacherLike,
    student: nn.Module,
    X_train: Any,
    y_train: Any = None,
    *,
    X_val: Any = None,
    y_val: Any = None,
    temperature: float = 4.0,
    alpha: float = 0.9,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    weight_decay: float = 0.0,
    progress: Any = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``student`` (in place) to reproduce ``teacher``'s soft labels with ``hinton_loss``.

    Args:
        teacher: a ``torch.nn.Module``, a callable mapping a float batch ``(B, d)`` to logits
            ``(B, C)``, or the teacher's logits on ``X_train`` computed earlier, ``(n, C)``.
            A model is run once over ``X_train`` (eval mode, no gradient), not once per epoch.
        student: a ``torch.nn.Module`` mapping ``(B, d)`` to ``(B, C)``; trained in place.
        X_train: ``(n, d)`` inputs: the transfer set the teacher labels.
        y_train: ``(n,)`` class ids or ``-100`` for rows nobody labelled; ``None``: soft labels only.
        X_val, y_val: optional validation split, ``(m, d)`` and ``(m,)``, scored after every epoch.
        temperature, alpha: see ``hinton_loss``.
        epochs, batch_size, lr, weight_decay: Adam over shuffled mini-batches.
        seed: fixes shuffling and dropout; the result is deterministic on CPU for a given seed.
        progress: an optional ``rich.progress.Progress`` to show an epoch bar on.

    Returns:
        ``(student, history)``; ``history`` has per-epoch lists ``epoch``, ``train_loss`` and, with
        validation data, ``val_accuracy`` / ``val_agreement``, plus ``seconds``.

    Raises:
        ValueError: before training, naming the argument and rows, for mismatched shapes, empty
            data, labels out of range, NaN/inf inputs or teacher logits, or a student whose output
            width differs from the teacher's.
    """
    _check_training_args(epochs, batch_size, lr, seed)
    x = _features(X_train, "X_train")
    z = _teacher_logits(teacher, x, "teacher logits on X_train")
    n_classes = z.shape[1]
    labels = None if y_train is None else _labels(y_train, len(x), n_classes, "y_train", allow_ignore=True)
    xv, yv, zv = _val_split(X_val, y_val, x.shape[1], n_classes)
    if xv is not None and not isinstance(teacher, np.ndarray | Tensor):
        zv = _teacher_logits(teacher, xv, "teacher logits on X_val")
    _check_student_width(student, x, n_classes, "the teacher")
    hinton_loss(z[:1], z[:1], temperature=temperature, alpha=alpha)  # validates T and alpha up front
    history = _train_loop(
        student,
        x,
        labels=labels,
        teacher_logits=z,
        temperature=temperature,
        alpha=alpha,
        epochs=int(epochs),
        batch_size=int(batch_size),
        lr=float(lr),
        weight_decay=float(weight_decay),
        seed=int(seed),
        X_val=xv,
        y_val=yv,
        val_teacher_logits=zv,
        progress=progress,
        description=f"distil T={temperature:g}",
    )
    return student, history


def train_classifier(
    model: nn.Module,
    X_train: Any,
    y_train: Any,
    *,
    X_val: Any = None,
    y_val: Any = None,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    weight_decay: float = 0.0,
    progress: Any = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``model`` (in place) on hard labels with cross-entropy: a teacher, or the no-teacher baseline.

    Same loop, arguments and history as ``distill_classifier`` (without the teacher); every row of
    ``y_train`` must be a class id in ``[0, C)``.
    """
    _check_training_args(epochs, batch_size, lr, seed)
    x = _features(X_train, "X_train")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model)}")
    n_classes = predict_logits(model, x[:1], name="model").shape[1]
    labels = _labels(y_train, len(x), n_classes, "y_train", allow_ignore=False)
    xv, yv, _ = _val_split(X_val, y_val, x.shape[1], n_classes)
    history = _train_loop(
        model,
        x,
        labels=labels,
        teacher_logits=None,
        temperature=1.0,
        alpha=0.0,
        epochs=int(epochs),
        batch_size=int(batch_size),
        lr=float(lr),
        weight_decay=float(weight_decay),
        seed=int(seed),
        X_val=xv,
        y_val=yv,
        val_teacher_logits=None,
        progress=progress,
        description="train (hard labels)",
    )
    return model, history


def _val_split(X_val: Any, y_val: Any, n_features: int, n_classes: int):
    if X_val is None:
        if y_val is not None:
            raise ValueError("y_val given without X_val")
        return None, None, None
    xv = _features(X_val, "X_val")
    if xv.shape[1] != n_features:
        raise ValueError(f"X_val has {xv.shape[1]} features per row but X_train has {n_features}")
    yv = None if y_val is None else _labels(y_val, len(xv), n_classes, "y_val", allow_ignore=False)
    return xv, yv, None


def clone(model: nn.Module) -> nn.Module:
    """A deep copy (same initial weights): compare students trained from the same initialisation."""
    return copy.deepcopy(model)

"""Distillation losses: pure functions of tensors.

Conventions (see docs/losses.md):
- logits have shape ``(..., C)`` (classes or vocabulary entries on the last axis);
- every divergence is computed in float32 or wider whatever the input dtype;
- a term with no position that counts is 0 with zero gradient, never NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_temperature(temperature: float, name: str = "temperature") -> float:
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {temperature!r}")
    return t


def _check_unit_interval(value: float, name: str) -> float:
    v = float(value)
    if not (0.0 <= v <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return v


def _upcast(x: Tensor) -> Tensor:
    # Softmax and KL in half precision lose the small probabilities that carry the "dark knowledge".
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _kl_rows(teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
    """KL(p_T || p_S) per row, ``(..., C) -> (...)``. Entries with p_T = 0 contribute 0 (0·log 0 = 0)."""
    p_t = teacher_logp.exp()
    term = torch.where(p_t > 0, p_t * (teacher_logp - student_logp), torch.zeros_like(p_t))
    return term.sum(-1)


def hinton_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
    ignore_index: int = -100,
) -> Tensor:
    """Soft-label distillation loss of Hinton et al. (2015).

    ``alpha * T**2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, labels)``

    Args:
        student_logits: ``(N, C)`` (or ``(..., C)``) raw student scores.
        teacher_logits: same shape as ``student_logits``; treated as constants (detached).
        labels: ``(N,)`` (or ``(...)``) integer class ids, ``ignore_index`` for rows without a
            label (e.g. a transfer set the teacher labelled but nobody else did). ``None``:
            the loss is the soft term ``T**2 * KL`` alone and ``alpha`` is not applied.
        temperature: softmax temperature T for both models; finite and > 0. The T² factor keeps
            the soft term's gradient magnitude independent of T (gradients scale as 1/T²).
        alpha: weight of the soft term, in [0, 1].
        ignore_index: label value of rows left out of the CE term.

    Returns:
        A scalar (float32 or float64). The soft term is averaged over all rows (every row has a
        teacher distribution), the CE term over rows whose label is not ``ignore_index``; a term
        with no row that counts is 0, so an empty batch gives 0 with zero gradient, never NaN.
        The CE term uses the unscaled student logits (T = 1), as in Hinton et al.
    """
    t = _check_temperature(temperature)
    a = _check_unit_interval(alpha, "alpha")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.dim() < 1:
        raise ValueError("logits must have a class axis: shape (..., C)")
    s = _upcast(student_logits)
    tl = _upcast(teacher_logits).detach().to(s.dtype)
    rows = s.shape[:-1]
    n_rows = math.prod(rows)

    kl = _kl_rows(F.log_softmax(tl / t, dim=-1), F.log_softmax(s / t, dim=-1))
    soft = (t * t) * (kl.sum() / max(n_rows, 1))
    if labels is None:
        return soft

    if tuple(labels.shape) != tuple(rows):
        raise ValueError(
            f"labels must have shape {tuple(rows)} (one per row of the logits), got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    counted = labels != ignore_index
    n_classes = s.shape[-1]
    bad = counted & ((labels < 0) | (labels >= n_classes))
    if bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        raise ValueError(f"labels must be in [0, {n_classes - 1}] or {ignore_index}, got {first}")
    n_counted = int(counted.sum())
    safe_labels = torch.where(counted, labels, torch.zeros_like(labels))
    nll = F.cross_entropy(s.reshape(-1, n_classes), safe_labels.reshape(-1), reduction="none")
    hard = (nll * counted.reshape(-1)).sum() / max(n_counted, 1)
    return a * soft + (1.0 - a) * hard


# Every loss by name; the trainer and the CLI choose from this dict. Extended in place by adding entries.
LOSSES: dict = {"hinton": hinton_loss}

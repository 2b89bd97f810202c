"""Distillation losses: pure functions of tensors.

Owns: the divergences and their row kernels (`divergence.py`), sparse teachers — top-k or sampled —
(`sparse.py`), the chunked loss from hidden states and the LM head (`fused.py`), ULD against a teacher's
own top-k across tokenizers (`uld_sparse.py`), and the public
functions below. May import: torch and the shared modules only (no model, no file).

- ``hinton_loss``: soft targets at temperature T with the T² factor, plus hard-label CE (classifiers).
- ``LOSSES``: every divergence between next-token distributions by name, one call for all:
  ``LOSSES[name](student_logits, teacher_logits, *, temperature=1.0, mask=None, **kwargs)``.
- ``kd_loss``: the entry point for a dense teacher or a sparse one (``SparseTargets``: top-k or sampled).
- ``fused_linear_kd_loss``: the same from hidden states and the LM head, chunked, never holding the
  full ``(N, V)`` logits.

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

from distill.losses.divergence import (
    ROWS,
    check_loss,
    check_mask,
    dense_rows,
    kl,
)
from distill.losses.divergence import check_temperature as _check_temperature
from distill.losses.divergence import check_unit_interval as _check_unit_interval
from distill.losses.divergence import upcast as _upcast
from distill.losses.sparse import TAILS, SparseTargets, check_against_vocab, flatten_targets, kd_rows


def _kl_rows(teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
    """KL(p_T || p_S) per row, ``(..., C) -> (...)``. Entries with p_T = 0 contribute 0 (0·log 0 = 0)."""
    return kl(teacher_logp, student_logp)


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


# ---------------------------------------------------------------------------------------------------------
# Divergences between next-token distributions. Shared contract (docs/losses.md):
#   student_logits, teacher_logits: (..., V); both divided by `temperature` before the softmax; no T² factor;
#   mask: bool (...), True = the position counts; masked positions are never read (they may hold NaN);
#   result: mean over counted positions of the per-position divergence, float32 (float64 for float64 input);
#   all-masked or empty input: 0 with zero gradient. The teacher is a constant (detached).
# ---------------------------------------------------------------------------------------------------------


def _check_logits(student_logits: Tensor, teacher_logits: Tensor) -> None:
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, Tensor) or not x.dtype.is_floating_point or x.dim() < 1:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a float tensor of shape (..., V), got {got}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape (..., V), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}; if the vocabularies differ "
            "only by padding entries, slice both to the shared vocabulary first"
        )


def _mean_over_counted(per_row: Tensor, n_counted: int) -> Tensor:
    # sum / max(n, 1): an all-masked batch gives 0 (still attached to the graph, so its gradient is 0).
    return per_row.sum() / max(n_counted, 1)


def _flat_rows(student_logits: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None, int]:
    rows = student_logits.shape[:-1]
    check_mask(mask, tuple(rows), "student logits")
    flat_mask = None if mask is None else mask.reshape(-1)
    n = math.prod(rows) if mask is None else int(flat_mask.sum())
    return student_logits.reshape(-1, student_logits.shape[-1]), flat_mask, n


def _dense(name: str, student_logits, teacher_logits, temperature, mask, loss_kwargs) -> Tensor:
    t = _check_temperature(temperature)
    kwargs = check_loss(name, loss_kwargs)
    _check_logits(student_logits, teacher_logits)
    z, rows, n = _flat_rows(student_logits, mask)
    zt = teacher_logits.reshape(z.shape)
    if rows is not None:
        z, zt = z[rows], zt[rows]
    return _mean_over_counted(dense_rows(z, zt, name, t, kwargs), n)


def forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """Forward KL, KL(T || S) = sum_v p_T (log p_T - log p_S), mean over counted positions.

    Args:
        student_logits: ``(..., V)`` raw student scores.
        teacher_logits: ``(..., V)`` raw teacher scores; constant (detached).
        temperature: T > 0; both logits are divided by T before the softmax. No T² factor.
        mask: bool ``(...)``, True where the position counts; ``None``: every position counts.

    Returns:
        Scalar, nats per counted position. "Mode covering": the student pays wherever the teacher has mass.
    """
    return _dense("forward_kl", student_logits, teacher_logits, temperature, mask, {})


def reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """Reverse KL, KL(S || T) = sum_v p_S (log p_S - log p_T), mean over counted positions ("mode seeking").

    Arguments and reduction as :func:`forward_kl`.
    """
    return _dense("reverse_kl", student_logits, teacher_logits, temperature, mask, {})


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024), as TRL's ``generalized_jsd_loss``.

    ``beta * KL(T || M) + (1 - beta) * KL(S || M)`` with ``M = beta * T + (1 - beta) * S``; at
    ``beta = 0`` exactly ``KL(T || S)``, at ``beta = 1`` exactly ``KL(S || T)``. The interior formula tends
    to 0 as beta -> 0+ or 1-, so the value *jumps* at the endpoints (beta = 0.001 gives ~0.001 x a
    divergence, beta = 0 gives forward KL): the endpoints are a convention, not a limit. ``beta = 0.5``
    is the symmetric JSD, bounded by log 2. Other arguments and reduction as :func:`forward_kl`.
    """
    return _dense("generalized_jsd", student_logits, teacher_logits, temperature, mask, {"beta": beta})


def skew_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    skew: float = 0.1,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Skew KL of DistiLLM (Ko et al. 2024): ``KL(T || skew * T + (1 - skew) * S)``, skew in [0, 1].

    ``skew = 0`` is forward KL; ``skew = 1`` is 0. Gradients flow through the mixture. Other arguments
    and reduction as :func:`forward_kl`.
    """
    return _dense("skew_kl", student_logits, teacher_logits, temperature, mask, {"skew": skew})


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    skew: float = 0.1,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Skew reverse KL of DistiLLM: ``KL(S || skew * S + (1 - skew) * T)``, skew in [0, 1].

    ``skew = 0`` is reverse KL; ``skew = 1`` is 0. Other arguments and reduction as :func:`forward_kl`.
    """
    return _dense("skew_reverse_kl", student_logits, teacher_logits, temperature, mask, {"skew": skew})


def tvd(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """Total variation distance ``1/2 sum_v |p_T - p_S|`` (in [0, 1]), mean over counted positions.

    Arguments and reduction as :func:`forward_kl`.
    """
    return _dense("tvd", student_logits, teacher_logits, temperature, mask, {})


def soft_cross_entropy(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """Soft cross-entropy ``-sum_v p_T log p_S``, mean over counted positions.

    This is what torchtune's ``ForwardKLLoss`` computes under the name "forward KL": it equals
    ``KL(T || S) + H(T)``, so it has the same gradient with respect to the student as :func:`forward_kl`
    but a value higher by the teacher's entropy H(T) (it is not 0 when student = teacher).
    Arguments and reduction as :func:`forward_kl`.
    """
    return _dense("soft_cross_entropy", student_logits, teacher_logits, temperature, mask, {})


def uld(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """ULD (Boizard et al. 2024): ``sum_i |sort(p_S)_i - sort(p_T)_i|`` (descending), mean over counted
    positions; in [0, 2]; 0 whenever one distribution is a permutation of the other.

    Needs no shared vocabulary, only aligned positions: across tokenizers use `uld_topk` with the
    teacher's own top-k log-probabilities. Arguments and reduction as :func:`forward_kl`.
    """
    return _dense("uld", student_logits, teacher_logits, temperature, mask, {})


# Every divergence by name, one uniform call for the trainer and the CLI:
#   LOSSES[name](student_logits, teacher_logits, *, temperature=1.0, mask=None, **kwargs)
# `hinton_loss` is not here: it takes hard labels and alpha and applies T², a different contract.
LOSSES: dict = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
    "soft_cross_entropy": soft_cross_entropy,
    "uld": uld,
}
assert set(LOSSES) == set(ROWS)  # one name space for dense, sparse and fused losses


def kd_loss(
    student_logits: Tensor,
    teacher: Tensor | SparseTargets,
    *,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    mask: Tensor | None = None,
    tail: str = "bucket",
    **loss_kwargs: float,
) -> Tensor:
    """The one distillation-loss entry point: dense teacher logits or a sparse teacher signal.

    Args:
        student_logits: ``(..., V)``, aligned with the teacher position by position (no label shifting here).
        teacher: dense logits ``(..., V)`` (then exactly ``LOSSES[loss]``), or :class:`SparseTargets` with
            ids/logprobs ``(..., K)``.
        loss: a name in ``LOSSES``. Sparse top-k targets accept every name; sampled targets accept
            ``"forward_kl"`` and ``"soft_cross_entropy"`` (the divergences with an unbiased estimator
            from teacher samples); others raise ValueError.
        temperature: T > 0 for the student's softmax, and the temperature the teacher distribution is
            taken at. A sparse teacher captured at another temperature is rescaled (docs/losses.md says
            what is exact and what is approximate).
        mask: bool ``(...)``, True = the position counts.
        tail: top-k only. ``"bucket"``: a (K+1)-th entry holds the mass outside the k ids on both sides;
            ``"renormalize"``: both distributions restricted to the k ids and renormalised.
        **loss_kwargs: ``beta`` (generalized_jsd), ``skew`` (skew_kl, skew_reverse_kl).

    Returns:
        Scalar: mean over counted positions of the per-position divergence, in nats; 0 (zero gradient)
        when nothing counts. No T² factor.
    """
    kwargs = check_loss(loss, loss_kwargs)
    if not isinstance(teacher, SparseTargets):
        return LOSSES[loss](student_logits, teacher, temperature=temperature, mask=mask, **loss_kwargs)
    t = _check_temperature(temperature)
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if not isinstance(student_logits, Tensor) or not student_logits.dtype.is_floating_point:
        raise ValueError("student_logits must be a float tensor of shape (..., V)")
    z, rows, n = _flat_rows(student_logits, mask)
    check_against_vocab(teacher, z.shape[-1], student_logits.shape[:-1], mask, loss, z.device)
    per_row = kd_rows(
        z, flatten_targets(teacher), rows, loss=loss, temperature=t, tail=tail, loss_kwargs=kwargs
    )
    return _mean_over_counted(per_row, n)


# Defined in its own module (it is mostly autograd plumbing); exported here with the other losses.
from distill.losses.fused import fused_head_loss, fused_linear_kd_loss  # noqa: E402
from distill.losses.uld_sparse import uld_topk  # noqa: E402

__all__ = [
    "LOSSES",
    "SparseTargets",
    "forward_kl",
    "fused_head_loss",
    "fused_linear_kd_loss",
    "generalized_jsd",
    "hinton_loss",
    "kd_loss",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "soft_cross_entropy",
    "tvd",
    "uld",
    "uld_topk",
]

"""Per-row divergences between log-probability vectors: the one implementation behind every loss.

Private to ``distill``: the public functions live in :mod:`distill.losses`. Each function here takes
student and teacher log-probabilities ``s, t`` of shape ``(M, C)`` (``C`` is the vocabulary, or the
``K`` (+1) entries of a sparse teacher signal) and returns the divergence per row, shape ``(M,)``.
Entries may be ``-inf`` (probability 0); they contribute 0 (``0 * log 0 = 0``), and both the value
and the gradient stay finite wherever the divergence itself is finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

_NEG_INF = float("-inf")


def check_temperature(temperature: float, name: str = "temperature") -> float:
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {temperature!r}")
    return t


def check_unit_interval(value: float, name: str) -> float:
    v = float(value)
    if not (0.0 <= v <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return v


def upcast(x: Tensor) -> Tensor:
    # Softmax and KL in half precision lose the small probabilities that carry the "dark knowledge".
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def kl(a: Tensor, b: Tensor) -> Tensor:
    """KL(A || B) per row from log-probabilities ``a, b: (M, C) -> (M,)``; entries with p_A = 0 give 0."""
    p = a.exp()
    # where() before the product: a - b is NaN at (-inf) - (-inf); selecting 0 there keeps the
    # backward pass free of 0 * NaN.
    return (p * torch.where(p > 0, a - b, 0.0)).sum(-1)


def log_mix(a: Tensor, b: Tensor, w: float) -> Tensor:
    """``log(w * exp(a) + (1 - w) * exp(b))`` elementwise, for ``w`` in [0, 1]; NaN-free gradients."""
    if w == 1.0:
        return a
    if w == 0.0:
        return b
    x = a + math.log(w)
    y = b + math.log1p(-w)
    both = (x == _NEG_INF) & (y == _NEG_INF)
    # logaddexp(-inf, -inf) has a NaN gradient; feed it zeros there and put the -inf back after.
    out = torch.logaddexp(torch.where(both, 0.0, x), torch.where(both, 0.0, y))
    return torch.where(both, _NEG_INF, out)


def forward_kl_rows(s: Tensor, t: Tensor) -> Tensor:
    """KL(T || S) = sum_v p_T (log p_T - log p_S)."""
    return kl(t, s)


def reverse_kl_rows(s: Tensor, t: Tensor) -> Tensor:
    """KL(S || T) = sum_v p_S (log p_S - log p_T)."""
    return kl(s, t)


def generalized_jsd_rows(s: Tensor, t: Tensor, beta: float = 0.5) -> Tensor:
    """beta KL(T || M) + (1 - beta) KL(S || M), M = beta T + (1 - beta) S; KL(T||S) at 0, KL(S||T) at 1."""
    if beta == 0.0:
        return kl(t, s)
    if beta == 1.0:
        return kl(s, t)
    m = log_mix(t, s, beta)
    return beta * kl(t, m) + (1.0 - beta) * kl(s, m)


def skew_kl_rows(s: Tensor, t: Tensor, skew: float = 0.1) -> Tensor:
    """KL(T || skew T + (1 - skew) S) (DistiLLM's skew KL); forward KL at skew = 0, 0 at skew = 1."""
    return kl(t, log_mix(t, s, skew))


def skew_reverse_kl_rows(s: Tensor, t: Tensor, skew: float = 0.1) -> Tensor:
    """KL(S || skew S + (1 - skew) T) (DistiLLM's skew reverse KL); reverse KL at skew = 0."""
    return kl(s, log_mix(s, t, skew))


def tvd_rows(s: Tensor, t: Tensor) -> Tensor:
    """Total variation distance 1/2 sum_v |p_T - p_S|, in [0, 1]."""
    return 0.5 * (t.exp() - s.exp()).abs().sum(-1)


def soft_cross_entropy_rows(s: Tensor, t: Tensor) -> Tensor:
    """-sum_v p_T log p_S = KL(T || S) + H(T)."""
    p = t.exp()
    return -(p * torch.where(p > 0, s, 0.0)).sum(-1)


def uld_rows(s: Tensor, t: Tensor) -> Tensor:
    """Universal Logit Distillation (Boizard et al. 2024): sum_i |sort(p_S)_i - sort(p_T)_i|, both
    sorted in descending order; in [0, 2]. Compares the shapes of the distributions, not which token has
    which probability: no vocabulary mapping needed (a closed-form Wasserstein-1 distance)."""
    ps = s.exp().sort(dim=-1, descending=True).values
    pt = t.exp().sort(dim=-1, descending=True).values
    return (ps - pt).abs().sum(-1)


ROWS: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl_rows,
    "reverse_kl": reverse_kl_rows,
    "generalized_jsd": generalized_jsd_rows,
    "skew_kl": skew_kl_rows,
    "skew_reverse_kl": skew_reverse_kl_rows,
    "tvd": tvd_rows,
    "soft_cross_entropy": soft_cross_entropy_rows,
    "uld": uld_rows,
}
# The keyword arguments each divergence accepts, validated in ``check_loss``.
_KWARGS: dict[str, tuple[str, ...]] = {
    "generalized_jsd": ("beta",),
    "skew_kl": ("skew",),
    "skew_reverse_kl": ("skew",),
}


def check_loss(loss: str, loss_kwargs: dict) -> dict:
    """Validate a divergence name and its keyword arguments; returns them as floats."""
    if loss not in ROWS:
        raise ValueError(f"unknown loss {loss!r}; expected one of {sorted(ROWS)}")
    allowed = _KWARGS.get(loss, ())
    extra = sorted(set(loss_kwargs) - set(allowed))
    if extra:
        raise ValueError(f"loss {loss!r} takes no argument(s) {extra}; it accepts {list(allowed) or 'none'}")
    return {k: check_unit_interval(v, k) for k, v in loss_kwargs.items()}


def dense_rows(
    student_logits: Tensor, teacher_logits: Tensor, loss: str, temperature: float, loss_kwargs: dict
) -> Tensor:
    """Divergence per row between two dense logit matrices ``(M, V) -> (M,)``; teacher detached."""
    s = upcast(student_logits)
    t = upcast(teacher_logits).detach().to(s.dtype)
    if temperature != 1.0:
        s, t = s / temperature, t / temperature
    return ROWS[loss](F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), **loss_kwargs)


def check_mask(mask: Tensor | None, rows: tuple[int, ...], what: str = "logits") -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        kind = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor (True = position counts), got {kind}")
    if tuple(mask.shape) != tuple(rows):
        raise ValueError(
            f"mask must have shape {tuple(rows)} (the {what} without the last axis), got {tuple(mask.shape)}"
        )

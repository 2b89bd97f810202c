"""ULD against a teacher known only by its own top-k (cross-tokenizer distillation).

ULD (Boizard et al. 2024) compares the *sorted* probability vectors of the two models, so it needs no
mapping between vocabularies: only the positions must be aligned. A hosted or cached teacher gives
its k largest probabilities; the student's k largest are taken from its full distribution. The rest of
both distributions is compared as one tail entry each, ``|r_S - r_T|`` with ``r = 1 - sum(top k)``:
by the triangle inequality a lower bound of the full ULD's tail part (the teacher's tail is unknown).
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.losses.divergence import check_mask, check_temperature, upcast


def uld_topk(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    *,
    temperature: float = 1.0,
    capture_temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Top-k ULD: ``sum_i |sort(p_S)_i - sort(p_T)_i|`` over the k largest of each, plus ``|r_S - r_T|``.

    Args:
        student_logits: ``(..., V)`` the student's logits in its own vocabulary.
        teacher_logprobs: ``(..., K)`` the teacher's top-k log-probabilities over *its* vocabulary (any
            order; ``-inf`` entries are padding), captured at ``capture_temperature``.
        temperature: T > 0 of the student's softmax and of the teacher's distribution. At another T than
            the capture T the teacher's top-k entries are rescaled to ``p^(capture T / T)`` and its tail
            entry to ``r^(capture T / T)``, then renormalised (approximate: the tail's spread is unknown).
        mask: bool ``(...)``, True = the position counts.

    Returns:
        Scalar: mean over counted positions, in [0, 2]; 0 with zero gradient when nothing counts.
    """
    t = check_temperature(temperature)
    c = check_temperature(capture_temperature, "capture_temperature")
    if teacher_logprobs.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"teacher_logprobs have positions {tuple(teacher_logprobs.shape[:-1])} but the student logits "
            f"{tuple(student_logits.shape[:-1])}"
        )
    rows = student_logits.shape[:-1]
    check_mask(mask, tuple(rows), "student logits")
    z = upcast(student_logits).reshape(-1, student_logits.shape[-1])
    lp = upcast(teacher_logprobs).detach().to(z.dtype).reshape(-1, teacher_logprobs.shape[-1])
    if mask is not None:
        keep = mask.reshape(-1)
        z, lp = z[keep], lp[keep]
    n = z.shape[0]
    if n == 0:
        return student_logits.sum() * 0.0
    k = min(lp.shape[-1], z.shape[-1])
    lp = lp.clamp(max=0.0).sort(dim=-1, descending=True).values[:, :k]
    s = torch.log_softmax(z / t, dim=-1)
    ps = s.topk(k, dim=-1).values.exp()
    r_s = (1.0 - ps.sum(-1)).clamp(min=0.0)
    pt = lp.exp()
    r_t = (1.0 - pt.sum(-1)).clamp(min=0.0)
    rho = c / t
    if rho != 1.0:
        pt = pt.pow(rho)
        r_t = r_t.pow(rho)
        norm = pt.sum(-1) + r_t
        pt, r_t = pt / norm[:, None], r_t / norm
    per_row = (ps - pt).abs().sum(-1) + (r_s - r_t).abs()
    return per_row.sum() / n


__all__ = ["uld_topk"]

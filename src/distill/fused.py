"""Chunked, fused distillation loss: student logits computed from hidden states a chunk at a time.

Public name re-exported by :mod:`distill.losses`. The full ``(N, V)`` student logit matrix and its
gradient never exist at once: each chunk's logits, loss and gradients are computed in the forward pass
and only the gradients for the hidden states ``(N, H)``, the head ``(V, H)`` (and bias) are kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from distill._divergence import check_loss, check_mask, check_temperature, upcast
from distill.sparse import TAILS, SparseTargets, check_against_vocab, kd_rows, map_targets

# Default chunk: about 2**22 logits (16 MiB per float32 copy of a chunk; the loss holds ~8 such copies
# while it runs, so ~130 MiB beyond the inputs whatever N is). Large enough that each chunk's matmul
# runs at full speed: 128 rows at V = 32,000, 32 rows at V = 128,256 (see docs/losses.md).
CHUNK_LOGITS = 2**22


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk for a vocabulary of ``vocab_size``: ``max(1, 2**22 // vocab_size)``."""
    return max(1, CHUNK_LOGITS // vocab_size)


class _FusedLinearKD(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, the gradients; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, mask, labels, cfg):  # noqa: D102
        n = hidden.shape[0]
        c = cfg["chunk_size"]
        need_h, need_w, need_b = cfg["needs_grad"]
        grad_h = torch.zeros_like(hidden) if need_h else None
        # Accumulate the head's gradient in float32 (or float64) over chunks: bf16 sums would drift.
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, n, c):
            end = min(start + c, n)
            hc = hidden[start:end]
            rows = None if mask is None else mask[start:end]
            kd_part = cfg["n_kd"] > 0 and (rows is None or bool(rows.any()))
            ce_part = cfg["ce_weight"] > 0 and bool((labels[start:end] != cfg["ignore_index"]).any())
            if not (kd_part or ce_part):
                continue
            with torch.enable_grad():
                # Logits in the input dtype (as a plain `hidden @ weight.T` would be), upcast for the loss.
                logits = upcast(F.linear(hc, weight, bias)).detach().requires_grad_()
                chunk_loss = logits.new_zeros(())
                if kd_part:
                    tc = (
                        teacher[start:end]
                        if isinstance(teacher, Tensor)
                        else cfg["slice"](teacher, start, end)
                    )
                    per_row = kd_rows(logits, tc, rows, **cfg["kd"])
                    chunk_loss = chunk_loss + per_row.sum() / cfg["n_kd"]
                if ce_part:
                    nll = F.cross_entropy(
                        logits, labels[start:end], ignore_index=cfg["ignore_index"], reduction="sum"
                    )
                    chunk_loss = chunk_loss + nll * (cfg["ce_weight"] / cfg["n_ce"])
                (g,) = torch.autograd.grad(chunk_loss, logits)
            total += chunk_loss.detach().to(acc)
            g = g.to(weight.dtype)
            if need_h:
                grad_h[start:end] = g @ weight
            if need_w:
                grad_w += (g.T @ hc).to(acc)
            if need_b:
                grad_b += g.sum(0).to(acc)
        ctx.save_for_backward(*(x for x in (grad_h, grad_w, grad_b) if x is not None))
        ctx.which = (need_h, need_w, need_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        saved = iter(ctx.saved_tensors)
        grads = []
        for needed, dtype in zip(ctx.which, ctx.dtypes):
            grads.append((next(saved) * grad_out).to(dtype) if needed else None)
        return (*grads, None, None, None, None)


def fused_linear_kd_loss(
    student_hidden: Tensor,
    lm_head_weight: Tensor,
    teacher: Tensor | SparseTargets,
    *,
    loss: str = "forward_kl",
    chunk_size: int | None = None,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ce_weight: float = 0.0,
    lm_head_bias: Tensor | None = None,
    tail: str = "bucket",
    **loss_kwargs: float,
) -> Tensor:
    """``kd_loss(student_hidden @ lm_head_weight.T + lm_head_bias, teacher, ...) + ce_weight * CE``, chunked.

    Args:
        student_hidden: ``(N, H)`` (or ``(..., H)``) final hidden states of the student.
        lm_head_weight: ``(V, H)`` output projection; ``lm_head_bias``: ``(V,)`` or ``None``.
        teacher: dense teacher logits ``(N, V)`` (constant), or :class:`SparseTargets` ``(N, K)``.
        loss, temperature, tail, **loss_kwargs: as :func:`distill.losses.kd_loss` (same names, same
            semantics; mean over counted positions, no T²).
        chunk_size: rows of logits computed at once; ``None``: ``max(1, 2**22 // V)``.
        mask: bool ``(N,)``, positions that count for the distillation term.
        labels: int ``(N,)`` next-token ids for the hard-label term, ``-100`` = ignored (already aligned
            with the logits: no shifting here). Required when ``ce_weight > 0``.
        ce_weight: weight of the cross-entropy term, >= 0. CE uses the *unscaled* logits (T = 1) and is
            the mean over positions whose label is not -100 (0 when there are none).

    Returns:
        Scalar ``KD + ce_weight * CE`` (float32, or float64 for float64 inputs) whose gradients for
        ``student_hidden``, ``lm_head_weight`` and ``lm_head_bias`` equal those of the dense computation.
        Only first derivatives (no double backward).
    """
    t = check_temperature(temperature)
    kd_kwargs = check_loss(loss, loss_kwargs)
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if not isinstance(student_hidden, Tensor) or not student_hidden.dtype.is_floating_point:
        raise ValueError("student_hidden must be a float tensor of shape (N, H)")
    if not isinstance(lm_head_weight, Tensor) or lm_head_weight.dim() != 2:
        raise ValueError("lm_head_weight must be a float tensor of shape (V, H)")
    v, h = lm_head_weight.shape
    if student_hidden.dim() < 1 or student_hidden.shape[-1] != h:
        raise ValueError(
            f"student_hidden must be (N, {h}) to match lm_head_weight {tuple(lm_head_weight.shape)}, "
            f"got {tuple(student_hidden.shape)}"
        )
    if lm_head_bias is not None and tuple(lm_head_bias.shape) != (v,):
        raise ValueError(f"lm_head_bias must have shape ({v},), got {tuple(lm_head_bias.shape)}")
    rows_shape = tuple(student_hidden.shape[:-1])
    n = math.prod(rows_shape)
    check_mask(mask, rows_shape, "student hidden states")
    if isinstance(teacher, SparseTargets):
        check_against_vocab(teacher, v, torch.Size(rows_shape), mask)
        teacher = map_targets(teacher, lambda x: x.reshape(n, x.shape[-1]))
    elif isinstance(teacher, Tensor):
        if tuple(teacher.shape) != (*rows_shape, v):
            raise ValueError(
                f"teacher logits must have shape {(*rows_shape, v)} (positions x the head's vocabulary), "
                f"got {tuple(teacher.shape)}"
            )
        teacher = teacher.detach().reshape(n, v)
    else:
        raise ValueError(f"teacher must be a logits tensor or SparseTargets, got {type(teacher).__name__}")
    cw = float(ce_weight)
    if not math.isfinite(cw) or cw < 0:
        raise ValueError(f"ce_weight must be a finite number >= 0, got {ce_weight!r}")
    n_ce = 0
    if cw > 0:
        if labels is None:
            raise ValueError("labels are required when ce_weight > 0")
        if tuple(labels.shape) != rows_shape or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"labels must be integer ids of shape {rows_shape}, got {labels.dtype} {tuple(labels.shape)}"
            )
        labels = labels.reshape(n)
        counted = labels != -100
        bad = counted & ((labels < 0) | (labels >= v))
        if bool(bad.any()):
            raise ValueError(f"labels must be in [0, {v - 1}] or -100, got {labels[bad][0].item()}")
        n_ce = int(counted.sum())
    if chunk_size is None:
        chunk_size = default_chunk_size(v)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1 or None, got {chunk_size!r}")
    flat_mask = None if mask is None else mask.reshape(n)
    cfg = {
        "chunk_size": chunk_size,
        "needs_grad": (
            student_hidden.requires_grad,
            lm_head_weight.requires_grad,
            lm_head_bias is not None and lm_head_bias.requires_grad,
        ),
        "n_kd": n if flat_mask is None else int(flat_mask.sum()),
        "n_ce": max(n_ce, 1),
        "ce_weight": cw if n_ce > 0 else 0.0,
        "ignore_index": -100,
        "kd": {"loss": loss, "temperature": t, "tail": tail, "loss_kwargs": kd_kwargs},
        "slice": lambda targets, a, b: map_targets(targets, lambda x: x[a:b]),
    }
    return _FusedLinearKD.apply(
        student_hidden.reshape(n, h), lm_head_weight, lm_head_bias, teacher, flat_mask, labels, cfg
    )

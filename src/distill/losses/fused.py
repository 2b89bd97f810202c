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

from distill.losses.divergence import check_loss, check_mask, check_temperature, upcast
from distill.losses.sparse import TAILS, SparseTargets, check_against_vocab, kd_rows, map_targets

# Default chunk: about 2**22 logits (16 MiB per float32 copy of a chunk). The extra memory is a few such
# buffers plus the head's float32 gradient accumulator, independent of N; 131 rows at V = 32,000 and 32 at
# V = 128,256 keep each chunk's matmul at full speed on CPU (docs/losses.md has the measurements).
CHUNK_LOGITS = 2**22


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk for a vocabulary of ``vocab_size``: ``max(1, 2**22 // vocab_size)``."""
    return max(1, CHUNK_LOGITS // vocab_size)


# Divergences whose gradient w.r.t. the logits is written out below instead of taken by autograd: forward
# KL is the common case and autograd's extra passes over a (chunk, V) block cost ~30% of its time on CPU.
_ANALYTIC = ("forward_kl", "soft_cross_entropy")


def _autograd(fn, logits: Tensor) -> tuple[Tensor, Tensor]:
    """Value and gradient of the scalar ``fn(logits)`` w.r.t. ``logits``."""
    with torch.enable_grad():
        z = logits.detach().requires_grad_()
        value = fn(z)
        (g,) = torch.autograd.grad(value, z)
    return value.detach(), g


def _kl_value_grad(
    logits: Tensor, teacher: Tensor, rows: Tensor | None, loss: str, temperature: float
) -> tuple[Tensor, Tensor]:
    """Sum over ``rows`` of forward KL (or soft CE) and its gradient w.r.t. ``logits``, in closed form.

    With s = log_softmax(z / T) and p_T = softmax(z_T / T): KL = sum p_T (log p_T - s), soft CE =
    -sum p_T s; both have gradient (softmax(z / T) - p_T) / T w.r.t. the student logits z.
    """
    z = logits if rows is None else logits[rows]
    t = upcast(teacher if rows is None else teacher[rows]).detach().to(z.dtype)
    tl = F.log_softmax(t / temperature if temperature != 1.0 else t, dim=-1)
    p = tl.exp()
    s = z / temperature if temperature != 1.0 else z.clone()
    s -= torch.logsumexp(s, dim=-1, keepdim=True)  # student log-probabilities, in place
    if loss == "forward_kl":
        # clamp: where p = 0 the log-probabilities may be -inf, and 0 * finite = 0 where 0 * inf is NaN
        low = torch.finfo(tl.dtype).min
        value = (p * (tl.clamp_(min=low) - s.clamp(min=low))).sum()
    else:
        value = -(p * s).sum()
    g_rows = s.exp_().sub_(p)
    if temperature != 1.0:
        g_rows.mul_(1.0 / temperature)
    if rows is None:
        return value, g_rows
    g = torch.zeros_like(logits)
    g[rows] = g_rows
    return value, g


def _ce_value_grad(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Sum of the NLL of ``labels`` under the unscaled ``logits`` and its gradient, in closed form:
    ``softmax(z) - onehot(label)`` on counted rows, 0 on rows whose label is ``ignore_index``."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    nll = (lse[:, 0] - logits.gather(-1, safe[:, None])[:, 0]) * valid
    g = (logits - lse).exp_()
    g[torch.arange(len(g), device=g.device), safe] -= 1.0
    g.mul_(valid[:, None].to(g.dtype))
    return nll.sum(), g


def _kl_ce_value_grad(
    logits: Tensor, teacher: Tensor, labels: Tensor, cfg: dict
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward KL (or soft CE) at T = 1 on every row and CE on the labelled ones from one softmax:
    (KD sum, NLL sum, gradient of ``kd_scale * KD + ce_scale * CE``), with q = softmax(z):
    ``kd_scale (q - p_T) + ce_scale [labelled] (q - onehot)``."""
    kd_scale, ce_scale = cfg["kd_scale"], cfg["ce_scale"]
    tl = F.log_softmax(upcast(teacher).detach().to(logits.dtype), dim=-1)
    p = tl.exp()
    s = logits - torch.logsumexp(logits, dim=-1, keepdim=True)  # student log-probabilities
    valid = labels != cfg["ignore_index"]
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    ce_sum = -(s.gather(-1, safe[:, None])[:, 0] * valid).sum()
    if cfg["kd"]["loss"] == "forward_kl":
        low = torch.finfo(tl.dtype).min  # 0 * finite where p = 0 (log-probabilities may be -inf)
        kd_sum = (p * (tl.clamp_(min=low) - s.clamp(min=low))).sum()
    else:
        kd_sum = -(p * s).sum()
    del tl
    w = kd_scale + ce_scale * valid.to(s.dtype)
    g = s.exp_().mul_(w[:, None]).sub_(p, alpha=kd_scale)
    g[torch.arange(len(g), device=g.device), safe] -= ce_scale * valid.to(g.dtype)
    return kd_sum, ce_sum, g


def _chunk_terms(
    logits: Tensor, teacher, rows: Tensor | None, labels: Tensor | None, cfg: dict
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """One chunk's (sum of the divergence over its KD rows, sum of its NLL, gradient of
    ``kd_scale * KD + ce_scale * CE`` w.r.t. the chunk's logits); ``None`` for a term not computed."""
    kd, kd_sum, ce_sum, grad = cfg["kd"], None, None, None
    dense = isinstance(teacher, Tensor) and kd["loss"] in _ANALYTIC
    if dense and labels is not None and rows is None and kd["temperature"] == 1.0:
        return _kl_ce_value_grad(logits, teacher, labels, cfg)  # one softmax for both terms
    if teacher is not None:
        if dense:
            kd_sum, g = _kl_value_grad(logits, teacher, rows, kd["loss"], kd["temperature"])
        else:
            kd_sum, g = _autograd(lambda z: kd_rows(z, teacher, rows, **kd).sum(), logits)
        grad = g.mul_(cfg["kd_scale"])
    if labels is not None:
        ce_sum, g = _ce_value_grad(logits, labels, cfg["ignore_index"])
        grad = g.mul_(cfg["ce_scale"]) if grad is None else grad.add_(g, alpha=cfg["ce_scale"])
    return kd_sum, ce_sum, grad


def _teacher_chunk(teacher, start: int, end: int):
    """Rows ``start:end`` of the teacher signal: dense logits, `SparseTargets`, or a teacher head's chunk."""
    if isinstance(teacher, Tensor):
        return teacher[start:end]
    if isinstance(teacher, SparseTargets):
        return map_targets(teacher, lambda x: x[start:end])
    return teacher.chunk(start, end)  # e.g. `distill.train.heads.TeacherHead`: its logits computed here


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
        sums = {"kd": torch.zeros((), dtype=acc, device=hidden.device), "ce": None}
        if labels is not None:
            sums["ce"] = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, n, c):
            end = min(start + c, n)
            hc = hidden[start:end]
            rows = None if mask is None else mask[start:end]
            kd_part = teacher is not None and cfg["has_kd"] and (rows is None or bool(rows.any()))
            ce_part = labels is not None and bool((labels[start:end] != cfg["ignore_index"]).any())
            if not (kd_part or ce_part):
                continue
            # Logits in the input dtype (as a plain `hidden @ weight.T` would be), upcast for the loss.
            logits = upcast(F.linear(hc, weight, bias))
            tc = _teacher_chunk(teacher, start, end) if kd_part else None
            lc = labels[start:end] if ce_part else None
            kd_sum, ce_sum, g = _chunk_terms(logits, tc, rows, lc, cfg)
            for name, v in (("kd", kd_sum), ("ce", ce_sum)):
                if v is not None:
                    sums[name] += v.detach().to(acc)
            del logits
            g = g.to(weight.dtype)
            if need_h:
                grad_h[start:end] = g @ weight
            if need_w:
                if g.dtype == acc:
                    grad_w.addmm_(g.T, hc)
                else:
                    grad_w += (g.T @ hc).to(acc)
            if need_b:
                grad_b += g.sum(0).to(acc)
        ctx.grads = (grad_h, grad_w, grad_b)  # results, not inputs: no need for save_for_backward's checks
        ctx.handover = bool(cfg.get("handover"))
        ctx.which = (need_h, need_w, need_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        cfg["sums"] = sums  # the unscaled sums, for the caller's logs
        total = sums["kd"] * cfg["kd_scale"]
        if sums["ce"] is not None and cfg["ce_scale"]:
            total = total + sums["ce"] * cfg["ce_scale"]
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        held = ctx.grads
        if held is None:
            raise RuntimeError(
                "this fused loss was built for one backward pass (handover=True): its gradients are spent"
            )
        # The loss is usually the final scalar (grad_out = 1): skip a (V, H) copy then.
        scale = None if bool(grad_out == 1) else grad_out
        if ctx.handover:
            # One backward (a training loop): give the gradients away, scaled in place, so autograd can
            # keep them as the parameters' .grad instead of copying a (V, H) tensor.
            ctx.grads = None
            grads = [None if g is None else (g if scale is None else g.mul_(scale.to(g.dtype))) for g in held]
            del held
            return (*(g if g is None else g.to(d) for g, d in zip(grads, ctx.dtypes)), None, None, None, None)
        grads = []
        for g, needed, dtype in zip(held, ctx.which, ctx.dtypes):
            grads.append(((g if scale is None else g * scale).to(dtype)) if needed else None)
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
        check_against_vocab(teacher, v, torch.Size(rows_shape), mask, loss, student_hidden.device)
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
    n_kd = n if flat_mask is None else int(flat_mask.sum())
    cfg = {
        "chunk_size": chunk_size,
        "needs_grad": (
            student_hidden.requires_grad,
            lm_head_weight.requires_grad,
            lm_head_bias is not None and lm_head_bias.requires_grad,
        ),
        "has_kd": n_kd > 0,
        "kd_scale": 1.0 / max(n_kd, 1),
        "ce_scale": cw / max(n_ce, 1),
        "ignore_index": -100,
        "kd": {"loss": loss, "temperature": t, "tail": tail, "loss_kwargs": kd_kwargs},
    }
    ce_labels = labels if cw > 0 and n_ce > 0 else None
    return _FusedLinearKD.apply(
        student_hidden.reshape(n, h), lm_head_weight, lm_head_bias, teacher, flat_mask, ce_labels, cfg
    )


def fused_head_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    teacher=None,
    kd_mask: Tensor | None = None,
    labels: Tensor | None = None,
    kd_scale: float = 1.0,
    ce_scale: float = 1.0,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    tail: str = "bucket",
    loss_kwargs: dict | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Sums for a training loop: ``kd_scale * sum_KD-rows D + ce_scale * sum_labelled-rows NLL``, chunked.

    The trainer's form of `fused_linear_kd_loss`: sums instead of means (the loop divides by the tokens
    of the whole accumulated batch), both terms optional, and a teacher that may compute its own
    chunks (an object with ``chunk(start, end)`` returning dense logits ``(end - start, V)`` or
    `SparseTargets`; `distill.train.heads.TeacherHead` applies a local teacher's head there).

    Args:
        hidden: ``(N, H)`` student hidden states (only the rows that count: nothing is skipped here).
        weight, bias: the student's head ``(V, H)`` / ``(V,)``.
        teacher: ``None`` (CE only), dense logits ``(N, V)``, `SparseTargets` ``(N, K)`` or a chunk source.
        kd_mask: bool ``(N,)``, rows that count for the divergence (``None``: all); CE counts every row
            whose label is not -100.
        labels: int ``(N,)`` next-token ids or -100; ``None``: no CE term.
        loss, temperature, tail, loss_kwargs: as `kd_loss` (any name in ``LOSSES``; no T² here).

    Returns:
        ``(total, {"kd": sum of D over KD rows, "ce": sum of NLL})``: the unscaled sums are detached,
        for logging; ``total``'s gradients equal those of the dense computation. One backward pass
        only: the gradients are handed to autograd (no (V, H) copy), a second backward raises.
    """
    t = check_temperature(temperature)
    kd_kwargs = check_loss(loss, dict(loss_kwargs or {}))
    v, h = weight.shape
    n = hidden.shape[0]
    if isinstance(teacher, SparseTargets):
        check_against_vocab(teacher, v, torch.Size((n,)), kd_mask, loss, hidden.device)
    if chunk_size is None:
        chunk_size = default_chunk_size(v)
    has_kd = teacher is not None and (kd_mask is None or bool(kd_mask.any()))
    cfg = {
        "chunk_size": int(chunk_size),
        "needs_grad": (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad),
        "has_kd": has_kd,
        "kd_scale": float(kd_scale),
        "ce_scale": float(ce_scale),
        "ignore_index": -100,
        "kd": {"loss": loss, "temperature": t, "tail": tail, "loss_kwargs": kd_kwargs},
        "handover": True,
    }
    total = _FusedLinearKD.apply(hidden, weight, bias, teacher if has_kd else None, kd_mask, labels, cfg)
    sums = cfg["sums"]
    return total, {"kd": sums["kd"], "ce": sums["ce"] if sums["ce"] is not None else sums["kd"] * 0}

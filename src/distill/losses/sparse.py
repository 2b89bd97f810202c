"""Sparse teacher signals: top-k log-probabilities or sampled token ids, and the losses against them.

Public names are re-exported by :mod:`distill.losses`; see docs/losses.md for the semantics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses.divergence import ROWS, check_temperature, dense_rows, upcast

KINDS = ("topk", "sampled")
TAILS = ("bucket", "renormalize")
# Divergences with an unbiased estimator from tokens sampled from the teacher: E_{v~p_T}[f(v)] forms.
SAMPLED_LOSSES = ("forward_kl", "soft_cross_entropy")
_NEG_INF = float("-inf")
# Captured log-probabilities are rounded (fp16 caches, API JSON); allow this much above 0 / above sum 1.
_LOGPROB_SLACK = 1e-3


@dataclass(frozen=True, eq=False)
class SparseTargets:
    """A teacher's next-token distribution known only at ``K`` token ids per position.

    Rows may be padded: an entry with ``logprobs == -inf`` (top-k) or ``counts == 0`` (sampled) is
    ignored, whatever its id. Validated on construction.
    """

    ids: Tensor
    """Token ids, integer tensor ``(..., K)``, each in ``[0, V)``. Top-k: distinct among non-padded entries."""
    logprobs: Tensor
    """Float ``(..., K)``: the teacher's log-probability of each id over its *full* vocabulary,
    at ``temperature``, as captured (log_softmax first, then top-k; never renormalised over k)."""
    temperature: float = 1.0
    """The softmax temperature the log-probabilities were captured at; finite and > 0."""
    kind: str = "topk"
    """``"topk"``: the K most likely ids; ``"sampled"``: ids drawn from the teacher, with ``counts``."""
    counts: Tensor | None = None
    """``"sampled"`` only: how many times each id was drawn, ``(..., K)``, >= 0 (float allowed:
    expected counts); ``None`` for ``"topk"``."""

    def __post_init__(self) -> None:
        ids, lp = self.ids, self.logprobs
        if not isinstance(ids, Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            got = ids.dtype if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"SparseTargets.ids must be an integer tensor (..., K), got {got}")
        if not isinstance(lp, Tensor) or not lp.dtype.is_floating_point:
            got = lp.dtype if isinstance(lp, Tensor) else type(lp).__name__
            raise ValueError(f"SparseTargets.logprobs must be a float tensor (..., K), got {got}")
        if ids.dim() < 1 or ids.shape[-1] < 1:
            raise ValueError(
                f"SparseTargets.ids must have shape (..., K) with K >= 1, got {tuple(ids.shape)}"
            )
        if lp.shape != ids.shape:
            raise ValueError(
                f"SparseTargets.logprobs must have the shape of ids {tuple(ids.shape)}, got {tuple(lp.shape)}"
            )
        if lp.device != ids.device:
            raise ValueError(f"SparseTargets: ids on {ids.device} but logprobs on {lp.device}")
        check_temperature(self.temperature, "SparseTargets.temperature")
        if self.kind not in KINDS:
            raise ValueError(f"SparseTargets.kind must be one of {KINDS}, got {self.kind!r}")
        if bool((ids < 0).any()):
            raise ValueError(f"SparseTargets.ids must be >= 0, got {int(ids.min())}")
        if bool(torch.isnan(lp).any()) or bool((lp > _LOGPROB_SLACK).any()):
            bad = lp[torch.isnan(lp) | (lp > _LOGPROB_SLACK)].flatten()[0].item()
            raise ValueError(f"SparseTargets.logprobs must be log-probabilities (<= 0, not NaN), got {bad}")
        if self.kind == "topk":
            self._check_topk()
        else:
            self._check_sampled()

    def _check_topk(self) -> None:
        if self.counts is not None:
            raise ValueError('SparseTargets.counts must be None for kind="topk"')
        lp = self.logprobs.detach()
        mass = torch.logsumexp(lp.double(), dim=-1).exp()
        if bool((mass > 1 + _LOGPROB_SLACK).any()):
            raise ValueError(
                "SparseTargets: top-k probabilities sum to more than 1 at some position "
                f"(max {mass.max().item():.6f}); logprobs must be over the full vocabulary, not renormalised"
            )
        # Distinct ids among non-padded entries: padded ones get distinct negative stand-ins.
        k = self.ids.shape[-1]
        fill = -1 - torch.arange(k, device=self.ids.device).expand_as(self.ids)
        keyed = torch.where(lp > _NEG_INF, self.ids.long(), fill).sort(dim=-1).values
        if bool((keyed[..., 1:] == keyed[..., :-1]).any()):
            raise ValueError('SparseTargets: duplicate ids at one position for kind="topk"')

    def _check_sampled(self) -> None:
        c = self.counts
        if not isinstance(c, Tensor):
            raise ValueError('SparseTargets.counts is required for kind="sampled": a (..., K) tensor')
        if c.shape != self.ids.shape or c.device != self.ids.device:
            raise ValueError(
                f"SparseTargets.counts must have the shape and device of ids {tuple(self.ids.shape)}, "
                f"got {tuple(c.shape)} on {c.device}"
            )
        if c.dtype == torch.bool or bool((c < 0).any()) or (c.is_floating_point() and bool(c.isnan().any())):
            raise ValueError("SparseTargets.counts must be numbers >= 0")
        if bool(((c > 0) & (self.logprobs == _NEG_INF)).any()):
            raise ValueError("SparseTargets: a sampled id (count > 0) has logprob -inf")

    def to(self, device: torch.device | str) -> SparseTargets:
        """The same targets on ``device`` (e.g. a CPU cache moved to the student's GPU)."""
        return map_targets(self, lambda x: x.to(device))

    @classmethod
    def from_logits(cls, logits: Tensor, k: int, *, temperature: float = 1.0) -> SparseTargets:
        """The top-``k`` of dense teacher ``logits (..., V)`` at ``temperature`` (softmax over V first)."""
        t = check_temperature(temperature)
        if not 1 <= k <= logits.shape[-1]:
            raise ValueError(f"k must be in [1, {logits.shape[-1]}], got {k}")
        logp = F.log_softmax(upcast(logits.detach()) / t, dim=-1)
        values, ids = logp.topk(k, dim=-1)
        return cls(ids=ids, logprobs=values, temperature=t, kind="topk")

    @classmethod
    def sample_from_logits(
        cls, logits: Tensor, n: int, *, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> SparseTargets:
        """Draw ``n`` ids per position from softmax(logits / temperature); ``K = n`` slots with counts.

        Repeated draws are merged into one slot with its count; the freed slots are padding (count 0).
        """
        t = check_temperature(temperature)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        logp = F.log_softmax(upcast(logits.detach()) / t, dim=-1)
        flat = logp.reshape(-1, logp.shape[-1])
        draws = torch.multinomial(flat.exp(), n, replacement=True, generator=generator).sort(-1).values
        # Merge repeated draws: one slot per distinct id (slots 0..runs-1), later slots padding (count 0).
        first = torch.ones_like(draws, dtype=torch.bool)
        first[:, 1:] = draws[:, 1:] != draws[:, :-1]
        run_id = first.long().cumsum(-1) - 1  # index of each draw's run within its row
        counts = torch.zeros_like(draws, dtype=torch.float32).scatter_add_(
            -1, run_id, torch.ones_like(draws, dtype=torch.float32)
        )
        # Every draw of a run writes the same id into the run's slot, so write order does not matter.
        ids = torch.zeros_like(draws).scatter_(-1, run_id, draws)
        shape = (*logp.shape[:-1], n)
        lp = flat.gather(-1, ids)
        return cls(
            ids=ids.reshape(shape),
            logprobs=lp.reshape(shape),
            temperature=t,
            kind="sampled",
            counts=counts.reshape(shape),
        )


def check_against_vocab(
    targets: SparseTargets,
    vocab_size: int,
    rows: torch.Size,
    mask: Tensor | None,
    loss: str,
    device: torch.device,
) -> None:
    """Checks that need the student's logits and the loss: leading shape, id range, loss for the kind."""
    if targets.kind == "sampled" and loss not in SAMPLED_LOSSES:
        raise ValueError(
            f"loss {loss!r} has no unbiased estimator from sampled teacher ids; "
            f'with kind="sampled" use one of {SAMPLED_LOSSES} (or top-k targets)'
        )
    if tuple(targets.ids.shape[:-1]) != tuple(rows):
        raise ValueError(
            f"SparseTargets have positions {tuple(targets.ids.shape[:-1])} but the student logits "
            f"have {tuple(rows)}; pass aligned (..., V) logits and (..., K) targets"
        )
    if targets.ids.device != device:
        raise ValueError(
            f"SparseTargets are on {targets.ids.device} but the student logits on {device}; "
            "move them with targets.to(device)"
        )
    top = int(targets.ids.max()) if targets.ids.numel() else -1
    if top >= vocab_size:
        raise ValueError(f"SparseTargets.ids must be < the student's vocabulary size {vocab_size}, got {top}")
    if targets.kind == "sampled":
        n = targets.counts.sum(-1)
        empty = (n <= 0) if mask is None else (n <= 0) & mask
        if bool(empty.any()):
            raise ValueError("SparseTargets: a counted position has no sampled id (counts sum to 0)")


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0`` (``-inf`` at ``x = 0``)."""
    return torch.log(-torch.expm1(x.clamp(max=0.0)))


def sparse_rows(
    student_logits: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    counts: Tensor | None,
    *,
    kind: str,
    capture_temperature: float,
    loss: str,
    temperature: float,
    tail: str,
    loss_kwargs: dict,
) -> Tensor:
    """Divergence per row against a sparse teacher: ``(M, V), (M, K) -> (M,)``. Arguments checked by callers.

    Temperature: with rho = capture_temperature / temperature, log p_T(v) = rho * logprob(v) - log Z,
    where Z sums over the full vocabulary. Ratios among the K ids are therefore exact at any temperature;
    only the tail mass (top-k bucket) and Z (sampled) need an approximation, see docs/losses.md.
    """
    z = upcast(student_logits)
    lp = upcast(logprobs).detach().to(z.dtype).clamp(max=0.0)
    ids = ids.long()
    rho = capture_temperature / temperature
    zs = z / temperature if temperature != 1.0 else z
    lse = torch.logsumexp(zs, dim=-1, keepdim=True)
    s_k = zs.gather(-1, ids) - lse  # student log-probabilities of the K ids, exact

    if kind == "sampled":
        c = counts.detach().to(z.dtype)
        # Self-normalised importance weights toward p_T ∝ p_capture^rho: a_i ∝ c_i p_i^(rho - 1).
        log_w = torch.where(c > 0, c.log() + (rho - 1.0) * torch.where(c > 0, lp, 0.0), _NEG_INF)
        log_a = log_w - torch.logsumexp(log_w, dim=-1, keepdim=True)
        a = log_a.exp()
        s_safe = torch.where(a > 0, s_k, 0.0)
        if loss == "soft_cross_entropy":
            return -(a * s_safe).sum(-1)
        # log p_T(i) = rho * lp_i - log Z, with Z = E_{p_capture}[p^(rho-1)] estimated from the draws.
        log_z = torch.logsumexp(log_w, dim=-1, keepdim=True) - c.sum(-1, keepdim=True).log()
        t_i = torch.where(a > 0, rho * lp - log_z, 0.0)
        return (a * (t_i - s_safe)).sum(-1)

    valid = lp > _NEG_INF
    t_k = rho * lp if rho != 1.0 else lp
    s_k = torch.where(valid, s_k, _NEG_INF)
    if tail == "renormalize":
        # Both distributions restricted to the valid ids and renormalised: exact at any temperature.
        t = t_k - torch.logsumexp(t_k, dim=-1, keepdim=True)
        s = s_k - torch.logsumexp(s_k, dim=-1, keepdim=True)
        return ROWS[loss](s, t, **loss_kwargs)

    # Bucket: one extra entry holding the mass outside the top-k ids, on both sides.
    hits = torch.zeros_like(zs).scatter_add_(-1, ids, valid.to(zs.dtype)) > 0
    full = hits.all(-1, keepdim=True)  # the ids cover the vocabulary: no tail on either side
    # Teacher tail at capture T. Floored at the float epsilon: captured values that sum to ~1 cannot
    # resolve a smaller tail, and a zero tail would make reverse KL infinite for any student.
    eps = torch.finfo(lp.dtype).eps
    log_r = _log1mexp(torch.logsumexp(lp, dim=-1, keepdim=True)).clamp(min=math.log(eps))
    if rho != 1.0:
        # Unknown how the tail mass r spreads over the n missing ids; assume evenly (r / n each), so the
        # tail weight at the new temperature is n (r / n)^rho. Exact at rho = 1; see docs/losses.md.
        n_missing = (~hits).sum(-1, keepdim=True).to(z.dtype)
        log_r = rho * log_r + (1.0 - rho) * torch.where(full, 0.0, n_missing.log())
    u = torch.cat([t_k, torch.where(full, _NEG_INF, log_r)], dim=-1)
    t = u - torch.logsumexp(u, dim=-1, keepdim=True) if rho != 1.0 else u
    # Student tail exactly: logsumexp over the ids not in the top-k (no 1 - sum cancellation).
    tail_in = zs.masked_fill(hits | full, _NEG_INF)
    tail_lse = torch.logsumexp(tail_in.masked_fill(full, 0.0), dim=-1, keepdim=True)
    s_tail = torch.where(full, _NEG_INF, tail_lse - lse)
    s = torch.cat([s_k, s_tail], dim=-1)
    return ROWS[loss](s, t, **loss_kwargs)


def kd_rows(
    student_logits: Tensor,
    teacher: Tensor | SparseTargets,
    rows: Tensor | None,
    *,
    loss: str,
    temperature: float,
    tail: str,
    loss_kwargs: dict,
) -> Tensor:
    """Divergence per selected row: student ``(N, V)``, teacher ``(N, V)`` or flat ``SparseTargets`` ``(N, K)``.

    ``rows``: bool ``(N,)`` of the rows to compute (``None``: all); returns ``(rows.sum(),)``.
    """
    pick = (lambda x: x) if rows is None else (lambda x: x[rows])
    z = pick(student_logits)
    if isinstance(teacher, Tensor):
        return dense_rows(z, pick(teacher), loss, temperature, loss_kwargs)
    counts = None if teacher.counts is None else pick(teacher.counts)
    return sparse_rows(
        z,
        pick(teacher.ids),
        pick(teacher.logprobs),
        counts,
        kind=teacher.kind,
        capture_temperature=float(teacher.temperature),
        loss=loss,
        temperature=temperature,
        tail=tail,
        loss_kwargs=loss_kwargs,
    )


def map_targets(targets: SparseTargets, fn) -> SparseTargets:
    """``fn`` applied to the ids, logprobs and counts tensors (a reshape, a slice), without re-validating."""
    out = object.__new__(SparseTargets)
    for name in ("ids", "logprobs", "counts"):
        value = getattr(targets, name)
        object.__setattr__(out, name, None if value is None else fn(value))
    object.__setattr__(out, "temperature", targets.temperature)
    object.__setattr__(out, "kind", targets.kind)
    return out


def flatten_targets(targets: SparseTargets) -> SparseTargets:
    """View ``(..., K)`` targets as ``(N, K)``."""
    return map_targets(targets, lambda x: x.reshape(-1, x.shape[-1]))


__all__ = ["SparseTargets", "KINDS", "TAILS", "SAMPLED_LOSSES"]

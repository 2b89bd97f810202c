"""Losses from hidden states: the student's (and a local teacher's) LM head applied chunk by chunk.

Real vocabularies (128k-152k entries) make the ``(batch, length, V)`` logits the largest tensors of a
step, several float32 copies of them with their gradient. So by default (``TrainConfig.fused``) the
loop never asks the model for its logits: `captured_head` replaces the output head's ``forward`` for
one call of the model, records the hidden states that reach it (and the head's weight and bias *as
the head sees them inside the forward*: under FSDP that is the gathered, unsharded weight, whose
gradient flows back to the shards) and returns an empty ``(..., 0)`` tensor instead of logits. The
loss (`distill.losses.fused_head_loss`) then applies the head to a chunk of rows at a time.

A local teacher goes through the same capture under ``no_grad``; `TeacherHead` applies its head to the
same chunk of rows beside the student's (or takes the top-k of that chunk when ``teacher_top_k`` asks
for it), so its full logits never exist either. `micro_batch_loss` is the one call the loop makes,
fused or dense (``--no-fused``: the model's own full logits and `Objective.loss_sum`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses import SparseTargets
from distill.train.examples import IGNORE


def output_head(model) -> torch.nn.Module:
    """The module that turns hidden states into logits (``get_output_embeddings()``), through any wrapper
    (DDP, FSDP, peft)."""
    m = model
    while hasattr(m, "module") and not hasattr(m, "get_output_embeddings"):
        m = m.module  # DDP / FSDP1 wrappers
    head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(
            f"{type(m).__name__} has no output head with a weight (get_output_embeddings()): "
            "train it with --no-fused"
        )
    return head


@dataclass
class Captured:
    """What reached the head in one forward: hidden states ``(B, L, H)``, its weight ``(V, H)`` and bias."""

    hidden: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None
    output: Tensor | None = None
    """The model's ``logits`` output: an empty ``(B, L, 0)`` tensor computed from the hidden states (see `anchored`)."""


@contextmanager
def captured_head(model) -> Iterator[Captured]:
    """While open, the model's head records its input and returns no logits (an empty ``(..., 0)`` tensor)."""
    head = output_head(model)
    cap = Captured()

    def forward(x: Tensor) -> Tensor:
        # The weight as seen here: inside the forward, FSDP has gathered it (and keeps the root's
        # parameters gathered until backward), and autograd links it to the real parameter.
        cap.hidden, cap.weight, cap.bias = x, head.weight, getattr(head, "bias", None)
        # No logits, but still in the graph (`anchored`). A copy, not a view of ``x``: FSDP2 warns that
        # an in-place op on a view it hooks would drop its pre-backward hook.
        return x[..., :0].clone()

    head.forward = forward  # an instance attribute shadows the class's forward for this call only
    try:
        yield cap
    finally:
        del head.forward


def hidden_states(model, batch: dict[str, Tensor]) -> Captured:
    """One forward of ``model`` on ``batch`` that stops before the head."""
    with captured_head(model) as cap:
        cap.output = model(**model_inputs(batch)).logits
    if cap.hidden is None:
        raise ValueError(f"{type(model).__name__}'s forward never called its output head: use --no-fused")
    return cap


def anchored(total: Tensor, cap: Captured) -> Tensor:
    """``total`` plus 0 x the model's (empty) output, added last so that backward reaches that output
    first: FSDP registers its pre-backward hooks (which put it in its backward state, FSDP1 asserts it)
    on the root module's outputs, and the loss from hidden states would otherwise never pass through them."""
    return total + cap.output.sum() * 0.0


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The model's keyword arguments for ``batch``: packed batches (``position_ids`` present) pass no 2-D
    mask, so transformers builds the block-diagonal causal mask from the position ids' resets."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


class TeacherHead:
    """A local teacher's signal for the counted rows, one chunk at a time: ``chunk(start, end)`` gives its
    logits over the shared vocabulary ``(end - start, n_vocab)``, or their top-k as `SparseTargets`
    taken at the distillation temperature (``top_k > 0``)."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, *, n_vocab: int,
                 top_k: int = 0, temperature: float = 1.0) -> None:  # fmt: skip
        self.hidden, self.weight = hidden, weight[:n_vocab] if n_vocab < weight.shape[0] else weight
        self.bias = None if bias is None else bias[:n_vocab]
        self.top_k, self.temperature = top_k, temperature

    def chunk(self, start: int, end: int) -> Tensor | SparseTargets:
        with torch.no_grad():
            logits = F.linear(self.hidden[start:end], self.weight, self.bias)
            if not self.top_k:
                return logits
            return SparseTargets.from_logits(logits, self.top_k, temperature=self.temperature)


def default_chunk_size(vocab: int, hidden: int | None = None) -> int:
    """Rows per chunk when ``--chunk-size`` is not given: ``max(1, 2**22 // V)`` (about 4 M logits, 16 MiB
    per float32 copy of a chunk; 32 rows at V = 131,072). ``hidden`` is not used: in the sweep of
    docs/train.md (V = 131,072, H = 128, CPU) 32 rows took less CPU time and memory than 128 or 512."""
    return max(1, 2**22 // vocab)


def fused_loss_sum(objective, model, teacher, batch: dict[str, Tensor], *, on_policy: bool):
    """(loss summed over the micro-batch's counted tokens, parts) computed from hidden states.

    Only the rows that count (label not -100 after the shift) are ever projected: prompt and padding
    rows, all-padding rows included, cost nothing (the dense path masks the same rows out)."""
    from distill.losses import fused_head_loss

    s = hidden_states(model, batch)
    labels = batch["labels"][:, 1:]
    rows = labels != IGNORE
    if not bool(rows.any()):
        # The head's weight (and bias) still get a zero gradient, as in the dense path: a process whose
        # micro-batch scores nothing must do the same collectives as the others (FSDP2 reduce-scatters
        # only the parameters that have a gradient; DDP waits for every one).
        zero = s.hidden.sum() * 0.0 + s.weight.sum() * 0.0
        zero = anchored(zero + s.bias.sum() * 0.0 if s.bias is not None else zero, s)
        parts = {"ce": zero.detach(), "kd": zero.detach()}
        return zero, parts if objective.distills else {"ce": parts["ce"]}
    h = s.hidden[:, :-1][rows]
    n_vocab = objective.n_vocab
    # Padding rows of the head past the shared vocabulary are left out; no slice when there are none
    # (a slice's backward would allocate a second (V, H) gradient).
    cut = n_vocab is not None and n_vocab < s.weight.shape[0]
    weight = s.weight[:n_vocab] if cut else s.weight
    bias = s.bias[:n_vocab] if cut and s.bias is not None else s.bias
    lab = labels[rows]
    chunk = objective.chunk_size or default_chunk_size(weight.shape[0], weight.shape[1])
    if not objective.distills:
        total, parts = fused_head_loss(h, weight, bias, labels=lab, ce_scale=1.0, chunk_size=chunk)
        return anchored(total, s), {"ce": parts["ce"]}
    kd_rows = rows & batch["kd_mask"][:, 1:].bool() if "kd_mask" in batch else rows
    kd_mask = kd_rows[rows]
    if teacher is not None:
        with torch.no_grad():  # the teacher is frozen: no activations kept
            t = hidden_states(teacher, batch)
        target = TeacherHead(t.hidden[:, :-1][rows], t.weight, t.bias, n_vocab=n_vocab or t.weight.shape[0],
                             top_k=objective.teacher_top_k, temperature=objective.temperature)  # fmt: skip
    else:
        target = SparseTargets(batch["topk_ids"][:, 1:][rows], batch["topk_logprobs"][:, 1:][rows],
                               temperature=objective.capture_temperature)  # fmt: skip
    alpha, t2 = objective.kd_weight(on_policy), objective.temperature**2
    total, parts = fused_head_loss(
        h, weight, bias, teacher=target, kd_mask=None if bool(kd_mask.all()) else kd_mask, labels=lab,
        kd_scale=alpha * t2, ce_scale=1.0 - alpha, loss=objective.loss, temperature=objective.temperature,
        loss_kwargs=objective.loss_kwargs, chunk_size=chunk,
    )  # fmt: skip
    return anchored(total, s), {"ce": parts["ce"], "kd": parts["kd"] * t2}


def micro_batch_loss(objective, model, teacher, batch: dict[str, Tensor], *, on_policy: bool):
    """(loss sum, parts) of one micro-batch: fused from hidden states, or from the full logits (``--no-fused``)."""
    if objective.fused:
        return fused_loss_sum(objective, model, teacher, batch, on_policy=on_policy)
    s_logits = model(**model_inputs(batch)).logits
    t_logits = None
    if teacher is not None:
        with torch.no_grad():  # the teacher is frozen: no activations kept
            t_logits = teacher(**model_inputs(batch)).logits
    return objective.loss_sum(s_logits, batch, t_logits, on_policy=on_policy)


__all__ = ["TeacherHead", "captured_head", "default_chunk_size", "micro_batch_loss", "output_head"]

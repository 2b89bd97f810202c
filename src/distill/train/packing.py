"""Packing short examples into full sequences (``--pack``), attention kept within each example.

Examples are concatenated in data order into rows of at most ``max_length`` tokens (an example
longer than that is already truncated by loading). Each piece's position ids restart at 0; a batch
of packed rows is given to the model with ``position_ids`` and no 2-D attention mask, from which
transformers builds a block-diagonal causal mask (a token sees only earlier tokens of its own
example). `check_isolation` verifies that on the student itself before training: a model whose
attention ignores the position-id resets is refused. The first token of every piece gets label -100:
it would otherwise be "predicted" from the end of the previous example (unpacked, it is never a target).
"""

from __future__ import annotations

from typing import Any

import torch

from distill.train.examples import IGNORE

_ROW_KEYS = ("input_ids", "labels", "topk_ids", "topk_logprobs", "kd_mask")


def pack_examples(examples: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Rows of concatenated examples, each at most ``max_length`` tokens, with ``position_ids``."""
    rows: list[list[dict[str, Any]]] = [[]]
    used = 0
    for e in examples:
        n = len(e["input_ids"])
        if rows[-1] and used + n > max_length:
            rows.append([])
            used = 0
        rows[-1].append(e)
        used += n
    return [_join(pieces) for pieces in rows if pieces]


def _join(pieces: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"id": "+".join(p["id"] for p in pieces), "prompt_len": 0}
    for key in _ROW_KEYS:
        if all(key in p for p in pieces):
            out[key] = torch.cat([p[key] for p in pieces])
    labels = out["labels"].clone()
    start = 0
    for p in pieces:
        labels[start] = IGNORE  # not predictable from the previous example
        start += len(p["input_ids"])
    out["labels"] = labels
    out["position_ids"] = torch.cat([torch.arange(len(p["input_ids"])) for p in pieces])
    return out


def check_packing(cfg, tok, student) -> None:
    """Refuse ``--pack`` before training: a tokenizer without EOS (examples could not end), or a model
    whose attention crosses example boundaries in a packed row (`check_isolation`)."""
    if tok.eos_token_id is None:
        raise ValueError(
            f"--pack needs a tokenizer with an EOS token to end each packed example; {cfg.student}'s has none"
        )
    leak = check_isolation(student)
    if leak > 1e-4:
        raise ValueError(
            f"--pack: {type(student).__name__} ({cfg.student}) lets tokens attend to the previous example in a "
            f"packed row (logits moved by {leak:.3g}: its attention ignores the position-id resets); "
            "train without --pack"
        )


@torch.no_grad()
def check_isolation(model) -> float:
    """Largest change of the second example's logits when a first example is packed before it (0 when
    attention stays within each example). A probe of 5 + 4 tokens, run on ``model`` itself."""
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(1, vocab, (5,), generator=g), torch.randint(1, vocab, (4,), generator=g)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        alone = model(input_ids=b[None].to(device), use_cache=False).logits[0]
        packed_ids = torch.cat([a, b])[None].to(device)
        pos = torch.cat([torch.arange(5), torch.arange(4)])[None].to(device)
        packed = model(input_ids=packed_ids, position_ids=pos, use_cache=False).logits[0, 5:]
    finally:
        model.train(was)
    return float((packed.float() - alone.float()).abs().max())


__all__ = ["check_isolation", "check_packing", "pack_examples"]

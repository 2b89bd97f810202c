"""Checks and switches for the memory knobs of `distill train` (``--chunk-size``,
``--gradient-checkpointing``), done once before the loop; `distill.train.setup` calls them."""

from __future__ import annotations

from typing import Any

from distill.train.config import TrainConfig


def check_chunk_size(cfg: TrainConfig, examples: list[dict[str, Any]]) -> None:
    """Refuse a ``--chunk-size`` larger than a micro-batch can hold (its longest rows, all counted)."""
    if cfg.chunk_size is None:
        return
    most = cfg.batch_size * max(len(e["input_ids"]) - 1 for e in examples)
    if cfg.chunk_size > most:
        raise ValueError(
            f"chunk_size (--chunk-size) {cfg.chunk_size} is larger than a micro-batch's tokens (at most "
            f"{cfg.batch_size} x {most // cfg.batch_size} = {most} with --batch-size {cfg.batch_size}): "
            "give at most that, or leave it unset for the default"
        )


def enable_checkpointing(cfg: TrainConfig, student) -> None:
    """``--gradient-checkpointing``: layer activations recomputed in backward; refused where unsupported."""
    if not cfg.gradient_checkpointing:
        return
    if not getattr(student, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"--gradient-checkpointing: {type(student).__name__} ({cfg.student}) does not support gradient "
            "checkpointing (transformers' supports_gradient_checkpointing is False); train without it"
        )
    # Non-reentrant: gradients also reach frozen-embedding models (LoRA) without enable_input_require_grads.
    kwargs = {"use_reentrant": False}
    if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.2x's name for it
        student.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

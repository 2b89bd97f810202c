"""On-policy steps (GKD): which steps the student writes the completions, and its samples.

A step is on-policy with probability ``lmbda``, drawn from a generator seeded by ``(seed, step)``
(never the global RNG), so every process agrees and a resumed run draws the same. The student's
samples replace the data's completions; the teacher then scores every sampled token.
"""

from __future__ import annotations

from typing import Any

import torch

from distill.train.config import TrainConfig
from distill.train.examples import IGNORE, collate_prompts


def is_on_policy(cfg: TrainConfig, step: int) -> bool:
    """Whether optimizer step ``step`` (0-based) trains on the student's own samples."""
    g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    return cfg.mode == "on-policy" and float(torch.rand((), generator=g)) < cfg.lmbda


@torch.no_grad()
def student_samples(cfg: TrainConfig, model, examples, tok, *, synced: bool = False) -> list[dict[str, Any]]:
    """The student continues each example's prompt; returns examples whose completion is its sample.

    ``synced``: every process runs as many forward passes as the slowest (a sharded model's forward is
    a collective, so a process that stops early would leave the others waiting)."""
    prompts = collate_prompts(examples, tok.pad_token_id)
    was_training = model.training
    model.eval()
    out = model.generate(
        **{k: v.to(model.device) for k, v in prompts.items()},
        do_sample=True,
        temperature=cfg.sample_temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=cfg.max_new_tokens,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        synced_gpus=synced,
    ).cpu()
    model.train(was_training)
    width = prompts["input_ids"].shape[1]
    made = []
    for e, row in zip(examples, out):
        p = e["input_ids"][: max(e["prompt_len"], 1)]
        gen = row[width:].tolist()
        if tok.eos_token_id in gen:  # keep the end-of-sequence token: the teacher grades stopping too
            gen = gen[: gen.index(tok.eos_token_id) + 1]
        ids = torch.cat([p, torch.tensor(gen, dtype=torch.long)])
        labels = torch.cat([torch.full_like(p, IGNORE), torch.tensor(gen, dtype=torch.long)])
        sample = {"id": e["id"], "input_ids": ids, "labels": labels, "prompt_len": len(p)}
        if "text" in e:  # what a teacher of another tokenizer reads (`distill.train.cross_data.CrossTeacher`)
            sample["text"] = (e["text"][0], tok.decode(gen, skip_special_tokens=True))
        made.append(sample)
    return made


__all__ = ["is_on_policy", "student_samples"]

"""On-policy steps (GKD): which steps the student writes the completions, and its samples.

A step is on-policy with probability ``lmbda``, drawn from a generator seeded by ``(seed, step)``
(never the global RNG), so every process agrees and a resumed run draws the same. The student's
samples replace the data's completions; the teacher then scores every sampled token: a local
teacher with its full logits (in the loop), an HTTP teacher (vLLM) here, through `remote_scores`,
which adds the same per-example top-k fields a store's examples carry, so the loss takes the
stored-top-k path.
"""

from __future__ import annotations

from typing import Any

import torch

from distill.train.config import TrainConfig
from distill.train.examples import IGNORE, collate_prompts

REMOTE_TOP_K = 20
"""Top-k an HTTP teacher is asked per position when ``teacher_top_k`` is 0 (vLLM's default ``--max-logprobs``)."""


def remote_top_k(cfg: TrainConfig) -> int:
    """Top-k an HTTP teacher (``--teacher URL``) is asked per position: ``teacher_top_k``, or `REMOTE_TOP_K`."""
    return cfg.teacher_top_k or REMOTE_TOP_K


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


def remote_scores(teacher, examples: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """``examples`` with ``topk_ids`` (L, k) long and ``topk_logprobs`` (L, k) float32 from an HTTP
    teacher (`distill.models.api.APITeacher.score_tokens`: vLLM's ``prompt_logprobs``): row i is the
    teacher's distribution for the token at position i given the tokens before it (row 0 zeros), as in
    a store's examples. Only labelled positions are trained on, so the prompt rows cost nothing."""
    scored = teacher.score_tokens([e["input_ids"].tolist() for e in examples], k)
    out = []
    for e, (ids, lps) in zip(examples, scored):
        out.append(
            {
                **e,
                "topk_ids": torch.tensor(ids, dtype=torch.long),
                "topk_logprobs": torch.tensor(lps, dtype=torch.float32),
            }
        )
    return out


def open_scoring_teacher(url: str, student_tokenizer, k: int):
    """The `APITeacher` at ``url`` for on-policy scoring, after checking (one line each, before any
    training step) that it is vLLM (only its ``prompt_logprobs`` scores given tokens), that it
    tokenises `PROBE` as the student's tokenizer does (token-level distillation needs one vocabulary)
    and that it returns ``k`` log-probabilities per position."""
    from distill.models.http import APIError
    from distill.models.open import open_model
    from distill.models.server import PROBE, _tokenize, check_top_k, local_probe_ids

    teacher = open_model(url, role="teacher")
    where = f"--teacher {teacher.urls[0]}"
    try:
        if teacher._known_kind() != "vllm":
            raise ValueError(
                f"{where}: on-policy scoring needs vLLM's prompt_logprobs; this server's /v1/models card "
                f"says owned_by {(teacher._card or {}).get('owned_by')!r}"
            )
        server_ids, strs = _tokenize(teacher, PROBE)
        mine = local_probe_ids(student_tokenizer)
        if server_ids != mine:
            i = next(
                (j for j, (a, b) in enumerate(zip(server_ids, mine)) if a != b),
                min(len(mine), len(server_ids)),
            )
            raise ValueError(
                f"{where} tokenises the probe text differently from the student's tokenizer (first difference "
                f"at probe token {i}: server {strs[i] if strs and i < len(strs) else None!r}); token-level "
                "distillation needs one tokenizer"
            )
        check_top_k(teacher, k)
    except APIError as err:
        raise ValueError(f"{where}: {err}") from None
    return teacher


__all__ = ["is_on_policy", "open_scoring_teacher", "remote_scores", "student_samples"]

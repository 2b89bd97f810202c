"""Training a causal-LM student: the one training loop, `train(cfg) -> TrainResult`.

Three modes (``cfg.mode``):

- ``sft``: cross-entropy on the completions (prompt tokens masked); works with any teacher, since
  only its text is used.
- ``logits``: ``alpha * KD + (1 - alpha) * CE``, KD a loss from `distill.losses` against the store's
  top-k log-probabilities, or against a local teacher's full logits (``cfg.teacher``).
- ``on-policy`` (GKD): each step, with probability ``lmbda``, the student writes the completions and
  the teacher scores every token with the generalized JSD (``beta``); otherwise the data's completions
  are scored the same way.

Normalisation is the loop's job: every micro-batch's loss is a *sum* over its tokens divided by the
number of counted tokens in the whole accumulated batch across all processes, so G accumulated
micro-batches on P processes give the gradient of the same examples in one batch.
Multi-process runs go through `accelerate` (``accelerate launch -m distill train ...``): DDP and FSDP;
`distill.train.distributed` refuses the setups this loop would get wrong (DeepSpeed, FSDP requested on CPU).
"""

from __future__ import annotations

import json
import signal
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from distill.train import checkpoint as ckpt
from distill.train.config import TrainConfig
from distill.train.examples import IGNORE, BatchOrder, DataStats, collate, collate_prompts, load_examples


@dataclass
class TrainResult:
    """What a training run did."""

    out: Path
    """Directory holding the saved model (``save_pretrained``), tokenizer, metrics.jsonl, checkpoints/."""
    steps: int
    """Optimizer steps done in total (including those before a resume)."""
    tokens: int
    """Counted (loss-bearing) tokens seen in total, all processes."""
    final_loss: float
    """Loss of the last step (per counted token)."""
    seconds: float
    """Wall-clock time of this run (not counting earlier runs before a resume)."""
    stopped: str
    """``max_steps`` or ``sigterm``."""
    data: DataStats
    resumed_from: str | None = None
    changed_on_resume: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    """The metrics lines of this run (also in metrics.jsonl)."""


# --- losses ------------------------------------------------------------------------------------


def _kd_sum(cfg: TrainConfig, s_logits, batch, t_logits, stats: DataStats, mask) -> torch.Tensor:
    """Sum over counted positions of the distillation term. ``s_logits``: (B, L-1, V) shifted.

    Multiplied by T² (Hinton et al.): the soft term's gradients scale as 1/T², and T² keeps its
    weight against the CE term when T changes. At T = 1 (GKD's setting) the factor is 1.
    """
    from distill.losses import SparseTargets, kd_loss

    n = int(mask.sum())
    if n == 0:
        return s_logits.sum() * 0.0
    name = "generalized_jsd" if cfg.mode == "on-policy" else cfg.loss
    kw = {"beta": cfg.beta} if name == "generalized_jsd" else {}
    if t_logits is not None:
        teacher = t_logits
    else:
        teacher = SparseTargets(
            batch["topk_ids"][:, 1:], batch["topk_logprobs"][:, 1:], temperature=stats.capture_temperature
        )
    mean = kd_loss(s_logits, teacher, loss=name, temperature=cfg.temperature, mask=mask, **kw)
    return mean * n * cfg.temperature**2


def _loss_sum(
    cfg, s_logits, batch, t_logits, stats, on_policy: bool, n_vocab: int
) -> tuple[torch.Tensor, dict]:
    """(sum of the per-token objective over the micro-batch, parts for logging). Logits: (B, L, V).

    ``n_vocab``: real vocabulary entries shared with the teacher; padded embedding rows beyond it
    hold no token and are left out of both distributions."""
    s = s_logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    t = None if t_logits is None else t_logits[:, :-1]
    if cfg.mode != "sft":
        s = s[..., :n_vocab]
        t = None if t is None else t[..., :n_vocab]
    ce = F.cross_entropy(
        s.float().reshape(-1, s.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    if cfg.mode == "sft":
        return ce, {"ce": ce.detach()}
    kd = _kd_sum(cfg, s, batch, t, stats, mask)
    # On-policy batches: the student's own samples are not targets, so pure JSD (as in GKD).
    alpha = 1.0 if on_policy else cfg.alpha
    return alpha * kd + (1 - alpha) * ce, {"ce": ce.detach(), "kd": kd.detach()}


# --- models and data ---------------------------------------------------------------------------


def _load_model(path: str, what: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is the one that matters
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{what} {p}: not a model directory (no config.json)")
    tok = AutoTokenizer.from_pretrained(p)
    model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _apply_lora(cfg: TrainConfig, model):
    from peft import LoraConfig, get_peft_model

    targets = list(cfg.lora_target_modules) or "all-linear"
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


@torch.no_grad()
def _student_samples(cfg, model, examples, tok, *, synced: bool = False) -> list[dict]:
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
        made.append({"id": e["id"], "input_ids": ids, "labels": labels, "prompt_len": len(p)})
    return made


def _rng_state(accelerator) -> dict[str, torch.Tensor]:
    # Gathered as tensors from every process (no pickle); restored per rank on resume.
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    out = {}
    for k, v in states.items():
        allv = accelerator.gather(v.to(accelerator.device).unsqueeze(0)).cpu()
        for r in range(allv.shape[0]):
            out[f"{k}.{r}"] = allv[r].contiguous()
    return out


def accumulate_gradients(
    cfg: TrainConfig,
    accelerator,
    model,
    teacher,
    batches: list[dict],
    *,
    stats,
    on_policy: bool,
    n_vocab: int,
) -> tuple[float, dict[str, float], int]:
    """Backward over the micro-batches of one optimizer step; returns (loss sum, part sums, tokens counted).

    The normalisation contract: each micro-batch contributes its loss *summed* over tokens, divided
    by the number of counted tokens in all micro-batches on all processes, so the accumulated gradient
    equals the gradient of the mean per-token loss over the whole global batch.
    """
    world = accelerator.num_processes
    # Count tokens over the whole accumulated batch on all processes before any backward.
    n_local = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    n_total = int(accelerator.reduce(torch.tensor(n_local, device=accelerator.device), "sum"))
    scale = world / max(n_total, 1)  # DDP averages gradients over processes: undo that average
    total, parts_sum = 0.0, {}
    for m, b in enumerate(batches):
        b = {k: v.to(accelerator.device) for k, v in b.items()}
        # Gradients are all-reduced once, after the last micro-batch.
        sync = nullcontext() if m == len(batches) - 1 else accelerator.no_sync(model)
        with sync, accelerator.autocast():
            s_logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            t_logits = None
            if teacher is not None:
                with torch.no_grad():  # the teacher is frozen: no activations kept
                    t_logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            loss_sum, parts = _loss_sum(cfg, s_logits, b, t_logits, stats, on_policy, n_vocab)
            if not torch.isfinite(loss_sum):
                raise FloatingPointError(f"non-finite loss {float(loss_sum)} (parts {parts})")
            accelerator.backward(loss_sum * scale)
        total += float(loss_sum.detach())
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + float(v)
    return total, parts_sum, n_total


# --- the loop ----------------------------------------------------------------------------------


def train(cfg: TrainConfig, *, accelerator=None, console=None) -> TrainResult:
    """Train ``cfg.student`` on ``cfg.data`` as ``cfg.mode`` says; save it to ``cfg.out``; return a summary.

    Every input is checked before the first step (data, tokenizers, checkpoint). ``accelerator``: an
    `accelerate.Accelerator` (one is made from ``cfg`` when ``None``; under ``accelerate launch`` it
    picks up the processes).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration
    from rich.console import Console

    from distill.train.distributed import (
        check_launch,
        check_requested,
        gather_train_state,
        load_train_state,
        mixed_precision,
    )
    from distill.train.trackers import PROJECT, check_trackers, logging_dir, tracker_env
    from distill.train.vocab import check_store_tokenizer, shared_vocab_size

    t_start = time.perf_counter()
    out = Path(cfg.out)
    check_trackers(cfg.log_with)
    if accelerator is None:
        check_requested()
    precision = (
        mixed_precision(cfg.mixed_precision, cuda=torch.cuda.is_available()) if accelerator is None else None
    )
    accelerator = accelerator or Accelerator(
        # Without a GPU, cpu=True lets processes started by `accelerate launch`/torchrun join a gloo group.
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        log_with=list(cfg.log_with) or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(logging_dir(out))),
    )
    check_launch(accelerator, lora=bool(cfg.lora_r))  # before any model is loaded
    console = console or Console(stderr=True)
    main = accelerator.is_main_process
    say = console.print if main else (lambda *a, **k: None)

    student, tok = _load_model(cfg.student, "student")
    max_length = cfg.max_length or int(getattr(student.config, "max_position_embeddings", 2048))
    token_level = cfg.mode != "sft"
    teacher = None
    n_vocab = len(tok)
    if cfg.teacher and token_level:
        teacher, t_tok = _load_model(cfg.teacher, "teacher")
        n_vocab = shared_vocab_size(
            tok,
            t_tok,
            student_vocab_size=student.config.vocab_size,
            teacher_vocab_size=teacher.config.vocab_size,
        )
        teacher.requires_grad_(False).eval().to(accelerator.device)
    examples, stats = load_examples(
        cfg.data,
        tok,
        max_length=max_length,
        need_topk=token_level and teacher is None,
        token_level=token_level,
    )
    if token_level and teacher is None:
        check_store_tokenizer(stats.manifest, tok, cfg.data)
        top = max(int(e["topk_ids"].max()) for e in examples)
        if top >= student.config.vocab_size:
            raise ValueError(f"{cfg.data}: teacher token id {top} is outside the student's vocabulary")
    say(f"[bold]data[/]: {stats.summary()}")
    context = int(getattr(student.config, "max_position_embeddings", 0) or 0)
    if cfg.mode == "on-policy" and context:
        longest = max(e["prompt_len"] for e in examples)
        if longest + cfg.max_new_tokens > context:
            raise ValueError(
                f"on-policy: the longest prompt ({longest} tokens) + max_new_tokens ({cfg.max_new_tokens}) "
                f"exceeds the student's context ({context}); lower --max-new-tokens or --max-length"
            )

    torch.manual_seed(cfg.seed)  # LoRA initialisation
    if cfg.lora_r:
        student = _apply_lora(cfg, student)
    student.train()
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    # Names and whole shapes before `prepare` (FSDP replaces parameters with shards): checkpoints use them.
    names, shapes = list(trainable), {n: tuple(p.shape) for n, p in trainable.items()}
    if accelerator.distributed_type == DistributedType.FSDP and not getattr(accelerator, "is_fsdp2", False):
        # FSDP1 replaces the parameters with flat ones and accelerate does not remap an optimizer made
        # before: it would hold parameters the wrapped model no longer has. Make it from the wrapped model.
        model = accelerator.prepare(student)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = accelerator.prepare(torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
    else:
        optimizer = torch.optim.AdamW(trainable.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        model, optimizer = accelerator.prepare(student, optimizer)
    del trainable  # under FSDP these are no longer the parameters being trained

    world, rank = accelerator.num_processes, accelerator.process_index
    per_rank = cfg.batch_size * cfg.grad_accum
    global_batch = per_rank * world
    order = BatchOrder(len(examples), cfg.seed)

    # Resume: newest complete checkpoint; report each changed setting.
    step, tokens_seen, resumed_from, changed = 0, 0, None, {}
    ckpt_root = out / "checkpoints"
    if cfg.resume:
        path, skipped = ckpt.latest(ckpt_root)
        for p, why in skipped:
            say(f"[yellow]resume[/]: skipping {p.name}: {why}")
        if path is None:
            say(f"[yellow]resume[/]: no complete checkpoint under {ckpt_root}; starting from step 0")
        else:
            loaded = ckpt.read(path, shapes=shapes)
            # Whole tensors in, sharded where the model is sharded: resume is exact under FSDP too.
            load_train_state(model, _inner(optimizer), names, loaded["params"], loaded["optimizer"])
            state, rng = loaded["trainer_state"], loaded["rng"]
            step, tokens_seen, resumed_from = int(state["step"]), int(state["tokens"]), str(path)
            changed = {k: v for k, v in cfg.changed_fields(state["config"]).items() if k != "resume"}
            for k, (old, new) in changed.items():
                say(f"[yellow]resume[/]: {k} changed since the checkpoint: {old!r} -> {new!r}")
            if state.get("world_size", world) != world:
                say(
                    f"[yellow]resume[/]: processes changed {state['world_size']} -> {world}; data order continues"
                )
            torch.set_rng_state(rng.get(f"cpu.{rank}", rng["cpu.0"]))
            if torch.cuda.is_available() and f"cuda.{rank}" in rng:
                torch.cuda.set_rng_state(rng[f"cuda.{rank}"])
            say(f"[bold]resumed[/] from {path.name} at step {step}")
    else:
        torch.manual_seed(cfg.seed + rank)  # on-policy sampling differs per process, repeatably

    out.mkdir(parents=True, exist_ok=True)
    tracking = ExitStack()  # trackers end (and their environment is restored) however the loop ends
    if cfg.log_with:
        tracking.enter_context(tracker_env(cfg.log_with, out))
        accelerator.init_trackers(PROJECT, config={k: str(v) for k, v in cfg.to_dict().items()})
        tracking.callback(accelerator.end_training)
    log_path = out / "metrics.jsonl"
    stop = {"sigterm": False}
    old_handler = None
    try:  # SIGTERM finishes the step, writes a checkpoint and returns (only the main thread may set it)
        old_handler = signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("sigterm", True))
    except ValueError:
        pass

    def save_checkpoint(at: int) -> None:
        rng = _rng_state(accelerator)
        # A collective: under FSDP every process hands its shards to rank 0.
        params, optim_state = gather_train_state(model, _inner(optimizer), names)
        if main:
            state = {
                "step": at,
                "tokens": tokens_seen,
                "config": cfg.to_dict(),
                "world_size": world,
                "data_position": order.position(at, global_batch),
                "n_examples": len(examples),
            }
            ckpt.save(
                ckpt_root,
                at,
                params=params,
                optimizer=optim_state,
                rng=rng,
                trainer_state=state,
                keep=cfg.keep_checkpoints,
            )
        accelerator.wait_for_everyone()

    history: list[dict[str, Any]] = []
    progress = _progress(console, enabled=main and cfg.progress)
    task = progress.add_task("train", total=cfg.max_steps, completed=step, loss=float("nan"), tps=0.0)
    loss_value, stopped, t_loop, tokens_run = float("nan"), "max_steps", time.perf_counter(), 0
    with tracking, progress, open(log_path, "a", encoding="utf-8") if main else nullcontext() as log:
        while step < cfg.max_steps:
            idx = order.step(step, global_batch)[rank * per_rank : (rank + 1) * per_rank]
            micro = [
                [examples[i] for i in idx[m * cfg.batch_size : (m + 1) * cfg.batch_size]]
                for m in range(cfg.grad_accum)
            ]
            # Same decision on every process: a generator seeded by (seed, step), not the global RNG.
            g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
            on_policy = cfg.mode == "on-policy" and float(torch.rand((), generator=g)) < cfg.lmbda
            if on_policy:
                synced = world > 1 and accelerator.distributed_type == DistributedType.FSDP
                micro = [
                    _student_samples(cfg, accelerator.unwrap_model(model), mb, tok, synced=synced)
                    for mb in micro
                ]
            batches = [collate(mb, tok.pad_token_id) for mb in micro]
            total, parts_sum, n_total = accumulate_gradients(
                cfg, accelerator, model, teacher, batches, stats=stats, on_policy=on_policy, n_vocab=n_vocab
            )
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += n_total
            tokens_run += n_total
            # Loss per counted token over all processes (what was minimised).
            red = accelerator.reduce(
                torch.tensor([total, *parts_sum.values()], device=accelerator.device), "sum"
            )
            loss_value = float(red[0]) / max(n_total, 1)
            tps = tokens_run / max(time.perf_counter() - t_loop, 1e-9)
            progress.update(task, completed=step, loss=loss_value, tps=tps)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                line = {
                    "step": step,
                    "loss": loss_value,
                    "tokens": tokens_seen,
                    "tokens_per_s": tps,
                    "elapsed_s": time.perf_counter() - t_loop,
                    "lr": lr,
                    "on_policy": on_policy,
                    **{k: float(v) / max(n_total, 1) for k, v in zip(parts_sum, red[1:])},
                }
                history.append(line)
                if main:
                    log.write(json.dumps(line) + "\n")
                    log.flush()
                if cfg.log_with:
                    accelerator.log({k: v for k, v in line.items() if k != "step"}, step=step)
            if world > 1:  # every process must stop at the same step, or the collectives deadlock
                flag = accelerator.reduce(
                    torch.tensor(int(stop["sigterm"]), device=accelerator.device), "sum"
                )
                stop["sigterm"] = bool(int(flag))
            if stop["sigterm"]:
                save_checkpoint(step)
                stopped = "sigterm"
                say(f"[yellow]SIGTERM[/]: checkpoint written at step {step}; resume with --resume")
                break
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                save_checkpoint(step)
    if old_handler is not None:
        signal.signal(signal.SIGTERM, old_handler)
    if stopped == "max_steps":
        save_checkpoint(step)
        _save_model(cfg, accelerator, model, tok, out)
    return TrainResult(
        out=out,
        steps=step,
        tokens=tokens_seen,
        final_loss=loss_value,
        seconds=time.perf_counter() - t_start,
        stopped=stopped,
        data=stats,
        resumed_from=resumed_from,
        changed_on_resume=changed,
        history=history,
    )


def _save_model(cfg: TrainConfig, accelerator, model, tok, out: Path) -> None:
    """The student as ``save_pretrained`` writes it (safetensors) with its tokenizer; LoRA merged on request."""
    accelerator.wait_for_everyone()
    # Every process takes part: under FSDP this gathers the whole weights onto the main process.
    from distill.train.distributed import full_model_state

    state = full_model_state(model)
    if not accelerator.is_main_process:
        return
    m = accelerator.unwrap_model(model)
    if cfg.lora_r and cfg.merge_lora:
        m, state = m.merge_and_unload(), None  # merged weights: the model's own state dict
    m.save_pretrained(out, state_dict=state, safe_serialization=True)
    tok.save_pretrained(out)


def _inner(optimizer):
    # accelerate's optimizer wrapper; torch.distributed.checkpoint wants the optimizer it wraps.
    return getattr(optimizer, "optimizer", optimizer)


def _progress(console, *, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


__all__ = ["train", "TrainResult", "accumulate_gradients"]

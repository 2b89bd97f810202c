"""Training a causal-LM student: the one training loop, `train(cfg) -> TrainResult`.

Read `train` top to bottom: setup (`distill.train.setup`: accelerate, models, data, optimizer, resume,
trackers, SIGTERM), the objective resolved once (`distill.train.objective`), then the loop.

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
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distill.train import setup
from distill.train.checkpoint import prepare_output
from distill.train.config import TrainConfig
from distill.train.examples import IGNORE, BatchOrder, DataStats, collate
from distill.train.heads import micro_batch_loss
from distill.train.objective import Objective
from distill.train.onpolicy import is_on_policy, remote_scores, remote_top_k, student_samples


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


def accumulate_gradients(
    objective: Objective | TrainConfig,
    accelerator,
    model,
    teacher,
    batches: list[dict],
    *,
    on_policy: bool,
    stats: DataStats | None = None,
    n_vocab: int | None = None,
) -> tuple[float, dict[str, float], int]:
    """Backward over the micro-batches of one optimizer step; returns (loss sum, part sums, tokens counted).

    The normalisation contract: each micro-batch contributes its loss *summed* over tokens, divided
    by the number of counted tokens in all micro-batches on all processes, so the accumulated gradient
    equals the gradient of the mean per-token loss over the whole global batch.

    ``objective``: the run's `Objective`; a `TrainConfig` is resolved into one here, with the store's
    capture temperature from ``stats`` and the shared vocabulary size ``n_vocab``.
    """
    if isinstance(objective, TrainConfig):
        capture = stats.capture_temperature if stats is not None else 1.0
        objective = Objective.from_config(objective, capture_temperature=capture, n_vocab=n_vocab)
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
            loss_sum, parts = micro_batch_loss(objective, model, teacher, b, on_policy=on_policy)
            if not torch.isfinite(loss_sum):
                raise FloatingPointError(f"non-finite loss {float(loss_sum)} (parts {parts})")
            accelerator.backward(loss_sum * scale)
        total += float(loss_sum.detach())
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + float(v)
    return total, parts_sum, n_total


def _micro_batches(examples, order: BatchOrder, step: int, cfg: TrainConfig, world: int, rank: int):
    """This process's share of step ``step``: ``grad_accum`` lists of ``batch_size`` examples."""
    per_rank = cfg.batch_size * cfg.grad_accum
    idx = order.step(step, per_rank * world)[rank * per_rank : (rank + 1) * per_rank]
    b = cfg.batch_size
    return [[examples[i] for i in idx[m * b : (m + 1) * b]] for m in range(cfg.grad_accum)]


def _lr(cfg: TrainConfig, step: int) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up over ``warmup_steps``, then constant."""
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr


def _quiet(*args, **kwargs) -> None:
    pass


# --- the loop ----------------------------------------------------------------------------------


def train(cfg: TrainConfig, *, accelerator=None, console=None) -> TrainResult:
    """Train ``cfg.student`` on ``cfg.data`` as ``cfg.mode`` says; save it to ``cfg.out``; return a summary.

    Every input is checked before the first step (data, tokenizers, checkpoint). ``accelerator``: an
    `accelerate.Accelerator` (one is made from ``cfg`` when ``None``; under ``accelerate launch`` it
    picks up the processes).
    """
    from accelerate.utils import DistributedType
    from rich.console import Console

    t_start, out = time.perf_counter(), Path(cfg.out)
    accelerator = setup.make_accelerator(cfg, accelerator)
    console = console or Console(stderr=True)
    main = accelerator.is_main_process
    say = console.print if main else _quiet
    models = setup.load_models(cfg, accelerator)
    tok, teacher, cross_teacher = models.tokenizer, models.teacher, models.cross_teacher
    examples, stats = setup.load_data(cfg, models, say)
    objective = Objective.from_config(
        cfg, capture_temperature=stats.capture_temperature, n_vocab=models.n_vocab
    )
    run = setup.prepare(cfg, accelerator, models.student)
    model, optimizer = run.model, run.optimizer
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.batch_size * cfg.grad_accum * world
    order = BatchOrder(len(examples), cfg.seed)
    start = setup.resume(cfg, accelerator, run, say)
    checkpoints = setup.Checkpointer(
        cfg, accelerator, run, order, global_batch, len(examples), stats.capture_temperature
    )
    prepare_output(out)  # a read-only directory fails now, in one line, not at the first save
    tracking = setup.trackers(cfg, accelerator)
    # Under FSDP a sharded forward is a collective: every process samples as many steps as the slowest.
    synced = world > 1 and accelerator.distributed_type == DistributedType.FSDP

    step, tokens_seen, tokens_run, history = start.step, start.tokens, 0, []
    progress = setup.progress(console, enabled=main and cfg.progress)
    task = progress.add_task("train", total=cfg.max_steps, completed=step, loss=float("nan"), tps=0.0)
    loss_value, stopped, t_loop = float("nan"), "max_steps", time.perf_counter()
    log_file = open(out / "metrics.jsonl", "a", encoding="utf-8") if main else nullcontext()  # noqa: SIM115
    with tracking, setup.sigterm() as stop, progress, log_file as log:
        while step < cfg.max_steps:
            micro = _micro_batches(examples, order, step, cfg, world, rank)
            on_policy = is_on_policy(cfg, step)
            if on_policy:
                student = accelerator.unwrap_model(model)
                micro = [student_samples(cfg, student, mb, tok, synced=synced) for mb in micro]
                if cross_teacher is not None:  # a teacher of another tokenizer: targets for the fresh samples
                    micro = [cross_teacher.annotate(mb) for mb in micro]
            if models.remote_teacher is not None:  # an HTTP teacher scores every sequence (vLLM)
                micro = [remote_scores(models.remote_teacher, mb, remote_top_k(cfg)) for mb in micro]
            batches = [collate(mb, tok.pad_token_id) for mb in micro]
            total, parts_sum, n_total = accumulate_gradients(
                objective, accelerator, model, teacher, batches, on_policy=on_policy
            )
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            lr = _lr(cfg, step)
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
            if stop.requested(accelerator):
                checkpoints.save(step, tokens_seen)
                stopped = "sigterm"
                say(f"[yellow]SIGTERM[/]: checkpoint written at step {step}; resume with --resume")
                break
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                checkpoints.save(step, tokens_seen)
    if stopped == "max_steps":
        checkpoints.save(step, tokens_seen)
        setup.save_model(cfg, accelerator, model, tok, out)
    return TrainResult(
        out=out,
        steps=step,
        tokens=tokens_seen,
        final_loss=loss_value,
        seconds=time.perf_counter() - t_start,
        stopped=stopped,
        data=stats,
        resumed_from=start.resumed_from,
        changed_on_resume=start.changed,
        history=history,
    )


__all__ = ["train", "TrainResult", "accumulate_gradients"]

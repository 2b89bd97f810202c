"""Everything `distill.train.train` does before its loop, one named step each.

In order: `make_accelerator` (process setup and the launches refused), `load_models` (student,
tokenizer, optional local teacher, shared vocabulary), `load_data` (examples and what loading did),
`prepare` (LoRA, optimizer, accelerate's wrapping), `resume` (newest complete checkpoint, RNG state),
`trackers`, `sigterm`, and the `Checkpointer` and `save_model` the loop calls. Every input is checked
here, before the first step.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distill.train import checkpoint as ckpt
from distill.train.config import TrainConfig
from distill.train.cross_data import cross_store, cross_summary
from distill.train.distributed import (
    check_launch,
    check_requested,
    full_model_state,
    gather_train_state,
    load_train_state,
    mixed_precision,
)
from distill.train.examples import BatchOrder, DataStats, load_examples
from distill.train.knobs import check_chunk_size, enable_checkpointing
from distill.train.onpolicy import remote_top_k
from distill.train.packing import check_packing, pack_examples
from distill.train.trackers import PROJECT, check_trackers, logging_dir, tracker_env
from distill.train.vocab import check_store_tokenizer, shared_vocab_size, token_strings

Say = Callable[..., None]


def make_accelerator(cfg: TrainConfig, accelerator=None):
    """The `accelerate.Accelerator` of the run (``accelerator``, or one made from ``cfg``), after refusing
    the setups this loop would get wrong; nothing is loaded before these checks."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    check_trackers(cfg.log_with)
    if accelerator is None:
        check_requested()
        out = Path(cfg.out)
        accelerator = Accelerator(
            # Without a GPU, cpu=True lets processes started by `accelerate launch`/torchrun join a gloo group.
            cpu=not torch.cuda.is_available(),
            mixed_precision=mixed_precision(cfg.mixed_precision, cuda=torch.cuda.is_available()),
            log_with=list(cfg.log_with) or None,
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(logging_dir(out))),
        )
    check_launch(accelerator, lora=bool(cfg.lora_r))  # before any model is loaded
    return accelerator


def load_model(path: str, what: str, trust_remote_code: bool = False):
    """``(model, tokenizer)`` from a `save_pretrained` directory, float32; a pad token is set if missing.

    Through `distill.models.loading`: safetensors only, the checkpoint's own code only when trusted."""
    from transformers.utils import logging as hf_logging

    from distill.models.loading import load_causal_lm, load_tokenizer

    hf_logging.disable_progress_bar()  # our own progress bar is the one that matters
    tok = load_tokenizer(path, what, trust_remote_code=trust_remote_code)
    model = load_causal_lm(path, what, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


@dataclass
class Models:
    """The student (not yet prepared), its tokenizer, the frozen local teacher if any."""

    student: Any
    tokenizer: Any
    teacher: Any | None
    n_vocab: int
    """Real vocabulary entries (the student's tokenizer; shared with the teacher's when there is one)."""
    cross_teacher: Any | None = None
    """A local teacher of another tokenizer (`distill.train.cross_data.CrossTeacher`); ``teacher`` is
    then None: its targets come projected onto the student's vocabulary, in the batches."""
    remote_teacher: Any | None = None
    """On-policy with ``--teacher URL``: the `APITeacher` (vLLM) that scores every sequence."""


def load_models(cfg: TrainConfig, accelerator) -> Models:
    """Student and tokenizer; in token-level modes also the local teacher (frozen, on the device), after
    checking that both speak the same vocabulary (or, when not, wrapped as a `CrossTeacher`)."""
    student, tok = load_model(cfg.student, "student", cfg.trust_remote_code)
    teacher, n_vocab = None, len(tok)
    if cfg.teacher and cfg.mode == "on-policy" and cfg.teacher.startswith(("http://", "https://")):
        from distill.train.onpolicy import open_scoring_teacher

        remote = open_scoring_teacher(cfg.teacher, tok, remote_top_k(cfg))
        return Models(student=student, tokenizer=tok, teacher=None, n_vocab=n_vocab, remote_teacher=remote)
    if cfg.teacher and cfg.mode != "sft":
        teacher, t_tok = load_model(cfg.teacher, "teacher", cfg.trust_remote_code)
        if token_strings(tok) != token_strings(t_tok):  # another tokenizer: distil through the text
            from distill.train.cross_data import CrossTeacher

            teacher.requires_grad_(False).eval().to(accelerator.device)
            cross = CrossTeacher(teacher, t_tok, tok, k=20, top_k=cfg.cross_top_k)
            return Models(student=student, tokenizer=tok, teacher=None, n_vocab=n_vocab, cross_teacher=cross)
        n_vocab = shared_vocab_size(
            tok,
            t_tok,
            student_vocab_size=student.config.vocab_size,
            teacher_vocab_size=teacher.config.vocab_size,
        )
        teacher.requires_grad_(False).eval().to(accelerator.device)
        if cfg.teacher_top_k > n_vocab:
            raise ValueError(
                f"teacher_top_k (--teacher-top-k) {cfg.teacher_top_k} is more than the {n_vocab} vocabulary "
                "entries the models share"
            )
    return Models(student=student, tokenizer=tok, teacher=teacher, n_vocab=n_vocab)


def max_length(cfg: TrainConfig, student) -> int:
    """Longest sequence: ``cfg.max_length``, else the student's context size."""
    return cfg.max_length or int(getattr(student.config, "max_position_embeddings", 2048))


def load_data(cfg: TrainConfig, models: Models, say: Say) -> tuple[list[dict[str, Any]], DataStats]:
    """The training examples and what loading did (printed); checks the store's tokenizer and token ids,
    and that on-policy prompts leave room in the student's context for ``max_new_tokens``."""
    student, tok = models.student, models.tokenizer
    token_level = cfg.mode != "sft"
    local = (
        models.teacher is not None or models.cross_teacher is not None or models.remote_teacher is not None
    )
    from_store = token_level and not local
    spec = cross_store(cfg, tok) if from_store else None
    if spec is not None:  # a store of another tokenizer's top-k: projected onto the student's vocabulary
        from distill.train.cross_data import load_cross_store

        examples, stats = load_cross_store(
            cfg.data, tok, spec, max_length=max_length(cfg, student), allow_partial=cfg.allow_partial_store
        )
    else:
        examples, stats = load_examples(
            cfg.data,
            tok,
            max_length=max_length(cfg, student),
            need_topk=from_store,
            token_level=token_level and models.cross_teacher is None,
            allow_partial_store=cfg.allow_partial_store,
            as_text=models.cross_teacher is not None,
        )
    if models.cross_teacher is not None:
        t_name = _name(models.cross_teacher.tok)
        stats.cross = {"teacher_tokenizer": t_name, "method": cfg.cross_tokenizer}
        models.cross_teacher.annotate(examples, stats)
        stats.has_topk = True
    if stats.cross:
        say(f"[bold]cross-tokenizer[/]: {cross_summary(stats, _name(tok))}")
    elif from_store:
        check_store_tokenizer(stats.manifest, tok, cfg.data)
        top = max(int(e["topk_ids"].max()) for e in examples)
        if top >= student.config.vocab_size:
            raise ValueError(f"{cfg.data}: teacher token id {top} is outside the student's vocabulary")
    say(f"[bold]data[/]: {stats.summary()}")
    if cfg.pack:
        check_packing(cfg, tok, student)
        n_before = len(examples)
        examples = pack_examples(examples, max_length(cfg, student))
        say(
            f"[bold]packed[/] {n_before} examples into {len(examples)} sequences of up to {max_length(cfg, student)} tokens"
        )
    check_chunk_size(cfg, examples)
    context = int(getattr(student.config, "max_position_embeddings", 0) or 0)
    if cfg.mode == "on-policy" and context:
        longest = max(e["prompt_len"] for e in examples)
        if longest + cfg.max_new_tokens > context:
            raise ValueError(
                f"on-policy: the longest prompt ({longest} tokens) + max_new_tokens ({cfg.max_new_tokens}) "
                f"exceeds the student's context ({context}); lower --max-new-tokens or --max-length"
            )
    return examples, stats


def _name(tok) -> str:
    return str(getattr(tok, "name_or_path", "") or "?")


@dataclass
class Trainable:
    """The prepared model and optimizer, and the trainable parameters' names and whole shapes."""

    model: Any
    optimizer: Any
    names: list[str]
    """Trainable parameter names in the optimizer's order (checkpoints key the optimizer state by index)."""
    shapes: dict[str, tuple[int, ...]]
    """Whole shapes before `prepare` (FSDP replaces parameters with shards)."""


def apply_lora(cfg: TrainConfig, model):
    """``model`` with `peft` LoRA adapters of rank ``cfg.lora_r`` (only the adapters train)."""
    from peft import LoraConfig, get_peft_model

    targets = list(cfg.lora_target_modules) or "all-linear"
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def prepare(cfg: TrainConfig, accelerator, student) -> Trainable:
    """LoRA (when asked), AdamW over the trainable parameters, and accelerate's wrapping (DDP, FSDP)."""
    from accelerate.utils import DistributedType

    enable_checkpointing(cfg, student)
    torch.manual_seed(cfg.seed)  # LoRA initialisation
    if cfg.lora_r:
        student = apply_lora(cfg, student)
    student.train()
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
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
    return Trainable(model=model, optimizer=optimizer, names=names, shapes=shapes)


def inner(optimizer):
    """The optimizer accelerate's wrapper holds (torch.distributed.checkpoint wants that one)."""
    return getattr(optimizer, "optimizer", optimizer)


@dataclass
class Start:
    """Where the run starts: step 0, or the newest complete checkpoint's step."""

    step: int = 0
    tokens: int = 0
    resumed_from: str | None = None
    changed: dict[str, Any] = field(default_factory=dict)


def resume(cfg: TrainConfig, accelerator, run: Trainable, say: Say) -> Start:
    """With ``cfg.resume``: load the newest complete checkpoint (parameters, optimizer, RNG state) into
    ``run`` and report each changed setting; otherwise seed this process's RNG for on-policy sampling."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if not cfg.resume:
        torch.manual_seed(cfg.seed + rank)  # on-policy sampling differs per process, repeatably
        return Start()
    root = Path(cfg.out) / "checkpoints"
    path, skipped = ckpt.latest(root)
    for p, why in skipped:
        say(f"[yellow]resume[/]: skipping {p.name}: {why}")
    if path is None:
        say(f"[yellow]resume[/]: no complete checkpoint under {root}; starting from step 0")
        return Start()
    loaded = ckpt.read(path, shapes=run.shapes)
    # Whole tensors in, sharded where the model is sharded: resume is exact under FSDP too.
    load_train_state(run.model, inner(run.optimizer), run.names, loaded["params"], loaded["optimizer"])
    state, rng = loaded["trainer_state"], loaded["rng"]
    start = Start(step=int(state["step"]), tokens=int(state["tokens"]), resumed_from=str(path))
    start.changed = {k: v for k, v in cfg.changed_fields(state["config"]).items() if k != "resume"}
    for k, (old, new) in start.changed.items():
        say(f"[yellow]resume[/]: {k} changed since the checkpoint: {old!r} -> {new!r}")
    if state.get("world_size", world) != world:
        say(f"[yellow]resume[/]: processes changed {state['world_size']} -> {world}; data order continues")
    torch.set_rng_state(rng.get(f"cpu.{rank}", rng["cpu.0"]))
    if torch.cuda.is_available() and f"cuda.{rank}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda.{rank}"])
    say(f"[bold]resumed[/] from {path.name} at step {start.step}")
    return start


def rng_state(accelerator) -> dict[str, torch.Tensor]:
    """Every process's torch RNG state as tensors (gathered, no pickle), keyed ``cpu.<rank>``/``cuda.<rank>``."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    out = {}
    for k, v in states.items():
        allv = accelerator.gather(v.to(accelerator.device).unsqueeze(0)).cpu()
        for r in range(allv.shape[0]):
            out[f"{k}.{r}"] = allv[r].contiguous()
    return out


@dataclass
class Checkpointer:
    """Writes the run's atomic checkpoints (`distill.train.checkpoint`); every process calls `save`."""

    cfg: TrainConfig
    accelerator: Any
    run: Trainable
    order: BatchOrder
    global_batch: int
    n_examples: int
    capture_temperature: float = 1.0
    """The temperature of the data's top-k log-probabilities (recorded beside ``config.temperature``)."""

    def save(self, step: int, tokens: int) -> None:
        """Checkpoint after ``step`` optimizer steps and ``tokens`` counted tokens; a collective."""
        acc = self.accelerator
        rng = rng_state(acc)
        # A collective: under FSDP every process hands its shards to rank 0.
        params, optim_state = gather_train_state(self.run.model, inner(self.run.optimizer), self.run.names)
        if acc.is_main_process:
            state = {
                "step": step,
                "tokens": tokens,
                "config": self.cfg.to_dict(),
                "capture_temperature": self.capture_temperature,
                "world_size": acc.num_processes,
                "data_position": self.order.position(step, self.global_batch),
                "n_examples": self.n_examples,
            }
            ckpt.save(
                Path(self.cfg.out) / "checkpoints",
                step,
                params=params,
                optimizer=optim_state,
                rng=rng,
                trainer_state=state,
                keep=self.cfg.keep_checkpoints,
            )
        acc.wait_for_everyone()


def trackers(cfg: TrainConfig, accelerator) -> ExitStack:
    """The run's trackers (``--log-with``), started; closing the stack ends them and restores the
    environment they needed, however the loop ends."""
    stack = ExitStack()
    if cfg.log_with:
        stack.enter_context(tracker_env(cfg.log_with, cfg.out))
        accelerator.init_trackers(PROJECT, config={k: str(v) for k, v in cfg.to_dict().items()})
        stack.callback(accelerator.end_training)
    return stack


class Stop:
    """Set by SIGTERM; `requested` agrees across processes (all stop at the same step, or collectives hang)."""

    def __init__(self) -> None:
        self.sigterm = False

    def requested(self, accelerator) -> bool:
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(torch.tensor(int(self.sigterm), device=accelerator.device), "sum")
            self.sigterm = bool(int(flag))
        return self.sigterm


@contextmanager
def sigterm() -> Iterator[Stop]:
    """While the loop runs, SIGTERM only sets a flag: the step finishes, a checkpoint is written, train
    returns. Only the main thread may set a handler; elsewhere SIGTERM keeps its default."""
    stop = Stop()
    try:
        old = signal.signal(signal.SIGTERM, lambda *_: setattr(stop, "sigterm", True))
    except ValueError:
        old = None
    try:
        yield stop
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def save_model(cfg: TrainConfig, accelerator, model, tok, out: Path) -> None:
    """The student as ``save_pretrained`` writes it (safetensors) with its tokenizer; LoRA merged on request."""
    accelerator.wait_for_everyone()
    # Every process takes part: under FSDP this gathers the whole weights onto the main process.
    state = full_model_state(model)
    if not accelerator.is_main_process:
        return
    m = accelerator.unwrap_model(model)
    if cfg.lora_r and cfg.merge_lora:
        m, state = m.merge_and_unload(), None  # merged weights: the model's own state dict
    from safetensors import SafetensorError

    from distill.data import output_error

    try:
        m.save_pretrained(out, state_dict=state, safe_serialization=True)
        tok.save_pretrained(out)
    except (OSError, SafetensorError) as err:  # full or read-only: the final checkpoint is already saved
        raise output_error(err, f"the trained model to {out}", ckpt.intact(out / "checkpoints")) from None


def progress(console, *, enabled: bool):
    """The loop's progress bar: step, loss, tokens/s, ETA (disabled: draws nothing)."""
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


__all__ = [
    "Checkpointer",
    "Models",
    "Start",
    "Trainable",
    "load_data",
    "load_model",
    "load_models",
    "make_accelerator",
    "prepare",
    "resume",
    "save_model",
    "sigterm",
    "trackers",
]

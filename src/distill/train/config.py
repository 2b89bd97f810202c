"""Training configuration: one frozen dataclass, validated where it is built.

A TOML file only writes values down (``distill train --config recipe.toml``); flags given on the
command line override the file's values. The file never names code to import: every value is a
number, a string, a boolean or a list of strings. Unknown keys are errors, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODES = ("sft", "logits", "on-policy")
MIXED_PRECISION = ("no", "bf16", "fp16")
CROSS_TOKENIZER = ("project", "uld")
TRACKERS = ("tensorboard", "mlflow", "wandb", "aim", "comet_ml", "clearml", "dvclive")
# Allowed values of the fields that take one of a few names (also the CLI's choices).
CHOICES = {"mode": MODES, "mixed_precision": MIXED_PRECISION, "cross_tokenizer": CROSS_TOKENIZER}
# TOML spellings of fields whose Python name differs (``lambda`` is a Python keyword).
ALIASES = {"lambda": "lmbda"}
# Largest distillation temperature: far above any useful one, and T**2 (the KD term's factor) stays finite.
MAX_TEMPERATURE = 1000.0


@dataclass(frozen=True)
class TrainConfig:
    """Everything `distill.train.train` needs to know; see docs/train.md."""

    student: str
    """Directory of the student: any `transformers` causal LM saved with ``save_pretrained`` (and its tokenizer)."""
    data: str
    """A store made by `distill generate` (a directory), or a JSONL/JSON/CSV/Parquet file with
    ``prompt`` and ``completion`` columns (or a single ``text`` column)."""
    out: str
    """Output directory: the trained model, ``metrics.jsonl``, ``checkpoints/``."""
    mode: str = "sft"
    """``sft`` (cross-entropy on completions, prompt masked), ``logits`` (a loss from `LOSSES` against the
    store's top-k or a local teacher's full logits, mixed with CE by ``alpha``) or ``on-policy`` (GKD)."""
    loss: str = "forward_kl"
    """Name of the token-level loss in `distill.losses.LOSSES` (``logits`` mode); ``on-policy`` always uses
    ``generalized_jsd`` with ``beta``."""
    temperature: float = 1.0
    """Softmax temperature of both models in the distillation term; finite and > 0. The term is multiplied
    by T² so its gradient keeps its weight against CE when T changes (Hinton et al. 2015)."""
    alpha: float = 0.5
    """Weight of the distillation term, in [0, 1]: loss = alpha * KD + (1 - alpha) * CE on the labels."""
    teacher: str | None = None
    """Directory of a local teacher causal LM; its full logits are computed on the fly. Needed by
    ``on-policy`` and by ``logits`` when the store has no top-k log-probabilities. ``on-policy`` also
    takes a vLLM base URL ``http(s)://HOST/v1``: it scores every sequence through vLLM's
    ``prompt_logprobs`` (top ``teacher_top_k`` per position, 20 when that is 0)."""
    cross_tokenizer: str = "project"
    """When the teacher's tokenizer is not the student's (``logits``, ``on-policy``): ``project`` maps the
    teacher's top-k at aligned positions onto the student's vocabulary (then ``loss`` applies), ``uld``
    compares the sorted probabilities (ULD); unaligned positions get CE only. See docs/losses.md."""
    cross_top_k: int = 0
    """Across tokenizers: student tokens kept per position after projection (the rest is the tail
    bucket); 0 = the teacher's k (20 for a local teacher)."""
    teacher_tokenizer: str | None = None
    """Directory with the tokenizer of the teacher that made a store of token ids (``distill generate
    --teacher DIR``), when it is not the student's; checked against the store manifest's vocabulary hash."""
    allow_partial_store: bool = False
    """Train on what a damaged store still holds: shards its manifest lists that cannot be read are
    counted and reported instead of refused (by default, re-run `distill generate` to redo them)."""
    max_steps: int = 100
    """Optimizer steps to run in total (a resumed run counts the steps already done); >= 1."""
    batch_size: int = 8
    """Examples per micro-batch per process; >= 1. Global batch = batch_size * grad_accum * processes."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step; >= 1. Tokens are counted over the whole accumulated
    batch, so the gradient equals that of one large batch."""
    lr: float = 1e-4
    """Peak learning rate of AdamW; > 0."""
    weight_decay: float = 0.0
    """AdamW weight decay; >= 0."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to ``lr``, after which the rate stays constant; >= 0."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    max_length: int | None = None
    """Longest sequence in tokens; longer examples are truncated from the end and counted. ``None``: the
    student's context size (``max_position_embeddings``)."""
    save_every: int = 0
    """Write an atomic checkpoint every N optimizer steps; 0 = only at the end and on SIGTERM."""
    keep_checkpoints: int = 3
    """How many of the newest checkpoints to keep; >= 1."""
    resume: bool = False
    """Continue from the newest complete checkpoint under ``out/checkpoints`` (torn ones are skipped)."""
    seed: int = 0
    """Seed of data order, initialisation of LoRA weights and on-policy sampling."""
    lora_r: int = 0
    """LoRA rank; 0 trains all weights, >= 1 trains low-rank adapters through `peft`."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (adapter scale = lora_alpha / lora_r); > 0."""
    lora_target_modules: tuple[str, ...] = ()
    """Module names to adapt (e.g. ``q_proj``, ``v_proj``); empty = every linear layer but the output head."""
    merge_lora: bool = False
    """Merge the adapters into the weights before saving (a plain model); otherwise save adapters only."""
    lmbda: float = 0.5
    """On-policy only: probability per step that the student writes the completions (GKD's lambda), in [0, 1].
    Spelled ``lambda`` in TOML and ``--lambda`` on the command line."""
    beta: float = 0.5
    """On-policy only: generalized JSD interpolation, in [0, 1]: 0 = forward KL(T||S), 1 = reverse KL(S||T)."""
    max_new_tokens: int = 32
    """On-policy only: tokens the student writes per prompt; >= 1."""
    sample_temperature: float = 1.0
    """On-policy only: sampling temperature of the student's completions; > 0."""
    fused: bool = True
    """Compute the loss from hidden states with the LM head applied a chunk of rows at a time, so the full
    (batch, length, vocabulary) logits never exist (`distill.train.heads`); ``--no-fused``: the model's
    full logits and the plain loss (same values within float32 rounding)."""
    chunk_size: int | None = None
    """Rows (tokens) per chunk of the fused loss, >= 1 and at most a micro-batch's tokens; default
    ``max(1, 2**22 // V)`` for a vocabulary of V entries (32 at V = 131,072; measured sweep in docs/train.md)."""
    teacher_top_k: int = 0
    """Distil against the teacher's top-k per position (plus a tail bucket for the rest of its mass). A local
    teacher: taken chunk by chunk; 0 = its full distribution. An HTTP teacher (on-policy, ``--teacher
    URL``) always answers with a top-k: 0 means 20 (vLLM's default ``--max-logprobs``), and more than
    the server's limit is refused."""
    pack: bool = False
    """Pack short examples into sequences of up to ``max_length`` tokens, attention kept within each
    example (position ids restart at each example), so no compute goes to padding; needs an EOS token."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in backward instead of keeping them (less memory, ~30% more
    time); refused for a model that does not support it."""
    trust_remote_code: bool = False
    """Run Python code shipped with the student's or teacher's checkpoint (its ``auto_map`` modules);
    off unless asked. Weights are read from safetensors only, whatever this says."""
    mixed_precision: str = "no"
    """``no``, ``bf16`` or ``fp16``, passed to `accelerate` (bf16 only where the device supports it)."""
    log_with: tuple[str, ...] = ()
    """Extra trackers through `accelerate` (``tensorboard``: OUT/trackers; ``mlflow``: ``MLFLOW_TRACKING_URI``
    or OUT/mlruns; ``wandb``, ...); each needs its package. metrics.jsonl is always written."""
    log_every: int = 1
    """Write a metrics line every N optimizer steps; >= 1."""
    progress: bool = True
    """Show a progress bar (loss, tokens/s, ETA) on the main process."""

    def __post_init__(self) -> None:
        for name in ("student", "data", "out"):
            if not str(getattr(self, name) or "").strip():
                raise ValueError(f"{name} must be given (a path), got {getattr(self, name)!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        _positive_float("temperature", self.temperature)
        if self.temperature > MAX_TEMPERATURE:  # T**2 scales the loss: 1e308 would overflow to inf
            raise ValueError(
                f"temperature (--temperature) must be at most {MAX_TEMPERATURE:g}, got {self.temperature!r}"
            )
        _positive_float("lr", self.lr)
        _positive_float("lora_alpha", self.lora_alpha)
        _positive_float("sample_temperature", self.sample_temperature)
        for name in ("alpha", "lmbda", "beta"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not (0.0 <= float(v) <= 1.0):
                label = "lambda" if name == "lmbda" else name
                raise ValueError(f"{label} must be in [0, 1], got {v!r}")
        for name, low in (
            ("max_steps", 1),
            ("batch_size", 1),
            ("grad_accum", 1),
            ("warmup_steps", 0),
            ("save_every", 0),
            ("keep_checkpoints", 1),
            ("lora_r", 0),
            ("max_new_tokens", 1),
            ("log_every", 1),
            ("teacher_top_k", 0),
            ("cross_top_k", 0),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if self.chunk_size is not None and (
            isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1
        ):
            raise ValueError(f"chunk_size (--chunk-size) must be an integer >= 1, got {self.chunk_size!r}")
        if self.teacher_top_k and not self.teacher:
            raise ValueError(
                f"teacher_top_k (--teacher-top-k) {self.teacher_top_k} needs a teacher: give --teacher DIR or URL"
            )
        if self.pack and self.mode == "on-policy":
            raise ValueError(
                "pack (--pack) does not apply to mode 'on-policy': the student writes the completions"
            )
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 2):
            raise ValueError(f"max_length must be an integer >= 2 or None, got {self.max_length!r}")
        for name in ("weight_decay", "max_grad_norm"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.cross_tokenizer not in CROSS_TOKENIZER:
            raise ValueError(
                f"cross_tokenizer must be one of {', '.join(CROSS_TOKENIZER)}, got {self.cross_tokenizer!r}"
            )
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}"
            )
        for t in self.log_with:
            if t not in TRACKERS:
                raise ValueError(f"log_with: unknown tracker {t!r}; expected some of {', '.join(TRACKERS)}")
        from distill.losses import LOSSES  # a name looked up in a plain dict, never code to import

        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(sorted(LOSSES))}, got {self.loss!r}")
        if self.mode == "on-policy" and not self.teacher:
            raise ValueError("mode 'on-policy' needs a teacher: give --teacher DIR (or a vLLM URL)")
        if self.mode != "on-policy" and str(self.teacher or "").startswith(("http://", "https://")):
            raise ValueError(
                f"--teacher {self.teacher}: an HTTP teacher scores sequences in mode 'on-policy' only; "
                "for 'logits' store its top-k with `distill generate --teacher URL` and train on the store"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def changed_fields(self, other: TrainConfig | dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """``{field: (other's value, this value)}`` for every field that differs from ``other``."""
        theirs = other.to_dict() if isinstance(other, TrainConfig) else dict(other)
        mine = self.to_dict()
        return {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}


def _positive_float(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))
FIELD_DOCS: dict[str, str] = {}  # field -> its docstring, filled below; used for CLI help


def _read_field_docs() -> None:
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            FIELD_DOCS[node.target.id] = " ".join(str(nxt.value.value).split())


try:
    _read_field_docs()
except (OSError, TypeError):  # source unavailable (frozen app): help falls back to field names
    pass


def _normalise(values: dict[str, Any], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = ALIASES.get(key, key)
        if name not in FIELD_NAMES:
            raise ValueError(f"{source}: unknown setting {key!r}; known: {', '.join(FIELD_NAMES)}")
        if name in ("lora_target_modules", "log_with"):
            value = (value,) if isinstance(value, str) else tuple(value or ())
        if isinstance(value, dict | list) and name not in ("lora_target_modules", "log_with"):
            raise ValueError(f"{source}: {key} must be a single value, got {value!r}")
        out[name] = value
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A `TrainConfig` from a TOML file (top-level keys or a ``[train]`` table) with ``overrides`` on top.

    ``overrides`` maps field names (or TOML spellings such as ``lambda``) to values; ``None`` values
    are ignored, so unset command-line flags leave the file's values alone.
    """
    values: dict[str, Any] = {}
    if path is not None:
        from distill.data import read_document

        p = Path(path)
        raw = read_document(p, "config file", toml=True)
        if "train" in raw and isinstance(raw["train"], dict):
            extra = sorted(set(raw) - {"train"})
            if extra:
                raise ValueError(f"{p}: settings outside [train]: {', '.join(extra)}")
            raw = raw["train"]
        values = _normalise(raw, str(p))
    values.update(_normalise({k: v for k, v in (overrides or {}).items() if v is not None}, "command line"))
    missing = [n for n in ("student", "data", "out") if n not in values]
    if missing:
        raise ValueError(
            f"missing required setting(s): {', '.join(missing)} (in the config file or as flags)"
        )
    return TrainConfig(**values)


__all__ = ["TrainConfig", "load_config", "MODES", "CHOICES", "FIELD_DOCS", "FIELD_NAMES"]

"""Choosing distillation settings (temperature, alpha, ...) on a validation split: `sweep`.

Hinton et al. distil at T = 2-20 and T = 4-10 is common for language models; which T (and which
weight ``alpha`` of the soft term) suits a teacher, a student and a budget is an empirical question
that only held-out data can answer. `sweep` trains one student per point of a grid of `TrainConfig`
fields, from the same initialisation and data, scores each on a validation file that none of them
trained on, and picks the best: the settings are chosen on validation, never on the test split.

    from distill.train.sweep import sweep
    result = sweep(base_cfg, {"temperature": [1, 2, 4, 8], "alpha": [0.5, 0.9]}, val="val.jsonl",
                   metric="exact_match", workers=2)
    result.best.settings    # {"temperature": 2.0, "alpha": 0.9}
    result.best.out         # the directory of the chosen student

The command line: ``distill train ... --sweep temperature=1,2,4,8 --sweep alpha=0.5,0.9 --val val.jsonl``.

Scores (`validation_scores`): ``eval_ce``, the cross-entropy of the validation completions under the
student (nats per completion token, lower is better), and ``exact_match``, the share of greedy
answers whose first line equals the completion's (higher is better). The metric chooses; the other
breaks ties. Temperatures: a store's top-k log-probabilities were captured at the store's capture
temperature (its manifest, recorded per point here), and `distill.train` rescales them to each
point's distillation temperature (`distill.losses.SparseTargets`: ratios within the top-k exact,
then renormalised over the top-k plus one tail bucket).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.train.config import FIELD_NAMES, TrainConfig

METRICS = {"eval_ce": False, "exact_match": True}
"""Validation metric -> whether higher is better."""
_NOT_SWEPT = ("student", "data", "out", "resume", "progress", "log_with")


@dataclass
class SweepPoint:
    """One trained point of the grid."""

    settings: dict[str, Any]
    """The swept fields' values at this point."""
    out: Path
    """Directory of the trained student."""
    scores: dict[str, float] = field(default_factory=dict)
    """``{"eval_ce", "exact_match"}`` on the validation file."""
    train_seconds: float = 0.0


@dataclass
class SweepResult:
    """Every point with its validation scores, and the one chosen."""

    metric: str
    points: list[SweepPoint]
    best: SweepPoint
    capture_temperature: float
    """Temperature the data's top-k log-probabilities were captured at (1.0 for a table or no top-k)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (what ``OUT/sweep.json`` holds)."""

        def point(p: SweepPoint) -> dict[str, Any]:
            return {**dataclasses.asdict(p), "out": str(p.out)}

        return {"metric": self.metric, "higher_is_better": METRICS[self.metric],
                "capture_temperature": self.capture_temperature, "best": point(self.best),
                "points": [point(p) for p in self.points]}  # fmt: skip


def parse_grid(specs: Sequence[str]) -> dict[str, list[Any]]:
    """``["temperature=1,2,4,8", "alpha=0.5,0.9"]`` -> ``{"temperature": [1.0, 2.0, 4.0, 8.0], "alpha": [0.5, 0.9]}``.

    Each value is converted to the field's type (float, int, bool, str); errors name the spec."""
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        name, sep, values = str(spec).partition("=")
        name = {"lambda": "lmbda"}.get(name.strip(), name.strip()).replace("-", "_")
        if not sep or not values.strip():
            raise ValueError(f"--sweep {spec!r}: expected NAME=V1,V2,... (e.g. temperature=1,2,4,8)")
        if name not in FIELD_NAMES or name in _NOT_SWEPT:
            raise ValueError(f"--sweep {spec!r}: {name!r} is not a setting that can be swept")
        if name in grid:
            raise ValueError(f"--sweep {spec!r}: {name} is given twice")
        kind = str(types[name])
        grid[name] = [_convert(v.strip(), kind, spec) for v in values.split(",")]
    return grid


def _convert(value: str, kind: str, spec: str) -> Any:
    try:
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("bool"):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
    except ValueError:
        raise ValueError(f"--sweep {spec!r}: {value!r} is not a valid {kind.split(' ')[0]}") from None
    return value


def grid_configs(
    base: TrainConfig, grid: Mapping[str, Sequence[Any]]
) -> list[tuple[dict[str, Any], TrainConfig]]:
    """Every point of ``grid`` (the product of its value lists) as ``(settings, config)``.

    Each point trains into ``base.out/<name>=<value>,...``; every config is validated here, before
    anything is trained, so a bad value (``temperature=0``) fails at once."""
    if not grid or any(len(v) == 0 for v in grid.values()):
        raise ValueError(
            f"sweep grid must name at least one setting with at least one value, got {dict(grid)!r}"
        )
    names = list(grid)
    points = []
    for values in itertools.product(*(grid[n] for n in names)):
        settings = dict(zip(names, values))
        label = ",".join(f"{n}={v}" for n, v in settings.items())
        points.append((settings, dataclasses.replace(base, **settings, out=str(Path(base.out) / label))))
    return points


def choose(points: Sequence[SweepPoint], metric: str) -> SweepPoint:
    """The best point by ``metric`` (`METRICS`), ties broken by the other metric, then grid order."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if not points:
        raise ValueError("choose: no points")
    other = next(m for m in METRICS if m != metric)

    def key(ip: tuple[int, SweepPoint]) -> tuple[float, float, int]:
        i, p = ip
        sign = {m: (-1.0 if METRICS[m] else 1.0) for m in METRICS}  # smaller key = better
        return (sign[metric] * p.scores[metric], sign[other] * p.scores[other], i)

    return min(enumerate(points), key=key)[1]


def eval_ce(model_dir: str | Path, data: str | Path, *, batch_size: int = 32) -> float:
    """Cross-entropy of the completions in ``data`` (prompt/completion rows) under the model in ``model_dir``.

    Each completion and its end-of-sequence token given its prompt, teacher-forced; nats per completion token."""
    import torch

    from distill.models.loading import load_causal_lm, load_tokenizer
    from distill.train.examples import IGNORE, collate, load_examples

    model = load_causal_lm(model_dir, "model").eval()
    tok = load_tokenizer(model_dir, "model")
    max_length = int(getattr(model.config, "max_position_embeddings", 2048))
    examples, _ = load_examples(data, tok, max_length=max_length)
    ce, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            b = collate(examples[i : i + batch_size], tok.pad_token_id)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            labels = b["labels"][:, 1:]
            ce += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                          ignore_index=IGNORE, reduction="sum"))  # fmt: skip
            n += int((labels != IGNORE).sum())
    return ce / max(n, 1)


def validation_scores(model_dir: str | Path, val: str | Path, *, batch_size: int = 32) -> dict[str, float]:
    """``{"eval_ce", "exact_match"}`` of the student in ``model_dir`` on ``val`` (prompt/completion rows).

    ``eval_ce``: `eval_ce` (nats per completion token). ``exact_match``: greedy answers (as long as the
    longest completion, plus one token) whose first line equals the completion's first line (spaces
    stripped)."""
    from distill.data import read_table
    from distill.metrics import exact_match
    from distill.models.base import GenerationSettings, Request
    from distill.models.hf import HFTeacher

    rows = [
        r
        for r in read_table(val)
        if isinstance(r.get("prompt"), str) and isinstance(r.get("completion"), str)
    ]
    if not rows:
        raise ValueError(f"{val}: no rows with 'prompt' and 'completion' text to validate on")
    gen = HFTeacher(model_dir, batch_size=batch_size)
    longest = max(len(gen.tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) for r in rows)
    settings = GenerationSettings(max_new_tokens=min(longest + 1, 256), temperature=0.0)
    answers = gen.complete([Request(id=str(i), prompt=r["prompt"]) for i, r in enumerate(rows)], settings)
    hits = [exact_match(a.text, r["completion"], first_line=True) for a, r in zip(answers, rows)]
    return {"eval_ce": eval_ce(model_dir, val, batch_size=batch_size), "exact_match": sum(hits) / len(hits)}


def _train_and_score(job: tuple[TrainConfig, str]) -> tuple[float, dict[str, float], str]:
    from distill.train.loop import train

    cfg, val = job
    t0 = time.perf_counter()
    res = train(cfg)
    if res.stopped != "max_steps":
        raise KeyboardInterrupt(f"{cfg.out}: training stopped early ({res.stopped}) at step {res.steps}")
    return time.perf_counter() - t0, validation_scores(cfg.out, val), res.stopped


def sweep(
    base: TrainConfig,
    grid: Mapping[str, Sequence[Any]],
    *,
    val: str | Path,
    metric: str = "eval_ce",
    workers: int = 1,
    console: Any = None,
) -> SweepResult:
    """Train ``base`` at every point of ``grid``, score each on ``val``, and choose by ``metric``.

    ``grid``: `TrainConfig` field -> values (e.g. ``{"temperature": [1, 2, 4, 8]}``; `parse_grid`
    reads ``"temperature=1,2,4,8"``). Every point starts from ``base.student`` with ``base.seed`` and
    trains into ``base.out/<settings>``; ``workers`` processes train points side by side (one torch
    thread each). Writes ``base.out/sweep.json`` (`SweepResult.to_dict`) and returns the result.
    """
    from distill.train.parallel import map_processes

    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if not Path(val).is_file():
        raise FileNotFoundError(f"no such validation file: {val}")
    configs = grid_configs(base, grid)
    progress = base.progress and workers == 1  # workers > 1: bars from several processes would interleave
    configs = [(s, dataclasses.replace(c, progress=progress)) for s, c in configs]
    points = [SweepPoint(settings=s, out=Path(c.out)) for s, c in configs]
    say = console.print if console is not None else (lambda *a, **k: None)
    for i, (seconds, scores, _) in map_processes(_train_and_score, [(c, str(val)) for _, c in configs],
                                                 workers=workers):  # fmt: skip
        points[i].scores, points[i].train_seconds = scores, seconds
        say(
            f"sweep {points[i].out.name}: eval_ce {scores['eval_ce']:.4f}, exact_match {scores['exact_match']:.4f}"
        )
    result = SweepResult(metric, points, choose(points, metric), _capture_temperature(base.data))
    path = Path(base.out) / "sweep.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    return result


def _capture_temperature(data: str | Path) -> float:
    manifest = Path(data) / "manifest.json"
    if not manifest.is_file():
        return 1.0
    return float(json.loads(manifest.read_text(encoding="utf-8")).get("capture_temperature") or 1.0)


__all__ = [
    "sweep",
    "parse_grid",
    "grid_configs",
    "choose",
    "validation_scores",
    "SweepPoint",
    "SweepResult",
    "METRICS",
]

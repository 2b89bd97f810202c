"""`distill demo --task triage`: soft labels against the teacher's text on a task with uncertain labels.

The task (`distill.demos.triage_task`): route a support ticket to one of eight teams; a ticket that
mentions two issues has a gold team *sampled* from a known distribution. All on this CPU:

1. A teacher causal LM (Llama 4x128) is trained on ``n_teacher_train`` gold examples (cached under
   ``OUT/teacher``), so it learns the label probabilities, not only the most likely team.
2. It answers a transfer set of unlabelled tickets through `distill.store.generate`, greedily, with
   its top-k log-probabilities, into one store per teacher budget (``OUT/stores/<budget>``; each
   store extends the smaller one, so the 300-ticket store holds the 100-ticket one's answers).
3. Students 5x+ smaller, one initialisation and one step budget per seed: ``hard`` (``labelled``
   gold tickets, no teacher), ``sft`` (the teacher's answers), ``logits`` (its top-k at the
   distillation temperature T and weight alpha chosen on validation, `distill.train.sweep`) and
   ``on-policy`` (GKD: the student writes answers, the local teacher scores them). Students of a
   seed train side by side, one process per core (`distill.train.parallel`).
4. Every model answers held-out tickets greedily; the first line is compared with the held-out
   (sampled) gold team. Also: agreement with the teacher, calibration error (ECE of the probability
   of the answer's first token), the expected accuracy under the known label distribution (the same
   score without the noise of one sampled label per ticket), and accuracy against teacher budget.

Every choice (T, alpha, which soft-label student is "best") is made on the validation split; the
test split is only reported. Scoring lives in `distill.demos.triage_eval`, reports in
`distill.demos.triage_report`.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from distill import report
from distill.demos import triage_eval as ev
from distill.demos.common import cached_teacher, load_or_train_tokenizer, model_params, run_jobs, write_rows
from distill.train.parallel import WorkerPool, default_workers

STUDENTS = ("hard", "sft", "logits", "on-policy")
SOFT = ("logits", "on-policy")


@dataclass(frozen=True)
class TriageDemoConfig:
    """Sizes, budgets and grids of the triage demo."""

    budget: int = 300
    """Teacher answers (transfer tickets) of the main table; must be one of ``budgets``."""
    budgets: tuple[int, ...] = (100, 300, 1000)
    """Teacher budgets of the accuracy-against-budget curve (sft and the soft-label students)."""
    labelled: int = 100
    """Gold-labelled tickets the ``hard`` student trains on (the first N transfer tickets)."""
    n_teacher_train: int = 20000
    """Gold examples the teacher trains on (seed 0)."""
    n_val: int = 1000
    """Validation tickets (seed 1): every setting is chosen on these."""
    n_test: int = 2000
    """Test tickets (seed 3): only reported."""
    teacher_steps: int = 700
    teacher_batch: int = 32
    student_steps: int = 400
    """Optimizer steps of every student (the same budget for all)."""
    batch_size: int = 16
    teacher_size: tuple[int, int, int] = (4, 128, 4)
    """Teacher (layers, width, heads)."""
    student_size: tuple[int, int, int] = (2, 64, 4)
    """Student (layers, width, heads)."""
    vocab_size: int = 768
    top_k: int = 20
    """Teacher log-probabilities stored per token."""
    temperatures: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    """Distillation temperatures swept on validation (``logits``)."""
    alphas: tuple[float, ...] = (0.5, 0.9)
    """Weights of the distillation term swept on validation (``logits``; ``on-policy`` uses the chosen one)."""
    lmbda: float = 0.5
    """On-policy: share of steps on which the student writes the answers (GKD's lambda)."""
    beta: float = 0.5
    """On-policy: generalized JSD interpolation (GKD's beta)."""
    lr_teacher: float = 2e-3
    lr_student: float = 3e-3
    seed: int = 0
    """Teacher seed; student seed s is initialised with ``seed + 1 + s`` and shuffled with ``seed + s``."""
    seeds: int = 3
    workers: int = field(default_factory=lambda: min(default_workers(), 8))
    """Processes training students side by side (one torch thread each; default: the cores, at most 8);
    the numbers do not depend on it."""
    teacher_threads: int = 1
    """Torch threads of the teacher's training. 2 threads were 1.5x faster on the idle 2-core machine and
    5x slower on the shared, loaded one (OpenMP threads contending), so 1 by default."""

    def __post_init__(self) -> None:
        for name in (
            "budget",
            "labelled",
            "seeds",
            "student_steps",
            "teacher_steps",
            "workers",
            "n_val",
            "n_test",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.budgets):
            raise ValueError(f"budgets must be integers >= 1, got {self.budgets!r}")
        if self.budget not in self.budgets:
            raise ValueError(
                f"budget must be one of the curve's budgets {list(self.budgets)}, got {self.budget!r}"
            )
        if self.labelled > self.pool:
            raise ValueError(f"labelled must be <= the largest budget ({self.pool}), got {self.labelled!r}")
        if not self.temperatures or any(not t > 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be numbers > 0, got {self.temperatures!r}")

    @property
    def pool(self) -> int:
        """Transfer tickets generated: the largest budget."""
        return max(self.budgets)


QUICK = dict(budget=60, budgets=(30, 60), labelled=30, n_teacher_train=1600, n_val=80, n_test=160,
             teacher_steps=50, student_steps=20, temperatures=(1.0, 4.0), alphas=(0.9,), seeds=1)  # fmt: skip


def run(out: str | Path = "runs/demo-triage", *, quick: bool = False, console: Any = None, progress: bool = True,
        **overrides: Any) -> dict[str, Any]:  # fmt: skip
    """Run the triage demo; write ``report.json``, ``report.md``, the plots and the models under ``out``.

    ``quick``: a small run (well under 90 s) for tests; ``overrides``: fields of `TriageDemoConfig`
    (``budget`` alone also picks a curve that contains it). Returns the report (``report.json``'s content).
    """
    from rich.console import Console

    base = TriageDemoConfig()
    if quick:
        overrides = {**QUICK, **overrides}
    if "budget" in overrides and "budgets" not in overrides:
        curve = QUICK["budgets"] if quick else base.budgets
        overrides["budgets"] = tuple(sorted({*curve, int(overrides["budget"])}))
    cfg = replace(base, **overrides)
    return _run(cfg, Path(out), quick, console or Console(stderr=True), progress)


def _stores(
    cfg: TriageDemoConfig, out: Path, tdir: Path, transfer, console, progress: bool
) -> dict[int, Any]:
    """One store per budget, each grown from the previous one (`generate` answers only the new tickets)."""
    from distill.models.base import GenerationSettings
    from distill.models.hf import HFTeacher
    from distill.store.generate import generate

    teacher = HFTeacher(tdir, batch_size=64)
    settings = GenerationSettings(max_new_tokens=ev.MAX_NEW_TOKENS, temperature=0.0, top_logprobs=cfg.top_k)
    results, previous = {}, None
    for b in sorted(cfg.budgets):
        sdir = out / "stores" / str(b)
        if previous is not None and not (sdir / "manifest.json").is_file():
            shutil.rmtree(sdir, ignore_errors=True)
            shutil.copytree(previous, sdir, ignore=shutil.ignore_patterns(".lock"))
        prompts = write_rows(
            out / "data" / f"transfer_{b}.jsonl", [{"id": e.id, "prompt": e.prompt} for e in transfer[:b]]
        )
        results[b] = generate(teacher, prompts, sdir, settings=settings, progress=progress, console=console)
        previous = sdir
    return results


def _job(cfg: TriageDemoConfig, out: Path, kind: str, budget: int, s: int, init: Path, tdir: Path, *,
         temperature: float = 1.0, alpha: float = 0.5, sweep: bool = False) -> dict[str, Any]:  # fmt: skip
    name = f"{kind}-b{budget}-s{s}" + (f"-T{temperature:g}-a{alpha:g}" if sweep else "")
    common = dict(student=str(init), out=str(out / "students" / name), max_steps=cfg.student_steps,
                  batch_size=cfg.batch_size, lr=cfg.lr_student, warmup_steps=10, seed=cfg.seed + s, progress=False)  # fmt: skip
    store = str(out / "stores" / str(budget))
    if kind == "hard":
        train = dict(mode="sft", data=str(out / "data" / "labelled_gold.jsonl"))
    elif kind == "sft":
        train = dict(mode="sft", data=store)
    elif kind == "logits":
        train = dict(mode="logits", data=store, temperature=temperature, alpha=alpha)
    else:  # GKD: T = 1 as in GKD; the same alpha as logits on the off-policy steps
        train = dict(mode="on-policy", data=store, teacher=str(tdir), alpha=alpha, lmbda=cfg.lmbda, beta=cfg.beta,
                     max_new_tokens=ev.MAX_NEW_TOKENS)  # fmt: skip
    return {"name": name, "kind": kind, "budget": budget, "seed": s, "sweep": sweep, "config": {**common, **train},
            "val": str(out / "data" / "val_gold.jsonl"), "n_val": cfg.n_val, "n_test": cfg.n_test,
            "top_k": cfg.top_k}  # fmt: skip


def _run(cfg: TriageDemoConfig, out: Path, quick: bool, console, progress: bool) -> dict[str, Any]:
    from distill.demos.triage_report import write_reports
    from distill.demos.triage_task import make_examples, to_rows
    from distill.models.tiny import save_tiny, tiny_causal_lm

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    teacher_train = make_examples(cfg.n_teacher_train, seed=cfg.seed)
    transfer = make_examples(cfg.pool, seed=cfg.seed + 2)
    val, test = ev.splits(cfg.n_val, cfg.n_test)
    tok = load_or_train_tokenizer(out / "tokenizer", [e.prompt + " " + e.answer for e in teacher_train[:4000]],
                                  cfg.vocab_size)  # fmt: skip
    console.print("[bold]1/4[/] teacher (trained once on gold labels, cached under the output directory)")
    key = {k: v for k, v in asdict(cfg).items() if k in ("n_teacher_train", "teacher_steps", "teacher_batch",
                                                         "teacher_size", "vocab_size", "lr_teacher", "seed")}  # fmt: skip
    t0 = time.perf_counter()
    tdir, reused = _teacher(cfg, out, key, tok, to_rows(teacher_train), console, progress)
    teacher_seconds = time.perf_counter() - t0

    console.print(f"[bold]2/4[/] teacher answers {cfg.pool} transfer tickets into stores (top-{cfg.top_k})")
    gens = _stores(cfg, out, tdir, transfer, console, progress)
    write_rows(out / "data" / "labelled_gold.jsonl", to_rows(transfer[: cfg.labelled]))
    write_rows(out / "data" / "val_gold.jsonl", to_rows(val))
    teacher_eval = {**ev.predict(tdir, val, test, cfg.top_k), "cached": reused}

    console.print(f"[bold]3/4[/] students ({cfg.seeds} seed(s), {cfg.workers} at a time): sweep T x alpha on "
                  "validation, then the chosen setting at every budget and seed")  # fmt: skip
    layers, width, heads = cfg.student_size
    inits = [save_tiny(tiny_causal_lm(len(tok), n_layer=layers, n_embd=width, n_head=heads, seed=cfg.seed + 1 + s),
                       tok, out / "init" / f"student-s{s}") for s in range(cfg.seeds)]  # fmt: skip
    t0 = time.perf_counter()
    done, points, best = _students(cfg, out, inits, tdir, console, progress)
    chosen = best.settings
    students_seconds = time.perf_counter() - t0

    console.print("[bold]4/4[/] scores on held-out tickets")
    result = ev.summarise(cfg, done, teacher_eval, val, test, params={
        "teacher": model_params(tdir), "student": model_params(inits[0])})  # fmt: skip
    manifest = gens[cfg.budget]
    result.update(
        quick=quick,
        config=asdict(cfg),
        sweep={
            "metric": "exact_match (validation accuracy; ties: validation CE)",
            "chosen": chosen,
            "points": [{**p.settings, **p.scores} for p in points],
        },  # fmt: skip
        temperatures={
            "capture": ev.capture_temperature(out / "stores" / str(cfg.budget)),
            "distillation": chosen["temperature"],
        },  # fmt: skip
        store={
            "path": str(out / "stores"),
            "answered_now": sum(g.answered for g in gens.values()),
            "failed": sum(g.failed for g in gens.values()),
            "total": manifest.total,
        },  # fmt: skip
        seconds={
            "total": time.perf_counter() - t_start,
            "teacher": teacher_seconds,
            "students": students_seconds,
        },
    )
    write_reports(out, result, console)
    report.write_json(out / "report.json", result)
    return result


def _students(cfg: TriageDemoConfig, out: Path, inits: list[Path], tdir: Path, console, progress: bool):
    """Train and score every student: (job results, the sweep's points, the chosen point).

    Phase 1: the T x alpha sweep (seed 0, main budget, scored on validation), hard and sft. Phase 2,
    with the chosen T and alpha: logits at every other budget and seed, and on-policy. One pool of
    workers serves both phases (starting a worker costs seconds)."""
    from distill.train.sweep import SweepPoint, choose

    def job(kind: str, budget: int, s: int, **kw: Any) -> dict[str, Any]:
        return _job(cfg, out, kind, budget, s, inits[s], tdir, **kw)

    seeds = range(cfg.seeds)
    first = [
        job("logits", cfg.budget, 0, temperature=t, alpha=a, sweep=True)
        for t in cfg.temperatures
        for a in cfg.alphas
    ]
    first += [job("hard", cfg.budget, s) for s in seeds] + [
        job("sft", b, s) for b in cfg.budgets for s in seeds
    ]
    with WorkerPool(cfg.workers) as pool:
        done = run_jobs(_student_job, _longest_first(first), pool=pool, console=console, progress=progress)
        points = [SweepPoint(settings={"temperature": r["temperature"], "alpha": r["alpha"]}, out=Path(r["dir"]),
                             scores=r["val_scores"], train_seconds=r["train_seconds"]) for r in done if r["sweep"]]  # fmt: skip
        best = choose(points, "exact_match")
        t, a = best.settings["temperature"], best.settings["alpha"]
        console.print(f"chosen on validation: T = {t:g}, alpha = {a:g}")
        second = [job("on-policy", b, s, alpha=a) for b in cfg.budgets for s in seeds]
        second += [job("logits", b, s, temperature=t, alpha=a) for b in cfg.budgets for s in seeds
                   if (b, s) != (cfg.budget, 0)]  # fmt: skip
        done += run_jobs(_student_job, _longest_first(second), pool=pool, console=console, progress=progress)
    for r in list(done):  # the chosen sweep point is the main budget's seed-0 logits student
        if r["sweep"] and r["dir"] == str(best.out):
            done.append({**r, "sweep": False})
    return done, points, best


_COST = {"on-policy": 0, "logits": 1, "sft": 2, "hard": 3}


def _longest_first(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Longest first, so the last jobs to finish are short ones and the workers stay busy to the end.
    return sorted(jobs, key=lambda j: _COST[j["kind"]])


def _teacher(cfg: TriageDemoConfig, out: Path, key, tok, rows, console, progress: bool) -> tuple[Path, bool]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.teacher_threads)  # the teacher trains alone: both cores help it
    try:
        return cached_teacher(out, key, tok, rows, size=cfg.teacher_size, seed=cfg.seed, console=console,
                              max_steps=cfg.teacher_steps, batch_size=cfg.teacher_batch, lr=cfg.lr_teacher,
                              warmup_steps=20, progress=progress)  # fmt: skip
    finally:
        torch.set_num_threads(previous)


def _student_job(job: dict[str, Any]) -> dict[str, Any]:
    """Worker: train one student, then answer the validation and test tickets (plain data back)."""
    import io

    from rich.console import Console

    from distill.demos.common import stop_if_terminated
    from distill.train import train
    from distill.train.config import TrainConfig
    from distill.train.sweep import validation_scores

    cfg = TrainConfig(**job["config"])
    res = train(cfg, console=Console(file=io.StringIO()))  # its summary line would interleave with others'
    stop_if_terminated(res)
    val, test = ev.splits(job["n_val"], job["n_test"])
    out = {k: job[k] for k in ("name", "kind", "budget", "seed", "sweep")}
    out.update(dir=cfg.out, temperature=cfg.temperature, alpha=cfg.alpha, tokens=res.tokens,
               train_seconds=res.seconds, **ev.predict(Path(cfg.out), val, test, job["top_k"]))  # fmt: skip
    if job["sweep"]:
        out["val_scores"] = validation_scores(cfg.out, job["val"])
    return out

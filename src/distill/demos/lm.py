"""`distill demo --task lm`: distil a small causal LM on the built-in invoice task (`distill.demos.tasks`).

The setting, all on this machine's CPU, nothing downloaded:

1. A byte-level BPE tokenizer is trained on the task's texts; a teacher causal LM (4 layers) is
   trained on gold answers (``sft``) and cached under ``OUT/teacher`` (reused when its settings match).
2. The teacher answers a transfer set of prompts through `distill.store.generate` into a real store
   (``OUT/store``) with its top-k log-probabilities. Labels are scarce, as in the classifier demo:
   only the first ``labelled`` transfer prompts (default 150 of 1500) have a gold answer.
3. Three students 5-10x smaller, all from the same initialisation and with the same steps and batch,
   each trained by `distill.train.train` once per seed (``seeds``: initialisation and data order):
   ``hard labels`` (the ``labelled`` gold answers alone, seen many times over; no teacher), ``sft``
   (the teacher's answers to every transfer prompt) and ``logits`` (the teacher's top-k
   log-probabilities on every transfer prompt, forward KL mixed with CE on its answers). The students
   are independent: they train side by side, one worker process (one torch thread) per core
   (``workers``), with the same results as one after another.
4. Every model is scored on held-out prompts: exact match of its greedy answer, eval cross-entropy
   of the gold answer (in the worker that trained it), parameters, and greedy-decoding latency
   (speedup against the teacher; timed afterwards in the main process, one model at a time).
   Students' exact match and eval CE are reported as mean ± std over seeds, as in the digits demo:
   one seed cannot tell a method's effect from the luck of its initialisation.

The students' budget matters more than anything else here: at 1500 steps a 2x64 student had learnt
vendor, currency and year but not yet the month (8% right); at 3000 steps it got 88% of months
(measured with this module's settings; see docs/train.md).

The teacher must be clearly better than the students for distillation to help (KD-NOTES: a weak
teacher made the student worse); the report checks and says so.

Why the distilled students do not also get the ``labelled`` gold answers: the teacher answers those
same prompts (they are part of the transfer set) and is right on ~99% of held-out prompts, so gold
answers would change at most a handful of targets; and ``logits`` mode reads only store records with
top-k log-probabilities, so adding gold rows would give ``sft`` and ``logits`` different data.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from distill import report
from distill.demos.common import (
    cached_teacher,
    load_or_train_tokenizer,
    model_params,
    run_jobs,
    stop_if_terminated,
)
from distill.demos.common import write_rows as _write_rows
from distill.models.base import GenerationSettings
from distill.train.parallel import WorkerPool, default_workers


@dataclass(frozen=True)
class LMDemoConfig:
    """Sizes and budgets of the LM demo."""

    n_teacher_train: int = 3000
    """Gold-answer examples the teacher trains on (seed 0)."""
    n_transfer: int = 1500
    """Prompts the teacher answers for the students (seed 2)."""
    labelled: int = 150
    """Transfer prompts with a gold answer (the first N): all the hard-label student trains on;
    1 <= labelled <= n_transfer."""
    n_eval: int = 200
    """Held-out prompts for exact match and eval CE (seed 1)."""
    teacher_steps: int = 2000
    """Optimizer steps of the teacher (batch ``batch_size``)."""
    student_steps: int = 3000
    """Optimizer steps of every student: the same budget for all three."""
    batch_size: int = 16
    """Examples per step."""
    teacher_size: tuple[int, int, int] = (4, 128, 4)
    """Teacher (layers, width, heads)."""
    student_size: tuple[int, int, int] = (2, 64, 4)
    """Student (layers, width, heads)."""
    vocab_size: int = 512
    """Tokenizer vocabulary (bytes + merges + special tokens)."""
    top_k: int = 20
    """Teacher log-probabilities stored per token."""
    alpha: float = 0.7
    """Weight of the distillation term in ``logits`` mode."""
    temperature: float = 1.0
    """Softmax temperature of the distillation term in ``logits`` mode (T² scaling in `distill.train`)."""
    lr_teacher: float = 1e-3
    """Peak learning rate of the teacher."""
    lr_student: float = 3e-3
    """Peak learning rate of the students."""
    latency_prompts: int = 20
    """Prompts timed one at a time for the speedup."""
    seed: int = 0
    """Seed of the teacher's initialisation and data order; student seed ``s`` is initialised with
    ``seed + 1 + s`` and shuffled with ``seed + s``."""
    seeds: int = 2
    """Student seeds (initialisation and data order); exact match and eval CE as mean ± std."""
    workers: int = field(default_factory=lambda: min(default_workers(), 8))
    """Processes training students side by side (one torch thread each; default: the cores, at most 8);
    the numbers do not depend on it."""

    def __post_init__(self) -> None:
        if int(self.seeds) < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds!r}")
        if not 1 <= int(self.labelled) <= int(self.n_transfer):
            raise ValueError(
                f"labelled must be >= 1 and <= n_transfer ({self.n_transfer}), got {self.labelled!r}"
            )


QUICK = dict(
    n_teacher_train=400,
    n_transfer=160,
    labelled=40,
    n_eval=40,
    teacher_steps=120,
    student_steps=40,
    latency_prompts=5,
    seeds=1,
)

GREEDY = GenerationSettings(max_new_tokens=24, temperature=0.0)
"""How every model of the demo answers: greedy, at most 24 new tokens (answers are 1-6 tokens)."""


def _greedy_answers(gen, eval_examples) -> list[str]:
    """The greedy answers (up to 24 tokens) of teacher ``gen`` (an `HFTeacher`) to every example."""
    from distill.models.base import Request

    reqs = [Request(id=e.id, prompt=e.prompt) for e in eval_examples]
    return [c.text for c in gen.complete(reqs, GREEDY)]


def _score(model_dir: Path, eval_examples, eval_rows_path: Path) -> dict[str, Any]:
    """Exact match of the greedy answers, eval CE of the gold answers (nats/token), three samples."""
    from distill.demos.tasks import exact_match_rate
    from distill.models.hf import HFTeacher
    from distill.train.sweep import eval_ce

    answers = _greedy_answers(HFTeacher(model_dir, batch_size=32), eval_examples)
    return {
        "exact_match": exact_match_rate(answers, [e.answer for e in eval_examples]),
        "eval_ce": eval_ce(model_dir, eval_rows_path),
        "samples": [
            {"prompt": e.prompt, "gold": e.answer, "answer": a}
            for e, a in list(zip(eval_examples, answers))[:3]
        ],
    }


def _timing(model_dir: Path, eval_examples, cfg: LMDemoConfig) -> dict[str, Any]:
    """Parameters and greedy latency per prompt at batch size 1 (timed in the main process, one model at a time)."""
    from distill.models.base import Request
    from distill.models.hf import HFTeacher

    gen = HFTeacher(model_dir, batch_size=32)
    timed = [Request(id=e.id, prompt=e.prompt) for e in eval_examples[: cfg.latency_prompts]]
    t0 = time.perf_counter()
    for r in timed:  # one prompt per call: batch size 1
        gen.complete([r], GREEDY)
    latency = (time.perf_counter() - t0) / max(len(timed), 1)
    return {"params": model_params(model_dir), "latency_ms": latency * 1000}


def _student_job(job: dict[str, Any]) -> dict[str, Any]:
    """Worker: train one student and score it on the held-out prompts (plain data back)."""
    import io

    from rich.console import Console

    from distill.demos.tasks import make_examples
    from distill.train import train
    from distill.train.config import TrainConfig

    cfg = TrainConfig(**job["config"])
    res = train(cfg, console=Console(file=io.StringIO()))  # its summary line would interleave with others'
    stop_if_terminated(res)
    scored = _score(Path(cfg.out), make_examples(job["n_eval"], seed=1), Path(job["eval_rows"]))
    return {
        **job,
        "dir": Path(cfg.out),
        "tokens": res.tokens,
        "train_seconds": res.seconds,
        "mode": cfg.mode,
        **scored,
    }


def run(out: str | Path = "runs/demo-lm", *, quick: bool = False, console: Any = None, progress: bool = True,
        threads: int = 1, **overrides: Any) -> dict[str, Any]:  # fmt: skip
    """Run the LM demo; write ``report.json``, ``report.md``, ``plot.png`` and the models under ``out``.

    ``quick``: a small run (about a minute) for tests; ``overrides``: fields of `LMDemoConfig`.
    Returns the report dict (the content of ``report.json``).
    """
    import torch
    from rich.console import Console

    cfg = replace(LMDemoConfig(), **({**QUICK, **overrides} if quick else overrides))
    console = console or Console(stderr=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # tiny models: thread synchronisation costs more than it saves
    try:
        return _run(cfg, Path(out), quick, console, progress)
    finally:
        torch.set_num_threads(previous)


def _run(cfg: LMDemoConfig, out: Path, quick: bool, console, progress: bool) -> dict[str, Any]:
    from distill.demos.tasks import make_examples, to_rows
    from distill.models.hf import HFTeacher
    from distill.models.tiny import save_tiny, tiny_causal_lm
    from distill.store.generate import generate

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    teacher_train = make_examples(cfg.n_teacher_train, seed=0)
    eval_set = make_examples(cfg.n_eval, seed=1)
    transfer = make_examples(cfg.n_transfer, seed=2)
    tok = load_or_train_tokenizer(out / "tokenizer", [e.prompt + " " + e.answer for e in teacher_train],
                                  cfg.vocab_size)  # fmt: skip
    console.print("[bold]1/4[/] teacher (trained once, cached under the output directory)")
    key = {k: v for k, v in asdict(cfg).items() if k in ("n_teacher_train", "teacher_steps", "batch_size",
                                                         "teacher_size", "vocab_size", "lr_teacher", "seed")}  # fmt: skip
    tdir, reused = cached_teacher(out, key, tok, to_rows(teacher_train), size=cfg.teacher_size, seed=cfg.seed,
                                  console=console, max_steps=cfg.teacher_steps, batch_size=cfg.batch_size,
                                  lr=cfg.lr_teacher, warmup_steps=20, progress=progress)  # fmt: skip

    console.print("[bold]2/4[/] teacher answers the transfer prompts into a store (top-k log-probabilities)")
    prompts = _write_rows(
        out / "data" / "transfer_prompts.jsonl", [{"id": e.id, "prompt": e.prompt} for e in transfer]
    )
    gen = generate(HFTeacher(tdir, batch_size=32), prompts, out / "store",
                   settings=replace(GREEDY, top_logprobs=cfg.top_k),
                   progress=progress, console=console)  # fmt: skip
    # Label scarcity: only the first `labelled` transfer prompts have a gold answer.
    gold = _write_rows(out / "data" / "labelled_gold.jsonl", to_rows(transfer[: cfg.labelled]))
    eval_rows = _write_rows(out / "data" / "eval_gold.jsonl", to_rows(eval_set))

    console.print(f"[bold]3/4[/] students: same initialisation, same steps and batch ({cfg.seeds} seed(s), "
                  f"{cfg.workers} at a time), each scored on the held-out prompts")  # fmt: skip
    layers, width, heads = cfg.student_size
    runs = {"hard labels": ("hard", "sft", gold), "sft (teacher text)": ("sft", "sft", out / "store"),
            "logits (top-k KD)": ("logits", "logits", out / "store")}  # fmt: skip
    jobs = []
    for s in range(cfg.seeds):
        # Seed 0's models keep the unsuffixed directories (students/sft, ...) that `distill eval`,
        # `distill route fit` and benchmarks/route.py are pointed at.
        suffix = f"-seed{s}" if s else ""
        init = save_tiny(tiny_causal_lm(len(tok), n_layer=layers, n_embd=width, n_head=heads, seed=cfg.seed + 1 + s),
                         tok, out / "init" / f"student{suffix}")  # fmt: skip
        for name, (kind, mode, data) in runs.items():
            config = dict(student=str(init), data=str(data), out=str(out / "students" / f"{kind}{suffix}"), mode=mode,
                          alpha=cfg.alpha, temperature=cfg.temperature, max_steps=cfg.student_steps,
                          batch_size=cfg.batch_size, lr=cfg.lr_student, warmup_steps=10, seed=cfg.seed + s,
                          progress=False)  # fmt: skip
            jobs.append({"name": f"{kind}{suffix}", "student": name, "seed": s, "config": config,
                         "n_eval": cfg.n_eval, "eval_rows": str(eval_rows)})  # fmt: skip
    with WorkerPool(cfg.workers) as pool:
        done = run_jobs(_student_job, jobs, pool=pool, console=console, progress=progress)
    per_seed: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    for r in sorted(done, key=lambda r: r["seed"]):
        per_seed[r["student"]].append(r)

    console.print("[bold]4/4[/] latency on held-out prompts, one model at a time")
    results = {
        "teacher": {**_score(tdir, eval_set, eval_rows), **_timing(tdir, eval_set, cfg), "cached": reused}
    }
    for name, seeds in per_seed.items():
        evals = [{**t, **_timing(t["dir"], eval_set, cfg)} for t in seeds]
        results[name] = _aggregate(evals, seeds, cfg.labelled if name == "hard labels" else gen.total)
    teacher = results["teacher"]
    for r in results.values():
        em = _mean(r["exact_match"])
        r["quality_retained"] = em / teacher["exact_match"] if teacher["exact_match"] else None
        r["speedup"] = teacher["latency_ms"] / r["latency_ms"] if r["latency_ms"] else None
        r["param_ratio"] = teacher["params"] / r["params"]
    students = [r for n, r in results.items() if n != "teacher"]
    best_student = max(students, key=lambda r: _mean(r["exact_match"]))
    clearly_better = (teacher["exact_match"] >= _mean(best_student["exact_match"]) + 0.05
                      and teacher["eval_ce"] < min(_mean(r["eval_ce"]) for r in students))  # fmt: skip
    result = {
        "task": "invoice field extraction (distill.demos.tasks), exact match of the greedy answer",
        "labelled": cfg.labelled,
        "seeds": list(range(cfg.seeds)),
        "quick": quick,
        "config": asdict(cfg),
        "models": results,
        "teacher_clearly_better": clearly_better,
        "store": {
            "path": str(out / "store"),
            "total": gen.total,
            "answered_now": gen.answered,
            "without_topk": gen.without_topk,
            "failed": gen.failed,
        },
        "seconds": time.perf_counter() - t_start,
    }
    _write_reports(out, result, console)
    report.write_json(out / "report.json", result)
    return result


def _mean(value: Any) -> float:
    """A metric that is a float (the teacher) or ``{"mean", "std", ...}`` (students over seeds)."""
    return float(value["mean"]) if isinstance(value, dict) else float(value)


def _aggregate(evals: list[dict[str, Any]], seeds: list[dict[str, Any]], examples: int) -> dict[str, Any]:
    """One student over seeds: exact match and eval CE as ``{mean, std, n, per_seed}``; the rest as means.

    ``samples`` are seed 0's; ``dir`` is seed 0's model directory."""
    import statistics

    out: dict[str, Any] = {}
    for key in ("exact_match", "eval_ce"):
        vals = [e[key] for e in evals]
        out[key] = {**report.mean_std(vals), "per_seed": vals}
    out["latency_ms"] = statistics.fmean(e["latency_ms"] for e in evals)
    out["params"] = evals[0]["params"]
    out["samples"] = evals[0]["samples"]
    out["tokens"] = seeds[0]["tokens"]
    out["train_seconds"] = statistics.fmean(t["train_seconds"] for t in seeds)
    out["mode"] = seeds[0]["mode"]
    out["train_examples"] = examples
    out["dir"] = str(seeds[0]["dir"])
    return out


def _write_reports(out: Path, result: dict[str, Any], console) -> None:
    headers = ["model", "params", "train examples", "exact match", "eval CE", "retained", "speedup", "tokens"]
    rows = [[name, r["params"], r.get("train_examples"), r["exact_match"], r["eval_ce"], r["quality_retained"],
             r["speedup"], r.get("tokens")] for name, r in result["models"].items()]  # fmt: skip
    keep = [0, 1, 3, 4, 5, 6]  # the terminal gets the main columns; report.md has all of them
    report.print_table("distill demo --task lm (held-out prompts)", [headers[i] for i in keep],
                       [[r[i] for i in keep] for r in rows], console=console)  # fmt: skip
    verdict = ("The teacher is clearly better than every student (exact match +5 points or more, lower eval CE): "
               "distillation has something to transfer." if result["teacher_clearly_better"] else
               "WARNING: the teacher is NOT clearly better than the students; distilling from it can make a "
               "student worse. Train the teacher longer (teacher_steps) before trusting the KD rows.")  # fmt: skip
    console.print(verdict)
    t = result["models"]["teacher"]
    cfg = result["config"]
    report.write_markdown(
        out / "report.md",
        "distill demo: language-model distillation on invoice field extraction",
        [
            ("", f"{result['task']}. Teacher trained on {cfg['n_teacher_train']} gold answers for "
                 f"{cfg['teacher_steps']} steps{' (cached)' if t['cached'] else ''}. Students trained "
                 f"{cfg['student_steps']} steps of {cfg['batch_size']} from the same initialisation: hard labels "
                 f"on the {cfg['labelled']} gold answers only, sft and logits (alpha {cfg['alpha']}, T "
                 f"{cfg['temperature']}) on the teacher's answers to all {cfg['n_transfer']} transfer prompts; "
                 f"evaluated on {cfg['n_eval']} held-out prompts. Students: mean ± std over "
                 f"{len(result['seeds'])} seed(s) (initialisation and data order)."),
            ("Results", (headers, rows)),
            ("", verdict),
            ("", "Eval CE: cross-entropy of the gold answer per token (nats). Quality retained: exact match / "
                 "teacher's. Speedup: teacher's greedy-decoding latency per prompt (batch 1, CPU) / the model's."),
        ],
    )  # fmt: skip
    fig, (ax_em, ax_ce) = report.figure(2, width=4.6, height=3.8)
    names = list(result["models"])
    for ax, key, scale, color in (
        (ax_em, "exact_match", 100, "tab:blue"),
        (ax_ce, "eval_ce", 1, "tab:orange"),
    ):
        vals = [result["models"][n][key] for n in names]
        ax.bar(range(len(names)), [_mean(v) * scale for v in vals], color=color,
               yerr=[(v["std"] if isinstance(v, dict) else 0.0) * scale for v in vals], capsize=3)  # fmt: skip
    for ax, title in ((ax_em, "exact match (%)"), (ax_ce, "eval CE (nats/token)")):
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    report.save_figure(fig, out / "plot.png")

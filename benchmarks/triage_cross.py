"""Soft labels across tokenizers on the triage task: does the teacher's top-k beat its text?

The triage demo's task (`distill.demos.triage_task`: a ticket's gold team is *sampled* when it mentions
two issues), with a teacher whose tokenizer is not the students': the teacher (Llama 4x128) uses a
SentencePiece-style BPE (``▁`` for spaces, byte fallback, trained here), the students (Llama 2x64) a
byte-level BPE (``Ġ``). The teacher answers ``--budget`` transfer tickets with its top-20 through
`distill.store.generate` (a store of its token ids); students, one initialisation per seed, 400 steps:

- ``hard``: ``--labelled`` gold tickets, no teacher;
- ``sft``: the teacher's text, re-tokenised by the student;
- ``project``: ``--mode logits --cross-tokenizer project --teacher-tokenizer TEACHER`` (top-k mapped onto
  the student's vocabulary at aligned positions);
- ``uld``: ``--mode logits --cross-tokenizer uld`` (sorted-probability distance at aligned positions).

T and alpha of the two soft-label students are chosen on validation (seed 0; ``--temperatures``,
``--alphas``), as the demo does. Accuracy etc. on 2,000 test tickets, mean ± std over ``--seeds``.

    .venv/bin/python benchmarks/triage_cross.py --out runs/triage-cross          # the full run
    .venv/bin/python benchmarks/triage_cross.py --out /tmp/tc --quick            # a tiny run (~1 min)
    .venv/bin/python benchmarks/triage_cross.py --out runs/triage-cross --kinds uld --alphas 0.1 0.5 \
        --temperatures 1 --name triage_cross_uld                                 # more settings, same teacher

Writes ``OUT/triage_cross.json`` and prints the table (docs/train.md has the recorded one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from distill.demos import triage_eval as ev

KINDS = ("hard", "sft", "project", "uld")


def _job(job: dict[str, Any]) -> dict[str, Any]:
    """Worker: train one student, score it on validation and test (plain data back)."""
    import io

    from rich.console import Console

    from distill.train import train
    from distill.train.config import TrainConfig

    cfg = TrainConfig(**job["config"])
    res = train(cfg, console=Console(file=io.StringIO()))
    val, test = ev.splits(job["n_val"], job["n_test"])
    pred = ev.predict(Path(cfg.out), val, test, 20)
    out = {k: job[k] for k in ("name", "kind", "seed", "sweep")}
    out.update(temperature=cfg.temperature, alpha=cfg.alpha, train_seconds=res.seconds, cross=res.data.cross,
               val=ev.scores(pred["val"], val, None), test_pred=pred["test"])  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/triage-cross")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, measures nothing")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", type=int, default=300)
    ap.add_argument("--labelled", type=int, default=100)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.9])
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="students to train (the "
                    "teacher and store are cached in OUT: a second run with other --kinds reuses them)")  # fmt: skip
    ap.add_argument("--name", default="triage_cross", help="OUT/NAME.json")
    args = ap.parse_args(argv)

    from rich.console import Console

    from distill import report
    from distill.demos.common import (
        cached_teacher,
        load_or_train_tokenizer,
        model_params,
        run_jobs,
        write_rows,
    )
    from distill.demos.triage import QUICK, TriageDemoConfig
    from distill.demos.triage_task import make_examples, to_rows
    from distill.models.base import GenerationSettings
    from distill.models.hf import HFTeacher
    from distill.models.tiny import save_tiny, tiny_causal_lm, train_metaspace_tokenizer
    from distill.store.generate import generate
    from distill.train.parallel import WorkerPool, default_workers

    console = Console(stderr=True)
    t_start = time.perf_counter()
    over = dict(QUICK, seeds=min(args.seeds, 2)) if args.quick else {"seeds": args.seeds}
    over.pop("temperatures", None), over.pop("alphas", None)
    budget = over.pop("budget", args.budget)
    over["budgets"], over["labelled"] = (budget,), min(over.get("labelled", args.labelled), args.labelled)
    cfg = TriageDemoConfig(budget=budget, **over)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_train = make_examples(cfg.n_teacher_train, seed=cfg.seed)
    transfer = make_examples(cfg.pool, seed=cfg.seed + 2)
    val, test = ev.splits(cfg.n_val, cfg.n_test)
    texts = [e.prompt + " " + e.answer for e in teacher_train[:4000]]
    s_tok = load_or_train_tokenizer(out / "tokenizer", texts, cfg.vocab_size)
    t_tok_dir = out / "teacher_tokenizer"
    if (t_tok_dir / "tokenizer.json").is_file():
        from distill.models.loading import load_tokenizer

        t_tok = load_tokenizer(t_tok_dir, "teacher tokenizer")
    else:
        # No dummy prefix: the answer " Billing" keeps its space when decoded (as the students' data has it).
        t_tok = train_metaspace_tokenizer(texts, cfg.vocab_size, dummy_prefix=False)
        t_tok.save_pretrained(t_tok_dir)
    console.print(f"[bold]1/3[/] teacher (SentencePiece-style tokenizer, {len(t_tok)} entries; students: "
                  f"byte-level, {len(s_tok)})")  # fmt: skip
    key = {"n": cfg.n_teacher_train, "steps": cfg.teacher_steps, "size": cfg.teacher_size, "tok": "metaspace-768",
           "batch": cfg.teacher_batch, "lr": cfg.lr_teacher, "seed": cfg.seed}  # fmt: skip
    tdir, _ = cached_teacher(out, key, t_tok, to_rows(teacher_train), size=cfg.teacher_size, seed=cfg.seed,
                             console=console, max_steps=cfg.teacher_steps, batch_size=cfg.teacher_batch,
                             lr=cfg.lr_teacher, warmup_steps=20, progress=False)  # fmt: skip
    console.print(f"[bold]2/3[/] teacher answers {cfg.budget} transfer tickets (top-20)")
    prompts = write_rows(
        out / "data" / "transfer.jsonl", [{"id": e.id, "prompt": e.prompt} for e in transfer[: cfg.budget]]
    )
    settings = GenerationSettings(max_new_tokens=ev.MAX_NEW_TOKENS, temperature=0.0, top_logprobs=20)
    store = out / "stores" / str(cfg.budget)
    generate(
        HFTeacher(tdir, batch_size=64), prompts, store, settings=settings, progress=False, console=console
    )
    gold = write_rows(out / "data" / "labelled_gold.jsonl", to_rows(transfer[: cfg.labelled]))
    teacher_pred = ev.predict(tdir, val, test, 20)

    layers, width, heads = cfg.student_size
    inits = [save_tiny(tiny_causal_lm(len(s_tok), n_layer=layers, n_embd=width, n_head=heads, seed=cfg.seed + 1 + s),
                       s_tok, out / "init" / f"student-s{s}") for s in range(cfg.seeds)]  # fmt: skip

    def job(kind: str, s: int, t: float = 1.0, a: float = 0.5, sweep: bool = False) -> dict[str, Any]:
        name = f"{kind}-s{s}" + (f"-T{t:g}-a{a:g}" if sweep else "")
        c = dict(student=str(inits[s]), out=str(out / "students" / name), max_steps=cfg.student_steps,
                 batch_size=cfg.batch_size, lr=cfg.lr_student, warmup_steps=10, seed=cfg.seed + s, progress=False)  # fmt: skip
        if kind == "hard":
            c.update(mode="sft", data=str(gold))
        elif kind == "sft":
            c.update(mode="sft", data=str(store))
        else:
            c.update(mode="logits", data=str(store), teacher_tokenizer=str(tdir), cross_tokenizer=kind,
                     temperature=t, alpha=a)  # fmt: skip
        return {"name": name, "kind": kind, "seed": s, "sweep": sweep, "config": c, "n_val": cfg.n_val,
                "n_test": cfg.n_test}  # fmt: skip

    console.print(f"[bold]3/3[/] students ({cfg.seeds} seeds): T x alpha for project and uld on validation")
    grid = [(t, a) for t in args.temperatures for a in args.alphas]
    workers = args.workers or min(default_workers(), 8)
    with WorkerPool(workers) as pool:
        soft = [k for k in ("project", "uld") if k in args.kinds]
        first = [job(k, 0, t, a, sweep=True) for k in soft for t, a in grid]
        first += [job(k, s) for k in ("hard", "sft") if k in args.kinds for s in range(cfg.seeds)]
        done = run_jobs(_job, first, pool=pool, console=console, progress=False)
        chosen = {}
        for k in soft:
            pts = [r for r in done if r["kind"] == k and r["sweep"]]
            best = max(pts, key=lambda r: r["val"]["accuracy"])  # ties: the first (lower T)
            chosen[k] = (best["temperature"], best["alpha"])
            done.append({**best, "sweep": False})
        console.print(f"chosen on validation: {chosen}")
        second = [job(k, s, *chosen[k]) for k in soft for s in range(1, cfg.seeds)]
        done += run_jobs(_job, second, pool=pool, console=console, progress=False)

    t_scores = ev.scores(teacher_pred["test"], test, None)
    rows, result = [], {"teacher": {**t_scores, "params": model_params(tdir), "tokenizer": "metaspace"}}
    for k in [k for k in KINDS if k in args.kinds]:
        runs = sorted((r for r in done if r["kind"] == k and not r["sweep"]), key=lambda r: r["seed"])
        per = [ev.scores(r["test_pred"], test, teacher_pred["test"]) for r in runs]
        agg = {m: report.mean_std([p[m] for p in per]) | {"per_seed": [p[m] for p in per]} for m in per[0]}
        cross = runs[0]["cross"]
        share = cross["aligned"] / cross["positions"] if cross.get("positions") else None
        agg.update(aligned_share=share, temperature=runs[0]["temperature"], alpha=runs[0]["alpha"],
                   train_seconds=statistics.fmean(r["train_seconds"] for r in runs))  # fmt: skip
        result[k] = agg

        def f(m: str, agg: dict = agg) -> str:
            return f"{agg[m]['mean']:.3f} ± {agg[m]['std']:.3f}"

        setting = f"T {agg['temperature']:g}, alpha {agg['alpha']:g}" if k in ("project", "uld") else ""
        rows.append([k, setting, f("accuracy"), f("expected_accuracy"), f("agreement"), f("ece"),
                     "" if share is None else f"{share:.1%}"])  # fmt: skip
    result["params_student"] = model_params(inits[0])
    result["sweep"] = [{k: r[k] for k in ("kind", "temperature", "alpha")} | {"val_accuracy": r["val"]["accuracy"]}
                       for r in done if r["sweep"]]  # fmt: skip
    result["settings"] = {"budget": cfg.budget, "labelled": cfg.labelled, "seeds": cfg.seeds, "quick": args.quick,
                          "student_steps": cfg.student_steps, "seconds": time.perf_counter() - t_start}  # fmt: skip
    report.print_table(
        f"triage across tokenizers: {cfg.budget} teacher answers, {cfg.seeds} seeds (teacher test accuracy "
        f"{t_scores['accuracy']:.3f})",
        ["student", "setting", "test accuracy", "expected acc.", "agreement", "ECE", "aligned"],
        rows,
        console=console,
    )
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    console.print(f"{time.perf_counter() - t_start:.0f} s; {out / f'{args.name}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

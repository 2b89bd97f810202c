"""Soft labels across tokenizers on the LM demo's invoice task (`distill.demos.tasks`).

The LM demo (`distill demo --task lm`) with a teacher whose tokenizer is not the students': the teacher
(Llama 4x128, 2000 steps on 3000 gold answers) uses a SentencePiece-style BPE (``▁``, byte fallback,
trained here), the students (Llama 2x64, 3000 steps of 16) a byte-level BPE. The teacher answers 1500
transfer prompts with its top-20 (a store of its token ids); per seed, from one initialisation:
``hard`` (150 gold answers), ``sft`` (the teacher's text), ``project`` and ``uld`` (``--mode logits
--cross-tokenizer ... --teacher-tokenizer TEACHER``, alpha 0.7, T 1: the demo's settings). Exact match
and eval CE on 200 held-out prompts, mean ± std over ``--seeds``; the share of aligned positions.

    .venv/bin/python benchmarks/lm_cross.py --out runs/lm-cross            # the full run (tens of minutes)
    .venv/bin/python benchmarks/lm_cross.py --out /tmp/lc --quick          # a tiny run (checks the script)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

KINDS = ("hard", "sft", "project", "uld")


def _job(job: dict[str, Any]) -> dict[str, Any]:
    """Worker: train one student and score it (exact match, eval CE) on the held-out prompts."""
    import io

    from rich.console import Console

    from distill.demos.lm import _score
    from distill.demos.tasks import make_examples
    from distill.train import train
    from distill.train.config import TrainConfig

    cfg = TrainConfig(**job["config"])
    res = train(cfg, console=Console(file=io.StringIO()))
    scored = _score(Path(cfg.out), make_examples(job["n_eval"], seed=1), Path(job["eval_rows"]))
    return {**{k: job[k] for k in ("name", "kind", "seed")}, "cross": res.data.cross, "train_seconds": res.seconds,
            "exact_match": scored["exact_match"], "eval_ce": scored["eval_ce"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/lm-cross")
    ap.add_argument("--quick", action="store_true", help="the demo's --quick sizes: checks the script only")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args(argv)

    from dataclasses import replace

    from rich.console import Console

    from distill import report
    from distill.demos.common import (
        cached_teacher,
        load_or_train_tokenizer,
        model_params,
        run_jobs,
        write_rows,
    )
    from distill.demos.lm import GREEDY, QUICK, LMDemoConfig, _score
    from distill.demos.tasks import make_examples, to_rows
    from distill.models.hf import HFTeacher
    from distill.models.tiny import save_tiny, tiny_causal_lm, train_metaspace_tokenizer
    from distill.store.generate import generate
    from distill.train.parallel import WorkerPool, default_workers

    console = Console(stderr=True)
    t_start = time.perf_counter()
    cfg = LMDemoConfig(**(dict(QUICK, seeds=min(args.seeds, 2)) if args.quick else {"seeds": args.seeds}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_train = make_examples(cfg.n_teacher_train, seed=0)
    eval_set, transfer = make_examples(cfg.n_eval, seed=1), make_examples(cfg.n_transfer, seed=2)
    texts = [e.prompt + " " + e.answer for e in teacher_train]
    s_tok = load_or_train_tokenizer(out / "tokenizer", texts, cfg.vocab_size)
    t_dir = out / "teacher_tokenizer"
    if (t_dir / "tokenizer.json").is_file():
        from distill.models.loading import load_tokenizer

        t_tok = load_tokenizer(t_dir, "teacher tokenizer")
    else:
        t_tok = train_metaspace_tokenizer(
            texts, cfg.vocab_size + 256, dummy_prefix=False
        )  # + the byte pieces
        t_tok.save_pretrained(t_dir)
    console.print(
        f"[bold]1/3[/] teacher (SentencePiece-style, {len(t_tok)} entries; students byte-level, {len(s_tok)})"
    )
    key = {"n": cfg.n_teacher_train, "steps": cfg.teacher_steps, "size": cfg.teacher_size, "tok": "metaspace",
           "batch": cfg.batch_size, "lr": cfg.lr_teacher, "seed": cfg.seed}  # fmt: skip
    tdir, _ = cached_teacher(out, key, t_tok, to_rows(teacher_train), size=cfg.teacher_size, seed=cfg.seed,
                             console=console, max_steps=cfg.teacher_steps, batch_size=cfg.batch_size,
                             lr=cfg.lr_teacher, warmup_steps=20, progress=False)  # fmt: skip
    console.print("[bold]2/3[/] teacher answers the transfer prompts (top-20)")
    prompts = write_rows(
        out / "data" / "transfer.jsonl", [{"id": e.id, "prompt": e.prompt} for e in transfer]
    )
    store = out / "store"
    generate(HFTeacher(tdir, batch_size=32), prompts, store, settings=replace(GREEDY, top_logprobs=cfg.top_k),
             progress=False, console=console)  # fmt: skip
    gold = write_rows(out / "data" / "labelled_gold.jsonl", to_rows(transfer[: cfg.labelled]))
    eval_rows = write_rows(out / "data" / "eval_gold.jsonl", to_rows(eval_set))
    layers, width, heads = cfg.student_size
    jobs = []
    for s in range(cfg.seeds):
        init = save_tiny(tiny_causal_lm(len(s_tok), n_layer=layers, n_embd=width, n_head=heads, seed=cfg.seed + 1 + s),
                         s_tok, out / "init" / f"student-s{s}")  # fmt: skip
        for kind in KINDS:
            c = dict(student=str(init), out=str(out / "students" / f"{kind}-s{s}"), max_steps=cfg.student_steps,
                     batch_size=cfg.batch_size, lr=cfg.lr_student, warmup_steps=10, seed=cfg.seed + s, progress=False)  # fmt: skip
            if kind == "hard":
                c.update(mode="sft", data=str(gold))
            elif kind == "sft":
                c.update(mode="sft", data=str(store))
            else:
                c.update(mode="logits", data=str(store), teacher_tokenizer=str(tdir), cross_tokenizer=kind,
                         alpha=cfg.alpha, temperature=cfg.temperature)  # fmt: skip
            jobs.append({"name": f"{kind}-s{s}", "kind": kind, "seed": s, "config": c, "n_eval": cfg.n_eval,
                         "eval_rows": str(eval_rows)})  # fmt: skip
    console.print(f"[bold]3/3[/] {len(jobs)} students")
    with WorkerPool(args.workers or min(default_workers(), 8)) as pool:
        done = run_jobs(_job, jobs, pool=pool, console=console, progress=False)
    teacher = _score(tdir, eval_set, eval_rows)
    result: dict[str, Any] = {"teacher": {"exact_match": teacher["exact_match"], "eval_ce": teacher["eval_ce"],
                                          "params": model_params(tdir)}}  # fmt: skip
    rows = []
    for k in KINDS:
        runs = sorted((r for r in done if r["kind"] == k), key=lambda r: r["seed"])
        em, ce = [r["exact_match"] for r in runs], [r["eval_ce"] for r in runs]
        cross = runs[0]["cross"]
        share = cross["aligned"] / cross["positions"] if cross.get("positions") else None
        result[k] = {"exact_match": report.mean_std(em) | {"per_seed": em}, "eval_ce": report.mean_std(ce) | {"per_seed": ce},
                     "aligned_share": share}  # fmt: skip
        m, c = result[k]["exact_match"], result[k]["eval_ce"]
        rows.append([k, f"{m['mean']:.3f} ± {m['std']:.3f}", f"{c['mean']:.3f} ± {c['std']:.3f}",
                     "" if share is None else f"{share:.1%}"])  # fmt: skip
    result["params_student"] = model_params(out / "init" / "student-s0")
    result["settings"] = {"quick": args.quick, "seeds": cfg.seeds, "student_steps": cfg.student_steps,
                          "seconds": time.perf_counter() - t_start}  # fmt: skip
    report.print_table(f"invoice task across tokenizers ({cfg.seeds} seeds; teacher exact match {teacher['exact_match']:.3f})",
                       ["student", "exact match", "eval CE", "aligned"], rows, console=console)  # fmt: skip
    (out / "lm_cross.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

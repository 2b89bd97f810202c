"""How fast is cross-tokenizer alignment + projection, and what does it add to a training step?

Part 1 (``--records``, default 10,000): examples/s of `distill.train.cross.Projector` (alignment by
byte offsets, then the teacher's top-k mapped onto the student's vocabulary) over real tokenizer
pairs: SentencePiece v1 (32k) -> Tekken (131k), Tekken -> SentencePiece v1, and a locally trained
SentencePiece-style BPE -> byte-level BPE. The records are invoice/ticket-like texts of 20-60 tokens;
the teacher's top-k at each position is its own token (p 0.6) plus ``--k - 1`` other tokens of its
vocabulary drawn at random (no model needed; random alternatives exercise the slow path, the
student's tokenizer, more often than a real teacher's near-synonyms would).

Part 2: the training step with targets from another tokenizer against the same-tokenizer path. One
byte-level student (Llama 2x64), ``--steps`` steps of 16 from (a) a store of a same-tokenizer teacher's
top-20 ids (the exact id path) and (b) a store of a SentencePiece-style teacher's top-20 ids through
``--teacher-tokenizer`` (projected at load time); the same prompts. Median step time (steps after the
first 3), and the load time of each store.

    .venv/bin/python benchmarks/align.py                 # writes bench-results/align.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

WORDS = ("Invoice total due from Acme GmbH Ltd Inc EUR USD payment order shipped refund account locked "
         "charged twice password reset delivery address licence quote urgent please help thanks "
         "Berlin Oslo München Zürich café naïve €12.50 1234567 2024-03-07 3.14159 x² 😀").split()  # fmt: skip


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 25))) for _ in range(n)]


def projection_rate(teacher, student, records: list[str], k: int, seed: int = 0) -> dict:
    """Examples/s of alignment + projection of ``records`` (teacher/student tokenisation not counted)."""
    import math

    import numpy as np

    from distill.models.token_bytes import token_bytes
    from distill.train.cross import Projector, teacher_from_ids

    tb = token_bytes(teacher)
    token_bytes(student)  # built once per vocabulary (cached), as at load time
    rng = np.random.default_rng(seed)
    normal = np.flatnonzero(~tb.special)
    t_ids = teacher(records, add_special_tokens=False)["input_ids"]
    s_ids = student(records, add_special_tokens=False)["input_ids"]
    sides = []
    for ids in t_ids:
        ids = [*ids, teacher.eos_token_id]
        alts = rng.choice(normal, size=(len(ids), k))
        alts[:, 0] = ids
        lps = np.full((len(ids), k), math.log(0.4 / (k - 1)))
        lps[:, 0] = math.log(0.6)
        sides.append((ids, alts, lps))
    t0 = time.perf_counter()
    proj = Projector(student, k)
    for text, (ids, alts, lps), s in zip(records, sides, s_ids):
        proj.add(text, teacher_from_ids(ids, alts, lps, tb), [*s, student.eos_token_id])
    t_add = time.perf_counter() - t0
    out = proj.run()
    seconds = time.perf_counter() - t0
    positions = sum(len(o.aligned) for o in out)
    aligned = sum(int(o.aligned.sum()) for o in out)
    return {"records": len(records), "seconds": seconds, "add_seconds": t_add, "examples_per_s": len(records) / seconds,
            "positions": positions, "aligned_share": aligned / positions, "tokenizer_queries": len(proj._queries),
            "unspelled": proj.unspelled}  # fmt: skip


def step_times(root: Path, steps: int) -> dict:
    """Median training step time from a same-tokenizer store and from another tokenizer's store."""
    from distill.cli import main
    from distill.models.tiny import save_tiny, tiny_causal_lm, train_metaspace_tokenizer, train_tokenizer
    from distill.train import train
    from distill.train.config import TrainConfig

    data = texts(3000, seed=1)
    rows = [{"prompt": t[: len(t) // 2], "completion": t[len(t) // 2 :]} for t in data]
    root.mkdir(parents=True, exist_ok=True)
    table = root / "rows.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": r["prompt"]}) + "\n" for i, r in enumerate(rows[:400]))
    )
    s_tok = train_tokenizer(data, vocab_size=600)
    t_tok = train_metaspace_tokenizer(data, vocab_size=700)
    teachers = {}
    for name, tok in (("same", s_tok), ("other", t_tok)):
        init = save_tiny(
            tiny_causal_lm(len(tok), n_layer=2, n_embd=64, n_head=4, seed=0), tok, root / f"init-{name}"
        )
        tdir = root / f"teacher-{name}"
        if not (tdir / "model.safetensors").is_file():
            cfg = TrainConfig(student=str(init), data=str(table), out=str(tdir), mode="sft", max_steps=300,
                              batch_size=32, lr=3e-3, progress=False)  # fmt: skip
            train(cfg)
        store = root / f"store-{name}"
        args = ["generate", "--teacher", str(tdir), "--prompts", str(prompts), "--out", str(store), "--top-k", "20",
                "--max-new-tokens", "24", "--no-progress"]  # fmt: skip
        assert main(args) == 0
        teachers[name] = (tdir, store)
    student = save_tiny(
        tiny_causal_lm(len(s_tok), n_layer=2, n_embd=64, n_head=4, seed=1), s_tok, root / "student"
    )
    out = {}
    for name, (tdir, store) in teachers.items():
        extra = {"teacher_tokenizer": str(tdir)} if name == "other" else {}
        cfg = TrainConfig(student=str(student), data=str(store), out=str(root / f"run-{name}"), mode="logits",
                          max_steps=steps, batch_size=16, lr=1e-3, progress=False, **extra)  # fmt: skip
        t0 = time.perf_counter()
        res = train(cfg)
        el = [h["elapsed_s"] for h in res.history]
        per = [b - a for a, b in zip(el, el[1:])][3:]
        tokens = [h["tokens"] for h in res.history]
        out[name] = {"median_step_s": statistics.median(per), "mean_step_s": statistics.fmean(per),
                     "tokens_per_step": (tokens[-1] - tokens[0]) / max(len(tokens) - 1, 1),
                     "total_s": time.perf_counter() - t0, "loop_s": el[-1], "cross": res.data.cross}  # fmt: skip
        out[name]["load_s"] = out[name]["total_s"] - out[name]["loop_s"]
    out["ratio_median_step"] = out["other"]["median_step_s"] / out["same"]["median_step_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default="bench-results/align.json")
    ap.add_argument("--work", default="runs/bench-align", help="stores and models of part 2")
    ap.add_argument("--skip-steps", action="store_true", help="part 1 only")
    args = ap.parse_args(argv)

    import os

    import torch
    from rich.console import Console

    from distill import report
    from distill.models.mistral_tokenizers import sentencepiece_v1, tekken
    from distill.models.tiny import train_metaspace_tokenizer, train_tokenizer

    torch.set_num_threads(1)
    console = Console(stderr=True)
    records = texts(args.records)
    local = texts(2000, seed=5)
    sp, tk = sentencepiece_v1(), tekken()
    meta, byte = train_metaspace_tokenizer(local, 700), train_tokenizer(local, 600)
    result = {"load_average_start": os.getloadavg(), "pairs": {}}
    rows = []
    for name, t, s in (("SentencePiece v1 -> Tekken", sp, tk), ("Tekken -> SentencePiece v1", tk, sp),
                       ("Metaspace BPE -> byte-level BPE", meta, byte)):  # fmt: skip
        r = projection_rate(t, s, records, args.k)
        result["pairs"][name] = r
        rows.append([name, r["records"], f"{r['seconds']:.1f}", f"{r['examples_per_s']:,.0f}", f"{r['aligned_share']:.1%}",
                     f"{r['tokenizer_queries']:,}"])  # fmt: skip
    report.print_table(f"alignment + projection, k = {args.k}", ["pair", "records", "s", "examples/s",
                       "aligned", "tokenizer queries"], rows, console=console)  # fmt: skip
    if not args.skip_steps:
        st = step_times(Path(args.work), args.steps)
        result["steps"] = st
        report.print_table("training step (logits, batch 16, top-20)", ["data", "median step s", "load s", "aligned"],
                           [[n, f"{st[n]['median_step_s']:.4f}", f"{st[n]['load_s']:.1f}",
                             f"{st[n]['cross']['aligned'] / st[n]['cross']['positions']:.1%}" if st[n]["cross"] else "-"]
                            for n in ("same", "other")], console=console)  # fmt: skip
        console.print(f"cross / same median step time: {st['ratio_median_step']:.3f}")
    result["load_average_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How a student's step budget and size decide what it learns on the LM demo's invoice task, per field.

    .venv/bin/python benchmarks/lm_budget.py --steps 3000 --size 2 64 4             # seed 0's sft student
    .venv/bin/python benchmarks/lm_budget.py --steps 1500 --size 2 64 4 --mode logits

Trains one student with `distill.train.train` exactly as `distill demo --task lm` trains seed 0's
students (initialisation seed 1, data order seed 0, batch 16, warm-up 10), on the store and tokenizer of
an existing demo output (``--lm-dir``), and scores it on the demo's 200 held-out prompts (seed 1):
exact match overall and per field, eval CE, training seconds. Prints one JSON line and writes it to
``--out``. Results are recorded in docs/train.md ("The students' step budget").
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lm-dir", default="runs/demo-lm", help="output directory of `distill demo --task lm`")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--size", type=int, nargs=3, default=(2, 64, 4), metavar=("LAYERS", "WIDTH", "HEADS"))
    p.add_argument("--mode", choices=("sft", "logits"), default="sft")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--work", default="runs/lm-budget")
    p.add_argument("--out", default=None, help="JSON file (default: WORK/<name>.json)")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from distill.demos.lm import _eval_ce, _greedy_answers, _params
    from distill.demos.tasks import exact_match_rate, make_examples
    from distill.metrics import exact_match
    from distill.models.hf import HFTeacher
    from distill.models.tiny import save_tiny, tiny_causal_lm
    from distill.train import train
    from distill.train.config import TrainConfig

    torch.set_num_threads(1)  # as the demo: tiny models, thread sync costs more than it saves
    lm_dir = Path(args.lm_dir)
    layers, width, heads = args.size
    name = f"{args.mode}-{args.steps}-{layers}x{width}-lr{args.lr:g}"
    work = Path(args.work) / name
    tok = AutoTokenizer.from_pretrained(lm_dir / "tokenizer")
    init = save_tiny(
        tiny_causal_lm(len(tok), n_layer=layers, n_embd=width, n_head=heads, seed=1), tok, work / "init"
    )
    t0 = time.perf_counter()
    train(TrainConfig(student=str(init), data=str(lm_dir / "store"), out=str(work / "model"), mode=args.mode,
                      alpha=0.7, temperature=1.0, max_steps=args.steps, batch_size=16, lr=args.lr,
                      warmup_steps=10, seed=0, progress=True))  # fmt: skip
    seconds = time.perf_counter() - t0
    eval_set = make_examples(200, seed=1)
    # Scored as the demo scores its students: the same greedy answers and eval CE.
    answers = _greedy_answers(HFTeacher(work / "model", batch_size=32), eval_set)
    per_field = collections.defaultdict(list)
    for e, a in zip(eval_set, answers):
        per_field[e.field].append(exact_match(a, e.answer, first_line=True))
    result = {
        "name": name,
        "exact_match": exact_match_rate(answers, [e.answer for e in eval_set]),
        "eval_ce": _eval_ce(work / "model", lm_dir / "data" / "eval_gold.jsonl"),
        "params": _params(work / "model"),
        "train_seconds": seconds,
        "per_field": {k: sum(v) / len(v) for k, v in sorted(per_field.items())},
    }
    print(json.dumps(result))
    out = Path(args.out) if args.out else Path(args.work) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

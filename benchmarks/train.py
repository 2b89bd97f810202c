"""Throughput and peak memory of `distill train --mode logits` against TRL's `GKDTrainer`, side by side.

Same tiny teacher and student (built in code), same data (the invoice task in the tiny chat template),
same batch, sequence lengths, optimizer (AdamW), steps, loss (forward KL against the teacher's full
logits computed on the fly, T = 1; TRL: generalized JSD with beta = 0 and lambda = 0, i.e. no
on-policy generation), on this CPU. Each trainer runs in its own process so peak RSS is its own.

TRL is installed only in the benchmark's own environment, never in .venv. Create it once with::

    python3 -m venv .venv-bench
    echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \\
        > .venv-bench/lib/python3.11/site-packages/_distill_main.pth
    .venv-bench/bin/pip install --no-deps trl==1.16.0

(it reuses .venv's torch/transformers/accelerate/datasets, so both trainers run the same versions).
Then::

    .venv/bin/python benchmarks/train.py [--steps 30] [--out bench-results/train.json]

Tokens/s counts every non-padding input token of the trained batches, over the steps after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_PY = ROOT / ".venv-bench" / "bin" / "python"


def write_data(work: Path, rows: list[dict]) -> None:
    """``work/data.jsonl`` (id, prompt, completion: distill's input) and ``work/chat.jsonl`` (messages: TRL's)."""
    with open(work / "data.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in ("id", "prompt", "completion")}) + "\n")
    with open(work / "chat.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"messages": r["messages"]}) + "\n")


def _setup(work: Path, n: int) -> dict:
    from distill.demos.tasks import make_examples
    from distill.models.tiny import save_tiny, tiny_causal_lm, train_tokenizer

    ex = make_examples(n, seed=0)
    tok = train_tokenizer([e.prompt + " " + e.answer for e in ex], vocab_size=512)
    save_tiny(tiny_causal_lm(len(tok), n_layer=4, n_embd=128, n_head=4, seed=0), tok, work / "teacher")
    save_tiny(tiny_causal_lm(len(tok), n_layer=2, n_embd=64, n_head=4, seed=1), tok, work / "student")
    rows, lengths = [], []
    for e in ex:
        messages = [{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.answer}]
        prompt = tok.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(messages, tokenize=False)
        rows.append({"id": e.id, "prompt": prompt, "completion": full[len(prompt) :], "messages": messages})
        lengths.append(len(tok(full)["input_ids"]))
    write_data(work, rows)
    return {"examples": n, "mean_tokens": sum(lengths) / len(lengths), "max_tokens": max(lengths)}


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _worker_distill(work: Path, a: argparse.Namespace) -> dict:
    from distill.train import train
    from distill.train.config import TrainConfig

    cfg = TrainConfig(student=str(work / "student"), data=str(work / "data.jsonl"), out=str(work / "out-distill"),
                      mode="logits", teacher=str(work / "teacher"), loss="forward_kl", alpha=1.0,
                      temperature=1.0, max_steps=a.warmup + a.steps, batch_size=a.batch_size, lr=1e-4,
                      max_grad_norm=1.0, progress=False, seed=0)  # fmt: skip
    res = train(cfg)
    t = [h["elapsed_s"] for h in res.history]
    return {"seconds": t[-1] - t[a.warmup - 1], "peak_rss_mib": _peak_mib()}


def _worker_trl(work: Path, a: argparse.Namespace) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tok = AutoTokenizer.from_pretrained(work / "student")
    rows = [json.loads(x) for x in (work / "chat.jsonl").read_text().splitlines()]
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # noqa: D102
            stamps.append(time.perf_counter())

    args = GKDConfig(output_dir=str(work / "out-trl"), per_device_train_batch_size=a.batch_size,
                     max_steps=a.warmup + a.steps, learning_rate=1e-4, lr_scheduler_type="constant",
                     lmbda=0.0, beta=0.0, temperature=1.0, max_length=512, logging_steps=10_000,
                     save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0,
                     max_grad_norm=1.0, disable_tqdm=True)  # fmt: skip
    trainer = GKDTrainer(model=AutoModelForCausalLM.from_pretrained(work / "student"),
                         teacher_model=AutoModelForCausalLM.from_pretrained(work / "teacher"), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Clock()])  # fmt: skip
    trainer.train()
    return {"seconds": stamps[-1] - stamps[a.warmup - 1], "peak_rss_mib": _peak_mib()}


def _run_worker(python: Path, which: str, work: Path, a: argparse.Namespace) -> dict:
    cmd = [str(python), __file__, "--worker", which, "--workdir", str(work), "--steps", str(a.steps),
           "--warmup", str(a.warmup), "--batch-size", str(a.batch_size), "--threads", str(a.threads)]  # fmt: skip
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(a.threads),
    }
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {
            "error": done.stderr.strip().splitlines()[-1]
            if done.stderr.strip()
            else f"exit {done.returncode}"
        }
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=5, help="untimed first steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--examples", type=int, default=512)
    p.add_argument("--threads", type=int, default=2, help="torch threads of each trainer")
    p.add_argument("--out", default="bench-results/train.json")
    p.add_argument("--worker", choices=("distill", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        import torch

        torch.set_num_threads(a.threads)
        fn = _worker_distill if a.worker == "distill" else _worker_trl
        print(json.dumps(fn(Path(a.workdir), a)))
        return 0

    from rich.console import Console
    from rich.table import Table

    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = _setup(work, a.examples)
        tokens = a.steps * a.batch_size * data["mean_tokens"]  # same examples per step for both
        results = {"distill": _run_worker(Path(sys.executable), "distill", work, a)}
        if BENCH_PY.exists():
            results["trl GKDTrainer"] = _run_worker(BENCH_PY, "trl", work, a)
        else:
            results["trl GKDTrainer"] = {
                "error": f"{BENCH_PY} missing: create it as the module docstring says"
            }
    for r in results.values():
        if "seconds" in r:
            r["tokens_per_s"] = tokens / r["seconds"]
    table = Table(title=f"train --mode logits vs TRL GKDTrainer ({a.steps} steps, batch {a.batch_size}, CPU)")
    for col in ("trainer", "tokens/s", "s/step", "peak RSS (MiB)", "note"):
        table.add_column(col, justify="left" if col in ("trainer", "note") else "right")
    for name, r in results.items():
        if "error" in r:
            table.add_row(name, "-", "-", "-", r["error"][:80])
        else:
            table.add_row(
                name,
                f"{r['tokens_per_s']:,.0f}",
                f"{r['seconds'] / a.steps:.3f}",
                f"{r['peak_rss_mib']:,.0f}",
                "",
            )
    d, t = results["distill"], results["trl GKDTrainer"]
    summary = {}
    if "tokens_per_s" in d and "tokens_per_s" in t:
        summary = {
            "speedup": d["tokens_per_s"] / t["tokens_per_s"],
            "memory_ratio": d["peak_rss_mib"] / t["peak_rss_mib"],
        }
        table.caption = (
            f"distill / TRL: {summary['speedup']:.2f}x tokens/s, {summary['memory_ratio']:.2f}x peak RSS"
        )
    console.print(table)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    setup = {"steps": a.steps, "warmup": a.warmup, "batch_size": a.batch_size, "threads": a.threads, **data,
             "teacher": "llama 4x128", "student": "llama 2x64", "vocab": 512}  # fmt: skip
    out.write_text(json.dumps({"setup": setup, "results": results, "summary": summary}, indent=2))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

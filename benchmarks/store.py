"""Store size and read speed: bytes per generated token at k = 20, and training-ready top-k tensors per second.

    .venv/bin/python benchmarks/store.py [--records 2000] [--tokens 200] [--k 20] [--out bench-results/store.json]

The data imitate a real teacher: a 32,000-token vocabulary, top-k ids drawn at random (the hard
case for compression), log-probabilities the sorted top-k of a softmax over Gumbel-distributed
logits. Targets (issue 4): at most 6·k + 16 bytes per generated token; at least 1,000,000 tokens/s
read as training tensors (``Store.examples``) on one CPU core.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from distill import store
from distill.models.base import Completion
from distill.store import writer as store_writer


def synthetic_rows(n: int, tokens: int, prompt_tokens: int, k: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        logits = rng.gumbel(size=(tokens, 256)) * 2.0
        lse = np.log(np.exp(logits).sum(axis=1, keepdims=True))
        top = -np.sort(-logits, axis=1)[:, :k] - lse
        ids = rng.integers(0, vocab, size=(tokens, k))
        c = Completion(
            id=f"p{i}",
            text="w" * (4 * tokens),
            finish_reason="length",
            prompt_token_ids=rng.integers(0, vocab, size=prompt_tokens).tolist(),
            completion_token_ids=ids[:, 0].tolist(),
            top_ids=ids,
            top_logprobs=top,
            usage={"prompt_tokens": prompt_tokens, "completion_tokens": tokens},
        )
        rows.append(
            store_writer.completion_row(f"key{i:08d}", f"p{i}", "q" * (4 * prompt_tokens), None, c, k)
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=200, help="generated tokens per record")
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-records", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5, help="read passes; the fastest counts")
    ap.add_argument("--out", default="bench-results/store.json")
    args = ap.parse_args(argv)
    console = Console()
    rows = synthetic_rows(args.records, args.tokens, args.prompt_tokens, args.k, args.vocab)
    cfg = {
        "teacher": {"kind": "bench"},
        "tokenizer": None,
        "settings": {},
        "k": args.k,
        "capture_temperature": 1.0,
    }
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with store_writer.StoreWriter(tmp, cfg) as w:
            for s in range(0, len(rows), args.shard_records):
                w.write(rows[s : s + args.shard_records])
        write_s = time.perf_counter() - t0
        shards = sorted(Path(tmp).glob("shard-*.parquet"))
        size = sum(p.stat().st_size for p in shards)
        gen_tokens = args.records * args.tokens
        import pyarrow.parquet as pq

        topk_bytes = 0
        for p in shards:
            meta = pq.read_metadata(p)
            for g in range(meta.num_row_groups):
                for c in range(meta.num_columns):
                    col = meta.row_group(g).column(c)
                    if col.path_in_schema.startswith("topk_"):
                        topk_bytes += col.total_compressed_size
        best = float("inf")
        for _ in range(args.repeats):
            st = store.open(tmp)
            t0 = time.perf_counter()
            n_tok = 0
            for ex in st.examples():
                n_tok += int(ex["topk_ids"].shape[0]) - args.prompt_tokens
            best = min(best, time.perf_counter() - t0)
        assert n_tok == gen_tokens, (n_tok, gen_tokens)
        # What reopening costs `distill generate` (issue 11): every page read and its checksum checked,
        # against the footer-and-structure check alone, side by side (fastest of the same passes).
        from distill.store.format import _shard_ok

        check = {"full": float("inf"), "footer": float("inf")}
        for _ in range(args.repeats):
            for name, full in (("full", True), ("footer", False)):
                t0 = time.perf_counter()
                assert all(_shard_ok(p, full=full) for p in shards)
                check[name] = min(check[name], time.perf_counter() - t0)
    result = {
        "records": args.records,
        "generated_tokens": gen_tokens,
        "k": args.k,
        "bytes_per_generated_token": size / gen_tokens,
        "topk_bytes_per_generated_token": topk_bytes / gen_tokens,
        "target_bytes_per_token": 6 * args.k + 16,
        "write_seconds": write_s,
        "read_tokens_per_second": gen_tokens / best,
        "read_positions_per_second": args.records * (args.tokens + args.prompt_tokens) / best,
        "target_tokens_per_second": 1_000_000,
        "reopen_check_all_pages_seconds": check["full"],
        "reopen_check_footers_seconds": check["footer"],
    }
    table = Table(title=f"store at k={args.k}: {args.records} records x {args.tokens} generated tokens")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_row(
        "bytes / generated token (all columns)",
        f"{result['bytes_per_generated_token']:.1f}",
        f"<= {6 * args.k + 16}",
    )
    table.add_row("  of which top-k ids + log-probs", f"{result['topk_bytes_per_generated_token']:.1f}", "")
    table.add_row(
        "read: generated tokens / s (examples())", f"{result['read_tokens_per_second']:,.0f}", ">= 1,000,000"
    )
    table.add_row(
        "read: positions / s (prompt + completion)", f"{result['read_positions_per_second']:,.0f}", ""
    )
    table.add_row("write seconds", f"{write_s:.2f}", "")
    table.add_row("writer reopen: every page + checksums, s", f"{check['full']:.3f}", "")
    table.add_row("writer reopen: footers only, s", f"{check['footer']:.3f}", "")
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

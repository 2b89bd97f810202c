"""`distill scout LOGS --out DIR [--prices prices.toml] [--export FAMILY]`: what is worth distilling?"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distill.data import read_table
from distill.prices import load_prices
from distill.workload.scout import ScoutConfig, export_family, print_families, scout


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("logs", help="request log: OpenAI-style JSONL, one request and response per line")
    p.add_argument("--out", required=True, help="directory for families.json (and the exported prompts)")
    p.add_argument(
        "--prices", default=None, help="prices TOML ([models.NAME] token prices, [student] hourly_usd)"
    )
    p.add_argument(
        "--export", default=None, metavar="FAMILY", help="write FAMILY's requests to DIR/FAMILY.prompts.jsonl"
    )
    p.add_argument(
        "--embedder", default="tfidf", choices=["auto", "minilm", "tfidf"], help="embedding (default tfidf)"
    )
    p.add_argument(
        "--distance", type=float, default=0.6, help="cosine distance joining a family (default 0.6)"
    )
    p.add_argument(
        "--min-family-size", type=int, default=5, help="smaller groups pool into 'other' (default 5)"
    )


def run(args: argparse.Namespace) -> int:
    cfg = ScoutConfig(embedder=args.embedder, distance=args.distance, min_family_size=args.min_family_size)
    prices = load_prices(args.prices) if args.prices else None
    rows = read_table(args.logs)
    report, requests, family_index = scout(rows, cfg, prices)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "families.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print_families(report)
    print(f"wrote {out / 'families.json'}")
    if args.export:
        path = export_family(
            report, requests, family_index, args.export, out / f"{args.export}.prompts.jsonl"
        )
        print(f"wrote {path}")
    return 0

"""`distill coverage --train FILE --inputs FILE --out DIR`: do the training inputs cover production?"""

from __future__ import annotations

import argparse

from distill.data import read_table
from distill.workload.coverage import CoverageConfig, coverage_of_rows, print_report, write_report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True, help="distillation training inputs (JSONL/JSON/CSV/Parquet)")
    p.add_argument("--inputs", required=True, help="production inputs (JSONL/JSON/CSV/Parquet)")
    p.add_argument("--out", required=True, help="directory for report.json")
    p.add_argument(
        "--text-column", default=None, help="column holding the text (default: prompt/text/input/...)"
    )
    p.add_argument("--embedder", default="auto", choices=["auto", "minilm", "tfidf"], help="embedding model")
    p.add_argument("--k", type=int, default=5, help="nearest training neighbours per input (default 5)")
    p.add_argument(
        "--quantile", type=float, default=0.99, help="in-distribution boundary quantile (default 0.99)"
    )


def run(args: argparse.Namespace) -> int:
    cfg = CoverageConfig(embedder=args.embedder, k=args.k, quantile=args.quantile)
    report = coverage_of_rows(
        read_table(args.train),
        read_table(args.inputs),
        cfg,
        text_column=args.text_column,
        train_source=args.train,
        input_source=args.inputs,
    )
    path = write_report(report, args.out)
    print_report(report)
    print(f"wrote {path}")
    return 0

"""`distill eval --student S --teacher T --inputs FILE --out DIR`: the student against its teacher."""

from __future__ import annotations

import argparse

from distill.data import read_table
from distill.evaluate import EvalConfig, evaluate
from distill.evaluate.report import print_summary, write_reports
from distill.evaluate.runners import open_pair
from distill.models.base import GenerationSettings
from distill.models.loading import TRUST_REMOTE_CODE_HELP
from distill.prices import load_prices


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student", required=True, help="student: model directory or http(s) URL")
    p.add_argument(
        "--teacher", required=True, help="teacher: model directory, http(s) URL, or a store of its answers"
    )
    p.add_argument(
        "--inputs", required=True, help="production inputs (JSONL/JSON/CSV/Parquet), gold answers optional"
    )
    p.add_argument("--out", required=True, help="directory for report.json, report.html, plots/")
    p.add_argument(
        "--metric",
        default="auto",
        help="accuracy, exact_match, token_f1, or your own module:function(prediction, reference) -> float",
    )
    p.add_argument(
        "--prices", default=None, help="prices TOML ([teacher] token prices, [student] hourly_usd)"
    )
    p.add_argument(
        "--input-column", default=None, help="input column (default: prompt/messages, or x for classifiers)"
    )
    p.add_argument("--teacher-api-key-env", default=None, help="NAME of the env variable holding the API key")
    p.add_argument(
        "--student-api-key-env",
        default=None,
        help="NAME of the env variable holding an http(s) student's API key",
    )
    p.add_argument(
        "--ca-bundle",
        metavar="PEM",
        default=None,
        help="CA certificates trusted for https models behind a private CA (default: system store, "
        "which honours SSL_CERT_FILE)",
    )
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    p.add_argument("--reference-column", default=None, help="gold-answer column (default: label/answer/...)")
    p.add_argument(
        "--slice-column", default=None, help="column to break results down by (default: input length)"
    )
    p.add_argument("--first-line", action="store_true", help="compare only the first line of text answers")
    p.add_argument(
        "--max-new-tokens", type=int, default=32, help="generation limit for language models (default 32)"
    )
    p.add_argument(
        "--top-logprobs", type=int, default=5, help="top-k log-probs requested per token (default 5)"
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N inputs")
    p.add_argument(
        "--no-memory",
        dest="memory",
        action="store_false",
        help="skip the per-model peak-memory probe (a child process per local model, a few seconds each)",
    )
    p.add_argument(
        "--memory-inputs",
        type=int,
        default=4,
        help="how many of the longest evaluated inputs the memory probe runs (default 4)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    cfg = EvalConfig(
        metric=args.metric,
        reference_column=args.reference_column,
        slice_column=args.slice_column,
        first_line=args.first_line,
        memory=args.memory,
        memory_inputs=args.memory_inputs,
    )
    prices = load_prices(args.prices) if args.prices else None
    rows = read_table(args.inputs)
    if args.limit is not None:
        rows = rows[: args.limit]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, top_logprobs=args.top_logprobs)
    student, teacher = open_pair(
        args.student,
        args.teacher,
        settings=settings,
        input_column=args.input_column,
        api_key_env=args.teacher_api_key_env,
        student_api_key_env=args.student_api_key_env,
        ca_bundle=args.ca_bundle,
        trust_remote_code=args.trust_remote_code,
    )
    result = evaluate(student, teacher, rows, cfg, prices, progress=args.progress)
    files = write_reports(result, args.out)
    print_summary(result)
    print(f"wrote {files['json']} and {files['html']}")
    return 0

"""`distill generate --teacher T --prompts FILE --out STORE`: ask a teacher, keep its answers (resumable).

Exit status: 0 every prompt is in the store; 1 some prompts failed (in STORE/failures.jsonl; re-run
the same command to retry them); 3 the token budget stopped the run (re-run to continue).
"""

from __future__ import annotations

import argparse
import sys

from distill.models.loading import TRUST_REMOTE_CODE_HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--teacher",
        action="append",
        required=True,
        metavar="T",
        help="a local model directory, or an OpenAI-compatible base URL http(s)://HOST/v1; "
        "repeat the flag for several replicas of one model (URLs only)",
    )
    parser.add_argument("--prompts", required=True, metavar="FILE", help="JSONL/JSON/CSV/Parquet prompts")
    parser.add_argument("--out", required=True, metavar="STORE", help="store directory (created or resumed)")
    parser.add_argument(
        "--model", default=None, metavar="NAME", help="model name at the URL (default: the one it lists)"
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=20,
        metavar="K",
        help="top-k log-probabilities per token (default 20; 0: none)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="default 128")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="X", help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass when sampling (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=8,
        metavar="C",
        help="HTTP requests in flight, over all URLs (default 8)",
    )
    parser.add_argument(
        "--budget-tokens", type=int, default=None, metavar="N", help="stop before this run spends more tokens"
    )
    parser.add_argument(
        "--api-key-env", default=None, metavar="VAR", help="environment variable holding the API key"
    )
    parser.add_argument(
        "--ca-bundle",
        default=None,
        metavar="PEM",
        help="https teachers: trust the CA certificates in this PEM file instead of the system store "
        "(default: the system store, which honours SSL_CERT_FILE); verification is never turned off",
    )
    parser.add_argument(
        "--extra-body",
        default=None,
        metavar="JSON",
        help="URL teachers: a JSON object merged into every request body (fields a server needs)",
    )
    parser.add_argument(
        "--teacher-revision",
        default=None,
        metavar="STR",
        help="URL teachers: a label of the served weights, part of the store's setup (mark retrained "
        "weights served under the same name)",
    )
    parser.add_argument(
        "--teacher-tokenizer",
        default=None,
        metavar="DIR",
        help="URL teachers: a local copy of the served model's tokenizer, checked against the server "
        "(vLLM /tokenize) and recorded in the manifest",
    )
    parser.add_argument(
        "--allow-text-only",
        action="store_true",
        help="with --top-k > 0, keep answers an endpoint gives without top-k as text (default: stop)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP request (default 60)")
    parser.add_argument("--max-retries", type=int, default=5, help="retries per HTTP request (default 5)")
    parser.add_argument(
        "--chat",
        choices=("auto", "always", "never"),
        default="auto",
        help="auto: text prompts -> /completions, messages -> /chat/completions",
    )
    parser.add_argument("--device", default="cpu", help="torch device of a local teacher (default cpu)")
    parser.add_argument("--batch-size", type=int, default=8, help="local teacher: prompts decoded together")
    parser.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    parser.add_argument(
        "--price-input-per-1m", type=float, default=None, metavar="USD", help="USD per 1M prompt tokens"
    )
    parser.add_argument(
        "--price-output-per-1m", type=float, default=None, metavar="USD", help="USD per 1M completion tokens"
    )
    parser.add_argument(
        "--flush-every", type=int, default=64, help="commit a shard every N answers (default 64)"
    )
    parser.add_argument("--flush-seconds", type=float, default=2.0, help="... or every S seconds (default 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_teacher(args: argparse.Namespace):
    """The teacher the flags name (`distill.models.open.open_model`)."""
    from distill.models.open import is_url, open_model

    n_urls = sum(is_url(t) for t in args.teacher)
    extra = parse_extra_body(getattr(args, "extra_body", None))
    return open_model(
        args.teacher,
        role="teacher",
        device=args.device,
        batch_size=args.batch_size,
        model=args.model,
        api_key_env=args.api_key_env,
        timeout=args.timeout,
        chat=args.chat,
        max_retries=args.max_retries,
        max_connections=max(64, args.concurrency * n_urls),
        ca_bundle=args.ca_bundle,
        trust_remote_code=args.trust_remote_code,
        extra_body=extra,
        revision=getattr(args, "teacher_revision", None),
        tokenizer=getattr(args, "teacher_tokenizer", None),
    )


def parse_extra_body(text: str | None) -> dict | None:
    """The ``--extra-body`` JSON object (None when not given); anything else is a one-line ValueError."""
    import json

    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"--extra-body is not valid JSON ({err.msg} at character {err.pos}): {text!r:.80}"
        ) from None
    if not isinstance(value, dict):
        raise ValueError(
            f"--extra-body must be a JSON object ({{...}}), got {type(value).__name__}: {text!r:.80}"
        )
    return value


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from distill.models.base import GenerationSettings
    from distill.store.generate import generate

    console = Console(stderr=True)
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_logprobs=args.top_k,
        seed=args.seed,
    )
    price = None
    if args.price_input_per_1m is not None or args.price_output_per_1m is not None:
        from distill.prices import TokenPrice

        price = TokenPrice(args.price_input_per_1m or 0.0, args.price_output_per_1m or 0.0)
    teacher = build_teacher(args)
    res = generate(
        teacher,
        args.prompts,
        args.out,
        settings=settings,
        concurrency=args.concurrency,
        budget_tokens=args.budget_tokens,
        price=price,
        flush_every=args.flush_every,
        flush_seconds=args.flush_seconds,
        progress=not args.no_progress,
        console=console,
        allow_text_only=args.allow_text_only,
    )
    for line in res.repaired:
        console.print(f"repaired store: {line}")
    table = Table(title=f"distill generate -> {args.out}")
    for col in (
        "prompts",
        "already stored",
        "answered now",
        "failed",
        "not sent",
        "tokens",
        "cost (USD)",
        "seconds",
    ):
        table.add_column(col, justify="right")
    table.add_row(
        str(res.total),
        str(res.done_before),
        str(res.answered),
        str(res.failed),
        str(res.left),
        f"{res.tokens:,}",
        "-" if res.cost is None else f"{res.cost:,.4f}",
        f"{res.seconds:.1f}",
    )
    console.print(table)
    if res.without_topk:
        console.print(
            f"[yellow]{res.without_topk} answers came without top-k log-probabilities (kept as text)"
        )
    if res.stopped_by_budget:
        console.print(
            f"[yellow]stopped: --budget-tokens {args.budget_tokens} reached after {res.tokens:,} tokens; "
            f"{res.done_before + res.answered} of {res.total} prompts stored, {res.left} not sent. "
            "Re-run the same command (with a larger budget) to continue."
        )
        return 3
    if res.failed:
        console.print(
            f"[red]{res.failed} prompts failed (see {args.out}/failures.jsonl); "
            "re-run the same command to retry them."
        )
        return 1
    if res.done_before == res.total:
        print("nothing to do: every prompt is already in the store (0 requests)", file=sys.stderr)
    return 0

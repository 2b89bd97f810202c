"""`distill serve MODEL_DIR`: serve a local causal LM behind an OpenAI-compatible API (see docs/serve.md).

With a student's http(s) URL instead of MODEL_DIR it is a model-free routing gateway
(`distill.cli.serve_gateway`)."""

from __future__ import annotations

import argparse
import os
import sys

from distill.cli import serve_gateway
from distill.models.loading import TRUST_REMOTE_CODE_HELP
from distill.serve.http11 import HEADER_TIMEOUT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_dir",
        metavar="MODEL_DIR",
        help="a saved transformers causal LM (safetensors), or a student's http(s) base URL: then a "
        "model-free gateway routing between it and --fallback (needs --router)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument(
        "--api-key-env",
        metavar="VAR",
        default=None,
        help="name of the environment variable holding the API key clients must send as a Bearer token",
    )
    parser.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    parser.add_argument("--batch-size", type=int, default=8, help="requests decoded together (default 8)")
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=1 << 20,
        help="largest request body; larger ones get 413 (default 1 MiB)",
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=HEADER_TIMEOUT,
        metavar="S",
        help=f"seconds a client has to send a request's headers before its connection is closed "
        f"(default {HEADER_TIMEOUT:g}; slow or stalled clients are dropped)",
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="log one line per request (uvicorn's access log); off by default: it costs CPU on every "
        "request, and /metrics already counts them",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help=TRUST_REMOTE_CODE_HELP,
    )
    parser.add_argument(
        "--router",
        metavar="FILE",
        default=None,
        help="router JSON from `distill route fit`: answer from this model when it is confident, "
        "forward to --fallback otherwise (needs --fallback)",
    )
    parser.add_argument(
        "--fallback",
        metavar="URL",
        default=None,
        help="OpenAI-compatible base URL of the teacher, e.g. http://host:8000/v1 (needs --router)",
    )
    parser.add_argument(
        "--fallback-api-key-env",
        metavar="VAR",
        default=None,
        help="name of the environment variable holding the fallback's API key (never logged)",
    )
    parser.add_argument(
        "--fallback-model",
        metavar="NAME",
        default=None,
        help="model name put in forwarded requests (default: the client's, unchanged)",
    )
    parser.add_argument(
        "--fallback-ca-bundle",
        metavar="PEM",
        default=None,
        help="CA certificates (PEM) trusted for an https fallback behind a private CA, instead of the "
        "system store (which honours SSL_CERT_FILE)",
    )
    parser.add_argument(
        "--fallback-timeout",
        type=float,
        metavar="S",
        default=None,
        help="seconds for one fallback call (connect to last byte; streamed: to the headers, then "
        "between chunks); default 120",
    )
    serve_gateway.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if serve_gateway.is_url(args.model_dir):
        return serve_gateway.run(args, _key_from_env, _routing)
    serve_gateway.check_local_flags(args)
    import uvicorn

    from distill.serve import ServeLimits, create_app
    from distill.serve.http11 import with_header_timeout

    api_key = _key_from_env("--api-key-env", args.api_key_env)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    protocol = with_header_timeout(args.header_timeout)
    routing = _routing(args)  # before the model loads: a bad router or URL fails fast
    limits = ServeLimits(max_body_bytes=args.max_body_bytes)
    app = create_app(
        args.model_dir,
        api_key=api_key,
        limits=limits,
        device=args.device,
        batch_size=args.batch_size,
        trust_remote_code=args.trust_remote_code,
        routing=routing,
    )
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"distill serve: warning: listening on {args.host} without an API key", file=sys.stderr)
    auth = f"API key required (from ${args.api_key_env})" if api_key else "no API key"
    print(
        f"distill serve: {args.model_dir} at http://{args.host}:{args.port}/v1 ({auth})",
        file=sys.stderr,
        flush=True,
    )
    if routing is not None:
        r = routing.router
        print(
            f"distill serve: routing on {r.signal} >= {r.threshold_:.4g} (oriented), "
            f"else to {routing.fallback_url}; counts at /metrics",
            file=sys.stderr,
            flush=True,
        )
        if routing.ood_scorer is not None:
            print(
                f"distill serve: requests scoring above {r.ood_threshold_:.4g} on the OOD scorer "
                f"{r.ood_scorer_path_} go to the teacher before the student runs",
                file=sys.stderr,
                flush=True,
            )
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="info", http=protocol, access_log=args.access_log
    )
    return 0


def _routing(args: argparse.Namespace, *, gateway: bool = False, max_inflight: int | None = None):
    """A `RoutingPolicy` from --router/--fallback/--fallback-*, or None without --router.

    ``gateway``: count the gateway's reasons too; ``max_inflight``: cap on fallback calls."""
    if args.router is None and args.fallback is None:
        for flag, value in (
            ("--fallback-api-key-env", args.fallback_api_key_env),
            ("--fallback-model", args.fallback_model),
            ("--fallback-ca-bundle", args.fallback_ca_bundle),
            ("--fallback-timeout", args.fallback_timeout),
        ):
            if value is not None:
                raise ValueError(f"{flag} needs --router and --fallback")
        return None
    if args.router is None:
        raise ValueError("--fallback needs --router FILE (which requests go to the fallback)")
    if args.fallback is None:
        raise ValueError("--router needs --fallback URL (where unconfident requests go)")
    from distill.serve.metrics import LOCAL_REASONS, REASONS
    from distill.serve.routing import RoutingPolicy, check_fallback_url, load_router

    url = check_fallback_url(args.fallback)
    timeout = 120.0 if args.fallback_timeout is None else args.fallback_timeout
    if not timeout > 0:
        raise ValueError(f"--fallback-timeout must be > 0 seconds, got {timeout}")
    router = load_router(args.router)
    key = _key_from_env("--fallback-api-key-env", args.fallback_api_key_env)
    return RoutingPolicy(
        router,
        url,
        fallback_api_key=key,
        fallback_model=args.fallback_model,
        fallback_ca_bundle=args.fallback_ca_bundle,
        timeout=timeout,
        max_inflight=max_inflight,
        reasons=REASONS if gateway else LOCAL_REASONS,
    )


def _key_from_env(flag: str, name: str | None) -> str | None:
    """The key held by environment variable ``name`` (None when no name is given); an unset or empty
    variable is an error naming ``flag`` and the variable, never the value."""
    if not name:
        return None
    key = os.environ.get(name)
    if not key:
        raise ValueError(f"{flag} {name}: that environment variable is not set or empty")
    return key

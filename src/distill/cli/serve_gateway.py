"""`distill serve URL --router R --fallback URL`: the gateway's flags and start-up (see
`distill.serve.gateway` and docs/serve.md, "Gateway"). `distill.cli.serve` hands over to `run` when
its positional argument is an http(s) URL instead of a model directory."""

from __future__ import annotations

import argparse
import sys

# Flags that only make sense with the model in this process: refused with a student URL.
LOCAL_ONLY = {"device": "cpu", "batch_size": 8, "trust_remote_code": False}
# Flags that only make sense for the gateway (default None, so "given" is visible).
GATEWAY_ONLY = (
    "student_replica",
    "student_api_key_env",
    "student_model",
    "student_ca_bundle",
    "student_timeout",
    "max_inflight",
    "breaker_failures",
    "breaker_cooldown",
)


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("gateway (the positional argument is the student's http(s) base URL)")
    g.add_argument(
        "--student-replica",
        metavar="URL",
        action="append",
        default=None,
        help="another base URL of the same student; requests are shared round-robin (repeatable)",
    )
    g.add_argument(
        "--student-api-key-env",
        metavar="VAR",
        default=None,
        help="name of the environment variable holding the student endpoint's API key (never logged)",
    )
    g.add_argument(
        "--student-model",
        metavar="NAME",
        default=None,
        help="model name put in requests to the student (default: the first its /v1/models lists)",
    )
    g.add_argument(
        "--student-ca-bundle",
        metavar="PEM",
        default=None,
        help="CA certificates (PEM) trusted for an https student instead of the system store",
    )
    g.add_argument(
        "--student-timeout",
        type=float,
        metavar="S",
        default=None,
        help="seconds for one student call, connect to last byte (default 60); a timeout is a student failure",
    )
    g.add_argument(
        "--max-inflight",
        type=int,
        metavar="N",
        default=None,
        help="requests in flight per upstream (each student replica, the teacher); above it 429 with "
        "Retry-After (default 128)",
    )
    g.add_argument(
        "--breaker-failures",
        type=int,
        metavar="N",
        default=None,
        help="failed calls in a row that open a replica's circuit breaker (default 5)",
    )
    g.add_argument(
        "--breaker-cooldown",
        type=float,
        metavar="S",
        default=None,
        help="seconds an open breaker sends everything to the teacher before one probe (default 10)",
    )


def check_local_flags(args: argparse.Namespace) -> None:
    """With a model directory: refuse the gateway's flags (before the model loads)."""
    for name in GATEWAY_ONLY:
        if getattr(args, name) is not None:
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{flag} needs a student URL (http(s)://...) instead of MODEL_DIR {args.model_dir!r}"
            )


def run(args: argparse.Namespace, key_from_env, make_routing) -> int:
    """Start the gateway. ``key_from_env(flag, name)`` and ``make_routing(args, gateway=True,
    max_inflight=N)`` are `distill.cli.serve`'s (passed in: this module is imported by that one)."""
    import uvicorn

    from distill.serve.format import ServeLimits
    from distill.serve.gateway import build_gateway
    from distill.serve.http11 import with_header_timeout
    from distill.serve.routing import check_fallback_url
    from distill.serve.students import StudentPool

    # The URLs first: every later message names the student URL, which must hold no credentials.
    urls = [check_fallback_url(args.model_dir, "MODEL_DIR/URL", "--student-api-key-env")]
    for u in args.student_replica or []:
        urls.append(check_fallback_url(u, "--student-replica", "--student-api-key-env"))
    for name, default in LOCAL_ONLY.items():
        if getattr(args, name) != default:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} applies to a local model; {args.model_dir} is a student URL (gateway)")
    if args.router is None or args.fallback is None:
        raise ValueError(
            f"a student URL ({args.model_dir}) makes this a gateway, which needs --router FILE and --fallback URL"
        )
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    protocol = with_header_timeout(args.header_timeout)  # slow clients are dropped here too
    api_key = key_from_env("--api-key-env", args.api_key_env)
    student_key = key_from_env("--student-api-key-env", args.student_api_key_env)
    max_inflight = 128 if args.max_inflight is None else args.max_inflight
    if max_inflight < 1:
        raise ValueError(f"--max-inflight must be >= 1, got {max_inflight}")
    timeout = 60.0 if args.student_timeout is None else args.student_timeout
    if not timeout > 0:
        raise ValueError(f"--student-timeout must be > 0 seconds, got {timeout}")
    policy = make_routing(args, gateway=True, max_inflight=max_inflight)
    students = StudentPool(
        urls,
        api_key=student_key,
        timeout=timeout,
        max_inflight=max_inflight,
        ca_bundle=args.student_ca_bundle,
        model=args.student_model,
        breaker_failures=5 if args.breaker_failures is None else args.breaker_failures,
        breaker_cooldown=10.0 if args.breaker_cooldown is None else args.breaker_cooldown,
    )
    app = build_gateway(
        students, policy, api_key=api_key, limits=ServeLimits(max_body_bytes=args.max_body_bytes)
    )
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"distill serve: warning: listening on {args.host} without an API key", file=sys.stderr)
    auth = f"API key required (from ${args.api_key_env})" if api_key else "no API key"
    r = policy.router
    print(
        f"distill serve: gateway at http://{args.host}:{args.port}/v1 ({auth}); student {', '.join(urls)}; "
        f"routing on {r.signal} >= {r.threshold_:.4g} (oriented), else to {policy.fallback_url}; "
        f"counts at /metrics",
        file=sys.stderr,
        flush=True,
    )
    # No per-request access log unless asked (--access-log): formatting and writing a log record per
    # request is CPU the gateway spends on every request (docs/serve.md), and /metrics counts them.
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="info", http=protocol, access_log=args.access_log
    )
    return 0

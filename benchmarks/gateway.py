"""What the routing gateway adds on top of its upstreams, and time to first token of `distill serve`.

    .venv/bin/python benchmarks/gateway.py [--latency 0.1] [--seconds 5] [--concurrency 1 16 64]
        [--baseline-src DIR] [--gateway-arg=--access-log] [--out bench-results/gateway.json]

Part 0: CPU time per request of the HTTP client the gateway uses (`distill.serve.upstream`) and of
httpx's pooled `AsyncClient`, against an upstream that answers at once (why the gateway has its own).

Part 1, the gateway (`distill serve URL --router R --fallback URL`, its own process, as deployed):
a fake student and a fake teacher (one asyncio process, keep-alive HTTP/1.1) each wait
``--latency`` seconds and answer every ``/v1/completions`` with one pre-encoded answer of 16 tokens
carrying distill's top-5 extension, like `distill serve`; the student's answer is confident for
prompts starting with "s" and unconfident for "t" (the router, fitted here, sends those to the
teacher). A load generator (this process; asyncio, `concurrency` connections each sending one
request after the other for ``--seconds``) calls the chosen upstream directly, then the gateway,
side by side. Reported per concurrency and route: requests/s both ways and their ratio, latency
p50/p99 both ways and the difference (the gateway's added latency), and the gateway's CPU time
(Linux /proc) as requests/s per CPU core. A teacher-routed request costs the student's answer
too (the decision needs it): its added latency is shown over the teacher alone and over
student + teacher.

Part 2, time to first token of the local `distill serve` before and after token streaming:
`benchmarks/serve_ttft.py` (run from here, or alone). Tables: docs/serve.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from distill.serve.upstream import Upstream
from serve_ttft import ROOT, bench_ttft, free_port, start

TOKENS, K = 16, 5


def _answer(confident: bool) -> bytes:
    top = [-0.02, -4.5, -5.0, -5.5, -6.0] if confident else [-1.2, -1.3, -2.0, -2.5, -3.0]
    choice = {
        "index": 0,
        "text": "x" * TOKENS,
        "logprobs": {
            "tokens": ["x"] * TOKENS,
            "token_logprobs": [top[0]] * TOKENS,
            "top_logprobs": [{f"t{j}": v for j, v in enumerate(top)} for _ in range(TOKENS)],
            "text_offset": list(range(TOKENS)),
        },
        "finish_reason": "length",
        "prompt_token_ids": list(range(8)),
        "token_ids": list(range(TOKENS)),
        "top_token_ids": [[i + j for j in range(K)] for i in range(TOKENS)],
        "top_token_logprobs": [top] * TOKENS,
    }
    out = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "bench", "choices": [choice]}
    out["usage"] = {"prompt_tokens": 8, "completion_tokens": TOKENS, "total_tokens": 8 + TOKENS}
    return json.dumps(out).encode()


def _fake_upstreams(port_q, latency: float) -> None:
    """A student and a teacher, one event loop: wait ``latency``, answer with a canned completion."""
    answers = {"s": _answer(True), "t": _answer(False)}
    models = json.dumps({"object": "list", "data": [{"id": "bench", "object": "model"}]}).encode()

    def handler(role):
        async def handle(reader, writer):
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    n = 0
                    for line in head.split(b"\r\n"):
                        if line[:15].lower() == b"content-length:":
                            n = int(line[15:])
                    body = await reader.readexactly(n) if n else b""
                    if head.startswith(b"GET"):
                        data = models
                    else:
                        await asyncio.sleep(latency)
                        teacherish = role == "teacher" or b'"prompt": "t' in body or b'"prompt":"t' in body
                        data = answers["t" if teacherish else "s"]
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                        % (len(data), data)
                    )
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        return handle

    async def main():
        servers = [
            await asyncio.start_server(handler(r), "127.0.0.1", 0, backlog=1024)
            for r in ("student", "teacher")
        ]
        port_q.put([s.sockets[0].getsockname()[1] for s in servers])
        await asyncio.gather(*(s.serve_forever() for s in servers))

    asyncio.run(main())


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _load(
    url: str, body: bytes, concurrency: int, seconds: float, stagger: float = 0.0
) -> tuple[list[float], float, dict]:
    """Latencies (s) of every request, the wall time, and the first response's headers.

    ``stagger``: worker i starts ``i * stagger / concurrency`` seconds late, so arrivals spread over
    one upstream latency as independent clients' do (0: all start together and, with a fixed
    upstream latency, stay in phase: bursts of ``concurrency`` requests at once)."""
    up = Upstream(url, max_inflight=concurrency, timeout=120)
    latencies: list[float] = []
    first: dict = {}
    stop = time.perf_counter() + seconds

    async def worker(i: int):
        await asyncio.sleep(i * stagger / concurrency)
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            reply = await up.request("POST", "/completions", body)
            latencies.append(time.perf_counter() - t0)
            if reply.status != 200:
                raise RuntimeError(f"HTTP {reply.status}: {reply.body[:300]!r}")
            first.setdefault("headers", reply.headers)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    wall = time.perf_counter() - t0
    await up.aclose()
    return latencies, wall, first.get("headers", {})


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def bench_gateway(args, tmp: Path, console: Console) -> list[dict]:
    from distill.route.router import Router

    q: mp.Queue = mp.Queue()
    fake = mp.Process(target=_fake_upstreams, args=(q, args.latency), daemon=True)
    fake.start()
    s_port, t_port = q.get(timeout=30)
    student, teacher = f"http://127.0.0.1:{s_port}/v1", f"http://127.0.0.1:{t_port}/v1"
    router = Router(0.99, "mean_logprob").fit(
        {"mean_logprob": [-0.02, -1.2], "student_quality": [1.0, 0.0], "teacher_quality": [1.0, 1.0]}
    )
    router.save(tmp / "router.json")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *args.gateway_path])}
    cmd = [sys.executable, "-m", "distill", "serve", student, "--router", str(tmp / "router.json")]
    cmd += ["--fallback", teacher, "--port", str(port), "--max-inflight", "1024", *args.gateway_arg]
    gw = start(cmd, env, tmp / "gateway.log", port)
    gateway = f"http://127.0.0.1:{port}/v1"
    results = []
    try:
        for route, upstream in (("student", student), ("teacher", teacher)):
            body = json.dumps(
                {"model": "bench", "prompt": f"{route[0]} request", "max_tokens": TOKENS}
            ).encode()
            asyncio.run(_load(gateway, body, 4, 1.0))  # warm-up: connections, first imports
            for c in args.concurrency:
                stagger = 0.0 if args.burst else args.latency
                direct, d_wall, _ = asyncio.run(_load(upstream, body, c, args.seconds, stagger))
                c0 = _cpu_seconds(gw.pid)
                via, g_wall, headers = asyncio.run(_load(gateway, body, c, args.seconds, stagger))
                cpu = _cpu_seconds(gw.pid) - c0
                assert headers.get("x-distill-routed-to") == route, headers
                results.append(
                    {
                        "route": route,
                        "concurrency": c,
                        "direct_requests": len(direct),
                        "direct_rps": len(direct) / d_wall,
                        "gateway_requests": len(via),
                        "gateway_rps": len(via) / g_wall,
                        "direct_p50_ms": 1e3 * statistics.median(direct),
                        "direct_p99_ms": 1e3 * _pct(direct, 99),
                        "gateway_p50_ms": 1e3 * statistics.median(via),
                        "gateway_p99_ms": 1e3 * _pct(via, 99),
                        "gateway_cpu_seconds": cpu,
                        "gateway_cpu_ms_per_request": 1e3 * cpu / len(via),
                        "gateway_rps_per_core": len(via) / cpu if cpu > 0 else None,
                    }
                )
                console.print(f"{route} c={c}: {results[-1]['gateway_rps']:.0f} req/s via the gateway")
    finally:
        gw.terminate()
        gw.wait()
        fake.terminate()
    return results


def bench_clients(console: Console, n: int = 3000, concurrency: int = 16) -> list[dict]:
    """CPU time per request of this process's HTTP client: `distill.serve.upstream.Upstream` (what
    the gateway uses) against httpx's pooled `AsyncClient`, on a fake upstream that answers at once."""
    import resource

    import httpx

    q: mp.Queue = mp.Queue()
    fake = mp.Process(target=_fake_upstreams, args=(q, 0.0), daemon=True)
    fake.start()
    url = f"http://127.0.0.1:{q.get(timeout=30)[0]}/v1"
    body = json.dumps({"model": "bench", "prompt": "s request", "max_tokens": TOKENS}).encode()

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    async def run() -> list[dict]:
        up = Upstream(url, max_inflight=concurrency)
        hx = httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency))
        calls = {
            "distill.serve.upstream": lambda: up.request("POST", "/completions", body),
            "httpx.AsyncClient": lambda: hx.post(url + "/completions", content=body),
        }
        out = []
        for name, call in calls.items():

            async def worker(k: int, call=call) -> None:
                for _ in range(k):
                    await call()

            await asyncio.gather(*(worker(20) for _ in range(concurrency)))  # warm-up
            t0, c0 = time.perf_counter(), cpu()
            await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
            done = n // concurrency * concurrency
            out.append(
                {
                    "client": name,
                    "requests": done,
                    "cpu_ms_per_request": 1e3 * (cpu() - c0) / done,
                    "requests_per_second": done / (time.perf_counter() - t0),
                }
            )
            console.print(f"client {name}: {out[-1]['cpu_ms_per_request']:.3f} ms CPU per request")
        await up.aclose()
        await hx.aclose()
        return out

    try:
        return asyncio.run(run())
    finally:
        fake.terminate()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency", type=float, default=0.1, help="seconds each fake upstream waits per request")
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each load run")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument(
        "--burst",
        action="store_true",
        help="start all connections at once (they then stay in phase: the worst case) instead of "
        "spread over one upstream latency",
    )
    ap.add_argument(
        "--baseline-src", default=None, help="src/ of a checkout to compare time to first token with"
    )
    ap.add_argument(
        "--gateway-path",
        nargs="*",
        default=[],
        help="extra PYTHONPATH entries for the gateway process only, e.g. a `pip install --target` "
        "directory holding uvloop and httptools (uvicorn then uses them)",
    )
    ap.add_argument(
        "--gateway-arg",
        action="append",
        default=[],
        help="an extra flag for the gateway process (repeatable), e.g. --gateway-arg=--access-log",
    )
    ap.add_argument("--ttft-requests", type=int, default=10)
    ap.add_argument("--ttft-tokens", type=int, default=64)
    ap.add_argument("--skip", choices=["gateway", "ttft"], default=None, help="skip parts 0 and 1, or part 2")
    ap.add_argument("--out", default="bench-results/gateway.json")
    args = ap.parse_args(argv)
    console = Console()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        clients = bench_clients(console) if args.skip != "gateway" else []
        gateway = bench_gateway(args, tmp, console) if args.skip != "gateway" else []
        ttft = bench_ttft(args, tmp, console) if args.skip != "ttft" else []
    load_after = os.getloadavg()[0]
    if clients:
        table = Table(title="HTTP client CPU per request, concurrency 16, upstream answering at once")
        for col in ("client", "requests", "CPU ms/request", "req/s"):
            table.add_column(col, justify="right")
        for r in clients:
            table.add_row(
                r["client"],
                str(r["requests"]),
                f"{r['cpu_ms_per_request']:.3f}",
                f"{r['requests_per_second']:.0f}",
            )
        console.print(table)
    if gateway:
        table = Table(title=f"gateway vs direct, upstreams wait {args.latency * 1e3:.0f} ms")
        cols = ["route", "conc.", "direct req/s", "gateway req/s", "ratio", "direct p50/p99 ms"]
        cols += ["gateway p50/p99 ms", "added p50/p99 ms", "gateway CPU ms/req", "req/s per core"]
        for col in cols:
            table.add_column(col, justify="right")
        for r in gateway:
            base50, base99 = r["direct_p50_ms"], r["direct_p99_ms"]
            if r["route"] == "teacher":  # the student answered first: compare with both upstreams
                base50, base99 = 2 * base50, 2 * base99
            table.add_row(
                r["route"] + (" (vs student+teacher)" if r["route"] == "teacher" else ""),
                str(r["concurrency"]),
                f"{r['direct_rps']:.1f}",
                f"{r['gateway_rps']:.1f}",
                f"{r['gateway_rps'] / r['direct_rps']:.3f}",
                f"{r['direct_p50_ms']:.2f} / {r['direct_p99_ms']:.2f}",
                f"{r['gateway_p50_ms']:.2f} / {r['gateway_p99_ms']:.2f}",
                f"{r['gateway_p50_ms'] - base50:.2f} / {r['gateway_p99_ms'] - base99:.2f}",
                f"{r['gateway_cpu_ms_per_request']:.3f}",
                f"{r['gateway_rps_per_core']:.0f}" if r["gateway_rps_per_core"] else "n/a",
            )
        console.print(table)
    if ttft:
        table = Table(
            title=f"distill serve, stream: true, {args.ttft_tokens} tokens, greedy, one request at a time"
        )
        for col in ("server", "first token ms", "first text ms", "whole answer ms", "ms per token", "events"):
            table.add_column(col, justify="right")
        for r in ttft:
            table.add_row(
                r["server"],
                f"{r['ttft_ms_median']:.1f}",
                "" if r["first_text_ms_median"] is None else f"{r['first_text_ms_median']:.1f}",
                f"{r['total_ms_median']:.1f}",
                f"{r['total_ms_median'] / args.ttft_tokens:.1f}",
                "" if r["events_median"] is None else f"{r['events_median']:.0f}",
            )
        console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"latency": args.latency, "seconds": args.seconds, "cpus": os.cpu_count(), "burst": args.burst}
    meta["gateway_path"] = args.gateway_path
    meta |= {"load_1min_before": load_before, "load_1min_after": load_after}
    out.write_text(
        json.dumps({**meta, "clients": clients, "gateway": gateway, "ttft": ttft}, indent=2) + "\n"
    )
    console.print(
        f"1-minute load average: {load_before:.2f} before, {load_after:.2f} after, on {os.cpu_count()} CPUs"
    )
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

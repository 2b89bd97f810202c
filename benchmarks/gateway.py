"""What the routing gateway adds on top of its upstreams, and time to first token of `distill serve`.

    .venv/bin/python benchmarks/gateway.py [--latency 0.1] [--seconds 5] [--concurrency 1 16 64]
        [--baseline-src DIR] [--out bench-results/gateway.json]

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

Part 2, time to first token of the local `distill serve` on a 4-layer model built here: the
server run from this checkout, and from ``--baseline-src`` (e.g. ``git archive`` of the commit
before token streaming, which sent the whole answer as one event once decoding finished); both
run at once and take turns, one request at a time, ``stream: true``, 64 tokens, greedy: time to
the first event with text and to the end. Tables: docs/serve.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from distill.serve.upstream import Upstream

TOKENS, K = 16, 5
ROOT = Path(__file__).resolve().parents[1]


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


def _start(cmd: list[str], env: dict, log: Path, port: int, timeout: float = 120.0) -> subprocess.Popen:
    import httpx

    out = open(log, "wb")  # noqa: SIM115  (closed with the process)
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code in (200, 503):
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"not ready in {timeout} s:\n{log.read_text()[-3000:]}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *args.gateway_path])}
    cmd = [sys.executable, "-m", "distill", "serve", student, "--router", str(tmp / "router.json")]
    cmd += ["--fallback", teacher, "--port", str(port), "--max-inflight", "1024"]
    gw = _start(cmd, env, tmp / "gateway.log", port)
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


def _ttft_model(tmp: Path) -> Path:
    from distill.models.tiny import save_tiny, tiny_causal_lm, train_tokenizer

    texts = [
        f"Invoice {i:04d} from Acme: total {i * 3.5:.2f} EUR, due 2024-{i % 12 + 1:02d}." for i in range(300)
    ]
    tok = train_tokenizer(texts, vocab_size=400)
    model = tiny_causal_lm(len(tok), n_layer=4, n_embd=256, n_head=4, n_positions=512, seed=0)
    return save_tiny(model, tok, tmp / "ttft-model")


def _stream_once(port: int, body: dict) -> tuple[float, float, float, int]:
    """Seconds to the first event with a token (its id; its text may still be held back as an
    incomplete UTF-8 character), to the first with text, to the end; and the number of events."""
    import httpx

    t0 = time.perf_counter()
    first = first_text = None
    n = 0
    url = f"http://127.0.0.1:{port}/v1/completions"
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                n += 1
                choice = json.loads(line[6:])["choices"][0]
                if first is None and (choice.get("token_ids") or choice.get("text")):
                    first = time.perf_counter() - t0
                if first_text is None and choice.get("text"):
                    first_text = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return first or total, first_text or total, total, n


def _in_process(model: Path, body: dict, n: int) -> dict:
    """The model alone (this process, 1 thread, no HTTP): when `HFTeacher.generate` reports its
    first token through ``on_token``, and its whole answer: what the servers' figures compare to."""
    import torch

    from distill.models.base import GenerationSettings, Request
    from distill.models.hf import HFTeacher

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the servers run (OMP_NUM_THREADS=1)
    try:
        teacher = HFTeacher(model)
        settings = GenerationSettings(max_new_tokens=body["max_tokens"], temperature=0)
        runs = []
        for i in range(n + 1):
            seen: list[float] = []
            t0 = time.perf_counter()
            teacher.generate(
                [Request(id="r", prompt=body["prompt"])],
                settings,
                on_token=lambda _t, seen=seen: seen.append(time.perf_counter()),
            )
            if i:
                runs.append((seen[0] - t0, time.perf_counter() - t0))
    finally:
        torch.set_num_threads(threads)
    return {
        "server": "HFTeacher in process",
        "src": str(ROOT / "src"),
        "ttft_ms_median": 1e3 * statistics.median(r[0] for r in runs),
        "first_text_ms_median": None,
        "total_ms_median": 1e3 * statistics.median(r[1] for r in runs),
        "events_median": None,
        "requests": len(runs),
    }


def bench_ttft(args, tmp: Path, console: Console) -> list[dict]:
    """Both servers run at once and take turns, one request at a time: the same load for both."""
    model = _ttft_model(tmp)
    sources = [("this checkout", ROOT / "src")]
    if args.baseline_src:
        sources.insert(0, ("baseline", Path(args.baseline_src)))
    body = {
        "model": "m",
        "prompt": "Invoice 0042 from Acme",
        "max_tokens": args.ttft_tokens,
        "temperature": 0,
    }
    procs, ports = [], []
    try:
        for name, src in sources:
            port = _free_port()
            env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
            cmd = [sys.executable, "-m", "distill", "serve", str(model), "--port", str(port)]
            procs.append(_start(cmd, env, tmp / f"serve-{name.replace(' ', '-')}.log", port))
            ports.append(port)
        runs: list[list[tuple[float, float, float, int]]] = [[] for _ in sources]
        for i in range(args.ttft_requests + 1):  # the first round is a warm-up
            for j, port in enumerate(ports):
                got = _stream_once(port, body)
                if i:
                    runs[j].append(got)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
    out = [_in_process(model, body, args.ttft_requests)]
    for (name, src), got in zip(sources, runs):
        out.append(
            {
                "server": name,
                "src": str(src),
                "ttft_ms_median": 1e3 * statistics.median(g[0] for g in got),
                "first_text_ms_median": 1e3 * statistics.median(g[1] for g in got),
                "total_ms_median": 1e3 * statistics.median(g[2] for g in got),
                "events_median": statistics.median(g[3] for g in got),
                "requests": len(got),
            }
        )
        console.print(
            f"TTFT {name}: {out[-1]['ttft_ms_median']:.0f} ms of {out[-1]['total_ms_median']:.0f} ms"
        )
    return out


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
    ap.add_argument("--ttft-requests", type=int, default=10)
    ap.add_argument("--ttft-tokens", type=int, default=64)
    ap.add_argument("--skip", choices=["gateway", "ttft"], default=None, help="run only the other part")
    ap.add_argument("--out", default="bench-results/gateway.json")
    args = ap.parse_args(argv)
    console = Console()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        gateway = bench_gateway(args, tmp, console) if args.skip != "gateway" else []
        ttft = bench_ttft(args, tmp, console) if args.skip != "ttft" else []
    load_after = os.getloadavg()[0]
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
    out.write_text(json.dumps({**meta, "gateway": gateway, "ttft": ttft}, indent=2) + "\n")
    console.print(
        f"1-minute load average: {load_before:.2f} before, {load_after:.2f} after, on {os.cpu_count()} CPUs"
    )
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

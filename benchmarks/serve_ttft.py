"""Time to first token of the local `distill serve`: the server from this checkout against one from
another source tree (``--baseline-src``, e.g. ``git archive`` of the commit before token streaming,
which sent the whole answer as one event once decoding had finished), on a 4-layer model built
here. Both servers run at once and take turns, one request at a time, ``stream: true``, greedy:
time to the first event with a token, to the first with text, and to the end; beside them the
model alone in this process (`HFTeacher.generate(on_token=...)`, no HTTP). Part 2 of
``benchmarks/gateway.py``, which prints and records the table; alone:

    .venv/bin/python benchmarks/serve_ttft.py --baseline-src DIR [--ttft-requests 10] [--ttft-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start(cmd: list[str], env: dict, log: Path, port: int, timeout: float = 120.0) -> subprocess.Popen:
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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ttft_model(tmp: Path) -> Path:
    from distill.models.tiny import save_tiny, tiny_causal_lm, train_tokenizer

    texts = [
        f"Invoice {i:04d} from Acme: total {i * 3.5:.2f} EUR, due 2024-{i % 12 + 1:02d}." for i in range(300)
    ]
    tok = train_tokenizer(texts, vocab_size=400)
    model = tiny_causal_lm(len(tok), n_layer=4, n_embd=256, n_head=4, n_positions=512, seed=0)
    return save_tiny(model, tok, tmp / "ttft-model")


def _stream_once(client, port: int, body: dict) -> tuple[float, float, float, int]:
    """Seconds to the first event with a token (its id; its text may still be held back as an
    incomplete UTF-8 character), to the first with text, to the end; and the number of events.

    ``client``: one `httpx.Client` for all requests (a new one per request would time its own
    set-up, 40-100 ms of loading CA certificates on this machine, as part of the first token)."""
    t0 = time.perf_counter()
    first = first_text = None
    n = 0
    url = f"http://127.0.0.1:{port}/v1/completions"
    with client.stream("POST", url, json={**body, "stream": True}, timeout=300) as r:
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
    import httpx

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
            port = free_port()
            env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
            cmd = [sys.executable, "-m", "distill", "serve", str(model), "--port", str(port)]
            procs.append(start(cmd, env, tmp / f"serve-{name.replace(' ', '-')}.log", port))
            ports.append(port)
        runs: list[list[tuple[float, float, float, int]]] = [[] for _ in sources]
        with httpx.Client() as client:
            for i in range(args.ttft_requests + 1):  # the first round is a warm-up
                for j, port in enumerate(ports):
                    got = _stream_once(client, port, body)
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


if __name__ == "__main__":
    import tempfile

    from rich.console import Console

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-src", default=None)
    ap.add_argument("--ttft-requests", type=int, default=10)
    ap.add_argument("--ttft-tokens", type=int, default=64)
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(bench_ttft(ap.parse_args(), Path(d), Console()), indent=2))

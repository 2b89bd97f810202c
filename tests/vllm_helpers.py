"""A real vLLM (PyPI's CPU build, in `.venv-vllm`, made by `make vllm-venv`) for tests and benchmarks.

from vllm_helpers import VLLM_PYTHON, build_teacher, running_vllm, HostedShapeProxy

teacher = build_teacher(tmp / "teacher")              # tiny Llama-architecture LM, trained a few seconds
with running_vllm(teacher) as url:                    # "http://127.0.0.1:PORT/v1", ready (~60 s)
    with HostedShapeProxy(url) as hosted:             # the same server, answering like a hosted API
        ...

Facts this relies on (measured here, /work/shared/REAL-COMPONENTS.md): CPU attention needs head
sizes 32-512 (2 layers x 128 wide x 2 heads = 64); `VLLM_CPU_KVCACHE_SPACE=1`, float32, 256 tokens of
context, eager mode; the engine runs in child processes, so the server is started in its own session
and stopped by its process group.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx

REPO = Path(__file__).resolve().parent.parent
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
LAUNCHER = REPO / "tools" / "vllm_serve.py"

# Short texts of one narrow domain, each ending with EOS in training: the model learns to stop.
# The city names are CJK: with 300 tokens the BPE merges none of their UTF-8 bytes, so the model
# writes them byte by byte, and a byte that is part of a character decodes to "\ufffd" alone:
# several top-k entries (and the chosen token) then share one string, as in real vocabularies.
CITIES = ["東京", "大阪", "京都", "札幌", "神戸", "横浜"]
TEXTS = [f"Invoice {i:03d} from {CITIES[i % 6]}: total {i * 3 % 97}.50 €" for i in range(72)]
PROMPTS = [t.split(":")[0] + ":" for t in TEXTS[:24]] + [t[:12] for t in TEXTS[24:40]]
"""16 prompts ending where a city starts (the teacher is unsure which one) after 24 that end before the total."""


def available() -> bool:
    return VLLM_PYTHON.is_file() and LAUNCHER.is_file()


def build_teacher(path: Path, *, steps: int = 80, seed: int = 0) -> Path:
    """A tiny Llama-style LM (2 layers x 128 wide x 2 heads of 64) trained ``steps`` full-batch steps on
    `TEXTS` (each followed by EOS), with its byte-level BPE tokenizer, saved to ``path``."""
    import torch

    from distill.models.tiny import save_tiny, tiny_causal_lm, train_tokenizer

    tok = train_tokenizer(TEXTS, vocab_size=300)
    model = tiny_causal_lm(len(tok), n_layer=2, n_embd=128, n_head=2, seed=seed)
    ids = [tok(t)["input_ids"] + [tok.eos_token_id] for t in TEXTS]
    width = max(map(len, ids))
    x = torch.full((len(ids), width), tok.pad_token_id)
    labels = torch.full((len(ids), width), -100)
    for i, row in enumerate(ids):
        x[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(row)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=x, attention_mask=(labels != -100).long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return save_tiny(model, tok, path)


@contextlib.contextmanager
def running_vllm(
    model_dir: Path, *, extra_args: Sequence[str] = (), startup_timeout: float = 240.0
) -> Iterator[str]:
    """``vllm serve MODEL_DIR`` on 127.0.0.1 until the block exits; yields its ``.../v1`` base URL once
    ``/v1/models`` answers. Stopped by its process group (SIGTERM, then SIGKILL)."""
    from servers import free_port

    log = Path(tempfile.mkstemp(prefix="vllm-", suffix=".log")[1])
    port = free_port()
    cmd = [str(VLLM_PYTHON), str(LAUNCHER), "serve", str(model_dir), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--max-logprobs", "20", "--dtype", "float32", "--max-model-len", "256"]
    cmd += ["--enforce-eager", "--disable-log-stats", *extra_args]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # vLLM's venv, not the project's sources
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(url + "/models", timeout=2.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve not ready in {startup_timeout} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # engine children left behind, if any
        log.unlink(missing_ok=True)


class HostedShapeProxy:
    """A real HTTP proxy in front of vLLM that answers as a hosted API does: the card says
    ``owned_by: "openai"``, vLLM's token-id switches are removed from requests (so top-k entries are
    strings with their bytes) and ``token_ids`` / ``prompt_token_ids`` are removed from answers.
    ``strip_logprobs``: also remove ``logprobs`` from answers (a text-only endpoint).
    ``seen``: request paths received."""

    def __init__(self, upstream: str, *, strip_logprobs: bool = False) -> None:
        parts = urlsplit(upstream)
        self.host, self.port = parts.hostname, parts.port
        self.strip_logprobs = strip_logprobs
        self.seen: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self, method: str) -> None:
                proxy.seen.append(self.path)
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else None
                if body:
                    data = json.loads(body)
                    for key in ("return_token_ids", "return_tokens_as_token_ids"):
                        data.pop(key, None)
                    body = json.dumps(data).encode()
                conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=120)
                conn.request(method, self.path, body=body, headers={"content-type": "application/json"})
                resp = conn.getresponse()
                payload, status = resp.read(), resp.status
                conn.close()
                if status == 200:
                    payload = json.dumps(proxy._rewrite(json.loads(payload))).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def _rewrite(self, data: dict) -> dict:
        if data.get("object") == "list":
            for card in data.get("data", []):
                card["owned_by"] = "openai"
            return data
        data.pop("prompt_token_ids", None)
        for c in data.get("choices", []):
            for key in ("token_ids", "prompt_token_ids", "prompt_logprobs"):
                c.pop(key, None)
            if self.strip_logprobs:
                c["logprobs"] = None
        return data

    def __enter__(self) -> HostedShapeProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

"""Real servers for tests: `distill serve` started as a subprocess on 127.0.0.1.

from servers import running_server

with running_server(tiny_lm_dir) as base_url:          # "http://127.0.0.1:PORT/v1"
    client = openai.OpenAI(base_url=base_url, api_key="unused")

with running_server(d, api_key_env="MY_KEY", env={"MY_KEY": key}, log_file=p) as base_url:
    ...                                                  # p holds the server's stdout+stderr
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(
    model_dir: str | Path,
    *,
    api_key_env: str | None = None,
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    log_file: str | Path | None = None,
    startup_timeout: float = 120.0,
    processes: list[subprocess.Popen] | None = None,
) -> Iterator[str]:
    """Run ``python -m distill serve MODEL_DIR --host 127.0.0.1 --port P`` until the block exits.

    Yields the OpenAI base URL ``http://127.0.0.1:P/v1`` once ``/health`` answers 200.
    ``env``: extra environment variables (e.g. the API key under ``api_key_env``).
    ``log_file``: where the server's stdout and stderr go (a temporary file when None; its
    tail is put in the error when the server fails to start). The server is terminated
    (SIGTERM, then SIGKILL after 10 s) on exit. ``processes``: the server's `subprocess.Popen` is
    appended to it once it answers (for a test that kills it). ``model_dir`` may be a student URL
    (then it is a gateway, given ``--router``/``--fallback`` in ``extra_args``).
    """
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    full_env.update(env or {})
    owned_log = log_file is None
    path = Path(log_file) if log_file else Path(tempfile.mkstemp(prefix="distill-serve-", suffix=".log")[1])
    proc = None
    try:
        for _attempt in range(3):  # another process may take the free port first: try a new one
            port = free_port()
            cmd = [sys.executable, "-m", "distill", "serve", str(model_dir), "--host", "127.0.0.1"]
            cmd += ["--port", str(port)]
            if api_key_env:
                cmd += ["--api-key-env", api_key_env]
            cmd += list(extra_args)
            with open(path, "wb") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env)
            if _wait_ready(proc, port, path, startup_timeout):
                break
            _stop(proc)
        else:
            raise RuntimeError(f"distill serve found no free port in 3 tries:\n{_tail(path)}")
        if processes is not None:
            processes.append(proc)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        if proc is not None:
            _stop(proc)
        if owned_log:
            path.unlink(missing_ok=True)


def _wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float) -> bool:
    """True once THIS process listens on ``port`` and answers /health; False if the port was taken."""
    deadline = time.monotonic() + timeout
    bound = f"Uvicorn running on http://127.0.0.1:{port}"  # printed only after our own bind succeeded
    while True:
        text = log.read_text(errors="replace")
        if proc.poll() is not None:
            if "address already in use" in text.lower():
                return False
            raise RuntimeError(f"distill serve exited with {proc.returncode}:\n{_tail(log)}")
        if bound in text:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"distill serve did not answer /health within {timeout} s:\n{_tail(log)}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_bytes()[-n:].decode("utf-8", errors="replace")

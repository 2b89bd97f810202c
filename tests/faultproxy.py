"""A real fault-injecting HTTP proxy on 127.0.0.1, for tests of HTTP teachers.

    with FaultProxy(upstream="http://127.0.0.1:8000", rate=1/3, seed=0) as proxy:
        teacher = APITeacher(proxy.url + "/v1", ...)       # proxy.url = "http://127.0.0.1:PORT"
        ...
        proxy.seen, proxy.faults, proxy.forwarded          # counters

Each request is, with probability ``rate`` (seeded), answered by one fault from ``kinds``:
``429`` (with ``Retry-After``), ``500``, ``timeout`` (no answer for ``hang`` seconds, then the
connection closes), ``drop`` (the connection closes with no answer), ``malformed`` (the upstream's
answer cut in half, status 200). Other requests are forwarded unchanged. ``force_status`` answers
every request with that status instead (e.g. 400) to test that such errors are not retried.
Only paths starting with one of ``paths`` get faults. Runs in its own threads (a real server).
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("429", "500", "timeout", "drop", "malformed")


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # listen backlog: the default 5 resets bursts of concurrent connections


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        *,
        rate: float = 0.0,
        kinds: tuple[str, ...] = KINDS,
        seed: int = 0,
        retry_after: str = "0.05",
        hang: float = 1.5,
        force_status: int | None = None,
        paths: tuple[str, ...] = ("/v1/completions", "/v1/chat/completions"),
    ) -> None:
        bad = [k for k in kinds if k not in KINDS]
        if bad or not 0.0 <= rate <= 1.0:
            raise ValueError(f"kinds must be among {KINDS} and rate in [0, 1], got {kinds!r}, {rate!r}")
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.rate, self.kinds, self.retry_after, self.hang = rate, kinds, retry_after, hang
        self.force_status, self.paths = force_status, paths
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.seen: Counter[str] = Counter()  # requests received, by path
        self.faults: Counter[str] = Counter()  # faults injected, by kind
        self.forwarded = 0
        self.headers_seen: list[dict[str, str]] = []
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        # A client that gave up (its timeout) makes our late write fail: expected here, not news.
        self._server.handle_error = lambda request, address: None
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def total_seen(self) -> int:
        return sum(self.seen.values())

    def _choose(self, path: str) -> str | None:
        with self._lock:
            self.seen[path.split("?")[0]] += 1
            if not path.startswith(self.paths):
                return None
            if self.force_status is not None:
                return "force"
            if self._rng.random() < self.rate:
                kind = self._rng.choice(self.kinds)
                self.faults[kind] += 1
                return kind
            return None

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stall

            def log_message(self, *args) -> None:  # quiet: tests read counters, not logs
                pass

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self, body: bytes) -> tuple[int, bytes, dict[str, str]]:
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=120)
                try:
                    headers = {
                        k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")
                    }
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    keep = {
                        k: v for k, v in resp.getheaders() if k.lower() in ("retry-after", "www-authenticate")
                    }
                    with proxy._lock:
                        proxy.forwarded += 1
                    return resp.status, data, keep
                finally:
                    conn.close()

            def _handle(self) -> None:
                body = self._body()
                with proxy._lock:
                    proxy.headers_seen.append(dict(self.headers.items()))
                kind = proxy._choose(self.path)
                if kind == "force":
                    msg = {
                        "error": {"message": f"forced {proxy.force_status}", "type": "invalid_request_error"}
                    }
                    return self._reply(proxy.force_status, json.dumps(msg).encode())
                if kind == "429":
                    msg = {"error": {"message": "rate limited (injected)", "type": "rate_limit"}}
                    return self._reply(429, json.dumps(msg).encode(), {"Retry-After": proxy.retry_after})
                if kind == "500":
                    return self._reply(500, b'{"error": {"message": "injected server error"}}')
                if kind == "timeout":
                    time.sleep(proxy.hang)
                    self.close_connection = True
                    return None
                if kind == "drop":
                    self.close_connection = True
                    return None
                status, data, headers = self._forward(body)
                if kind == "malformed":
                    return self._reply(200, data[: max(1, len(data) // 2)])
                return self._reply(status, data, headers)

            do_GET = do_POST = _handle

        return Handler

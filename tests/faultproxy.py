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

TLS mode: ``server_tls=ssl_context`` makes it an HTTPS endpoint (``proxy.url`` = "https://...")
that terminates TLS and forwards plain HTTP to the upstream; `make_test_pki` writes a throwaway CA
and a server certificate for 127.0.0.1/localhost. ``proxy.connections`` counts accepted TCP
connections (keep-alive reuse shows as fewer connections than requests), ``proxy.tls_failures``
handshakes that failed (e.g. the client did not trust the certificate). ``idle_close=S`` closes a
kept-alive connection after S seconds without a request, as servers' keep-alive timeouts do.
``rewrite=fn`` passes every forwarded 200 answer through ``fn(path, body) -> body`` (e.g. to take token
ids out of an answer, as a hosted API gives none).
"""

from __future__ import annotations

import http.client
import json
import random
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

KINDS = ("429", "500", "timeout", "drop", "malformed")


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # listen backlog: the default 5 resets bursts of concurrent connections

    def __init__(self, address, handler, proxy: FaultProxy) -> None:
        super().__init__(address, handler)
        self.proxy = proxy

    def get_request(self):
        sock, addr = super().get_request()
        with self.proxy._lock:
            self.proxy.connections += 1
        if self.proxy.server_tls is not None:
            # The handshake runs in the handler's thread (Handler.setup), not in this accept loop.
            sock = self.proxy.server_tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr


@dataclass(frozen=True)
class PKIFiles:
    """Paths of PEM files written by `make_test_pki`."""

    ca_cert: Path
    """The CA certificate: what a client must trust."""
    server_cert: Path
    """The server's certificate, signed by the CA (for localhost, 127.0.0.1 and ::1 by default)."""
    server_key: Path
    """The server certificate's private key (unencrypted)."""

    def server_context(self) -> ssl.SSLContext:
        """A server-side context presenting the certificate."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.server_cert, self.server_key)
        return ctx


def make_test_pki(
    directory: str | Path,
    *,
    name: str = "distill test CA",
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
) -> PKIFiles:
    """Write a fresh self-signed CA and a CA-signed server certificate under ``directory``.

    ``hosts``: the server certificate's names (DNS names and IP addresses).

    Keys are EC P-256 (fast to make); certificates are valid from one hour ago for one day. Uses the
    ``cryptography`` package (a dev dependency)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    sans = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:  # not an address: a DNS name
            sans.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    pki = PKIFiles(out / "ca.pem", out / "server.pem", out / "server-key.pem")
    pki.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.server_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pki


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
        server_tls: ssl.SSLContext | None = None,
        idle_close: float | None = None,
        rewrite=None,
    ) -> None:
        bad = [k for k in kinds if k not in KINDS]
        if bad or not 0.0 <= rate <= 1.0:
            raise ValueError(f"kinds must be among {KINDS} and rate in [0, 1], got {kinds!r}, {rate!r}")
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.rate, self.kinds, self.retry_after, self.hang = rate, kinds, retry_after, hang
        self.force_status, self.paths = force_status, paths
        self.server_tls, self.idle_close, self.rewrite = server_tls, idle_close, rewrite
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.seen: Counter[str] = Counter()  # requests received, by path
        self.faults: Counter[str] = Counter()  # faults injected, by kind
        self.forwarded = 0
        self.headers_seen: list[dict[str, str]] = []
        self.connections = 0  # TCP connections accepted
        self.tls_failures = 0  # TLS handshakes that failed
        self._server = _Server(("127.0.0.1", 0), self._handler_class(), self)
        self._server.daemon_threads = True
        # A client that gave up (its timeout) makes our late write fail: expected here, not news.
        self._server.handle_error = lambda request, address: None
        scheme = "https" if server_tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self._server.server_address[1]}"
        # A short poll interval: shutdown() waits for it (0.5 s by default, per proxy, per test).
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

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
            timeout = proxy.idle_close  # a read waiting longer ends the connection (keep-alive timeout)

            def setup(self) -> None:
                if proxy.server_tls is not None:
                    self.request.settimeout(10.0)
                    try:
                        self.request.do_handshake()
                    except OSError:  # ssl.SSLError included: the client refused our certificate
                        with proxy._lock:
                            proxy.tls_failures += 1
                        raise
                    self.request.settimeout(None)  # StreamRequestHandler.setup applies `timeout`
                super().setup()

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
                if proxy.rewrite is not None and status == 200:
                    data = proxy.rewrite(self.path, data)
                if kind == "malformed":
                    return self._reply(200, data[: max(1, len(data) // 2)])
                return self._reply(status, data, headers)

            do_GET = do_POST = _handle

        return Handler

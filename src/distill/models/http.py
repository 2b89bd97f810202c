"""HTTP plumbing of `distill.models.api.APITeacher`: a keep-alive `http.client` transport, TLS
contexts and the classification of TLS failures, scrubbing the API key from error texts, the one
check of a base URL given by a user (`check_base_url`: credentials in a URL are refused), and
`APIError`, the one error type of the OpenAI-compatible HTTP API on both sides (a request this
client gave up on; an error `distill serve` answers).

Kept apart from the teacher so that the request/retry logic (api.py) reads on its own. The transport
never retries: retries live in `APITeacher._send`, and only there. ``tls_context`` also serves httpx
clients (``verify=``), e.g. a fallback endpoint behind a private CA.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import re
import select
import ssl
import threading
import time
from typing import Any
from urllib.parse import urlsplit


class APIError(RuntimeError):
    """An OpenAI-compatible API request that failed, on either side of the wire.

    ``status``: the HTTP status (None for a transport error). Client side (`APITeacher`):
    ``attempts`` is how many times the request was sent and ``retryable`` whether a later run may
    succeed. Server side (`distill serve`): ``param`` and ``code`` fill OpenAI's error body (`body`).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        attempts: int = 1,
        retryable: bool = True,
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.attempts, self.retryable = message, status, attempts, retryable
        self.param, self.code = param, code

    def body(self) -> dict[str, Any]:
        """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
        status = self.status or 500
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def redact_url(url: object) -> str:
    """``url`` with everything between ``scheme://`` and its last ``@`` (a user name and password)
    replaced by ``[redacted]``: the form in which a URL given by a user may appear in an error."""
    text = str(url)
    return re.sub(r"^([A-Za-z][\w+.-]*://)?.*@", lambda m: f"{m.group(1) or ''}[redacted]@", text, count=1)


def check_base_url(url: object, flag: str = "teacher URL", key_flag: str = "--api-key-env") -> str:
    """``url``, an OpenAI-compatible base URL ``http(s)://HOST[:PORT]/PATH``, without a trailing slash.

    The one check every command taking a URL uses (``generate --teacher``, ``eval``/``route fit``
    ``--student``/``--teacher``, ``serve --fallback``, `APITeacher`). A URL carrying credentials
    (``user:password@``, or any ``@``) is refused: a base URL is recorded (the store's manifest, the
    failure log, progress and errors), so a password in it would be written to disk and printed. The
    key belongs in an environment variable named by ``key_flag``. ``flag`` names the value in the
    `ValueError`; the URL shown there is redacted (`redact_url`)."""
    if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url):
        raise ValueError(
            f"{flag} must be an http(s) base URL such as http://host:8000/v1, got {redact_url(url)!r}"
        )
    if "@" in url:
        raise ValueError(
            f"{flag} must not carry credentials ({redact_url(url)}): a URL is written to manifests, "
            f"logs and errors; put the key in an environment variable and name it with {key_flag}"
        )
    return url.rstrip("/")


def tls_context(
    ca_bundle: str | os.PathLike[str] | None, *, where: str = "ca_bundle (--ca-bundle)"
) -> ssl.SSLContext:
    """A verifying TLS client context: the system store (which honours ``SSL_CERT_FILE``) when
    ``ca_bundle`` is None, else only the CA certificates in that PEM file. ``where`` names the
    value's origin in the `ValueError` for a missing file or one without a usable certificate.
    Also usable as httpx's ``verify=``."""
    if ca_bundle is None:
        return ssl.create_default_context()
    path = os.fspath(ca_bundle)
    if not os.path.isfile(path):
        raise ValueError(f"{where} {path!r} is not a file")
    try:
        return ssl.create_default_context(cafile=path)
    except ssl.SSLError as err:  # a PEM-less or corrupt file: OpenSSL says which
        raise ValueError(f"{where} {path!r} holds no usable PEM CA certificate ({err})") from None


# OpenSSL's reasons when an https URL reaches a server that answers in plain HTTP (3.0; 3.2+).
_NOT_TLS = frozenset(
    {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"}
)


def _tls_is_permanent(err: ssl.SSLError) -> bool:
    """A TLS failure that a retry cannot fix: an unverifiable certificate, or no TLS server at all."""
    return isinstance(err, ssl.SSLCertVerificationError) or err.reason in _NOT_TLS


def _tls_error(url: str, err: ssl.SSLError) -> str:
    if not isinstance(err, ssl.SSLCertVerificationError):
        return f"{url} did not answer with TLS ({err.reason}); is it a plain http:// endpoint?"
    why = err.verify_message or str(err)
    if "mismatch" in why:  # hostname / IP address mismatch: trusting another CA would not help
        return (
            f"TLS certificate of {url} could not be verified ({why}); use a host name or address "
            "the certificate was issued for"
        )
    return (
        f"TLS certificate of {url} could not be verified ({why}); if the server uses a private CA, "
        "trust it with --ca-bundle PATH (APITeacher(ca_bundle=PATH)) or the SSL_CERT_FILE environment "
        "variable (a PEM file of CA certificates)"
    )


def _scrubber(secret: str):
    """A function removing ``secret``, and any long piece of it (providers echo masked keys), from text."""

    def scrub(text: str) -> str:
        if not secret:
            return text
        text = text.replace(secret, "[redacted]")

        def piece(m: re.Match) -> str:
            parts = re.split(r"[.*]+", m.group())
            return "[redacted]" if any(len(p) >= 6 and p in secret for p in parts) else m.group()

        return re.sub(r"[\w\-.*]{6,}", piece, text)

    return scrub


def _error_text(payload: bytes) -> str:
    try:
        data = json.loads(payload)
        err = data.get("error", data) if isinstance(data, dict) else data
        msg = err.get("message", err) if isinstance(err, dict) else err
        text = msg if isinstance(msg, str) else json.dumps(msg)
    except ValueError:
        text = payload.decode("utf-8", "replace")
    return text[:300]


class _Transport:
    """HTTP/1.1 with keep-alive: one `http.client` connection per (thread, scheme, host, port);
    https connections use ``tls`` (a verifying `ssl.SSLContext`; the system store when None).

    ``request`` never retries (that is `APITeacher._send`'s job) and raises `TimeoutError`, `OSError`
    or `http.client.HTTPException` on transport failures. ``timeout``: seconds for the connect and for
    each read or write (httpx's meaning). ``max_connections``: requests in flight at once, over all
    threads. A connection the server closed while idle is noticed before reuse and replaced, so it
    costs no retry; a connection that failed mid-request is dropped."""

    def __init__(
        self,
        headers: dict[str, str],
        timeout: float,
        max_connections: int,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._headers = headers
        self._timeout = timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._local = threading.local()
        self._all: dict[http.client.HTTPConnection, threading.Thread] = {}  # for close()
        self._lock = threading.Lock()
        self._ssl = tls  # one context for all connections: OpenSSL reuses it (and its loaded CAs)

    def __repr__(self) -> str:
        return "_Transport(headers=[hidden])"

    def _conn(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        conns = self._local.__dict__.setdefault("conns", {})
        conn = conns.get((scheme, netloc))
        if conn is not None and conn.sock is not None:
            # Readable while idle means the server closed it (EOF) or sent junk: don't reuse it.
            poll = select.poll()  # not select.select: it fails for descriptors >= 1024
            poll.register(conn.sock, select.POLLIN)
            if poll.poll(0):
                self._drop(conns, (scheme, netloc))
                conn = None
        if conn is None or conn.sock is None:
            if conn is not None:
                self._drop(conns, (scheme, netloc))
            if scheme == "https":
                with self._lock:
                    self._ssl = self._ssl or ssl.create_default_context()
                conn = http.client.HTTPSConnection(netloc, timeout=self._timeout, context=self._ssl)
            else:
                conn = http.client.HTTPConnection(netloc, timeout=self._timeout)
            conns[(scheme, netloc)] = conn
            with self._lock:
                # Threads come and go (one pool per `generate` run): close what dead ones left open.
                dead = [c for c, t in self._all.items() if not t.is_alive()]
                for c in dead:
                    del self._all[c]
                self._all[conn] = threading.current_thread()
            for c in dead:
                c.close()
        return conn

    def _drop(self, conns: dict, where: tuple[str, str]) -> None:
        conn = conns.pop(where)
        conn.close()
        with self._lock:
            self._all.pop(conn, None)

    def request(self, method: str, url: str, body: dict[str, Any] | None):
        """``(status, headers, body bytes)`` of one HTTP exchange (headers: case-insensitive ``get``)."""
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        data = None if body is None else json.dumps(body).encode("utf-8")
        with self._slots:
            conn = self._conn(parts.scheme, parts.netloc)
            try:
                conn.request(method, target, body=data, headers=self._headers)
                resp = conn.getresponse()
                payload = resp.read()
            except BaseException:
                self._drop(self._local.conns, (parts.scheme, parts.netloc))
                raise
            if resp.will_close:
                self._drop(self._local.conns, (parts.scheme, parts.netloc))
        return resp.status, resp.headers, payload

    def close(self) -> None:
        with self._lock:
            conns, self._all = list(self._all), {}
        for conn in conns:
            conn.close()


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())

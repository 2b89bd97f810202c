"""`Upstream`: an asyncio HTTP/1.1 keep-alive client for one OpenAI-compatible base URL, with a cap
on requests in flight and per-request timeouts: how the gateway (`distill.serve.gateway`) and the
fallback forwarding of `distill.serve.routing` reach a student or a teacher.

Why not httpx: on this 2-core machine httpx's pooled `AsyncClient` spends over a millisecond of CPU
per request, this client a few hundredths (``benchmarks/gateway.py``, part 0; docs/serve.md); a
gateway's whole job is to add as little as possible on top of its upstreams.

It speaks just what an OpenAI-compatible server answers: a status line, headers, and a body with
``Content-Length``, ``Transfer-Encoding: chunked`` (server-sent events) or read until the close.
Nothing here retries a request the upstream may have seen, with one exception every HTTP client
makes: a kept-alive connection the server closed while idle is noticed before reuse, and a reused
connection that yields not one byte of response is replaced once (the server closed it before it
read the request). The API key lives only in the prebuilt header block; no repr, error or log
line shows it. Errors name the URL and the error type only.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from distill.models.http import tls_context


class UpstreamError(Exception):
    """The upstream could not be reached, timed out, or answered something that is not HTTP.

    The message names the URL and what failed (never a header, so never the key)."""


@dataclass
class Reply:
    """One HTTP response: ``status``, ``headers`` (lower-case names) and, unless streamed, ``body``."""

    status: int
    headers: dict[str, str]
    body: bytes = b""


class _Conn:
    __slots__ = ("reader", "writer", "reused")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.reused = reader, writer, False

    def usable(self) -> bool:
        # EOF seen while idle: the server closed it (keep-alive timeout); don't send on it.
        return not (self.reader.at_eof() or self.writer.is_closing())

    def close(self) -> None:
        self.writer.close()


class Upstream:
    """One OpenAI-compatible base URL (``http(s)://host[:port]/v1``).

    ``api_key``: sent as ``Authorization: Bearer``; held only in the header block. ``timeout``:
    seconds for the connect plus the whole response (`request`), or for the connect plus the
    headers and then each gap between body chunks (`stream`). ``max_inflight``: requests at once;
    `try_acquire` says whether one more fits (the caller answers 429 when it does not).
    ``ca_bundle``: PEM file of CA certificates trusted for https instead of the system store
    (which honours ``SSL_CERT_FILE``); ``where`` names the flag in errors about it. ``name`` is
    what `/health` and `/metrics` call it (e.g. ``student-0``).
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_inflight: int = 128,
        ca_bundle: str | None = None,
        where: str = "--fallback-ca-bundle",
        name: str = "upstream",
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{name}: expected an http(s) base URL, got {base_url!r}")
        if not timeout > 0:
            raise ValueError(f"{name}: timeout must be > 0 seconds, got {timeout!r}")
        if int(max_inflight) < 1:
            raise ValueError(f"{name}: max_inflight must be >= 1, got {max_inflight!r}")
        self.url = base_url.rstrip("/")
        self.name = name
        self.host, self.port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        self.base_path = parts.path.rstrip("/")
        self.timeout, self.max_inflight = float(timeout), int(max_inflight)
        # Built (and the file checked) now: a bad bundle fails at start, not on the first request.
        self._tls: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._tls = tls_context(ca_bundle, where=where) if ca_bundle else tls_context(None)
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address
        host = host if parts.port is None else f"{host}:{self.port}"
        block = f"Host: {host}\r\nContent-Type: application/json\r\nAccept-Encoding: identity\r\n"
        if api_key:
            block += f"Authorization: Bearer {api_key}\r\n"
        self._head = block.encode("latin-1")
        self._idle: list[_Conn] = []
        self.inflight = 0
        self.rejected = 0  # requests its owner answered 429 because it was full

    def __repr__(self) -> str:  # never shows the key
        return f"Upstream({self.url!r}, name={self.name!r}, inflight={self.inflight}/{self.max_inflight})"

    # -- admission ------------------------------------------------------------------------------
    def try_acquire(self) -> bool:
        """Take one in-flight slot if one is free (no waiting: above the cap the caller says 429)."""
        if self.inflight >= self.max_inflight:
            return False
        self.inflight += 1
        return True

    def release(self) -> None:
        self.inflight -= 1

    # -- requests -------------------------------------------------------------------------------
    async def request(self, method: str, path: str, body: bytes | None = None) -> Reply:
        """One exchange, the whole body read; `UpstreamError` on a transport failure or timeout."""
        try:
            async with asyncio.timeout(self.timeout):
                conn, reply = await self._exchange(method, path, body)
                length = reply.headers.get("content-length", "")
                if length.isdigit() and "transfer-encoding" not in reply.headers:
                    reply.body = await self._exactly(conn, int(length), reply.headers, path)
                else:
                    reply.body = b"".join([c async for c in self._body(conn, reply.headers)])
        except TimeoutError:
            raise UpstreamError(f"timed out after {self.timeout:g} s ({self.url}{path})") from None
        return reply

    async def stream(
        self, method: str, path: str, body: bytes | None = None
    ) -> tuple[Reply, AsyncIterator[bytes]]:
        """The response's headers, and its body as an iterator of pieces as they arrive.

        Iterate it to the end or ``aclose()`` it: the connection goes back to the pool (or is
        closed) when the iterator finishes. A gap longer than ``timeout`` raises `UpstreamError`."""
        try:
            async with asyncio.timeout(self.timeout):
                conn, reply = await self._exchange(method, path, body)
        except TimeoutError:
            raise UpstreamError(f"timed out after {self.timeout:g} s ({self.url}{path})") from None
        return reply, self._body(conn, reply.headers, gap=self.timeout, where=path)

    async def _exchange(self, method: str, path: str, body: bytes | None) -> tuple[_Conn, Reply]:
        target = self.base_path + path
        data = body or b""
        head = f"{method} {target} HTTP/1.1\r\n".encode() + self._head
        message = head + b"Content-Length: %d\r\n\r\n" % len(data) + data
        for _ in range(2):
            conn = await self._conn()
            try:
                conn.writer.write(message)
                raw = await conn.reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError) as err:
                conn.close()
                got = isinstance(err, asyncio.IncompleteReadError) and err.partial
                if conn.reused and not got:  # closed while idle, before it read this request
                    continue
                raise UpstreamError(f"{type(err).__name__} from {self.url}{path}") from None
            except (OSError, asyncio.LimitOverrunError, ValueError) as err:
                conn.close()
                raise UpstreamError(f"{type(err).__name__} from {self.url}{path}") from None
            except BaseException:  # cancelled or timed out mid-exchange: the connection is unusable
                conn.close()
                raise
            return conn, self._parse_head(raw, path)
        raise UpstreamError(f"connection closed twice before an answer ({self.url}{path})")

    def _parse_head(self, raw: bytes, path: str) -> Reply:
        lines = raw.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise UpstreamError(f"not an HTTP response from {self.url}{path}")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if version == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive":
            headers.setdefault("connection", "close")
        return Reply(int(code), headers)

    async def _exactly(self, conn: _Conn, n: int, headers: dict[str, str], where: str) -> bytes:
        """A Content-Length body in one read (the common case: no generator to drive)."""
        try:
            data = await conn.reader.readexactly(n)
        except BaseException as err:
            conn.close()
            if isinstance(err, asyncio.IncompleteReadError | ConnectionError | OSError):
                raise UpstreamError(f"{type(err).__name__} reading the answer of {self.url}{where}") from None
            raise
        if headers.get("connection", "").lower() != "close" and conn.usable():
            conn.reused = True
            self._idle.append(conn)
        else:
            conn.close()
        return data

    async def _body(
        self, conn: _Conn, headers: dict[str, str], *, gap: float | None = None, where: str = ""
    ) -> AsyncIterator[bytes]:
        """The body's pieces; the connection is pooled again after a complete keep-alive body."""
        done = False
        try:
            async for piece in self._pieces(conn.reader, headers, gap, where):
                yield piece
            done = headers.get("connection", "").lower() != "close"
        except TimeoutError:
            raise UpstreamError(f"no data for {gap:g} s from {self.url}{where}") from None
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError) as err:
            raise UpstreamError(f"{type(err).__name__} reading the answer of {self.url}{where}") from None
        finally:
            if done and conn.usable():
                conn.reused = True
                self._idle.append(conn)
            else:
                conn.close()

    @staticmethod
    async def _pieces(reader, headers, gap, where) -> AsyncIterator[bytes]:
        async def read(coro):
            if gap is None:
                return await coro
            async with asyncio.timeout(gap):
                return await coro

        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size_line = await read(reader.readuntil(b"\r\n"))
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while await read(reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                        pass
                    return
                piece = await read(reader.readexactly(size + 2))
                yield piece[:-2]
        elif "content-length" in headers:
            left = int(headers["content-length"])
            while left > 0:
                piece = await read(reader.read(min(left, 1 << 16)))
                if not piece:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(piece)
                yield piece
        else:  # delimited by the close
            headers["connection"] = "close"
            while piece := await read(reader.read(1 << 16)):
                yield piece

    async def _conn(self) -> _Conn:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable():
                return conn
            conn.close()
        try:
            reader, writer = await asyncio.open_connection(
                self.host, self.port, ssl=self._tls, server_hostname=self.host if self._tls else None
            )
        except ssl.SSLCertVerificationError as err:
            why = err.verify_message or "certificate verify failed"
            raise UpstreamError(f"TLS certificate of {self.url} could not be verified ({why})") from None
        except (OSError, ssl.SSLError) as err:
            raise UpstreamError(f"{type(err).__name__} connecting to {self.url}") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:  # headers and body leave in one write; small answers must not wait for ACKs
            import socket

            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Conn(reader, writer)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

"""`Guard`: the checks every request to `distill serve` (local model or gateway) passes before its
route runs: the API key and the declared body size. A plain ASGI wrapper (no per-request task or
body copy, unlike a `BaseHTTPMiddleware`): it costs a few microseconds per request.
"""

from __future__ import annotations

import hashlib
import hmac

from distill.models.http import APIError
from distill.serve.format import ServeLimits, error_response, too_large

OPEN_PATHS = frozenset({"/health"})
"""Paths answered without the API key (load balancers and test harnesses poll them)."""


class Guard:
    """Wraps an ASGI ``app``: with ``api_key``, every path but `OPEN_PATHS` (unknown ones included)
    needs ``Authorization: Bearer <api_key>`` (401 otherwise; compared in constant time, only a
    sha256 digest is kept, never logged or echoed); a ``Content-Length`` that is not a number is a
    400 and one above ``limits.max_body_bytes`` a 413 (bodies without one are counted as they
    arrive by `distill.serve.format.read_json`)."""

    def __init__(self, app, *, api_key: str | None, limits: ServeLimits) -> None:
        self.app, self.limits = app, limits
        self._digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    def __repr__(self) -> str:
        return f"Guard(api_key={'set' if self._digest else None})"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            refusal = self.check(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, scope):
        """The error response for this request, or None when it may go on."""
        auth = length = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                auth = value
            elif name == b"content-length":
                length = value
        if self._digest is not None and scope["path"] not in OPEN_PATHS:
            scheme, _, given = (auth or b"").decode("latin-1").partition(" ")
            given_digest = hashlib.sha256(given.strip().encode()).digest()
            if scheme.lower() != "bearer" or not hmac.compare_digest(given_digest, self._digest):
                return error_response(
                    APIError("missing or invalid API key", status=401, code="invalid_api_key")
                )
        if length is not None:
            if not length.isdigit():
                return error_response(APIError("Content-Length must be a non-negative integer", status=400))
            if int(length) > self.limits.max_body_bytes:
                return too_large(self.limits)
        return None

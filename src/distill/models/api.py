"""`APITeacher`: any OpenAI-compatible HTTP endpoint (a hosted API, vLLM, llama.cpp, `distill serve`).

Plain-text prompts go to ``/v1/completions``, chats to ``/v1/chat/completions`` (``chat="auto"``).
With ``settings.top_logprobs = k > 0`` the request asks for log-probabilities (``logprobs=k`` on
completions, ``logprobs=true, top_logprobs=k`` on chat). Token ids come from the token-id extension
that `distill serve` and vLLM add to each choice (``prompt_token_ids``, ``token_ids``,
``top_token_ids``); an endpoint without it yields text-only completions (no top-k), which the
store keeps as black-box answers.

HTTP is `http.client` with one keep-alive connection per (thread, endpoint) (`_Transport`, in
`distill.models.http`): httpx cost ~1.4 ms of CPU per request under 32 threads (its pooled
connections share one lock), which capped `generate` at ~87% of a 100 ms server's ideal rate at
concurrency 32 on 2 cores (see docs/store.md); `http.client` costs ~0.3 ms. Retries live here and
only here (the transport never retries): exponential backoff with full jitter on 429 (``Retry-After`` honoured), 5xx, malformed responses, timeouts and dropped
connections; any other 4xx fails at once. Several base URLs (replicas of one model) share the
load round-robin, and a retry moves to the next replica.

The API key is read from the environment variable the user names and lives only in the transport's
headers (its repr shows none); error texts are scrubbed of it.

HTTPS always verifies the server's certificate and host name. A private CA is trusted either with
``ca_bundle=PATH`` (``--ca-bundle``: a PEM file, used *instead of* the system store, as curl's
``--cacert``) or with the ``SSL_CERT_FILE`` environment variable (OpenSSL reads it in
`ssl.create_default_context`; the system's certificate directory stays trusted too). A certificate
that cannot be verified is a configuration error, not a transient one: it fails at once, unretried,
and the constructor checks it with one TLS handshake per https URL when ``model`` is given (without
``model`` the ``/v1/models`` lookup does). There is no option to turn verification off.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from distill.models.base import Completion, GenerationSettings, Request
from distill.models.http import (
    APIError,
    _error_text,
    _retry_after,
    _scrubber,
    _tls_error,
    _tls_is_permanent,
    _Transport,
    check_base_url,
    tls_context,
)

CAPTURE_TEMPERATURE = 1.0
"""OpenAI-style endpoints (and `distill serve`) return log-probabilities of the raw (T = 1) distribution."""


def _check_url(url: str) -> str:
    return check_base_url(url, "teacher URL", "api_key_env (--api-key-env)")


class APITeacher:
    """An OpenAI-compatible endpoint as a teacher.

    ``base_url``: one URL such as ``http://127.0.0.1:8000/v1``, or several replicas of the same model.
    ``model``: the model name to request; None asks ``/v1/models`` (which must list exactly one).
    ``api_key_env``: NAME of the environment variable holding the key (never the key itself).
    ``timeout``: seconds per HTTP request. ``chat``: "auto" (text -> completions, messages -> chat),
    "always" (text prompts are sent as one user message) or "never" (chats are refused).
    ``max_retries``: retries after the first attempt; ``backoff``/``max_backoff``: seconds of the
    exponential backoff (full jitter); ``max_retry_after``: cap on an honoured ``Retry-After``.
    ``ca_bundle``: PEM file of CA certificates trusted for https URLs instead of the system store
    (None: the system store, which honours ``SSL_CERT_FILE``/``SSL_CERT_DIR``).
    Thread-safe: `generate` calls `complete` from many threads.
    """

    remote = True
    """Requests are independent HTTP calls: `generate` runs them concurrently."""

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        model: str | None = None,
        api_key_env: str | None = None,
        timeout: float = 60.0,
        chat: str = "auto",
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_retry_after: float = 120.0,
        max_connections: int = 64,
        seed: int | None = None,
        ca_bundle: str | os.PathLike[str] | None = None,
    ) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("APITeacher needs at least one base URL")
        self.urls = [_check_url(u) for u in urls]
        if chat not in ("auto", "always", "never"):
            raise ValueError(f"chat must be 'auto', 'always' or 'never', got {chat!r}")
        if not (timeout > 0):
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if int(max_connections) < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections!r}")
        if int(max_retries) < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries!r}")
        self.chat, self.timeout, self.max_retries = chat, float(timeout), int(max_retries)
        self.backoff, self.max_backoff, self.max_retry_after = (
            float(backoff),
            float(max_backoff),
            float(max_retry_after),
        )
        self.api_key_env = api_key_env
        headers = {"Content-Type": "application/json"}
        key = ""
        if api_key_env:
            key = os.environ.get(api_key_env, "")
            if not key:
                raise ValueError(f"environment variable {api_key_env} (named by --api-key-env) is not set")
            headers["Authorization"] = f"Bearer {key}"
        self.ca_bundle = None if ca_bundle is None else os.fspath(ca_bundle)
        https = any(u.startswith("https://") for u in self.urls)
        # Built (and a given bundle checked) even for http-only URLs: a bad path is an error anyway.
        tls = tls_context(self.ca_bundle) if https or self.ca_bundle is not None else None
        # The key stays in the transport's headers and this closure only: no attribute holds it.
        self._scrub = _scrubber(key)
        self._client = _Transport(headers, self.timeout, int(max_connections), tls)
        self._rr = itertools.count()
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self.stats = {"requests": 0, "retries": 0, "errors": 0}
        self._card: dict[str, Any] | None = None
        if model and https:
            self._check_tls(tls)  # without `model`, the /v1/models lookup below finds a bad certificate
        self.model = model if model else self._only_model()

    def __repr__(self) -> str:
        key = f", api_key_env={self.api_key_env!r}" if self.api_key_env else ""
        return f"APITeacher({self.urls!r}, model={self.model!r}{key})"

    def __getstate__(self):
        raise TypeError("APITeacher holds an API key and cannot be pickled")

    def close(self) -> None:
        self._client.close()

    def _check_tls(self, context: ssl.SSLContext) -> None:
        """One TLS handshake per https URL: an unverifiable certificate raises `APIError` now, before
        any prompt is sent. Other failures (refused, timed out) are left to the requests' retries."""
        for url in self.urls:
            parts = urlsplit(url)
            if parts.scheme != "https":
                continue
            try:
                with socket.create_connection((parts.hostname, parts.port or 443), self.timeout) as sock:
                    with context.wrap_socket(sock, server_hostname=parts.hostname):
                        pass
            except ssl.SSLError as err:
                if _tls_is_permanent(err):
                    raise APIError(self._scrub(_tls_error(url, err)), retryable=False) from None
            except OSError:
                pass

    # --- identity ---------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """``{"kind": "api", "name": model, "endpoints": [base URLs], "capture_temperature": 1.0}`` (no key)."""
        return {
            "kind": "api",
            "name": self.model,
            "endpoints": sorted(self.urls),
            "capture_temperature": CAPTURE_TEMPERATURE,
        }

    def tokenizer_info(self) -> dict[str, Any] | None:
        """The ``tokenizer`` entry (``{"name", "vocab_hash"}``) of the model's ``/v1/models`` card, if any
        (None also when the card cannot be fetched: it only documents the store)."""
        try:
            card = self._model_card()
        except APIError:
            return None
        tok = card.get("tokenizer") if card else None
        return tok if isinstance(tok, dict) else None

    def _model_card(self) -> dict[str, Any] | None:
        if self._card is None:
            data = self._send("GET", "/models", None)
            cards = [c for c in data.get("data", []) if isinstance(c, dict)]
            self._card = next((c for c in cards if c.get("id") == getattr(self, "model", None)), {})
            self._cards = cards
        return self._card

    def _only_model(self) -> str:
        self._model_card()
        names = [c.get("id") for c in self._cards]
        if len(names) != 1 or not isinstance(names[0], str):
            raise ValueError(f"{self.urls[0]}/models lists models {names!r}; choose one with --model")
        self._card = self._cards[0]
        return names[0]

    # --- answering --------------------------------------------------------------------------

    def complete(self, requests: Sequence[Request], settings: GenerationSettings) -> list[Completion]:
        """Answer ``requests`` in order, one HTTP request each (see the module docstring)."""
        return [self._complete_one(r, settings) for r in requests]

    def _complete_one(self, req: Request, settings: GenerationSettings) -> Completion:
        k = int(settings.top_logprobs)
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": int(settings.max_new_tokens),
            "temperature": float(settings.temperature),
            "top_p": float(settings.top_p),
            "seed": int(settings.seed),
            "n": 1,
        }
        use_chat = req.messages is not None or self.chat == "always"
        if use_chat:
            if self.chat == "never":
                raise APIError(f"prompt {req.id!r} is a chat but chat='never'", retryable=False)
            msgs = (
                [dict(m) for m in req.messages]
                if req.messages is not None
                else [{"role": "user", "content": req.prompt}]
            )
            body["messages"] = msgs
            if k:
                body.update(logprobs=True, top_logprobs=k)
            data = self._send("POST", "/chat/completions", body)
        else:
            body["prompt"] = req.prompt
            if k:
                body["logprobs"] = k
            data = self._send("POST", "/completions", body)
        try:
            return _parse(req.id, data, k, use_chat)
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise APIError(
                f"unexpected response shape from the endpoint ({type(err).__name__}: {err})"
            ) from None

    # --- HTTP with the one retry layer -------------------------------------------------------

    def _send(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        attempt = 0
        while True:
            with self._lock:
                url = self.urls[next(self._rr) % len(self.urls)] + path
                self.stats["requests"] += 1
            retry_after = None
            try:
                status, headers, payload = self._client.request(method, url, body)
            except TimeoutError:  # socket.timeout: connect or a read took longer than `timeout`
                error, status = f"timed out after {self.timeout:g} s ({url})", None
            except (OSError, http.client.HTTPException) as err:  # refused, reset, dropped mid-response
                if isinstance(err, ssl.SSLError) and _tls_is_permanent(err):
                    # Configuration, not chance (untrusted certificate, not a TLS server): never retried.
                    with self._lock:
                        self.stats["errors"] += 1
                    raise APIError(
                        self._scrub(_tls_error(url, err)), attempts=attempt + 1, retryable=False
                    ) from None
                error, status = f"connection failed: {type(err).__name__} ({url})", None
            else:
                if status == 200:
                    try:
                        data = json.loads(payload)
                        if not isinstance(data, dict):
                            raise ValueError("not a JSON object")
                        return data
                    except ValueError:
                        error = f"malformed JSON in a 200 response ({url})"
                else:
                    error = f"HTTP {status} from {url}: {self._scrub(_error_text(payload))}"
                    if status == 429:
                        retry_after = _retry_after(headers.get("retry-after"))
                    elif status < 500:
                        with self._lock:
                            self.stats["errors"] += 1
                        raise APIError(error, status=status, attempts=attempt + 1, retryable=False)
            if attempt >= self.max_retries:
                with self._lock:
                    self.stats["errors"] += 1
                raise APIError(
                    f"{error}; gave up after {attempt + 1} attempts", status=status, attempts=attempt + 1
                )
            with self._lock:
                self.stats["retries"] += 1
                jitter = self._rng.random()
            # Full jitter: uniform in [0, backoff * 2^attempt], capped; Retry-After is a floor.
            delay = jitter * min(self.max_backoff, self.backoff * 2**attempt)
            if retry_after is not None:
                delay = max(delay, min(retry_after, self.max_retry_after))
            time.sleep(delay)
            attempt += 1


def _parse(rid: str, data: dict[str, Any], k: int, chat: bool) -> Completion:
    """A `Completion` from one response; token-level fields only when the endpoint gave ids."""
    choice = data["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    prompt_ids = choice.get("prompt_token_ids") or data.get("prompt_token_ids")
    comp_ids = choice.get("token_ids")
    top_ids = top_lps = None
    if k and comp_ids is not None and choice.get("top_token_ids") is not None and choice.get("logprobs"):
        top_ids = choice["top_token_ids"]
        if choice.get("top_token_logprobs") is not None:  # (n, k) values aligned with top_token_ids
            top_lps = choice["top_token_logprobs"]
        elif chat:
            top_lps = [[e["logprob"] for e in tok["top_logprobs"]] for tok in choice["logprobs"]["content"]]
        else:
            # Legacy completions carry {token text: logprob} per position; aligned with top_token_ids
            # only when no two ids share a text (then the dict has k entries, likeliest first).
            dicts = choice["logprobs"]["top_logprobs"]
            if all(len(d) == len(row) for d, row in zip(dicts, top_ids)):
                top_lps = [list(d.values()) for d in dicts]
        n = len(comp_ids)
        if (
            top_lps is None
            or len(top_lps) != n
            or len(top_ids) != n
            or any(len(r) != k for r in top_ids + top_lps)
        ):
            top_ids = top_lps = None  # not recoverable: keep the completion without top-k
    usage = data.get("usage") or {}
    return Completion(
        id=rid,
        text=text if isinstance(text, str) else "",
        finish_reason=str(choice.get("finish_reason") or "unknown"),
        prompt_token_ids=[int(t) for t in prompt_ids] if prompt_ids is not None else None,
        completion_token_ids=[int(t) for t in comp_ids] if comp_ids is not None else None,
        top_ids=top_ids,
        top_logprobs=top_lps,
        usage={
            "prompt_tokens": int(usage.get("prompt_tokens", len(prompt_ids or []))),
            "completion_tokens": int(usage.get("completion_tokens", len(comp_ids or []))),
        },
    )

"""`APITeacher`: any OpenAI-compatible HTTP endpoint (a hosted API, vLLM, llama.cpp, `distill serve`).

Plain-text prompts go to ``/v1/completions``, chats to ``/v1/chat/completions`` (``chat="auto"``).
With ``settings.top_logprobs = k > 0`` the request asks for log-probabilities (``logprobs=k`` on
completions, ``logprobs=true, top_logprobs=k`` on chat). The server's kind comes from its
``/v1/models`` card (`distill.models.server`): to vLLM (``owned_by: "vllm"``) every request also
sends ``return_token_ids: true`` (ids of the prompt and of the completion, its final EOS included)
and ``return_tokens_as_token_ids: true`` (every top-k entry reads ``"token_id:N"``: vLLM has no
``top_token_ids``); `distill serve` adds ``prompt_token_ids``, ``token_ids`` and ``top_token_ids``
by itself; a hosted API's top-k comes as strings and is kept as bytes (``Completion.top_bytes``).
``extra_body`` is merged into every request. Parsing: `distill.models.responses`; the checks
before the first prompt (k limit, tokenizer probe, not an OpenAI endpoint) and vLLM scoring
(``prompt_logprobs``, `APITeacher.score`): `distill.models.server`.

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
from distill.models.responses import parse_completion

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
        extra_body: dict[str, Any] | None = None,
        revision: str | None = None,
        tokenizer: str | os.PathLike[str] | None = None,
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
        if extra_body is not None and not isinstance(extra_body, dict):
            raise ValueError(f"extra_body (--extra-body) must be a JSON object, got {extra_body!r:.80}")
        self.extra_body = dict(extra_body or {})
        self.revision = None if revision is None else str(revision)
        self.tokenizer_dir = None if tokenizer is None else os.fspath(tokenizer)
        self._tok = self._tok_info = None
        if self.tokenizer_dir is not None:  # a local copy: loaded now, so a bad path fails before any request
            from distill.models.server import load_local_tokenizer

            self._tok, self._tok_info = load_local_tokenizer(self.tokenizer_dir)
        self.kind: str | None = None
        """Server kind from its /v1/models card (`distill.models.server.server_kind`); None until known."""
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
        self._kind_lock = threading.Lock()
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
        """``{"kind": "api", "name": model, "revision", "tokenizer", "extra_body", "capture_temperature": 1.0}``.

        Follows the model, not the address: no URL (replicas and a moved host reuse a store's records).
        ``revision``: ``--teacher-revision`` (marks retrained weights served under the same name);
        ``tokenizer``: the ``--teacher-tokenizer`` copy's ``{"name", "vocab_hash"}`` (None without one);
        ``extra_body``: the extra request fields (they may change the answers). What the server itself
        reports (kind, weights fingerprint, tokenizer) is checked by `prepare` on every run that asks.
        No key, no URL."""
        return {
            "kind": "api",
            "name": self.model,
            "revision": self.revision,
            "tokenizer": self._tok_info,
            "extra_body": self.extra_body or None,
            "capture_temperature": CAPTURE_TEMPERATURE,
        }

    @property
    def endpoints(self) -> list[str]:
        """The base URLs (recorded in a store's manifest for information, never hashed)."""
        return sorted(self.urls)

    def tokenizer_info(self) -> dict[str, Any] | None:
        """``{"name", "vocab_hash"}`` of the ``--teacher-tokenizer`` copy, else the ``tokenizer`` entry of
        the model's ``/v1/models`` card (`distill serve`), else vLLM's probe fingerprint
        (``{"name", "vocab_hash": None, "probe_hash"}``, `distill.models.server`); None when the server
        tells nothing (a hosted API) or cannot be reached (it only documents the store)."""
        if self._tok_info is not None:
            return self._tok_info
        from distill.models.server import server_tokenizer_info

        try:
            return server_tokenizer_info(self)
        except APIError:
            return None

    def prepare(self, settings: GenerationSettings, known: dict[str, Any] | None = None) -> dict[str, Any]:
        """Checks before the first prompt is sent; returns what the server reports (``{"kind",
        "fingerprint", "system_fingerprint", "tokenizer"}``) for the store's manifest. Raises
        ``ValueError`` (one line, naming the URL) for an endpoint that is not OpenAI-compatible, a
        ``--top-k`` above the server's limit (found with a one-token probe on vLLM and `distill serve`;
        20 for hosted APIs), or a ``--teacher-tokenizer`` that tokenises a probe text differently from
        the server (vLLM's ``/tokenize``; `distill serve`'s vocabulary hash). ``known``: the store's
        record of the server from an earlier run (a k checked then is not probed again)."""
        from distill.models.server import prepare

        return prepare(self, settings, known)

    def _model_card(self) -> dict[str, Any] | None:
        if self._card is None:
            data = self._send("GET", "/models", None)
            if not isinstance(data.get("data"), list):
                raise APIError(
                    f"{self.urls[0]}/models answered without a 'data' list of models: not an "
                    "OpenAI-compatible endpoint",
                    retryable=False,
                )
            cards = [c for c in data.get("data", []) if isinstance(c, dict)]
            self._card = next((c for c in cards if c.get("id") == getattr(self, "model", None)), {})
            self._cards = cards
            if getattr(self, "model", None) is not None:
                self._set_kind()
        return self._card

    def _set_kind(self) -> None:
        from distill.models.server import server_kind

        self.kind = server_kind(self._card or {})

    def _only_model(self) -> str:
        self._model_card()
        names = [c.get("id") for c in self._cards]
        if len(names) != 1 or not isinstance(names[0], str):
            raise ValueError(f"{self.urls[0]}/models lists models {names!r}; choose one with --model")
        self._card = self._cards[0]
        self.model = names[0]
        self._set_kind()
        return names[0]

    # --- answering --------------------------------------------------------------------------

    def complete(self, requests: Sequence[Request], settings: GenerationSettings) -> list[Completion]:
        """Answer ``requests`` in order, one HTTP request each (see the module docstring)."""
        return [self._complete_one(r, settings) for r in requests]

    def _known_kind(self) -> str:
        """The server's kind, looking its card up once if `prepare` (or the constructor) has not."""
        if self.kind is None:
            with self._kind_lock:
                if self.kind is None:
                    try:
                        self._model_card()
                    except APIError as err:
                        if not err.retryable:
                            self.kind = "openai"  # no card: ask as a hosted API would be asked
                        return "openai"  # a flaky server: looked up again with the next request
        return self.kind

    def request_body(self, settings: GenerationSettings, **fields: Any) -> dict[str, Any]:
        """The JSON body of one request: the generation settings, vLLM's token-id switches when the server
        is vLLM (``return_token_ids``, ``return_tokens_as_token_ids``), ``fields``, then ``extra_body``."""
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": int(settings.max_new_tokens),
            "temperature": float(settings.temperature),
            "top_p": float(settings.top_p),
            "seed": int(settings.seed),
            "n": 1,
        }
        if self._known_kind() == "vllm":
            body.update(return_token_ids=True, return_tokens_as_token_ids=True)
        body.update(fields)
        body.update(self.extra_body)
        return body

    def _complete_one(self, req: Request, settings: GenerationSettings) -> Completion:
        k = int(settings.top_logprobs)
        body = self.request_body(settings)
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
            return parse_completion(req.id, data, k, use_chat)
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise APIError(
                f"unexpected response shape from the endpoint ({type(err).__name__}: {err})"
            ) from None

    # --- HTTP with the one retry layer -------------------------------------------------------

    def score(
        self, sequences: Sequence[Sequence[int]], k: int
    ) -> list[tuple[list[list[int]], list[list[float]]]]:
        """The teacher's top-k next-token distribution at every position of each token-id sequence:
        ``[(top ids (L, k), log-probabilities (L, k)), ...]``, row i the distribution of token i given the
        tokens before it (row 0 zeros). Through vLLM's ``prompt_logprobs`` (echo-style scoring of text the
        teacher did not write: on-policy distillation); other servers raise `APIError`."""
        from distill.models.server import score

        return score(self, sequences, k)

    def _send(
        self, method: str, path: str, body: dict[str, Any] | None, *, retries: int | None = None
    ) -> dict[str, Any]:
        max_retries = self.max_retries if retries is None else retries
        attempt = 0
        while True:
            with self._lock:
                base = self.urls[next(self._rr) % len(self.urls)]
                url = path if path.startswith(("http://", "https://")) else base + path
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
            if attempt >= max_retries:
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


_parse = parse_completion  # the old name (tests and callers import it from here)

"""From what a user typed after ``--teacher`` / ``--student`` to a model: the one spec-to-model factory.

``http://...`` / ``https://...`` (one or several replicas of one model) -> `APITeacher`; one local
directory -> `HFTeacher`. Every command that opens a language model from a spec (`distill generate`,
`distill eval`, `distill route fit`, the memory probe) goes through `open_model`, so a spec means the
same thing everywhere and a bad one gets the same one-line error, naming the flag.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distill.models.base import Teacher


def is_url(spec: str) -> bool:
    """Whether ``spec`` names an HTTP(S) endpoint rather than a local directory."""
    return spec.startswith(("http://", "https://"))


def open_model(
    spec: str | Sequence[str],
    *,
    role: str = "teacher",
    device: str = "cpu",
    batch_size: int = 1,
    dtype: str | None = None,
    model: str | None = None,
    api_key_env: str | None = None,
    timeout: float | None = None,
    chat: str = "auto",
    max_retries: int | None = None,
    max_connections: int = 64,
    ca_bundle: str | None = None,
    trust_remote_code: bool = False,
    key_flag: str = "--api-key-env",
    extra_body: dict[str, Any] | None = None,
    revision: str | None = None,
    tokenizer: str | None = None,
) -> Teacher:
    """The model behind ``spec``: URL(s) -> `APITeacher`, one local directory -> `HFTeacher`.

    ``role`` names the flag in errors (``--teacher``, ``--student``). Local-only settings:
    ``device``, ``batch_size`` (prompts decoded together), ``dtype``. Endpoint-only settings:
    ``model`` (the served model's id, when the endpoint serves several), ``api_key_env`` (NAME of
    the environment variable holding the key, never the key), ``timeout`` (seconds per request),
    ``chat`` (``"auto"``, ``"always"``, ``"never"``), ``max_retries``, ``max_connections`` and
    ``ca_bundle`` (PEM file of trusted CAs); a URL carrying credentials is refused
    (`distill.models.http.check_base_url`; ``key_flag`` names the flag for the key instead).
    ``extra_body`` (a JSON object merged into every request), ``revision`` (``--teacher-revision``) and
    ``tokenizer`` (``--teacher-tokenizer``, a local copy of the served tokenizer) apply to URLs only.
    ``trust_remote_code``: a local checkpoint may run the code it ships (`distill.models.loading`). Raises ``ValueError`` (or ``FileNotFoundError``) with
    one line naming the flag and the value, before any prompt is sent: the endpoint is reached here
    (model lookup, TLS check).
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise ValueError(f"--{role}: no model given")
    from distill.models.http import APIError, check_base_url, redact_url

    urls = [s for s in specs if is_url(s)]
    if urls and len(urls) != len(specs):
        shown = [redact_url(s) for s in specs]
        raise ValueError(f"--{role}: mix of URLs and local directories {shown!r}; give one kind")
    if urls:
        from distill.models.api import APITeacher

        urls = [check_base_url(u, f"--{role}", key_flag) for u in urls]

        kw: dict[str, Any] = {
            "model": model,
            "api_key_env": api_key_env,
            "chat": chat,
            "ca_bundle": ca_bundle,
        }
        kw["max_connections"] = max_connections
        kw.update(extra_body=extra_body, revision=revision, tokenizer=tokenizer)
        if timeout is not None:
            kw["timeout"] = timeout
        if max_retries is not None:
            kw["max_retries"] = max_retries
        try:
            return APITeacher(urls if len(urls) > 1 else urls[0], **kw)
        except APIError as err:  # e.g. the /v1/models lookup refused: one clear line
            raise ValueError(f"--{role} {' '.join(urls)}: {err}") from None
    for value, flag in (
        (extra_body, "--extra-body"),
        (revision, "--teacher-revision"),
        (tokenizer, "--teacher-tokenizer"),
    ):
        if value is not None:
            raise ValueError(f"{flag} applies to URL teachers; --{role} {specs[0]} is a local directory")
    if ca_bundle is not None:
        raise ValueError(f"--ca-bundle {ca_bundle!r} applies to https URLs; --{role} is a local directory")
    if len(specs) != 1:
        raise ValueError(f"--{role}: one local model directory at a time, got {specs!r}")
    path = Path(specs[0])
    if not path.is_dir():
        raise FileNotFoundError(f"--{role}: no such model directory or URL: {specs[0]}")
    from distill.models.hf import HFTeacher

    return HFTeacher(
        path, device=device, batch_size=batch_size, dtype=dtype, trust_remote_code=trust_remote_code
    )

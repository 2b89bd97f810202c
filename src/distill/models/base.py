"""The model interface shared by local (`HFTeacher`) and HTTP (`APITeacher`) models.

A teacher is any `Model`, and so is a student being evaluated or served: the names `HFTeacher` and
`APITeacher` are historical and stay for compatibility; both serve either role.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class GenerationSettings:
    """How the teacher is asked to answer. Part of every record's id: a changed setting never reuses a record."""

    max_new_tokens: int = 128
    """Upper bound on generated tokens per prompt; >= 1."""
    temperature: float = 0.0
    """Sampling temperature; 0 means greedy decoding. Must be finite and >= 0."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; ignored when greedy."""
    top_logprobs: int = 0
    """How many top log-probabilities to return per generated token (0 = none), like OpenAI's ``top_logprobs``."""
    seed: int = 0
    """Sampling seed, so a sampled run can be repeated."""

    def __post_init__(self) -> None:
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if int(self.top_logprobs) < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {self.top_logprobs!r}")


@dataclass(frozen=True)
class Request:
    """One prompt for the teacher: plain text (``prompt``) or a chat (``messages``), exactly one of them."""

    id: str
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError(f"request {self.id!r}: give exactly one of prompt and messages")


@dataclass
class Completion:
    """The teacher's answer to one `Request`.

    Token-level fields are ``None`` when the teacher does not expose them (a black-box API).
    ``top_ids`` (or ``top_bytes``) and ``top_logprobs`` are ``(n_completion_tokens, k)`` lists: row j is
    the teacher's top-k next-token distribution at the step that produced completion token j.
    """

    id: str
    text: str
    finish_reason: str
    """"stop" (end of sequence or a stop string), "length" (hit max_new_tokens), or the endpoint's reason."""
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    usage: dict[str, int] = field(default_factory=dict)
    """``{"prompt_tokens": n, "completion_tokens": m}`` as reported or counted."""
    completion_token_bytes: list[bytes] | None = None
    """The raw bytes of each generated token, in order (n items), from the API's ``bytes`` field or the
    token strings; None when the endpoint gave neither. ``b"".join(...)`` is the completion's UTF-8
    (modulo special tokens a server hides from text)."""
    top_bytes: list[list[bytes]] | None = None
    """``(n, k)``: the bytes of each top-k alternative at each step, when the endpoint gives top-k as
    strings, not ids (hosted APIs; ``top_ids`` is None then). ``top_logprobs`` is in the same order.
    Entries whose strings collide are kept, never merged."""


@runtime_checkable
class Model(Protocol):
    """Anything that answers requests, teacher or student. Implementations: `HFTeacher` (local),
    `APITeacher` (HTTP)."""

    def identity(self) -> dict[str, Any]:
        """Who answers: at least ``{"kind", "name"}`` and, when known, ``{"tokenizer": {"name", "vocab_hash"}}``.

        Never contains secrets (API keys)."""
        ...

    def complete(self, requests: Sequence[Request], settings: GenerationSettings) -> list[Completion]:
        """Answer ``requests`` in order (one `Completion` each) or raise for the whole call."""
        ...


Teacher = Model
"""The same Protocol under the name the pipeline's first stage uses (a teacher is a `Model`)."""

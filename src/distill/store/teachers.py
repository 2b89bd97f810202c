"""What `generate` checks about its teachers: k within their limits, each HTTP server's report before
the first prompt (`prepare_teachers`), and the error for an answer that came without the top-k asked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distill import store
from distill.models.base import GenerationSettings, Teacher


def check_top_k(teachers: Sequence[Teacher], settings: GenerationSettings) -> None:
    """``settings.top_logprobs`` within what each teacher can return (its ``max_top_logprobs``, when it
    has one: a local model's vocabulary, a server's limit), before any request and before a store is
    made: a store is locked to its k, so a k no request can meet would leave a store nothing can fill."""
    k = int(settings.top_logprobs)
    for t in teachers:
        limit = getattr(t, "max_top_logprobs", None)
        if limit is not None and k > int(limit):
            raise ValueError(
                f"top_logprobs (--top-k) {k} exceeds the {int(limit)} log-probabilities per token that "
                f"teacher {t!r} can return; nothing was sent and no store was made"
            )


def remove_new_store(path: Path, existed: bool) -> None:
    for name in (store.MANIFEST, store.FAILURES, ".lock"):
        (path / name).unlink(missing_ok=True)
    if not existed and not any(path.iterdir()):
        path.rmdir()


def prepare_teachers(teachers, settings: GenerationSettings, writer) -> None:
    """The HTTP teachers' checks (`APITeacher.prepare`) before the first prompt; what the server reports
    is recorded in the manifest (``server``, ``endpoints``) and must match what it reported before."""
    old = writer.manifest.get("server") or {}
    reports = [t.prepare(settings, old) for t in teachers if hasattr(t, "prepare")]
    if not reports:
        return
    new = reports[0]
    for r in reports[1:]:  # replicas: the same weights and tokenizer where both report them
        a, b = (new.get("fingerprint"), new.get("tokenizer")), (r.get("fingerprint"), r.get("tokenizer"))
        if all(x is not None and y is not None for x, y in zip(a, b)) and store.canonical(
            a
        ) != store.canonical(b):
            raise ValueError(f"teachers given together report different models: {new!r} vs {r!r}")
    checks = [("fingerprint", old.get("fingerprint"), new.get("fingerprint"))]
    for h in ("vocab_hash", "probe_hash"):
        checks.append(
            (f"tokenizer {h}", (old.get("tokenizer") or {}).get(h), (new.get("tokenizer") or {}).get(h))
        )
    for what, was, now in checks:
        if was and now and was != now:
            raise ValueError(
                f"store {writer.path} holds answers of a server that reported {what} {str(was)[:16]}; "
                f"{' '.join(getattr(teachers[0], 'urls', []))} now reports {str(now)[:16]} (other weights "
                "or tokenizer under the same name): use a new --out (or --teacher-revision to mark them)"
            )
    writer.manifest["server"] = new
    writer.manifest["endpoints"] = sorted({u for t in teachers for u in getattr(t, "urls", [])})
    if not writer.manifest.get("tokenizer") and new.get("tokenizer"):
        writer.manifest["tokenizer"] = new["tokenizer"]


class TextOnlyError(ValueError):
    """Top-k was asked (k > 0) and the endpoint answered without it: no silent downgrade to text."""


def text_only_message(teacher, first: tuple[str, Any], k: int) -> str:
    rid, c = first
    where = " ".join(getattr(teacher, "urls", [])) or repr(teacher)
    if c.completion_token_ids is None and c.completion_token_bytes is None:
        what = "no per-token log-probabilities at all (no logprobs in the answer)"
    else:
        what = f"per-token log-probabilities but no top-{k} alternatives"
    return (
        f"--top-k {k} was asked, but teacher {where} answered prompt {rid!r} with text only: {what}. "
        "Stopped after the first answers (the text-only ones were not stored; the records committed "
        "before are intact). Use an endpoint that returns top-k log-probabilities (vLLM, distill serve, "
        "an OpenAI-compatible API with logprobs), or pass --allow-text-only to keep text-only records"
    )

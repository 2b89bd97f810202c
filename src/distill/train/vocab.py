"""Do the student and the teacher speak the same vocabulary? Compared by token strings, not sizes.

Token-level distillation matches distributions entry by entry, so entry i must be the same token in
both models. Models often pad their embedding matrix past the tokenizer (Qwen2.5: 151,936 vs
152,064 rows); those padded slots hold no token and are ignored. Any difference in the real tokens
is an error before training starts, naming both tokenizers and the first differing token.
"""

from __future__ import annotations

from distill.models.identity import vocab_hash

__all__ = ["check_store_tokenizer", "shared_vocab_size", "token_strings", "vocab_hash"]


def token_strings(tokenizer) -> list[str | None]:
    """Token string of every id from 0 to the largest id the tokenizer knows (``None`` for gaps)."""
    vocab = tokenizer.get_vocab()  # includes added/special tokens
    if not vocab:
        return []
    out: list[str | None] = [None] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        out[i] = tok
    return out


def _name(tokenizer, fallback: str) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or fallback)


def shared_vocab_size(
    student_tokenizer,
    teacher_tokenizer,
    *,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
) -> int:
    """Number of real vocabulary entries both models share; logits are compared on ``[:, :n]``.

    ``*_vocab_size`` are the models' embedding sizes (``config.vocab_size``), which may exceed the
    tokenizer (padding slots). Raises ``ValueError`` naming both tokenizers and the first differing
    token when the real vocabularies differ, or when a model has fewer rows than its tokenizer.
    """
    s, t = token_strings(student_tokenizer), token_strings(teacher_tokenizer)
    s_name = _name(student_tokenizer, "student tokenizer")
    t_name = _name(teacher_tokenizer, "teacher tokenizer")
    for i in range(max(len(s), len(t))):
        a = s[i] if i < len(s) else None
        b = t[i] if i < len(t) else None
        if a != b:
            raise ValueError(
                f"student tokenizer {s_name!r} and teacher tokenizer {t_name!r} differ at token id {i}: "
                f"{a!r} vs {b!r} (vocabularies of {len(s)} and {len(t)} entries); token-level modes "
                "(logits, on-policy) need one tokenizer; use --mode sft across tokenizers"
            )
    n = len(s)
    for who, size, name in (("student", student_vocab_size, s_name), ("teacher", teacher_vocab_size, t_name)):
        if size is not None and size < n:
            raise ValueError(
                f"{who} model has {size} vocabulary rows but its tokenizer {name!r} has {n} tokens"
            )
    return n


def check_store_tokenizer(manifest: dict, student_tokenizer, source: str) -> None:
    """Refuse a store captured with another tokenizer than the student's (token-level modes only).

    Compares the manifest's ``tokenizer.vocab_hash`` with the student's when the store records one;
    else its ``probe_hash`` (a server's tokenisation of a probe text, `distill.models.server.PROBE`:
    vLLM publishes no vocabulary) with the student's tokenisation of the same text. A store recording
    neither is reported by `distill.train.examples` (a note in the data summary), not skipped silently.
    """
    info = (manifest or {}).get("tokenizer") or {}
    theirs = info.get("vocab_hash")
    if not theirs and info.get("probe_hash"):
        from distill.models.server import local_probe_ids, probe_hash

        mine = probe_hash(local_probe_ids(student_tokenizer))
        if mine != info["probe_hash"]:
            raise ValueError(
                f"{source}: the store's teacher ({info.get('name')!r}) tokenises the probe text differently "
                f"from the student's tokenizer {_name(student_tokenizer, 'tokenizer')!r}; token-level modes "
                "need the same tokenizer (or, with --mode logits, the teacher's: --teacher-tokenizer DIR); "
                "use --mode sft across tokenizers"
            )
        return
    if not theirs:
        return
    mine = vocab_hash(student_tokenizer)
    if theirs != mine:
        raise ValueError(
            f"{source}: the store's teacher used tokenizer {info.get('name')!r} (vocab hash {theirs[:12]}), "
            f"not the student's {_name(student_tokenizer, 'tokenizer')!r} (vocab hash {mine[:12]}); "
            "token-level modes need the same tokenizer; use --mode sft across tokenizers"
        )

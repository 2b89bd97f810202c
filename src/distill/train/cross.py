"""Teacher top-k of one tokenizer as sparse targets in another's vocabulary (cross-tokenizer KD).

At each aligned student position (`distill.train.align`) the teacher's top-k alternatives are byte
strings. Each is mapped to the student token the student would write first for it:

1. the token the teacher wrote maps to the student's label there (the student's first token of the
   actual text from that offset);
2. another alternative whose bytes are exactly one student token maps to that token (the vocabularies'
   shared tokens, as in TRL GOLD's exact matches; two identical tokenizers give the identity);
3. otherwise the student's tokenizer encodes ``context + alternative + rest`` (a little of the text
   before the position, from a student token boundary, and the teacher's text after its token) and the
   student token that starts where the alternative starts is the target; when no student token starts
   there (the alternative would merge with the text before it) or the bytes are not valid UTF-8, its
   probability goes to the tail bucket;
4. the teacher's end-of-sequence token maps to the student's; its other special tokens go to the bucket.

Probabilities of alternatives mapping to one student token are summed; what is not mapped is the
tail bucket (``1 - sum``), as in `distill.losses.SparseTargets`. Unaligned positions get no target
(their KD mask is False: CE on the teacher's text only). The tokenizer runs once per distinct query
over a whole store, batched, when the data is loaded; nothing here runs per training step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from distill.models.token_bytes import TokenBytes, token_bytes
from distill.train.align import align, char_start, prefix_lead, stream_lead, token_starts

REST_BYTES = 24
"""How much of the teacher's text after an alternative the student's tokenizer sees (a word or two)."""


@dataclass
class TeacherSide:
    """One completion as the teacher wrote it: its tokens' bytes and its top-k alternatives."""

    token_bytes: list[bytes]
    """``(n,)`` bytes of each generated token (``b""`` for special tokens)."""
    eligible: np.ndarray
    """``(n,)`` bool: positions a student position may align with (not special, or the EOS token)."""
    alt_bytes: list[list[bytes | None]]
    """``(n, k)`` bytes of each alternative; ``None``: a special token other than EOS (to the bucket)."""
    alt_eos: np.ndarray
    """``(n, k)`` bool: the alternative is the teacher's end-of-sequence token."""
    logprobs: np.ndarray
    """``(n, k)`` float: the alternatives' log-probabilities over the teacher's vocabulary (-inf: padding)."""


def teacher_from_ids(completion_ids, topk_ids, topk_logprobs, tb: TokenBytes) -> TeacherSide:
    """A `TeacherSide` from stored token ids and the teacher's `TokenBytes` (a store of ids)."""
    ids = np.asarray(completion_ids, dtype=np.int64)
    top = np.asarray(topk_ids, dtype=np.int64).reshape(len(ids), -1)
    if len(ids) and (ids.max() >= len(tb) or top.max() >= len(tb) or ids.min() < 0 or top.min() < 0):
        raise ValueError(
            f"teacher token id {int(max(ids.max(), top.max()))} is outside the teacher tokenizer ({len(tb)} ids)"
        )
    eos = np.isin(top, list(tb.eos_ids)) if tb.eos_ids else np.zeros(top.shape, dtype=bool)
    special = tb.special[top] & ~eos
    table = tb.table
    alts = [
        [None if special[i, r] else table[t] for r, t in enumerate(row)] for i, row in enumerate(top.tolist())
    ]
    eligible = ~tb.special[ids] | (np.isin(ids, list(tb.eos_ids)) if tb.eos_ids else False)
    lps = np.asarray(topk_logprobs, dtype=np.float64).reshape(top.shape)
    return TeacherSide([table[i] for i in ids.tolist()], np.asarray(eligible, dtype=bool), alts, eos, lps)


def teacher_from_bytes(completion_token_bytes, topk_bytes, topk_logprobs) -> TeacherSide:
    """A `TeacherSide` from a hosted API's token bytes (store format 2, ``topk_kind == "bytes"``).

    Strings collide there (two tokens spelled alike are two entries): they are kept apart here and
    summed by the projection when they map to one student token."""
    toks = [bytes(b) for b in completion_token_bytes]
    alts = [[bytes(b) for b in row] for row in topk_bytes]
    lps = np.asarray(topk_logprobs, dtype=np.float64).reshape(len(alts), -1) if alts else np.zeros((0, 1))
    eligible = np.array([len(b) > 0 for b in toks], dtype=bool)
    return TeacherSide(toks, eligible, alts, np.zeros(lps.shape, dtype=bool), lps)


def trailing_special(side: TeacherSide, text: bytes) -> TeacherSide:
    """A server that spells its end-of-sequence token as text (``b"<eos>"``, ``b"</s>"``) after the
    completion: that trailing token is the EOS (no bytes of the text), and alternatives spelled like it
    are the EOS too. ``side`` unchanged when its tokens spell the text (or not even its start)."""
    stream = b"".join(side.token_bytes)
    lead = 1 if stream[:1] == b" " and not text[:1] == b" " and stream[1:].startswith(text) else 0
    if len(stream) <= len(text) + lead or not stream[lead:].startswith(text):
        return side
    ends = np.cumsum([len(b) for b in side.token_bytes])
    cut = np.flatnonzero(ends == len(text) + lead)
    if not len(cut) or cut[0] != len(side.token_bytes) - 2:
        return side  # only one trailing token is an end-of-sequence marker
    n = int(cut[0]) + 1
    marker = side.token_bytes[n]
    eos = side.alt_eos.copy()
    alts = [list(row) for row in side.alt_bytes]
    for i, row in enumerate(alts):
        for r, a in enumerate(row):
            if a == marker:
                eos[i, r], row[r] = True, None
    eligible = side.eligible.copy()
    eligible[n] = True
    return TeacherSide([*side.token_bytes[:n], b""], eligible, alts, eos, side.logprobs)


@dataclass
class Projected:
    """Targets of one example's completion positions in the student's vocabulary."""

    ids: np.ndarray
    """``(m, K)`` int64 student ids (0 where padding)."""
    logprobs: np.ndarray
    """``(m, K)`` float32 summed teacher log-probabilities (-inf: padding; a row of -inf: unaligned)."""
    aligned: np.ndarray
    """``(m,)`` bool: the position's KD term counts."""
    teacher_sorted: np.ndarray
    """``(m, k)`` float32: the teacher's own top-k log-probabilities, descending (for ULD)."""


class Projector:
    """Collects examples (`add`), then maps all their alternatives at once (`run`)."""

    def __init__(self, student_tokenizer, top_k: int) -> None:
        if top_k < 1:
            raise ValueError(f"cross_top_k must be >= 1, got {top_k}")
        self.tok = student_tokenizer
        self.tb = token_bytes(student_tokenizer)
        self.top_k = top_k
        self._queries: dict[tuple[str, int], int] = {}
        self._records: list[tuple[int, int, list]] = []  # (m, k, [(j, [(lp, target)], teacher lps)])
        self.unspelled = 0
        """Records whose teacher or student tokens do not spell the completion (nothing aligned)."""

    def _query(self, text: bytes, ctx: int, pos: int, alt: bytes, rest_from: int) -> int | None:
        rest = text[rest_from : rest_from + REST_BYTES]
        raw = text[ctx:pos] + alt + rest
        for cut in range(4):  # the window may end inside a character
            try:
                s = raw[: len(raw) - cut].decode("utf-8") if cut else raw.decode("utf-8")
                break
            except UnicodeDecodeError:
                continue
        else:
            return None
        return self._queries.setdefault((s, pos - ctx), len(self._queries))

    def add(self, text: str | bytes, teacher: TeacherSide, student_ids) -> int:
        """Queue one example: its completion text, the teacher's side, the student's completion ids
        ``(m,)`` (the labels, EOS included; they may spell only the start of the text). Returns its index in `run`'s result."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        s_ids = np.asarray(student_ids, dtype=np.int64)
        k = teacher.logprobs.shape[1] if teacher.logprobs.ndim == 2 and len(teacher.logprobs) else 1
        entry: list = []
        self._records.append((len(s_ids), k, entry))
        teacher = trailing_special(teacher, data)
        t_lead = prefix_lead(b"".join(teacher.token_bytes), data)  # a teacher cut at its context: a prefix
        # The student's labels may stop early (an example cut to max_length): a prefix of the text will do.
        s_lead = prefix_lead(b"".join(self.tb.table[i] for i in s_ids.tolist()), data)
        if t_lead is None or s_lead is None:
            self.unspelled += 1
            return len(self._records) - 1
        t_len = np.fromiter(
            (len(b) for b in teacher.token_bytes), dtype=np.int64, count=len(teacher.token_bytes)
        )
        t_st = token_starts(t_len, t_lead)
        t_end = np.maximum(np.cumsum(t_len) - t_lead, 0)  # where each teacher token ends in the text
        s_st = token_starts(self.tb.lengths[s_ids], s_lead)
        where = align(t_st, teacher.eligible, s_st)
        by_bytes, eos = self.tb.by_bytes, self.tb.eos_id
        for j in np.flatnonzero(where >= 0).tolist():
            i = int(where[j])
            pos = int(s_st[j])
            ctx = char_start(data, int(s_st[j - 1])) if j > 0 else pos
            fresh = j == 0 and s_lead == 1  # the student's first token carries its dummy-prefix space
            actual = teacher.token_bytes[i]
            if i == 0 and t_lead == 1 and actual[:1] == b" ":
                actual = actual[1:]
            mapped = []
            for r, lp in enumerate(teacher.logprobs[i].tolist()):
                if lp == -math.inf:
                    continue
                a = teacher.alt_bytes[i][r]
                if teacher.alt_eos[i, r]:
                    target = eos
                elif not a:
                    target = None
                else:
                    if i == 0 and t_lead == 1 and a[:1] == b" ":
                        a = a[1:]  # the teacher's decoder drops its own dummy-prefix space too
                    # The token the teacher wrote: the student's own label there is, by definition, the
                    # first token it writes for this text (exact, and free).
                    hit = int(s_ids[j]) if a == actual else None if fresh or not a else by_bytes.get(a)
                    target = hit if hit is not None else (
                        None if not a else ("q", self._query(data, ctx, pos, a, int(t_end[i]))))  # fmt: skip
                    if target == ("q", None):
                        target = None
                mapped.append((lp, target))
            entry.append((j, mapped, sorted(teacher.logprobs[i].tolist(), reverse=True)))
        return len(self._records) - 1

    def _resolve(self) -> list[int | None]:
        """The student id each query's alternative maps to (None: the bucket)."""
        keys = list(self._queries)
        out: list[int | None] = [None] * len(keys)
        backend = self.tok.backend_tokenizer
        tb = self.tb
        for lo in range(0, len(keys), 4096):
            chunk = keys[lo : lo + 4096]
            encs = backend.encode_batch([s for s, _ in chunk], add_special_tokens=False)
            for n, ((s, ctx), enc) in enumerate(zip(chunk, encs)):
                ids = np.asarray(enc.ids, dtype=np.int64)
                lead = stream_lead(b"".join(tb.table[i] for i in enc.ids), s.encode("utf-8"))
                if lead is None or not len(ids):
                    continue
                st = token_starts(tb.lengths[ids], lead)
                hit = np.flatnonzero((st == ctx) & (tb.lengths[ids] > 0))
                if len(hit):
                    out[lo + n] = int(ids[hit[0]])
        return out

    def run(self) -> list[Projected]:
        """Targets of every example added, in order."""
        resolved = self._resolve()
        K = self.top_k
        result = []
        for m, k, entry in self._records:
            ids = np.zeros((m, K), dtype=np.int64)
            lps = np.full((m, K), -np.inf, dtype=np.float32)
            aligned = np.zeros(m, dtype=bool)
            tsorted = np.full((m, k), -np.inf, dtype=np.float32)
            for j, mapped, t_sorted in entry:
                mass: dict[int, float] = {}
                for lp, target in mapped:
                    if isinstance(target, tuple):
                        target = resolved[target[1]]
                    if target is not None:
                        mass[target] = mass.get(target, 0.0) + math.exp(lp)
                top = sorted(mass.items(), key=lambda kv: -kv[1])[:K]
                for c, (sid, p) in enumerate(top):
                    ids[j, c], lps[j, c] = sid, math.log(min(p, 1.0))
                aligned[j] = True
                tsorted[j, : len(t_sorted)] = t_sorted
            result.append(Projected(ids, lps, aligned, tsorted))
        return result


__all__ = [
    "Projected",
    "Projector",
    "TeacherSide",
    "teacher_from_bytes",
    "teacher_from_ids",
    "trailing_special",
    "REST_BYTES",
]

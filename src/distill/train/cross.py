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

from dataclasses import dataclass

import numpy as np

from distill.models.token_bytes import TokenBytes, token_bytes
from distill.train.align import align, char_start, prefix_lead, token_starts

REST_BYTES = 24
"""How much of the teacher's text after an alternative the student's tokenizer sees (a word or two)."""


PAD_LOGPROB = -60000.0
"""Entries at or below this log-probability are padding (a short row of an API's top-k: float16's minimum)."""
_BUCKET, _QUERY = -2, -1  # target codes before resolution; queries are coded -(10 + index)


@dataclass
class Vocab:
    """The bytes of a set of ids: a tokenizer's `TokenBytes`, or the strings of one API answer interned."""

    table: list[bytes]
    special: np.ndarray
    eos_ids: frozenset[int]


@dataclass
class TeacherSide:
    """One completion as the teacher wrote it: its tokens and its top-k alternatives, as ids of ``vocab``."""

    tokens: np.ndarray
    """``(n,)`` int64: the generated tokens."""
    alts: np.ndarray
    """``(n, k)`` int64: the top-k alternatives at each step."""
    logprobs: np.ndarray
    """``(n, k)`` float64: their log-probabilities over the teacher's vocabulary (-inf or <= -60000: padding)."""
    vocab: Vocab | TokenBytes
    """What the ids stand for (``table``: bytes, ``special``: no bytes of the text, ``eos_ids``)."""

    @property
    def token_bytes(self) -> list[bytes]:
        return [self.vocab.table[t] for t in self.tokens.tolist()]

    @property
    def eligible(self) -> np.ndarray:
        """``(n,)``: positions a student position may align with (not special, or the EOS token)."""
        eos = np.isin(self.tokens, list(self.vocab.eos_ids)) if self.vocab.eos_ids else False
        return ~self.vocab.special[self.tokens] | eos


def teacher_from_ids(completion_ids, topk_ids, topk_logprobs, tb: TokenBytes) -> TeacherSide:
    """A `TeacherSide` from stored token ids and the teacher's `TokenBytes` (a store of ids)."""
    ids = np.asarray(completion_ids, dtype=np.int64)
    top = np.asarray(topk_ids, dtype=np.int64).reshape(len(ids), -1)
    if len(ids) and (ids.max() >= len(tb) or top.max() >= len(tb) or ids.min() < 0 or top.min() < 0):
        raise ValueError(
            f"teacher token id {int(max(ids.max(), top.max()))} is outside the teacher tokenizer ({len(tb)} ids)"
        )
    lps = np.asarray(topk_logprobs, dtype=np.float64).reshape(top.shape)
    return TeacherSide(ids, top, lps, tb)


def teacher_from_bytes(completion_token_bytes, topk_bytes, topk_logprobs) -> TeacherSide:
    """A `TeacherSide` from a hosted API's token bytes (store format 2, ``topk_kind == "bytes"``).

    Strings collide there (two tokens spelled alike are two entries): they are kept apart here and
    summed by the projection when they map to one student token. ``b""`` entries are padding."""
    index: dict[bytes, int] = {b"": 0}
    table = [b""]

    def intern(b) -> int:
        b = bytes(b)
        i = index.get(b)
        if i is None:
            i = index[b] = len(table)
            table.append(b)
        return i

    toks = np.array([intern(b) for b in completion_token_bytes], dtype=np.int64)
    alts = np.array([[intern(b) for b in row] for row in topk_bytes], dtype=np.int64).reshape(len(toks), -1)
    lps = np.asarray(topk_logprobs, dtype=np.float64).reshape(alts.shape)
    special = np.zeros(len(table), dtype=bool)
    special[0] = True
    return TeacherSide(toks, alts, lps, Vocab(table, special, frozenset()))


def trailing_special(side: TeacherSide, text: bytes) -> TeacherSide:
    """A server that spells its end-of-sequence token as text (``b"<eos>"``, ``b"</s>"``) after the
    completion: that trailing token is the EOS (no bytes of the text), and alternatives spelled like it
    are the EOS too. ``side`` unchanged when its tokens spell the text (or not even its start), or when
    its ids are a tokenizer's (which knows its special tokens)."""
    if not isinstance(side.vocab, Vocab) or not len(side.tokens):
        return side
    stream = b"".join(side.token_bytes)
    lead = 1 if stream[:1] == b" " and text[:1] != b" " and stream[1:].startswith(text) else 0
    if len(stream) <= len(text) + lead or not stream[lead:].startswith(text):
        return side
    ends = np.cumsum([len(b) for b in side.token_bytes])
    if len(ends) < 2 or ends[-2] != len(text) + lead:
        return side  # only one trailing token is an end-of-sequence marker
    marker = int(side.tokens[-1])
    table, special = list(side.vocab.table), side.vocab.special.copy()
    table[marker], special[marker] = b"", True
    return TeacherSide(side.tokens, side.alts, side.logprobs, Vocab(table, special, frozenset([marker])))


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
        self._records: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]] = []
        self._exact: dict[int, tuple[object, np.ndarray]] = {}
        self.unspelled = 0
        """Records whose teacher or student tokens do not spell the completion (nothing aligned)."""

    def _exact_map(self, vocab) -> np.ndarray:
        """Target code of every id of ``vocab`` by exact bytes: a student id, the bucket, or -1 (ask)."""
        hit = self._exact.get(id(vocab))
        if hit is not None and hit[0] is vocab:
            return hit[1]
        by_bytes, eos = self.tb.by_bytes, self.tb.eos_id
        codes = np.array([by_bytes.get(b, _QUERY) for b in vocab.table], dtype=np.int64)
        codes[np.asarray(vocab.special, dtype=bool)] = _BUCKET
        for e in vocab.eos_ids:
            codes[e] = _BUCKET if eos is None else eos
        if isinstance(vocab, TokenBytes):  # a tokenizer's table: kept for every record of the store
            self._exact[id(vocab)] = (vocab, codes)
        return codes

    def _query(self, text: bytes, ctx: int, pos: int, alt: bytes, rest_from: int) -> int:
        """Code of the query "first student token of ``text[ctx:pos] + alt + rest``" (-2: not valid text)."""
        raw = text[ctx:pos] + alt + text[rest_from : rest_from + REST_BYTES]
        for cut in range(4):  # the window may end inside a character
            try:
                s = raw[: len(raw) - cut].decode("utf-8")
                break
            except UnicodeDecodeError:
                continue
        else:
            return _BUCKET
        return -10 - self._queries.setdefault((s, pos - ctx), len(self._queries))

    def add(self, text: str | bytes, teacher: TeacherSide, student_ids) -> int:
        """Queue one example: its completion text, the teacher's side, the student's completion ids
        ``(m,)`` (the labels, EOS included; they may spell only the start of the text). Returns its
        index in `run`'s result."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        s_ids = np.asarray(student_ids, dtype=np.int64)
        k = teacher.alts.shape[1] if teacher.alts.ndim == 2 and len(teacher.alts) else 1
        empty = np.zeros(0, dtype=np.int64)
        self._records.append((len(s_ids), k, empty, np.zeros((0, k), np.int64), np.zeros((0, k))))
        teacher = trailing_special(teacher, data)
        t_bytes = teacher.token_bytes
        t_lead = prefix_lead(b"".join(t_bytes), data)  # a teacher cut at its context spells a prefix
        # The student's labels may stop early (an example cut to max_length): a prefix of the text will do.
        s_lead = prefix_lead(b"".join(self.tb.table[i] for i in s_ids.tolist()), data)
        if t_lead is None or s_lead is None:
            self.unspelled += 1
            return len(self._records) - 1
        t_len = np.fromiter((len(b) for b in t_bytes), dtype=np.int64, count=len(t_bytes))
        t_st = token_starts(t_len, t_lead)
        t_end = np.maximum(np.cumsum(t_len) - t_lead, 0)  # where each teacher token ends in the text
        s_st = token_starts(self.tb.lengths[s_ids], s_lead)
        where = align(t_st, teacher.eligible, s_st)
        sj = np.flatnonzero(where >= 0)
        ti = where[sj]
        A, LP = teacher.alts[ti], teacher.logprobs[ti]
        codes = self._exact_map(teacher.vocab)[A]
        codes[(LP == -np.inf) | (LP <= PAD_LOGPROB)] = _BUCKET
        # The token the teacher wrote: the student's own label there is, by definition, the first token
        # it writes for this text (exact, and free).
        actual = A == teacher.tokens[ti][:, None]
        codes = np.where(actual, s_ids[sj][:, None], codes)
        # Rows whose alternatives need their bytes changed or the student's context: the tokenizer decides.
        fresh = (sj == 0) & (s_lead == 1)  # the student's first token carries its dummy-prefix space
        shifted = (ti == 0) & (t_lead == 1)  # the teacher's decoder drops its own dummy-prefix space too
        ask = (codes == _QUERY) | ((fresh | shifted)[:, None] & (codes >= 0) & ~actual & (A != -1))
        ask &= ~np.isin(A, list(teacher.vocab.eos_ids)) if teacher.vocab.eos_ids else True
        table = teacher.vocab.table
        for r, c in zip(*np.nonzero(ask)):
            j, i = int(sj[r]), int(ti[r])
            a = table[A[r, c]]
            if i == 0 and t_lead == 1 and a[:1] == b" ":
                a = a[1:]
            if not a:
                codes[r, c] = _BUCKET
                continue
            hit = None if fresh[r] else self.tb.by_bytes.get(a)
            pos = int(s_st[j])
            ctx = char_start(data, int(s_st[j - 1])) if j > 0 else pos
            codes[r, c] = hit if hit is not None else self._query(data, ctx, pos, a, int(t_end[i]))
        self._records[-1] = (len(s_ids), k, sj, codes, LP)
        return len(self._records) - 1

    def _resolve(self) -> np.ndarray:
        """``(queries,)`` the student id each query's alternative maps to (-2: the bucket), vectorised over
        each batch of encodings."""
        keys = list(self._queries)
        out = np.full(len(keys), _BUCKET, dtype=np.int64)
        backend, tb = self.tok.backend_tokenizer, self.tb
        first_space = np.array([t[:1] == b" " for t in tb.table], dtype=bool)
        for lo in range(0, len(keys), 8192):
            chunk = keys[lo : lo + 8192]
            encs = backend.encode_batch([s for s, _ in chunk], add_special_tokens=False)
            counts = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
            if not counts.sum():
                continue
            ids = np.fromiter((i for e in encs for i in e.ids), dtype=np.int64, count=int(counts.sum()))
            seg = np.repeat(np.arange(len(chunk)), counts)
            first = np.concatenate([[0], np.cumsum(counts)[:-1]])
            lens = tb.lengths[ids]
            ends = np.cumsum(lens)
            before = np.concatenate([[0], ends])[first]  # bytes of the earlier segments
            total = np.add.reduceat(lens, first) if len(ids) else lens
            want = np.fromiter((len(s.encode("utf-8")) for s, _ in chunk), dtype=np.int64, count=len(chunk))
            lead = total - want  # 0, or 1 for a dummy-prefix space; anything else: the tokens do not spell it
            ok = (lead == 0) | ((lead == 1) & first_space[ids[np.minimum(first, len(ids) - 1)]])
            starts = np.maximum(ends - lens - before[seg] - lead[seg], 0)
            ctx = np.fromiter((c for _, c in chunk), dtype=np.int64, count=len(chunk))
            hit = (starts == ctx[seg]) & (lens > 0) & ok[seg] & (counts[seg] > 0)
            rows = np.flatnonzero(hit)
            seg_hit, pick = np.unique(seg[rows], return_index=True)
            out[lo + seg_hit] = ids[rows[pick]]
        return out

    def run(self) -> list[Projected]:
        """Targets of every example added, in order."""
        resolved = self._resolve()
        K = self.top_k
        V = len(self.tb) + 1
        result = []
        for m, k, sj, codes, LP in self._records:
            ids = np.zeros((m, K), dtype=np.int64)
            lps = np.full((m, K), -np.inf, dtype=np.float32)
            aligned = np.zeros(m, dtype=bool)
            tsorted = np.full((m, k), -np.inf, dtype=np.float32)
            if len(sj):
                q = codes <= -10
                c = codes.copy()
                c[q] = resolved[-codes[q] - 10]
                aligned[sj] = True
                lp = np.where(LP <= PAD_LOGPROB, -np.inf, LP)
                tsorted[sj] = -np.sort(-lp, axis=1)
                keep = c >= 0
                rows = np.broadcast_to(np.arange(len(sj))[:, None], c.shape)[keep]
                key = rows * V + c[keep]
                uniq, inv = np.unique(key, return_inverse=True)
                mass = np.bincount(inv, weights=np.exp(lp[keep]))
                r_u, id_u = uniq // V, uniq % V
                order = np.lexsort((-mass, r_u))  # by row, most probable first
                r_u, id_u, mass = r_u[order], id_u[order], mass[order]
                rank = np.arange(len(r_u)) - np.searchsorted(r_u, r_u)  # position within its row
                top = rank < K
                ids[sj[r_u[top]], rank[top]] = id_u[top]
                lps[sj[r_u[top]], rank[top]] = np.log(np.minimum(mass[top], 1.0))
            result.append(Projected(ids, lps, aligned, tsorted))
        return result


__all__ = ["PAD_LOGPROB", "Projected", "Projector", "TeacherSide", "Vocab", "teacher_from_bytes", "teacher_from_ids",
           "trailing_special", "REST_BYTES"]  # fmt: skip

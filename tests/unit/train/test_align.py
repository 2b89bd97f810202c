"""Alignment by byte offsets: hypothesis properties and real mismatched tokenizer pairs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.models.token_bytes import token_bytes
from distill.train.align import align, char_start, stream_lead, token_starts


def _segment(n: int, cuts: set[int]) -> np.ndarray:
    points = sorted({0, n} | {c for c in cuts if 0 < c < n})
    return np.diff(points)


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 60),
    a=st.sets(st.integers(1, 59), max_size=40),
    b=st.sets(st.integers(1, 59), max_size=40),
    special=st.sets(st.integers(0, 60), max_size=5),
)
def test_aligned_positions_are_exactly_the_common_boundaries(n, a, b, special):
    t_len, s_len = _segment(n, a), _segment(n, b)
    t_st, s_st = token_starts(t_len), token_starts(s_len)
    ok = np.array([i not in special for i in range(len(t_len))])
    where = align(t_st, ok, s_st)
    common = set(t_st[ok].tolist())
    assert [bool(w >= 0) for w in where] == [int(s) in common for s in s_st]
    for j, i in enumerate(where):
        if i >= 0:
            assert t_st[i] == s_st[j] and ok[i]


def test_zero_length_tokens_and_lead():
    # a special token (no bytes) before "ab": the first eligible teacher token at offset 0 counts
    t_st = token_starts(np.array([0, 2, 1]))
    assert align(t_st, np.array([False, True, True]), np.array([0, 2])).tolist() == [1, 2]
    assert stream_lead(b" blue", b"blue") == 1 and stream_lead(b"blue", b"blue") == 0
    assert stream_lead(b"xblue", b"blue") is None
    assert token_starts(np.array([5, 4]), lead=1).tolist() == [0, 4]
    assert char_start("a€".encode(), 2) == 1 and char_start(b"ab", 1) == 1


def _starts(tok, text: str) -> tuple[np.ndarray, np.ndarray]:
    tb = token_bytes(tok)
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"])
    lead = stream_lead(b"".join(tb.table[i] for i in ids), text.encode())
    assert lead is not None
    return ids, token_starts(tb.lengths[ids], lead)


@pytest.mark.parametrize(
    "text",
    [
        "Invoice total €12.50, due 2024-03-07.",  # € split into byte-fallback pieces by one side
        "  leading spaces and 1234567 digits",  # digits split one by one (SentencePiece) or not
        "naïve café 日本語",
    ],
)
@pytest.mark.parametrize(
    "pair",
    [
        ("sp_v1_tokenizer", "tekken_tokenizer"),
        ("tekken_tokenizer", "metaspace_tokenizer"),
        ("metaspace_tokenizer", "tiny_tokenizer"),
    ],  # fmt: skip
)
def test_real_pairs_align_where_both_start_a_token(pair, text, request):
    teacher, student = (request.getfixturevalue(n) for n in pair)
    t_ids, t_st = _starts(teacher, text)
    s_ids, s_st = _starts(student, text)
    where = align(t_st, np.ones(len(t_ids), dtype=bool), s_st)
    assert where[0] == 0  # both start the text
    common = set(t_st.tolist()) & set(s_st.tolist())
    assert {int(s_st[j]) for j in np.flatnonzero(where >= 0)} == common
    # both spell the same bytes between aligned offsets
    data = text.encode()
    for j in np.flatnonzero(where >= 0):
        assert data[s_st[j] :].startswith(data[t_st[where[j]] :][:1])


def test_euro_split_across_byte_fallback_pieces(sp_v1_tokenizer, metaspace_tokenizer, tekken_tokenizer):
    text = "total €5"
    t_ids, t_st = _starts(metaspace_tokenizer, text)  # ▁total ▁ <0xE2> <0x82> <0xAC> 5
    pieces = metaspace_tokenizer.convert_ids_to_tokens(t_ids.tolist())
    assert "<0xE2>" in pieces and "<0x82>" in pieces
    s_ids, s_st = _starts(tekken_tokenizer, text)
    where = align(t_st, np.ones(len(t_ids), dtype=bool), s_st)
    euro = text.encode().index("€".encode())
    # no student token starts inside the character; the teacher's pieces inside it align with nothing
    inside = {euro + 1, euro + 2}
    assert not inside & set(s_st.tolist())
    assert all(int(t_st[i]) not in inside for i in where if i >= 0)

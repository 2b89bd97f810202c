"""Teacher top-k projected onto another tokenizer's vocabulary: properties, real pairs, the store paths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY_TEXTS
from distill.models.token_bytes import token_bytes
from distill.train.cross import Projector, teacher_from_bytes, teacher_from_ids


def _teacher(tok, text, rng, k=4, p_top=0.6, eos=True):
    """The teacher's tokens of ``text`` (+ EOS) and a top-k with the actual token first."""
    ids = tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
    tb = token_bytes(tok)
    normal = np.flatnonzero(~tb.special)
    top, lps = [], []
    for t in ids:
        alts = [t] + [int(a) for a in rng.choice(normal, size=k - 1, replace=False) if a != t][: k - 1]
        rest = rng.dirichlet(np.ones(len(alts) - 1)) * (1 - p_top) * 0.9
        top.append(alts + [0] * (k - len(alts)))
        lps.append([math.log(p_top)] + [math.log(x) for x in rest] + [-math.inf] * (k - len(alts)))
    return ids, np.array(top), np.array(lps)


def _project(teacher_tok, student_tok, text, rng, k=4, **kw):
    ids, top, lps = _teacher(teacher_tok, text, rng, k, **kw)
    s_ids = student_tok(text, add_special_tokens=False)["input_ids"] + [student_tok.eos_token_id]
    proj = Projector(student_tok, k)
    h = proj.add(text, teacher_from_ids(ids, top, lps, token_bytes(teacher_tok)), s_ids)
    return proj.run()[h], s_ids, (ids, top, lps), proj


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(i=st.integers(0, len(TINY_TEXTS) - 1), seed=st.integers(0, 2**16), k=st.integers(1, 6))
def test_projected_targets_sum_to_one_with_the_bucket(tiny_tokenizer, metaspace_tokenizer, i, seed, k):
    rng = np.random.default_rng(seed)
    for teacher, student in ((metaspace_tokenizer, tiny_tokenizer), (tiny_tokenizer, metaspace_tokenizer)):
        out, s_ids, (_, _, lps), _ = _project(teacher, student, TINY_TEXTS[i], rng, k=k)
        mass = np.exp(out.logprobs.astype(np.float64)).sum(-1)
        assert (mass <= 1 + 1e-6).all()  # the bucket 1 - mass is >= 0
        assert (mass[out.aligned] >= 0.6 - 1e-6).all()  # the actual token's 0.6 is never lost
        for row, lp in zip(out.ids, out.logprobs):
            real = row[lp > -np.inf]
            assert len(set(real.tolist())) == len(real) and (real < len(student)).all()
        assert out.aligned[0] and out.aligned[-1]  # the first token and EOS start where both do
        # the student's own label is the top target wherever the teacher's 0.6 maps to it
        assert (out.ids[out.aligned, 0] == np.asarray(s_ids)[out.aligned]).mean() > 0.8


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(i=st.integers(0, len(TINY_TEXTS) - 1), seed=st.integers(0, 2**16))
def test_identical_tokenizers_give_the_identity_mapping(tiny_tokenizer, i, seed):
    out, s_ids, (ids, top, lps), _ = _project(
        tiny_tokenizer, tiny_tokenizer, TINY_TEXTS[i], np.random.default_rng(seed)
    )
    assert out.aligned.all()
    for j in range(len(s_ids)):
        want = {int(t): float(lp) for t, lp in zip(top[j], lps[j]) if lp > -np.inf}
        got = {int(t): float(lp) for t, lp in zip(out.ids[j], out.logprobs[j]) if lp > -np.inf}
        assert got.keys() == want.keys()
        assert all(got[t] == pytest.approx(want[t], abs=1e-6) for t in want)


def test_euro_split_across_byte_fallback_pieces(metaspace_tokenizer, tekken_tokenizer):
    text = "total €12.50"
    out, s_ids, (ids, _, _), _ = _project(
        metaspace_tokenizer, tekken_tokenizer, text, np.random.default_rng(0)
    )
    pieces = metaspace_tokenizer.convert_ids_to_tokens(ids)
    assert pieces[pieces.index("<0xE2>") + 1] == "<0x82>"  # the teacher spells € in three byte pieces
    s_pieces = tekken_tokenizer.convert_ids_to_tokens(s_ids)
    j = s_pieces.index("ĠâĤ¬")  # " €" is one Tekken token: aligned at its start (the teacher's "▁")
    assert out.aligned[j]


def test_digits_split_differently(sp_v1_tokenizer, tiny_tokenizer):
    text = "Invoice 0042 total 1234.50 EUR"
    out, s_ids, (ids, _, _), _ = _project(sp_v1_tokenizer, tiny_tokenizer, text, np.random.default_rng(1))
    assert "1" in sp_v1_tokenizer.convert_ids_to_tokens(ids)  # SentencePiece v1: one digit per token
    s_pieces = tiny_tokenizer.convert_ids_to_tokens(s_ids)
    assert any(
        len(p.strip("Ġ")) > 1 and p.strip("Ġ").isdigit() for p in s_pieces
    )  # the student merges digits
    # every student token starts where some SentencePiece token starts: all aligned
    assert out.aligned.all()
    assert (out.ids[:, 0] == np.asarray(s_ids)).mean() > 0.5


def test_leading_space_and_special_tokens(sp_v1_tokenizer, tekken_tokenizer, tiny_tokenizer):
    tb = token_bytes(sp_v1_tokenizer)
    text = "Invoice due"
    ids = sp_v1_tokenizer(text, add_special_tokens=False)["input_ids"] + [sp_v1_tokenizer.eos_token_id]
    first = ids[0]  # "▁In" or "▁Invoice": its dummy-prefix space is not in the text
    eos, other_special = sp_v1_tokenizer.eos_token_id, sp_v1_tokenizer.convert_tokens_to_ids("<s>")
    top = [[first, other_special, eos]] + [[t, eos, other_special] for t in ids[1:]]
    lps = [[math.log(0.5), math.log(0.3), math.log(0.1)]] * len(ids)
    s_ids = tekken_tokenizer(text, add_special_tokens=False)["input_ids"] + [tekken_tokenizer.eos_token_id]
    proj = Projector(tekken_tokenizer, 3)
    h = proj.add(text, teacher_from_ids(ids, top, lps, tb), s_ids)
    out = proj.run()[h]
    got0 = dict(zip(out.ids[0].tolist(), np.exp(out.logprobs[0]).tolist()))
    # "▁In" -> Tekken's "In" at the start (no space); "<s>" -> the bucket; "</s>" -> Tekken's "</s>"
    assert tekken_tokenizer.convert_ids_to_tokens(s_ids[0]).startswith("In")
    assert got0.get(s_ids[0], 0) == pytest.approx(0.5, abs=1e-6) or s_ids[0] not in got0
    assert got0[tekken_tokenizer.eos_token_id] == pytest.approx(0.1, abs=1e-6)
    assert sum(got0.values()) == pytest.approx(0.6 if s_ids[0] in got0 else 0.1, abs=1e-6)
    # the EOS position: the teacher's "</s>" is the student's "</s>"
    assert out.aligned[-1] and out.ids[-1, 0] == tekken_tokenizer.eos_token_id


def test_alternative_that_merges_with_the_text_before_goes_to_the_bucket(tiny_tokenizer, metaspace_tokenizer):
    # teacher alternative "ice" after "Invo": the student would write "Invoice" as one token, so no student
    # token starts where "ice" would: its probability joins the bucket instead of a wrong token
    proj = Projector(tiny_tokenizer, 3)
    student = tiny_tokenizer("Invoice 1", add_special_tokens=False)["input_ids"]
    side = teacher_from_bytes(
        [b"Invo", b"ice", b" 1"], [[b"Invo"], [b"ice"], [b" 1"]], np.log([[0.9], [0.8], [0.7]])
    )
    h = proj.add("Invoice 1", side, student)
    out = proj.run()[h]
    assert out.aligned[0]
    assert np.exp(out.logprobs[0, 0]) == pytest.approx(0.9) or out.logprobs[0, 0] == -np.inf


def test_bytes_records_with_colliding_strings_are_summed(tiny_tokenizer):
    """A hosted API's top-k as bytes (store format 2): two entries spelled alike are two entries, summed."""
    text = "Invoice 12"
    s_ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    spelled = [token_bytes(tiny_tokenizer).table[i] for i in s_ids[:-1]]
    top = [[b, b, b" x"] for b in spelled]
    lps = np.log([[0.4, 0.2, 0.1]] * len(spelled))
    proj = Projector(tiny_tokenizer, 3)
    h = proj.add(text, teacher_from_bytes(spelled, top, lps), s_ids)
    out = proj.run()[h]
    assert out.aligned[:-1].all() and not out.aligned[-1]  # no EOS from the API: the last position is CE only
    # 0.4 + 0.2 on the label everywhere (+ 0.1 where " x" also starts with the label's token, e.g. "Ġ")
    assert (np.exp(out.logprobs[:-1, 0]) >= 0.6 - 1e-6).all()
    assert (out.ids[:-1, 0] == np.asarray(s_ids[:-1])).all()


def test_unspelled_records_align_nothing(tiny_tokenizer):
    proj = Projector(tiny_tokenizer, 2)
    side = teacher_from_bytes([b"something", b" else"], [[b"a"], [b"b"]], np.log([[0.5], [0.5]]))
    h = proj.add("Invoice 1", side, tiny_tokenizer("Invoice 1")["input_ids"])
    out = proj.run()[h]
    assert not out.aligned.any() and proj.unspelled == 1


def test_kd_mask_and_uld_batches(tiny_tokenizer, metaspace_tokenizer):
    from distill.train.examples import collate

    out, s_ids, _, _ = _project(metaspace_tokenizer, tiny_tokenizer, TINY_TEXTS[3], np.random.default_rng(2))
    ex = {"input_ids": torch.tensor(s_ids), "labels": torch.tensor(s_ids), "prompt_len": 0,
          "topk_ids": torch.from_numpy(out.ids), "topk_logprobs": torch.from_numpy(out.logprobs),
          "kd_mask": torch.from_numpy(out.aligned), "uld_logprobs": torch.from_numpy(out.teacher_sorted)}  # fmt: skip
    short = {k: (v[:5] if isinstance(v, torch.Tensor) else v) for k, v in ex.items()}
    batch = collate([ex, short], pad_id=0)
    assert batch["kd_mask"].shape == batch["labels"].shape and not batch["kd_mask"][1, 5:].any()
    assert batch["uld_logprobs"].shape[:2] == batch["labels"].shape
    assert torch.isinf(batch["uld_logprobs"][1, 5:]).all()


def test_an_eos_spelled_as_text_after_the_completion_is_the_eos(tiny_tokenizer):
    """distill serve and vLLM spell a stop token as its text (b"<eos>") in a hosted-style answer: the
    contract's "modulo special tokens a server hides from text". That trailing token is the EOS."""
    from distill.train.cross import trailing_special

    side = teacher_from_bytes(
        [b" red", b"<eos>"],
        [[b" red", b" blue", b"<eos>"], [b"<eos>", b" red", b" blue"]],
        np.log([[0.6, 0.35, 0.01], [0.99, 0.005, 0.004]]),
    )
    fixed = trailing_special(side, b" red")
    assert fixed.token_bytes == [b" red", b""] and fixed.eligible.all()
    assert set(fixed.vocab.eos_ids) == {int(fixed.alts[0, 2])} == {int(fixed.alts[1, 0])}
    assert trailing_special(side, b" red and more") is side  # not a trailing marker: unchanged
    s_ids = tiny_tokenizer(" red", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    proj = Projector(tiny_tokenizer, 3)
    h = proj.add(" red", side, s_ids)
    out = proj.run()[h]
    assert out.aligned[0] and out.aligned[-1]  # this student spells " red" in several tokens: inside, none
    last = dict(zip(out.ids[-1].tolist(), np.exp(out.logprobs[-1]).tolist()))
    assert last[tiny_tokenizer.eos_token_id] == pytest.approx(0.99, rel=1e-5)

"""The built-in invoice task: seeded, varied, and scored by exact match."""

from __future__ import annotations

import re

import pytest

from distill.demos.tasks import FIELDS, MONTHS, exact_match_rate, make_examples, to_rows


def test_same_seed_same_examples_other_seed_differs():
    a, b, c = make_examples(50, seed=0), make_examples(50, seed=0), make_examples(50, seed=1)
    assert a == b
    assert [e.prompt for e in a] != [e.prompt for e in c]
    assert len({e.id for e in a}) == 50


def test_answers_are_normalised_and_found_in_the_invoice():
    for e in make_examples(200, seed=3):
        assert e.field in FIELDS and e.prompt.endswith("Answer:")
        body = e.prompt.split("\nQuestion:")[0]
        if e.field == "currency":
            assert e.answer in {"EUR", "USD", "GBP"}
            assert e.answer in body or {"EUR": "€", "USD": "$", "GBP": "£"}[e.answer] in body
        elif e.field == "month":
            assert e.answer in MONTHS
            i = MONTHS.index(e.answer) + 1
            assert e.answer in body or re.search(rf"-{i:02d}-|\.{i:02d}\.", body)
        elif e.field == "year":
            assert re.fullmatch(r"20(19|2[0-6])", e.answer) and e.answer in body
        else:
            assert e.answer in body
    assert {e.field for e in make_examples(100)} == set(FIELDS)
    assert {e.field for e in make_examples(20, field="month")} == {"month"}


def test_rows_and_exact_match():
    ex = make_examples(4, seed=0)
    rows = to_rows(ex)
    assert rows[0]["completion"] == " " + ex[0].answer and rows[0]["prompt"] == ex[0].prompt
    golds = [e.answer for e in ex]
    preds = [" " + golds[0] + "\nmore", golds[1], "wrong", ""]
    assert exact_match_rate(preds, golds) == 0.5
    with pytest.raises(ValueError, match="3 predictions for 4"):
        exact_match_rate(preds[:3], golds)
    with pytest.raises(ValueError, match="field"):
        make_examples(3, field="iban")

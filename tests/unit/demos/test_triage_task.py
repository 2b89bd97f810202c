"""The built-in triage task: seeded, mixed intents, and gold labels sampled from the stated distribution."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from distill.demos.triage_task import (
    PRIORITY,
    QUESTION,
    TEAMS,
    best_team,
    distribution,
    make_examples,
    to_rows,
)


def test_same_seed_same_tickets_other_seed_differs():
    a, b, c = make_examples(80, seed=0), make_examples(80, seed=0), make_examples(80, seed=1)
    assert a == b
    assert [e.prompt for e in a] != [e.prompt for e in c]
    assert len({e.id for e in a}) == 80
    with pytest.raises(ValueError, match="-1"):
        make_examples(-1)


def test_prompts_answers_and_distributions_are_consistent():
    examples = make_examples(600, seed=4)
    for e in examples:
        assert e.prompt.startswith("Ticket: ") and e.prompt.endswith(f"\n{QUESTION}\nAnswer:")
        assert e.answer in e.teams and len(set(e.teams)) == len(e.teams)
        assert math.isclose(sum(e.distribution), 1.0)
        # Only mentioned teams have mass; the gold team was drawn from that mass.
        assert {t for t, p in zip(TEAMS, e.distribution) if p > 0} == set(e.teams)
        assert e.distribution == distribution(e.teams)
    mixed = [e for e in examples if len(e.teams) > 1]
    assert 0.5 < len(mixed) / len(examples) < 0.8  # two thirds mention two issues
    assert max(max(e.distribution) for e in mixed) < 1.0  # mixed labels are uncertain
    assert {len(e.teams) for e in examples} == {1, 2}
    assert set(e.answer for e in examples) == set(TEAMS)
    rows = to_rows(examples[:2])
    assert rows[0] == {
        "id": examples[0].id,
        "prompt": examples[0].prompt,
        "completion": " " + examples[0].answer,
    }


def test_mixed_labels_follow_the_priority_softmax():
    # Billing (1.0) against Accounts (0.8): 0.55 / 0.45; the sampled labels of many such tickets agree.
    d = distribution(["Billing", "Accounts"])
    p = math.exp(PRIORITY["Billing"]) / (math.exp(PRIORITY["Billing"]) + math.exp(PRIORITY["Accounts"]))
    assert math.isclose(d[TEAMS.index("Billing")], p) and 0.54 < p < 0.56
    assert best_team(d) == "Billing"
    pairs = [e for e in make_examples(6000, seed=7) if set(e.teams) == {"Security", "Sales"}]
    share = Counter(e.answer for e in pairs)["Security"] / len(pairs)
    want = distribution(["Security", "Sales"])[TEAMS.index("Security")]
    assert len(pairs) > 80 and abs(share - want) < 0.08  # 0.88, within sampling error of ~100 tickets
    with pytest.raises(ValueError, match="Marketing"):
        distribution(["Marketing"])

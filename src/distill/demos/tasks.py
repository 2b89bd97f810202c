"""A built-in narrow, repetitive language task: reading one field out of a generated invoice.

Each example is a short invoice written in one of a few layouts, with the date and the amount in
one of several surface forms, and a question for one field. The gold answer is the field in a
normal form:

- ``vendor``   -> the vendor's name as written (``Acme GmbH``);
- ``currency`` -> the ISO code of the total's currency, whether the invoice writes ``EUR 12.50``,
  ``12.50 EUR`` or ``€12.50``;
- ``month``    -> the English month name of the invoice date, whether it is written ``2024-03-07``,
  ``07.03.2024``, ``7 March 2024`` or ``March 7, 2024``;
- ``year``     -> the four-digit year of the invoice date.

Each answer is one of a small set of values that must be found in the text and normalised: a tiny
model learns that in a few CPU minutes, while copying long digit strings would take it far longer.

Everything is generated in code from a seed (same seed, same examples), so tests, the LM demo and
benchmarks need no download. A model must copy and normalise, which a tiny model learns in minutes
on a CPU: the point of a *narrow* task is that a small student can get close to its teacher.

Public API::

    examples = make_examples(200, seed=0)        # list[TaskExample]: .id .prompt .answer .field
    rows = to_rows(examples)                     # [{"id", "prompt", "completion"}] for `distill train`
    exact_match_rate(predictions, [e.answer for e in examples])   # fraction in [0, 1]
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from distill.metrics import exact_match

FIELDS = ("vendor", "currency", "month", "year")
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_NAMES = ("Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne", "Wonka", "Tyrell", "Cyberdyne")
_SUFFIXES = ("GmbH", "Ltd", "Inc", "AG", "SA", "BV")
_CURRENCIES = (("EUR", "€"), ("USD", "$"), ("GBP", "£"))
_QUESTIONS = {
    "vendor": "Who is the vendor?",
    "currency": "In which currency is the total (ISO code)?",
    "month": "In which month was the invoice issued?",
    "year": "In which year was the invoice issued?",
}


@dataclass(frozen=True)
class TaskExample:
    """One prompt of the invoice task with its gold answer."""

    id: str
    """Stable identifier, ``"invoice-<seed>-<index>"``."""
    prompt: str
    """The invoice text and the question, ending with ``"Answer:"``; the model writes the answer after it."""
    answer: str
    """The gold answer in normal form (no leading space, no trailing newline)."""
    field: str
    """Which field is asked for: one of `FIELDS`."""


def _date_forms(rng: random.Random, y: int, m: int, d: int) -> str:
    form = rng.randrange(4)
    if form == 0:
        return f"{y:04d}-{m:02d}-{d:02d}"
    if form == 1:
        return f"{d:02d}.{m:02d}.{y:04d}"
    if form == 2:
        return f"{d} {MONTHS[m - 1]} {y}"
    return f"{MONTHS[m - 1]} {d}, {y}"


def _amount_forms(rng: random.Random, cents: int, code: str, symbol: str) -> str:
    units, frac = divmod(cents, 100)
    plain = f"{units}.{frac:02d}"
    form = rng.randrange(4)
    if form == 0:
        return f"{units:,}.{frac:02d} {code}"
    if form == 1:
        return f"{code} {plain}"
    if form == 2:
        return f"{symbol}{plain}"
    return f"{plain} {code}"


def _one(rng: random.Random, seed: int, index: int, field: str | None) -> TaskExample:
    vendor = f"{rng.choice(_NAMES)} {rng.choice(_SUFFIXES)}"
    number = f"{rng.randrange(10_000, 100_000)}"
    y, m, d = rng.randrange(2019, 2027), rng.randrange(1, 13), rng.randrange(1, 29)
    cents = rng.randrange(100, 500_000)
    code, symbol = rng.choice(_CURRENCIES)
    date_text = _date_forms(rng, y, m, d)
    amount_text = _amount_forms(rng, cents, code, symbol)
    layout = rng.randrange(3)
    if layout == 0:
        body = f"INVOICE {number}\nFrom: {vendor}\nDate: {date_text}\nTotal due: {amount_text}"
    elif layout == 1:
        body = f"{vendor} - invoice no. {number}, issued {date_text}. Amount: {amount_text}."
    else:
        body = f"Bill #{number} | {date_text} | {vendor} | {amount_text}"
    field = field or rng.choice(FIELDS)
    answers = {"vendor": vendor, "currency": code, "month": MONTHS[m - 1], "year": f"{y:04d}"}
    prompt = f"{body}\nQuestion: {_QUESTIONS[field]}\nAnswer:"
    return TaskExample(id=f"invoice-{seed}-{index}", prompt=prompt, answer=answers[field], field=field)


def make_examples(n: int, *, seed: int = 0, field: str | None = None) -> list[TaskExample]:
    """``n`` examples of the invoice task, the same for the same ``seed``.

    ``field`` asks every example for one field (one of `FIELDS`); ``None`` mixes all four.
    Use different seeds for training and evaluation sets (e.g. 0 and 1): they overlap only by chance.
    """
    if int(n) < 0:
        raise ValueError(f"n must be >= 0, got {n!r}")
    if field is not None and field not in FIELDS:
        raise ValueError(f"field must be one of {', '.join(FIELDS)} or None, got {field!r}")
    rng = random.Random(f"distill-invoice-{seed}")
    return [_one(rng, seed, i, field) for i in range(int(n))]


def to_rows(examples: Sequence[TaskExample]) -> list[dict[str, str]]:
    """Rows with ``id``, ``prompt`` and ``completion`` (``" " + answer``), the columns `distill train` reads."""
    return [{"id": e.id, "prompt": e.prompt, "completion": " " + e.answer} for e in examples]


def exact_match_rate(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of predictions whose first line equals the gold answer (`distill.metrics.exact_match`
    with ``first_line=True``: white space stripped and folded).

    ``predictions`` and ``answers`` must have the same length; an empty pair scores 0.0.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"got {len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        return 0.0
    return sum(exact_match(p, a, first_line=True) for p, a in zip(predictions, answers)) / len(answers)

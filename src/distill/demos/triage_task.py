"""A built-in task whose gold labels are uncertain: routing a support ticket to one of eight teams.

Each example is a short customer message written from a few templates: a greeting, one or two
*issues* (each a paraphrase of one of 39 intents, such as "I was charged twice for my order" or "my
account is locked"), a tone for each ("URGENT:", "by the way"), connectors, a sign-off, and the odd
typo. The question "Which team should handle this?" is answered with one team name (`TEAMS`) in a
fixed form, ``" Billing"``.

The gold label is *sampled*: from softmax(`PRIORITY`) over the teams the message mentions. A message
about a double charge that also mentions a login problem goes to Billing 55% of the time and to
Accounts 45%; one that only mentions a login problem goes to Accounts. A third of the messages have
one issue (a certain label), two thirds two (an uncertain one). A teacher trained on many gold
examples learns these probabilities, so its greedy answer is one team while its top-k
log-probabilities say which teams the message mentions and how likely each is: on a mixed message
the runner-up is a team whose phrasing the student should learn too. That is what distillation from
the teacher's distribution can transfer and distillation from its text cannot. (Tone does not
change the label: an earlier design that also weighted tone, intent severity and the order of the
issues was not learnt by a 4-layer teacher in the demo's budget; docs/train.md.)

Everything is generated in code from a seed (same seed, same examples); nothing is downloaded.

Public API::

    examples = make_examples(500, seed=0)   # list[TriageExample]: .id .prompt .answer .distribution ...
    rows = to_rows(examples)                 # [{"id", "prompt", "completion"}] for `distill train`
    best_team(e.distribution)                # the most likely team (what a perfect router answers)
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

TEAMS = ("Billing", "Accounts", "Shipping", "Returns", "Technical", "Security", "Sales", "Privacy")
QUESTION = "Which team should handle this?"

# team -> intent phrase templates; "{a|b}" picks one alternative.
INTENTS: dict[str, list[str]] = {
    "Billing": [
        "I was charged {twice|two times|double} for {my order|my subscription|the same item}",
        "{my|the} invoice shows the wrong {amount|total|tax}",
        "the {monthly|annual|yearly} fee went up without notice",
        "my card payment {failed|was declined|did not go through}",
        "I need a copy of my {receipt|invoice|bill}",
        "there is an {unknown|extra|odd} charge on my {statement|card}",
    ],
    "Accounts": [
        "I {can't|cannot|am unable to} log in",
        "the password reset {email|link} never {arrives|comes|works}",
        "I want to change the email on my profile",
        "my account is {locked|blocked|suspended}",
        "the two-factor codes {are not arriving|do not work}",
        "please merge my two {accounts|profiles|usernames}",
    ],
    "Shipping": [
        "my {package|parcel|order} {has not arrived|never arrived|is missing}",
        "the tracking {number|link|page} {shows nothing|does not work|has not updated}",
        "the courier {left|delivered} it at the wrong {address|door|house}",
        "can I change the delivery {address|date|time}",
        "the delivery is {late|delayed|a week late}",
    ],
    "Returns": [
        "I want to return {the|my} {jacket|shoes|lamp|item}",
        "the {item|product|box} arrived {broken|damaged|cracked}",
        "{I received|you sent me} the wrong {size|colour|model}",
        "{where is|I am still waiting for} my refund",
        "how do I print a return label",
    ],
    "Technical": [
        "the app {crashes|freezes|closes} when I {open it|search|check out}",
        "the website {shows an error|will not load|is very slow}",
        "{notifications|sync|the export} stopped working",
        "I get error {code 500|code 403|E42} on the {site|app}",
        "the {update|new version} broke {everything|my settings}",
    ],
    "Security": [
        "someone else {logged into|used|got into} my account",
        "I got a {phishing|suspicious|fake} email in your name",
        "there are orders {I did not make|I never placed}",
        "I think my password was {stolen|leaked|hacked}",
    ],
    "Sales": [
        "do you offer {discounts|a student discount|bulk pricing}",
        "I want to upgrade to the {business|premium|pro} plan",
        "can I get a quote for {ten|fifty|a hundred} {licences|seats}",
        "is the {premium|pro} plan worth it",
    ],
    "Privacy": [
        "please delete {all my data|my personal data|everything you store about me}",
        "I want a copy of the data you hold {about me|on me}",
        "stop using my data for {marketing|ads|profiling}",
        "how do you use my {location|contacts|browsing history}",
    ],
}
PRIORITY = {"Security": 1.5, "Billing": 1.0, "Accounts": 0.8, "Technical": 0.5, "Shipping": 0.3,
            "Returns": 0.0, "Privacy": -0.2, "Sales": -0.5}  # fmt: skip
"""Each team's score when the message mentions it; the gold team is drawn from softmax(score) over the
mentioned teams. Security vs Sales: 0.88 / 0.12; Billing vs Accounts: 0.55 / 0.45 (a near coin flip)."""
TONES = ("", "", "", "URGENT: ", "by the way, ", "not urgent, but ", "also ")
"""How the customer introduces an issue. Tone does not change the label (only topics do); ``"also "``
never opens a message."""
ISSUES = (1, 1, 2, 2, 2, 2)
"""How many issues (distinct teams) a message mentions, drawn uniformly from this tuple: a third are unambiguous."""
TYPO_RATE = 0.04
"""Chance that a word of four letters or more gets a typo (two inner letters swapped, or one dropped)."""
_GREETINGS = ("", "", "Hi, ", "Hello, ", "Hello team, ", "Dear support, ", "hey ")
_SEPARATORS = (". ", ". ", " and ", ", ", "! ")
_SIGNOFFS = ("", "", " Thanks.", " Regards, Sam.", " pls help", " Thank you!", " Best, Ana.")
_ALT = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class TriageExample:
    """One ticket with its sampled gold team and the distribution the label was drawn from."""

    id: str
    """Stable identifier, ``"triage-<seed>-<index>"``."""
    prompt: str
    """``"Ticket: <message>\\nWhich team should handle this?\\nAnswer:"``; the model writes the team after it."""
    answer: str
    """The gold team (one of `TEAMS`), sampled from ``distribution``."""
    distribution: tuple[float, ...]
    """Probability of each team of `TEAMS` (same order); zero for teams the message does not mention."""
    teams: tuple[str, ...]
    """The teams the message mentions, in the order it mentions them."""


def _fill(rng: random.Random, template: str) -> str:
    return _ALT.sub(lambda m: rng.choice(m.group(1).split("|")), template)


def _typo(rng: random.Random, word: str) -> str:
    if len(word) < 4 or not word.isalpha() or rng.random() >= TYPO_RATE:
        return word
    i = rng.randrange(1, len(word) - 2)
    if rng.random() < 0.5:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    return word[:i] + word[i + 1 :]


def _one(rng: random.Random, seed: int, index: int) -> TriageExample:
    teams = rng.sample(TEAMS, rng.choice(ISSUES))
    clauses = []
    for n, team in enumerate(teams):
        tone = rng.choice(TONES[:-1] if n == 0 else TONES)
        clauses.append(tone + _fill(rng, rng.choice(INTENTS[team])))
    text = clauses[0]
    for clause in clauses[1:]:
        text += rng.choice(_SEPARATORS) + clause
    text = rng.choice(_GREETINGS) + text + rng.choice(_SIGNOFFS)
    text = " ".join(_typo(rng, w) for w in text.split(" "))
    dist = distribution(teams)
    answer = rng.choices(TEAMS, weights=dist)[0]
    prompt = f"Ticket: {text}\n{QUESTION}\nAnswer:"
    return TriageExample(id=f"triage-{seed}-{index}", prompt=prompt, answer=answer, distribution=dist,
                         teams=tuple(teams))  # fmt: skip


def distribution(teams: Sequence[str]) -> tuple[float, ...]:
    """The gold distribution over `TEAMS` of a message that mentions ``teams``: softmax of `PRIORITY`."""
    if not teams or any(t not in PRIORITY for t in teams):
        raise ValueError(f"teams must be a non-empty list of {', '.join(TEAMS)}, got {list(teams)!r}")
    weights = {t: math.exp(PRIORITY[t]) for t in teams}
    total = sum(weights.values())
    return tuple(weights.get(t, 0.0) / total for t in TEAMS)


def make_examples(n: int, *, seed: int = 0) -> list[TriageExample]:
    """``n`` tickets, the same for the same ``seed``; use different seeds for different splits."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    rng = random.Random(f"distill-triage-{seed}")
    return [_one(rng, seed, i) for i in range(n)]


def best_team(distribution: Sequence[float]) -> str:
    """The most likely team of a distribution over `TEAMS` (the first of equals)."""
    return TEAMS[max(range(len(TEAMS)), key=lambda i: distribution[i])]


def to_rows(examples: Sequence[TriageExample]) -> list[dict[str, str]]:
    """Rows with ``id``, ``prompt`` and ``completion`` (``" " + gold team``), the columns `distill train` reads."""
    return [{"id": e.id, "prompt": e.prompt, "completion": " " + e.answer} for e in examples]

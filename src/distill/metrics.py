"""Metrics shared by every stage: text and class matching, user metrics, macro-F1, calibration, top-k KL.

Every per-input metric is a plain function ``metric(prediction, reference) -> float`` (larger is
better); the rest are functions of arrays. `METRICS` names the built-in per-input ones (what
``distill eval --metric`` takes); a user's own metric is named on the command line as
``module:function`` and imported by `load_metric` only then. The classifier's `compare`, `distill
eval` and the demos all score with these, so a number means the same everywhere.
"""

from __future__ import annotations

import importlib
import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def normalise_text(text: Any, first_line: bool = False) -> str:
    """``text`` stripped, runs of white space folded to one space; only its first line if ``first_line``."""
    s = str(text).strip()
    if first_line:
        s = s.split("\n", 1)[0]
    return " ".join(s.split())


def exact_match(prediction: Any, reference: Any, *, first_line: bool = False) -> float:
    """1.0 when the whitespace-normalised strings are equal, else 0.0.

    ``first_line``: compare only the prediction's first line (a generated answer that goes on after
    the answer line); the reference is compared whole."""
    return float(normalise_text(prediction, first_line) == normalise_text(reference))


def token_f1(prediction: Any, reference: Any) -> float:
    """F1 of the bags of lower-cased whitespace tokens (SQuAD style); 1.0 when both are empty."""
    p, r = normalise_text(prediction).lower().split(), normalise_text(reference).lower().split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def accuracy(prediction: Any, reference: Any) -> float:
    return float(str(prediction) == str(reference))


METRICS: dict[str, Callable[[Any, Any], float]] = {
    "accuracy": accuracy,
    "exact_match": exact_match,
    "token_f1": token_f1,
}


def load_metric(name: str) -> Callable[[Any, Any], float]:
    """A built-in metric by name, or the user's ``module:function`` (imported here, because the user asked)."""
    if name in METRICS:
        return METRICS[name]
    module_name, _, func_name = name.partition(":")
    if not module_name or not func_name:
        raise ValueError(f"metric {name!r}: expected a built-in name or module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"metric {name!r}: cannot import module {module_name!r} ({err})") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ValueError(f"metric {name!r}: module {module_name!r} has no function {func_name!r}")
    return fn


def macro_f1(
    predictions: Sequence[Any], references: Sequence[Any], *, labels: Sequence[Any] | None = None
) -> float:
    """Unweighted mean of the per-class F1 over ``labels`` (default: the classes in ``references``).

    Values are compared as strings, so class ids and class names both work; a class never predicted
    scores 0 (scikit-learn's ``zero_division=0``). Give ``labels`` to count classes absent from the
    references too (a classifier's ``range(n_classes)``)."""
    from sklearn.metrics import f1_score

    labels = sorted({str(r) for r in references}) if labels is None else [str(c) for c in labels]
    return float(
        f1_score(
            [str(r) for r in references],
            [str(p) for p in predictions],
            labels=labels,
            average="macro",
            zero_division=0,
        )
    )


def calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error: sum over equal-width bins of share x |accuracy - mean confidence|.

    ``confidence``: ``(n,)`` probability of each predicted answer in [0, 1]; ``correct``: ``(n,)`` 1/0
    (or bool) whether that answer was right. NaN for no inputs."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    if confidence.size == 0:
        return float("nan")
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    return float(
        sum(
            (bins == b).mean() * abs(correct[bins == b].mean() - confidence[bins == b].mean())
            for b in np.unique(bins)
        )
    )


def topk_kl(teacher_ids, teacher_lps, student_logp_at) -> float:
    """KL(teacher || student) per step on the teacher's top-k plus one bucket for the rest (nats, mean over steps).

    With the full distribution as "top-k" this is the exact KL; with a truncated top-k it is a lower
    bound (merging outcomes never increases KL). ``student_logp_at(step, ids)`` gives the student's
    log-probabilities of ``ids`` at that step."""
    total = 0.0
    for j, (ids, lps) in enumerate(zip(teacher_ids, teacher_lps)):
        pt = np.exp(np.asarray(lps, dtype=np.float64))
        ls = np.asarray(student_logp_at(j, ids), dtype=np.float64)
        kl = float(np.sum(pt * (np.asarray(lps) - ls)))
        rest_t, rest_s = 1.0 - pt.sum(), 1.0 - np.exp(ls).sum()
        if rest_t > 1e-9:
            kl += rest_t * (math.log(rest_t) - math.log(max(rest_s, 1e-12)))
        total += kl
    return max(0.0, total / max(1, len(teacher_ids)))

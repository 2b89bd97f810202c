"""A calibrated router: answer from the student when it is confident, send the rest to the teacher.

The router learns a threshold on one of the student's own confidence signals (and, optionally, a
cut-off on the out-of-distribution score of `distill.workload.coverage`) so that the routed system keeps at
least ``target`` of the teacher's quality while sending as few requests as possible to the teacher.

Serving use (no torch, no numpy needed beyond what is imported here)::

    router = Router.load("router.json")
    signals = confidence_signals(top_logprobs)        # from the student's own answer
    signals["ood"] = ood_score                         # when router.cuts_on_ood (see below)
    if router.decide(signals) == "teacher": ...        # forward to the teacher endpoint

A router fitted with an OOD column is saved with its `distill.workload.coverage.OODScorer`
(``router.save(path, ood_scorer=scorer)`` writes ``router.ood/`` beside ``router.json``);
``Router.load`` only records where it is (``ood_scorer_path_``), so loading stays model-free.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from distill.evaluate.signals import SIGNALS, confidence_signals

__all__ = ["FORMAT", "OOD_SCORER_SUFFIX", "SIGNALS", "Router", "confidence_signals"]

FORMAT = "distill.router/1"

OOD_SCORER_SUFFIX = ".ood"
"""`Router.save` puts the OOD scorer of ``router.json`` in the directory ``router.ood``."""


def _columns(calibration: Any) -> dict[str, np.ndarray]:
    """A dict of equal-length float arrays from a dict of sequences or a list of dict rows."""
    if isinstance(calibration, Mapping):
        cols = {k: np.asarray(v, dtype=np.float64) for k, v in calibration.items()}
    elif isinstance(calibration, Sequence) and calibration and isinstance(calibration[0], Mapping):
        keys = set().union(*(r.keys() for r in calibration))
        cols = {k: np.array([float(r.get(k, np.nan)) for r in calibration]) for k in keys}
    else:
        raise ValueError(
            f"calibration must be a dict of columns or a list of dict rows, got {type(calibration).__name__}"
        )
    lengths = {k: v.shape for k, v in cols.items()}
    if len({s for s in lengths.values()}) != 1 or any(len(s) != 1 for s in lengths.values()):
        raise ValueError(f"calibration columns must be 1-D and of equal length, got shapes {lengths}")
    return cols


class Router:
    """Chooses, per request, the student or the teacher (scikit-learn style estimator).

    Parameters are stored as given; `fit` validates them and sets the learned attributes:
    ``threshold_`` (student answers when its signal, oriented so larger = more confident, is
    ``>= threshold_``), ``ood_threshold_`` (inputs with an OOD score above it always go to the
    teacher; ``inf`` when unused), ``curve_`` (the whole trade-off: one dict per candidate threshold
    with ``fraction_to_teacher``, ``quality``, ``quality_retained``, ``cost``), and the calibration
    summary ``teacher_quality_``, ``student_quality_``, ``fraction_to_teacher_``, ``quality_retained_``,
    ``n_calibration_``.
    """

    def __init__(
        self,
        target: float = 0.99,
        signal: str = "mean_logprob",
        *,
        ood_signal: str | None = None,
        teacher_cost: float = 1.0,
        student_cost: float = 0.0,
        delta: float | None = None,
    ) -> None:
        self.target = target
        """Fraction of the teacher's mean quality the routed system must keep, in (0, 1]."""
        self.signal = signal
        """Student confidence signal thresholded: one of `SIGNALS`."""
        self.ood_signal = ood_signal
        """Column with an out-of-distribution score (larger = further out); ``None`` to ignore OOD."""
        self.teacher_cost = teacher_cost
        """Cost of one teacher answer (any unit, e.g. $ per 1M requests); >= 0."""
        self.student_cost = student_cost
        """Cost of one student answer in the same unit; paid on every request (the student answers first)."""
        self.delta = delta
        """``None``: the target must hold on the calibration data as measured. A number in (0, 0.5):
        it must hold for a one-sided (1 - delta) upper confidence bound on the mean quality lost to the
        student (normal approximation), so the router stays conservative on new inputs."""

    # -- parameters ---------------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "signal": self.signal,
            "ood_signal": self.ood_signal,
            "teacher_cost": self.teacher_cost,
            "student_cost": self.student_cost,
            "delta": self.delta,
        }

    def check_params(self) -> Router:
        """Raise ``ValueError`` naming the first bad parameter; return ``self`` (call before costly work)."""
        if not (isinstance(self.target, int | float) and 0.0 < float(self.target) <= 1.0):
            raise ValueError(f"target must be in (0, 1], got {self.target!r}")
        if self.signal not in SIGNALS:
            raise ValueError(f"signal must be one of {sorted(SIGNALS)}, got {self.signal!r}")
        if self.delta is not None and not (isinstance(self.delta, int | float) and 0.0 < self.delta < 0.5):
            raise ValueError(f"delta must be None or in (0, 0.5), got {self.delta!r}")
        for name in ("teacher_cost", "student_cost"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        return self

    def _oriented(self, values: np.ndarray) -> np.ndarray:
        return SIGNALS[self.signal] * values

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, calibration: Any) -> Router:
        """Learn the threshold(s) from calibration examples; returns ``self``.

        ``calibration``: a dict of equal-length columns (or a list of dict rows) holding the signal
        column named by ``signal`` (and ``ood_signal`` when set), ``student_quality`` and
        ``teacher_quality`` (per-input scores, e.g. 1/0 correct or token-F1, larger = better).

        Thresholds are scanned from "everything to the teacher" downwards, and the lowest threshold
        reached before the routed quality first drops below ``target * teacher_quality`` is kept.
        Stopping at the first violation (instead of taking the lowest threshold that passes anywhere)
        keeps a lucky dip in a noisy curve from being chosen.
        """
        self.check_params()
        cols = _columns(calibration)
        needed = [self.signal, "student_quality", "teacher_quality"] + (
            [self.ood_signal] if self.ood_signal else []
        )
        missing = [c for c in needed if c not in cols]
        if missing:
            raise ValueError(f"calibration has no {', '.join(map(repr, missing))} column; has {sorted(cols)}")
        conf = self._oriented(cols[self.signal])
        sq, tq = cols["student_quality"], cols["teacher_quality"]
        n = conf.size
        if n == 0:
            raise ValueError("calibration is empty")
        for name in needed:
            bad = np.flatnonzero(~np.isfinite(cols[name]))
            if bad.size:
                raise ValueError(
                    f"calibration column {name!r} has non-finite values at rows {bad[:5].tolist()}"
                )
        teacher_mean = float(tq.mean())
        required = float(self.target) * teacher_mean

        ood_cuts = [math.inf]
        if self.ood_signal:
            ood = cols[self.ood_signal]
            ood_cuts += sorted(
                {float(np.quantile(ood, q)) for q in (0.99, 0.95, 0.9, 0.8, 0.7)}, reverse=True
            )
        best = None
        for ood_cut in ood_cuts:
            forced = cols[self.ood_signal] > ood_cut if self.ood_signal else np.zeros(n, dtype=bool)
            threshold, curve = self._scan(conf, sq, tq, forced, required, teacher_mean)
            frac = next(p["fraction_to_teacher"] for p in curve if p["threshold"] == threshold)
            if best is None or frac < best[2] - 1e-12:
                best = (ood_cut, threshold, frac, curve)
        self.ood_threshold_, self.threshold_, _, self.curve_ = best
        chosen = next(p for p in self.curve_ if p["threshold"] == self.threshold_)
        self.teacher_quality_ = teacher_mean
        self.student_quality_ = float(sq.mean())
        self.fraction_to_teacher_ = chosen["fraction_to_teacher"]
        self.quality_retained_ = chosen["quality_retained"]
        self.n_calibration_ = int(n)
        return self

    def _scan(self, conf, sq, tq, forced, required, teacher_mean):
        """Trade-off curve over all distinct thresholds; returns (chosen threshold, curve)."""
        n = conf.size
        order = np.argsort(-conf, kind="stable")  # most confident first
        gain = np.where(forced, 0.0, sq - tq)[order]  # quality change when item k switches to the student
        # Candidate k: the k most confident (not forced) items go to the student.
        cum = np.concatenate([[0.0], np.cumsum(gain)])
        cum_sq = np.concatenate([[0.0], np.cumsum(gain**2)])
        z = NormalDist().inv_cdf(1.0 - self.delta) if self.delta is not None else 0.0
        eligible = np.concatenate([[0], np.cumsum(~forced[order])])
        sorted_conf = conf[order]
        curve, chosen = [], math.inf
        violated = False
        for k in range(n + 1):
            # Only cut between distinct signal values: equal signals must be routed alike.
            if 0 < k < n and sorted_conf[k] == sorted_conf[k - 1]:
                continue
            threshold = math.inf if k == 0 else float(sorted_conf[k - 1])
            quality = (tq.sum() + cum[k]) / n
            to_student = int(eligible[k])
            frac = 1.0 - to_student / n
            point = {
                "threshold": threshold,
                "fraction_to_teacher": frac,
                "quality": float(quality),
                "quality_retained": float(quality / teacher_mean) if teacher_mean > 0 else 1.0,
                "cost": self.student_cost + frac * self.teacher_cost,
            }
            curve.append(point)
            # Per-input quality lost l_i = -gain_i for inputs given to the student (0 otherwise):
            # mean = -cum/n; the bound adds z standard errors of that mean.
            var = max(cum_sq[k] / n - (cum[k] / n) ** 2, 0.0)
            bound = quality - z * math.sqrt(var / n)
            if not violated and bound >= required - 1e-12:
                chosen = threshold
            else:
                violated = True
        return chosen, curve

    # -- using a fitted router ----------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "threshold_"):
            raise RuntimeError("this Router is not fitted yet; call fit(calibration) or Router.load(path)")

    def predict(self, features: Any) -> np.ndarray:
        """``(N,)`` bool: True where the request goes to the teacher. ``features`` as in `fit`.

        A missing or non-finite signal sends the request to the teacher (the safe side)."""
        self._check_fitted()
        cols = _columns(features)
        if self.signal not in cols:
            raise ValueError(f"features have no {self.signal!r} column; have {sorted(cols)}")
        conf = self._oriented(cols[self.signal])
        to_teacher = ~(conf >= self.threshold_)  # NaN compares False -> teacher
        if self.ood_signal and math.isfinite(self.ood_threshold_):
            ood = cols.get(self.ood_signal)
            if ood is None:
                raise ValueError(
                    f"features have no {self.ood_signal!r} column (the router was fitted with it)"
                )
            to_teacher |= ~(ood <= self.ood_threshold_)
        return to_teacher

    @property
    def cuts_on_ood(self) -> bool:
        """True when the fitted router sends inputs above a finite ``ood_threshold_`` to the teacher."""
        self._check_fitted()
        return bool(self.ood_signal) and math.isfinite(getattr(self, "ood_threshold_", math.inf))

    def confident(self, features: Mapping[str, float]) -> bool:
        """The confidence half of `decide`: the student's signal is at or above ``threshold_``
        (a missing or non-finite signal is not confident)."""
        self._check_fitted()
        value = features.get(self.signal)
        if value is None or not math.isfinite(float(value)):
            return False
        return SIGNALS[self.signal] * float(value) >= self.threshold_

    def out_of_distribution(self, score: float | None) -> bool:
        """The OOD half of `decide`: ``score`` is above ``ood_threshold_`` (missing or NaN counts as
        out); always False for a router without an OOD cut-off."""
        if not self.cuts_on_ood:
            return False
        return score is None or not (float(score) <= self.ood_threshold_)

    def decide(self, features: Mapping[str, float]) -> str:
        """``"student"`` or ``"teacher"`` for one request's signals (a dict as from `confidence_signals`,
        plus the ``ood_signal`` score when the router cuts on one)."""
        if not self.confident(features):
            return "teacher"
        if self.out_of_distribution(features.get(self.ood_signal) if self.ood_signal else None):
            return "teacher"
        return "student"

    # -- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        learned = {
            k: getattr(self, k)
            for k in (
                "threshold_",
                "ood_threshold_",
                "teacher_quality_",
                "student_quality_",
                "fraction_to_teacher_",
                "quality_retained_",
                "n_calibration_",
            )
        }
        learned["curve_"] = _thin(self.curve_, self.threshold_)
        return {"format": FORMAT, "params": self.get_params(), "learned": learned}

    def save(self, path: str | Path, *, ood_scorer: Any = None) -> Path:
        """Write the fitted router as a small JSON file (infinite thresholds as ``null``).

        ``ood_scorer``: the fitted `distill.workload.coverage.OODScorer` behind the ``ood_signal`` column; it
        is saved beside the file as ``<name>.ood/`` (e.g. ``router.ood/`` next to ``router.json``)
        and the file records that path relative to itself, so the pair moves together."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        if ood_scorer is not None:
            if not self.ood_signal:
                raise ValueError("ood_scorer given, but this router was fitted without an ood_signal column")
            scorer_dir = ood_scorer.save(path.with_name(path.stem + OOD_SCORER_SUFFIX))
            data["ood_scorer"] = scorer_dir.name
        path.write_text(json.dumps(_encode(data), indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Router:
        """A fitted router from `save`'s JSON (numpy and the standard library only: no model, no torch).

        Sets ``ood_scorer_path_``: the absolute path of the saved OOD scorer directory, or ``None``
        when the file records none (it is not opened here; `distill.workload.coverage.OODScorer.load` does)."""
        from distill.data import read_document

        path = Path(path)
        data = read_document(path, "router file")
        if data.get("format") != FORMAT:
            raise ValueError(
                f"{path}: not a router file (format {data.get('format')!r}, expected {FORMAT!r})"
            )
        router = cls(**data["params"])
        router.check_params()
        for k, v in data["learned"].items():
            setattr(router, k, _decode(k, v))
        scorer = data.get("ood_scorer")
        if scorer is not None and (not isinstance(scorer, str) or Path(scorer).is_absolute()):
            raise ValueError(f"{path}: ood_scorer must be a path relative to the router file, got {scorer!r}")
        router.ood_scorer_path_ = (path.parent / scorer).resolve() if scorer is not None else None
        return router

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"Router({params})"


MAX_SAVED_CURVE_POINTS = 201


def _thin(curve: list[dict[str, Any]], chosen: float) -> list[dict[str, Any]]:
    """At most `MAX_SAVED_CURVE_POINTS` evenly spaced points (ends and the chosen point kept): the file stays small."""
    if len(curve) <= MAX_SAVED_CURVE_POINTS:
        return curve
    keep = set(np.linspace(0, len(curve) - 1, MAX_SAVED_CURVE_POINTS - 1).round().astype(int).tolist())
    keep |= {i for i, p in enumerate(curve) if p["threshold"] == chosen}
    return [curve[i] for i in sorted(keep)]


def _encode(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_encode(v) for v in obj]
    return obj


def _decode(key: str, value: Any) -> Any:
    # Only thresholds are ever infinite; JSON stores them as null.
    if key in ("threshold_", "ood_threshold_") and value is None:
        return math.inf
    if key == "curve_":
        return [{**p, "threshold": math.inf if p["threshold"] is None else p["threshold"]} for p in value]
    return value

"""Fitting a `Router` on real models: run student and teacher, fit on a calibration split, check the rest.

This is what `distill route fit` does; `distill.route.router` itself stays free of model code so a server
can load a router without torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distill.route.router import OOD_SCORER_SUFFIX, SIGNALS, Router, _columns


def split_indices(n: int, holdout: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of ``range(n)`` into (calibration, held-out) index arrays."""
    if not (0.0 <= holdout < 1.0):
        raise ValueError(f"holdout must be in [0, 1), got {holdout!r}")
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(holdout * n))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def routed_outcome(router: Router, features: Mapping[str, Any]) -> dict[str, float]:
    """What ``router`` does on labelled ``features`` (columns as in `Router.fit`): fraction to the
    teacher, routed quality, and its ratio to the teacher's quality."""
    cols = _columns(features)
    to_teacher = router.predict(cols)
    quality = float(np.where(to_teacher, cols["teacher_quality"], cols["student_quality"]).mean())
    teacher = float(cols["teacher_quality"].mean())
    frac = float(to_teacher.mean())
    return {
        "n": int(to_teacher.size),
        "fraction_to_teacher": frac,
        "fraction_to_student": 1.0 - frac,
        "quality": quality,
        "teacher_quality": teacher,
        "student_quality": float(cols["student_quality"].mean()),
        "quality_retained": quality / teacher if teacher > 0 else 1.0,
        "cost": router.student_cost + frac * router.teacher_cost,
    }


def calibrate_on_models(
    router: Router,
    student: Any,
    teacher: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    eval_cfg: Any = None,
    holdout: float = 0.3,
    seed: int = 0,
    ood_scorer: Any = None,
    text_column: str | None = None,
    prices: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run both models on ``rows``, fit ``router`` on a calibration split and check it on the rest.

    ``student``/``teacher`` are `distill.evaluate.runners` runners. Per input, the features are the student's
    `confidence_signals`, ``student_quality`` and ``teacher_quality`` (the eval metric against the
    gold answer, or the teacher's answer), and ``ood`` from a fitted ``ood_scorer`` when given.
    With ``prices``, the router's costs are set to dollars per 1M requests (teacher: token prices or
    hourly price over measured throughput; student: hourly price over measured throughput).
    Returns a report: ``calibration`` and ``held_out`` outcomes, sizes and ``excluded`` inputs.
    """
    from distill.evaluate import EvalConfig, run_pair

    records, excl = run_pair(student, teacher, rows, eval_cfg or EvalConfig(), progress=progress)
    if len(records) < 2:
        raise ValueError(f"only {len(records)} of {len(rows)} inputs could be answered by both models")
    features: dict[str, list[float]] = {"student_quality": [], "teacher_quality": []}
    for r in records:
        for name in SIGNALS:
            features.setdefault(name, []).append(r["signals"].get(name, math.nan))
        features["student_quality"].append(r["student_quality"])
        features["teacher_quality"].append(r["teacher_quality"])
    if ood_scorer is not None:
        from distill.workload.embed import row_text

        texts = [row_text(rows[r["index"]], text_column, f"input row {r['index']}") for r in records]
        features["ood"] = list(ood_scorer.score(texts))
    if prices is not None:
        router.teacher_cost, router.student_cost = _costs_per_1m(records, prices)
    cols = {k: np.asarray(v, dtype=np.float64) for k, v in features.items()}
    cal, test = split_indices(len(records), holdout, seed)
    router.fit({k: v[cal] for k, v in cols.items()})
    return {
        "n_inputs": len(rows),
        "n_answered": len(records),
        "excluded": excl.to_dict(),
        "latency_ms_mean": {
            w: float(np.mean([r[w].latency_ms for r in records])) for w in ("student", "teacher")
        },
        "n_calibration": int(cal.size),
        "n_held_out": int(test.size),
        "calibration": routed_outcome(router, {k: v[cal] for k, v in cols.items()}),
        "held_out": routed_outcome(router, {k: v[test] for k, v in cols.items()}) if test.size else None,
        "features": {k: v.tolist() for k, v in cols.items()},
        "split": {"calibration": cal.tolist(), "held_out": test.tolist()},
    }


def fit_and_save(
    router: Router,
    student: Any,
    teacher: Any,
    rows: Sequence[Mapping[str, Any]],
    out: str | Path,
    *,
    train_rows: Sequence[Mapping[str, Any]] | None = None,
    train_source: str = "training inputs",
    embedder: str = "auto",
    **calibrate: Any,
) -> dict[str, Any]:
    """What ``distill route fit`` does: fit ``router`` (`calibrate_on_models`) and write it to ``out``.

    With ``train_rows`` (the distillation training inputs), an `OODScorer` is fitted on their texts
    first and the router may learn an out-of-distribution cut-off; the scorer is saved beside the
    router as ``OUT-stem.ood/``. The report (with the router) goes to ``OUT`` with suffix
    ``.report.json``. ``calibrate``: keyword arguments of `calibrate_on_models`.
    Returns ``{"report", "router_path", "report_path", "scorer_path", "scorer", "n_train_texts"}``.
    """
    from distill.report import write_json
    from distill.workload.coverage import OODScorer
    from distill.workload.embed import texts_from_rows

    router.check_params()
    scorer, n_train = None, 0
    if train_rows is not None:
        texts, _, _ = texts_from_rows(train_rows, calibrate.get("text_column"), train_source)
        scorer, n_train = OODScorer(embedder=embedder).fit(texts), len(texts)
    report = calibrate_on_models(router, student, teacher, rows, ood_scorer=scorer, **calibrate)
    path = router.save(out, ood_scorer=scorer)
    report_path = write_json(Path(out).with_suffix(".report.json"), {**report, "router": router.to_dict()})
    return {
        "report": report,
        "router_path": path,
        "report_path": report_path,
        "scorer_path": path.with_name(path.stem + OOD_SCORER_SUFFIX) if scorer is not None else None,
        "scorer": scorer,
        "n_train_texts": n_train,
    }


def _costs_per_1m(records: Sequence[Mapping[str, Any]], prices: Any) -> tuple[float, float]:
    """(teacher, student) dollars per 1M requests from measured latencies and token counts."""

    def per_1m(who: str, hourly: float | None, token: Any) -> float:
        answers = [r[who] for r in records]
        if token is not None and any(a.input_tokens or a.output_tokens for a in answers):
            n_in = float(np.mean([a.input_tokens for a in answers]))
            n_out = float(np.mean([a.output_tokens for a in answers]))
            return token.cost(n_in, n_out) * 1e6
        if hourly is None:
            raise ValueError(f"{prices.source}: no price for the {who} ([{who}] token prices or hourly_usd)")
        rps = 1000.0 / float(np.mean([a.latency_ms for a in answers]))
        return hourly / 3600.0 / rps * 1e6

    return (
        per_1m("teacher", prices.teacher_hourly_usd, prices.teacher),
        per_1m("student", prices.student_hourly_usd, None),
    )

"""Student against teacher on production inputs: quality, agreement, calibration, latency and cost.

    result = evaluate(open_model(S, "student"), open_model(T, "teacher"), rows, EvalConfig(), prices)

Both models answer every input (one request at a time, timed). An input that either model cannot
answer, or whose metric raises, is excluded from the paired comparison and counted by reason with
examples in ``result["excluded"]``: the evaluation set never shrinks silently.

Quality is measured against the gold answer when the inputs have one (``label`` / ``answer``
column), otherwise against the teacher's answer. Metrics: classifiers get accuracy and macro-F1;
text gets exact match and token-F1; ``metric="module:function"`` calls the user's own
``function(prediction, reference) -> float`` per input.

Peak memory is measured per model, each alone in a child process that reloads it and answers the
longest few evaluated inputs (`distill.evaluate.memprobe`): this process holds both models, so its own peak
cannot separate them.
"""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from distill.data import TEXT_COLUMNS, Exclusions
from distill.evaluate.runners import Answer, Runner
from distill.evaluate.signals import confidence_signals
from distill.metrics import (
    METRICS,
    accuracy,
    calibration_error,
    exact_match,
    load_metric,
    macro_f1,
    normalise_text,
    token_f1,
    topk_kl,
)
from distill.prices import Prices

REFERENCE_COLUMNS = ("label", "answer", "reference", "completion", "gold")


@dataclass(frozen=True)
class EvalConfig:
    """What `evaluate` measures and how."""

    metric: str = "auto"
    """``"auto"`` (accuracy for classifiers, exact_match for text), ``"accuracy"``, ``"exact_match"``,
    ``"token_f1"``, or ``"module:function"`` (your own per-input metric, imported only because you named it)."""
    reference_column: str | None = None
    """Column with the gold answer; default: the first of `REFERENCE_COLUMNS` present, else the teacher's answer."""
    slice_column: str | None = None
    """Column whose values define slices; default: input-length quartiles."""
    first_line: bool = False
    """Compare only the first line of text answers (extraction tasks whose models keep generating)."""
    n_length_buckets: int = 4
    """Input-length slices when no slice column is given; >= 1."""
    calibration_bins: int = 15
    """Equal-width confidence bins of the expected calibration error; >= 1."""
    memory: bool = True
    """Measure each local model's peak memory alone, in a child process (`distill.evaluate.memprobe`; a few
    seconds per model, mostly importing torch); False skips it and reports ``None``."""
    memory_inputs: int = 4
    """How many evaluated inputs (the longest) the memory probe runs; >= 1."""

    def __post_init__(self) -> None:
        if self.metric != "auto" and self.metric not in METRICS and ":" not in self.metric:
            raise ValueError(
                f"metric must be auto, {', '.join(METRICS)} or module:function, got {self.metric!r}"
            )
        if int(self.memory_inputs) < 1:
            raise ValueError(f"memory_inputs must be >= 1, got {self.memory_inputs}")
        if int(self.n_length_buckets) < 1 or int(self.calibration_bins) < 1:
            raise ValueError(
                f"n_length_buckets and calibration_bins must be >= 1, got {self.n_length_buckets}, {self.calibration_bins}"
            )

    def metric_name(self, kind: str) -> str:
        """The metric used for models of ``kind`` (``"classifier"`` or ``"text"``): ``metric``, with
        ``"auto"`` resolved to accuracy for classifiers and exact match for text."""
        if self.metric != "auto":
            return self.metric
        return "accuracy" if kind == "classifier" else "exact_match"


# ------------------------------------------------------------------------------------------ running


def _reference(row: Mapping[str, Any], cfg: EvalConfig) -> Any:
    columns = (cfg.reference_column,) if cfg.reference_column else REFERENCE_COLUMNS
    return next((row[c] for c in columns if row.get(c) is not None), None)


def _input_length(row: Mapping[str, Any]) -> int:
    for c in (*TEXT_COLUMNS, "x"):
        if row.get(c) is not None:
            v = row[c]
            return len(v) if isinstance(v, str | list) else len(str(v))
    return 0


def _kl_for(student: Runner, s: Answer, t: Answer) -> float | None:
    """KL(teacher || student) where both give log-probabilities over the same ids; ``None`` otherwise."""
    if t.top_ids is None or t.top_logprobs is None:
        return None
    if student.kind == "classifier" and s.top_ids is not None:
        s_map = dict(zip(s.top_ids[0], s.top_logprobs[0]))
        return topk_kl(t.top_ids, t.top_logprobs, lambda j, ids: [s_map[i] for i in ids])
    score = getattr(getattr(student, "teacher", None), "score", None)
    if score is None or not t.prompt_ids or not t.completion_ids:
        return None
    # Teacher-forced: the student's log-probabilities along the teacher's own answer.
    k = max(len(r) for r in t.top_ids)
    sc = score(t.prompt_ids, t.completion_ids, k)
    rows = [dict(zip(i, v)) for i, v in zip(sc.top_ids, sc.top_logprobs)]
    floor = [min(v) if v else -30.0 for v in sc.top_logprobs]
    # A teacher top-k id outside the student's top-k gets the student's k-th log-prob: an upper bound on it.
    return topk_kl(t.top_ids, t.top_logprobs, lambda j, ids: [rows[j].get(i, floor[j]) for i in ids])


def run_pair(
    student: Runner,
    teacher: Runner,
    rows: Sequence[Mapping[str, Any]],
    cfg: EvalConfig = EvalConfig(),
    *,
    metric_fn: Callable[[Any, Any], float] | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], Exclusions]:
    """Both models on every row; returns per-input records (answered by both, metric computed) and exclusions.

    A record: ``index``, ``id``, ``reference`` (gold or teacher), ``gold`` (bool), ``student`` and
    ``teacher`` (`Answer`), ``student_quality``, ``teacher_quality``, ``agree``, ``kl``,
    ``signals`` (the student's `confidence_signals`), ``slice_key``.
    """
    from rich.progress import Progress

    if student.kind != teacher.kind:
        raise ValueError(f"student is a {student.kind} model but the teacher is a {teacher.kind} model")
    name = cfg.metric_name(student.kind)
    metric_fn = metric_fn or load_metric(name)
    excl = Exclusions()
    records = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("eval: inputs", total=len(rows))
        for i, row in enumerate(rows):
            bar.advance(task)
            s, t = student.answer(row), teacher.answer(row)
            failed = [(who, a) for who, a in (("student", s), ("teacher", t)) if a.error]
            if failed:
                for who, a in failed:
                    excl.add(
                        f"{who}: {a.error_kind}", {"row": i, "id": row.get("id"), "error": a.error[:300]}
                    )
                continue
            gold = _reference(row, cfg)
            reference = gold if gold is not None else t.prediction
            sp, tp = s.prediction, t.prediction
            if student.kind == "text":
                sp, tp = normalise_text(sp, cfg.first_line), normalise_text(tp, cfg.first_line)
            try:
                sq, tq = float(metric_fn(sp, reference)), float(metric_fn(tp, reference))
                if not (math.isfinite(sq) and math.isfinite(tq)):
                    raise ValueError(f"metric returned {sq}, {tq}")
            except Exception as err:  # the user's metric: counted per input, the run goes on
                excl.add(
                    f"metric raised {type(err).__name__}",
                    {"row": i, "id": row.get("id"), "error": str(err)[:300]},
                )
                continue
            slice_key = row.get(cfg.slice_column) if cfg.slice_column else None
            records.append(
                {
                    "index": i,
                    "id": row.get("id", f"row-{i}"),
                    "reference": reference,
                    "gold": gold is not None,
                    "student": s,
                    "teacher": t,
                    "student_prediction": sp,
                    "teacher_prediction": tp,
                    "student_quality": sq,
                    "teacher_quality": tq,
                    "agree": float(sp == tp),
                    "kl": _kl_for(student, s, t),
                    "signals": confidence_signals(s.top_logprobs) if s.top_logprobs else {},
                    "teacher_signals": confidence_signals(t.top_logprobs) if t.top_logprobs else {},
                    "slice_key": None if slice_key is None else str(slice_key),
                    "length": _input_length(row),
                }
            )
    return records, excl


def _length_slices(records: list[dict[str, Any]], n_buckets: int) -> None:
    lengths = np.array([r["length"] for r in records])
    edges = np.unique(np.quantile(lengths, np.linspace(0, 1, n_buckets + 1)))
    for r in records:
        k = (
            min(int(np.searchsorted(edges, r["length"], side="right")) - 1, len(edges) - 2)
            if len(edges) > 1
            else 0
        )
        lo, hi = (edges[k], edges[k + 1]) if len(edges) > 1 else (edges[0], edges[0])
        r["slice_key"] = f"length {int(lo)}-{int(hi)}"


def _model_summary(records, who: str, runner: Runner, cfg: EvalConfig, metric: str) -> dict[str, Any]:
    q = np.array([r[f"{who}_quality"] for r in records])
    preds = [r[f"{who}_prediction"] for r in records]
    refs = [r["reference"] for r in records]
    lat = np.array([r[who].latency_ms for r in records])
    sig = [r["signals" if who == "student" else "teacher_signals"] for r in records]
    out: dict[str, Any] = {**runner.info(), "metric": metric, "quality": float(q.mean())}
    if runner.kind == "classifier":
        out["accuracy"] = float(np.mean([accuracy(p, r) for p, r in zip(preds, refs)]))
        out["macro_f1"] = macro_f1(preds, refs)
    else:
        out["exact_match"] = float(np.mean([exact_match(p, r) for p, r in zip(preds, refs)]))
        out["token_f1"] = float(np.mean([token_f1(p, r) for p, r in zip(preds, refs)]))
    out["agreement"] = float(np.mean([r["agree"] for r in records])) if who == "student" else 1.0
    kls = [r["kl"] for r in records if r["kl"] is not None] if who == "student" else [0.0]
    out["kl_to_teacher"] = float(np.mean(kls)) if kls else None
    if all(s for s in sig):
        # Confidence of the whole answer: exp(sum of chosen-token log-probs) = exp(T * mean).
        steps = [len(r[who].top_logprobs) for r in records]
        conf = np.exp(np.array([s["mean_logprob"] * n for s, n in zip(sig, steps)]))
        correct = np.array([float(r[f"{who}_quality"] >= 1.0) for r in records])
        out["calibration_error"] = calibration_error(conf, correct, cfg.calibration_bins)
    else:
        out["calibration_error"] = None
    if np.isnan(lat).all():  # answers read from a store: nothing was run
        out["latency_ms"], out["throughput_per_s"] = None, None
        out["throughput_note"] = "not measured (answers read from a store)"
    else:
        out["latency_ms"] = {f"p{p}": float(np.percentile(lat, p)) for p in (50, 95, 99)}
        out["latency_ms"]["mean"] = float(lat.mean())
        out["throughput_per_s"] = 1000.0 / float(lat.mean()) if lat.mean() > 0 else None
        out["throughput_note"] = "sequential, batch size 1"
    out["input_tokens_mean"] = float(np.mean([r[who].input_tokens for r in records]))
    out["output_tokens_mean"] = float(np.mean([r[who].output_tokens for r in records]))
    return out


def _memory(result, runners, rows, cfg: EvalConfig, problems: list[str], progress: bool) -> None:
    """Each model's ``peak_memory_mb`` and its ``memory`` details (`distill.evaluate.memprobe.probe_memory`)."""
    from rich.progress import Progress

    from distill.evaluate.memprobe import probe_memory

    with Progress(disable=not progress or not cfg.memory, transient=True) as bar:
        task = bar.add_task("eval: peak memory, one child process per model", total=len(runners))
        for who, runner in runners:
            if cfg.memory:
                mem = probe_memory(runner, rows)
            else:
                mem = {"peak_memory_mb": None, "reason": "not measured (memory probe switched off)"}
            bar.advance(task)
            result[who]["peak_memory_mb"] = mem["peak_memory_mb"]
            result[who]["memory"] = mem
            if mem.get("error"):  # a failed probe is reported, the evaluation stands
                problems.append(f"{who} peak memory: probe failed: {mem['error']}")
            elif cfg.memory and mem["peak_memory_mb"] is None:
                problems.append(f"{who} peak memory: {mem['reason']}")
            elif mem.get("n_inputs") == 0:
                errors = "; ".join(mem.get("input_errors", []))
                problems.append(
                    f"{who} peak memory: loading only, the probe answered none of its inputs ({errors})"
                )


def _costs(result: dict[str, Any], prices: Prices | None, problems: list[str]) -> None:
    s, t = result["student"], result["teacher"]
    s["cost_per_1m_requests"] = t["cost_per_1m_requests"] = None
    if prices is None:
        problems.append("no prices file: costs not computed (pass --prices prices.toml)")
        return
    for who, m in (("student", s), ("teacher", t)):
        hourly = prices.student_hourly_usd if who == "student" else prices.teacher_hourly_usd
        token = prices.teacher if who == "teacher" else None
        if token is not None and (m["input_tokens_mean"] or m["output_tokens_mean"]):
            m["cost_per_1m_requests"] = token.cost(m["input_tokens_mean"], m["output_tokens_mean"]) * 1e6
            m["cost_basis"] = "token prices"
        elif hourly is not None and m["throughput_per_s"]:
            m["cost_per_1m_requests"] = hourly / 3600.0 / m["throughput_per_s"] * 1e6
            m["cost_basis"] = f"hardware ${hourly}/h at {m['throughput_per_s']:.1f} requests/s"
        else:
            problems.append(f"{prices.source}: no price for the {who} ([{who}] token prices or hourly_usd)")


def evaluate(
    student: Runner,
    teacher: Runner,
    rows: Sequence[Mapping[str, Any]],
    cfg: EvalConfig = EvalConfig(),
    prices: Prices | None = None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """The full comparison as a JSON-ready dict (see docs/evaluate.md for every key).

    Top level: ``n_inputs``, ``n_evaluated``, ``excluded`` ({total, by_reason}), ``reference``
    ("gold" / "teacher" / "mixed"), ``student`` and ``teacher`` metric dicts (each with its own
    ``peak_memory_mb`` and ``memory`` details from `distill.evaluate.memprobe`), ``quality_retained``
    (student quality / teacher quality), ``speedup`` (teacher p50 latency / student p50),
    ``cost_ratio`` (student cost / teacher cost per request), ``slices``, ``problems``, and
    ``process_peak_rss_mb`` (this process, both models together).
    """
    if not rows:
        raise ValueError("no inputs to evaluate")
    name = cfg.metric_name(student.kind)
    metric_fn = load_metric(name)  # fails before any model runs
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    records, excl = run_pair(student, teacher, rows, cfg, metric_fn=metric_fn, progress=progress)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if not records:
        reasons = ", ".join(f"{k}: {v['count']}" for k, v in excl.by_reason.items())
        raise ValueError(f"none of the {len(rows)} inputs could be evaluated ({reasons})")
    problems: list[str] = []
    result: dict[str, Any] = {
        "n_inputs": len(rows),
        "n_evaluated": len(records),
        "excluded": excl.to_dict(),
        "metric": name,
        "config": asdict(cfg),
    }
    gold = {r["gold"] for r in records}
    result["reference"] = "gold" if gold == {True} else "teacher" if gold == {False} else "mixed"
    for who, runner in (("student", student), ("teacher", teacher)):
        result[who] = _model_summary(records, who, runner, cfg, name)
    usable = [rows[r["index"]] for r in records]
    if hasattr(student, "throughput") and hasattr(teacher, "throughput"):
        for who, runner in (("student", student), ("teacher", teacher)):
            result[who]["throughput_per_s"] = runner.throughput(usable)
            result[who]["throughput_note"] = "batch size 256"
    # After all timing, so the probes' processes do not slow the measured requests.
    longest = sorted(usable, key=_input_length, reverse=True)[: cfg.memory_inputs]
    _memory(result, (("student", student), ("teacher", teacher)), longest, cfg, problems, progress)
    # ru_maxrss is KiB on Linux, bytes on macOS. This process holds both models (and whatever ran
    # before), so these bound the two together; per-model figures are each model's "peak_memory_mb".
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 2**10
    result["process_peak_rss_mb"] = rss1 * scale
    result["process_peak_rss_growth_mb"] = (rss1 - rss0) * scale
    _costs(result, prices, problems)
    s, t = result["student"], result["teacher"]
    result["quality_retained"] = s["quality"] / t["quality"] if t["quality"] > 0 else None
    timed = s["latency_ms"] and t["latency_ms"] and s["latency_ms"]["p50"] > 0
    result["speedup"] = t["latency_ms"]["p50"] / s["latency_ms"]["p50"] if timed else None
    sc, tc = s["cost_per_1m_requests"], t["cost_per_1m_requests"]
    result["cost_ratio"] = sc / tc if sc is not None and tc else None
    if not cfg.slice_column:
        _length_slices(records, cfg.n_length_buckets)
    result["slice_by"] = cfg.slice_column or "input length"
    result["slices"] = _slices(records)
    if excl.total:
        problems.append(f"{excl.total} of {len(rows)} inputs excluded: see 'excluded'")
    result["problems"] = problems
    result["per_input"] = [
        {
            "id": r["id"],
            "slice": r["slice_key"],
            "student": r["student_prediction"],
            "teacher": r["teacher_prediction"],
            "student_quality": r["student_quality"],
            "teacher_quality": r["teacher_quality"],
            "student_latency_ms": r["student"].latency_ms,
            "teacher_latency_ms": r["teacher"].latency_ms,
            "kl": r["kl"],
            **{f"student_{k}": v for k, v in r["signals"].items()},
        }
        for r in records
    ]
    return result


def _slices(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(str(r["slice_key"]), []).append(r)
    out = []
    for key, rs in sorted(groups.items()):
        sq = float(np.mean([r["student_quality"] for r in rs]))
        tq = float(np.mean([r["teacher_quality"] for r in rs]))
        out.append(
            {
                "slice": key,
                "n": len(rs),
                "student_quality": sq,
                "teacher_quality": tq,
                "agreement": float(np.mean([r["agree"] for r in rs])),
                "quality_retained": sq / tq if tq > 0 else None,
            }
        )
    return out

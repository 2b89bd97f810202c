"""Measuring a distilled classifier: temperature calibration and the teacher-vs-student comparison.

- ``calibrate_temperature`` fits a teacher's temperature on validation data (temperature scaling);
- ``compare`` measures teacher and student side by side: quality, agreement, calibration, cost
  (parameters, batch-1 latency, batched throughput).

Inputs are float feature matrices ``(n, d)``, labels integer class ids ``(n,)``, logits ``(n, C)``,
as in `distill.classifier`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.classifier.kd import _features, _labels, _logits, count_parameters, predict_logits
from distill.metrics import calibration_error, macro_f1

# ---------------------------------------------------------------------------------------- calibration


def calibrate_temperature(logits: Any, labels: Any) -> float:
    """Temperature T > 0 minimising the NLL of ``softmax(logits / T)`` on held-out data (temperature scaling).

    Args:
        logits: ``(n, C)`` a model's logits on a validation split (never the test split).
        labels: ``(n,)`` class ids.

    Returns:
        T in [0.05, 100]. T > 1 means the model was over-confident; divide its logits by T.
    """
    z = _logits(logits, None, "logits")
    if len(z) == 0:
        raise ValueError("logits is empty (0 rows)")
    y = _labels(labels, len(z), z.shape[1], "labels", allow_ignore=False)
    z = z.to(torch.float64)

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(z / math.exp(log_t), y))

    # NLL is convex in 1/T, hence unimodal in log T: a golden-section search finds the minimum.
    lo, hi = math.log(0.05), math.log(100.0)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return float(math.exp((lo + hi) / 2))


# ------------------------------------------------------------------------------------------ comparison


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """ECE of a classifier's ``(n, C)`` probabilities against ``(n,)`` labels (`distill.metrics.calibration_error`)."""
    conf, pred = probs.max(1)
    return calibration_error(conf.double().numpy(), (pred == labels).numpy(), n_bins)


@torch.inference_mode()
def throughput(model: Any, x: Tensor, batch: int = 256) -> float:
    """Examples per second of ``model`` on ``(n, d)`` inputs ``x`` at batch size ``batch`` (how a
    classifier is served): ``x`` repeated to at least 4 full batches, after one warm-up batch."""
    big = x.repeat(max(1, math.ceil(4 * batch / len(x))), 1)
    model(big[:batch])  # warm-up: the first call allocates
    n, t0 = 0, time.perf_counter()
    for i in range(0, len(big) - batch + 1, batch):
        model(big[i : i + batch])
        n += batch
    return n / (time.perf_counter() - t0)


@torch.inference_mode()
def _speed(model: Any, x: Tensor, latency_runs: int, throughput_batch: int) -> dict[str, float]:
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    for i in range(min(10, len(x))):  # warm-up: first calls allocate
        model(x[i : i + 1])
    times = []
    for i in range(latency_runs):
        row = x[i % len(x)].unsqueeze(0)
        t0 = time.perf_counter()
        model(row)
        times.append(time.perf_counter() - t0)
    per_s = throughput(model, x, throughput_batch)
    if was_training:
        model.train()
    ms = np.array(times) * 1e3
    return {
        "latency_ms_p50": float(np.percentile(ms, 50)),
        "latency_ms_p95": float(np.percentile(ms, 95)),
        "throughput_per_s": per_s,
    }


def compare(
    teacher: Any,
    student: Any,
    X: Any,
    y: Any,
    *,
    latency_runs: int = 200,
    throughput_batch: int = 256,
) -> dict[str, Any]:
    """Measure teacher and student on the same labelled data (a test split).

    Args:
        teacher, student: ``torch.nn.Module`` or callables mapping ``(B, d)`` floats to ``(B, C)`` logits.
        X: ``(n, d)`` inputs; y: ``(n,)`` class ids.
        latency_runs: single-example calls timed for the latency percentiles.
        throughput_batch: batch size of the throughput measurement.

    Returns:
        ``{"teacher": m, "student": m, "quality_retained", "speedup"}`` where each ``m`` has
        ``accuracy``, ``macro_f1``, ``agreement`` (top-1 agreement with the teacher), ``kl_to_teacher``
        (mean KL(teacher || model) in nats, T = 1), ``ece``, ``params`` (None for a plain callable),
        ``latency_ms_p50`` / ``latency_ms_p95`` (batch size 1, milliseconds) and ``throughput_per_s``
        (examples per second at ``throughput_batch``). ``quality_retained`` = student accuracy /
        teacher accuracy; ``speedup`` = teacher p50 latency / student p50 latency.
    """
    for name, model in (("teacher", teacher), ("student", student)):
        if not callable(model):
            raise ValueError(
                f"{name} must be a torch.nn.Module or a callable returning logits, got {type(model)}"
            )
    x = _features(X, "X")
    zt = predict_logits(teacher, x, name="teacher")
    zs = predict_logits(student, x, name="student")
    if zs.shape[1] != zt.shape[1]:
        raise ValueError(f"student outputs {zs.shape[1]} classes but the teacher has {zt.shape[1]}")
    labels = _labels(y, len(x), zt.shape[1], "y", allow_ignore=False)
    lt = F.log_softmax(zt.double(), 1)
    top_t = zt.argmax(1)
    result: dict[str, Any] = {}
    for name, model, z in (("teacher", teacher, zt), ("student", student, zs)):
        ls = F.log_softmax(z.double(), 1)
        pred = z.argmax(1)
        kl = (lt.exp() * (lt - ls)).sum(1).mean()
        result[name] = {
            "accuracy": float((pred == labels).double().mean()),
            "macro_f1": macro_f1(pred.tolist(), labels.tolist(), labels=range(z.shape[1])),
            "agreement": float((pred == top_t).double().mean()),
            "kl_to_teacher": max(0.0, float(kl)),
            "ece": expected_calibration_error(ls.exp(), labels),
            "params": count_parameters(model),
            **_speed(model, x, latency_runs, throughput_batch),
        }
    t, s = result["teacher"], result["student"]
    result["quality_retained"] = s["accuracy"] / t["accuracy"] if t["accuracy"] > 0 else float("nan")
    result["speedup"] = t["latency_ms_p50"] / s["latency_ms_p50"]
    return result

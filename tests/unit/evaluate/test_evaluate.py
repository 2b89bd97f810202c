"""evaluate(): numbers checked against values computed directly, on classifiers and tiny causal LMs."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from distill.classifier import mlp, save_classifier
from distill.evaluate import EvalConfig, evaluate
from distill.evaluate.memprobe import probe_memory
from distill.evaluate.runners import ClassifierRunner, TeacherRunner, open_model
from distill.metrics import (
    calibration_error,
    exact_match,
    load_metric,
    token_f1,
    topk_kl,
)
from distill.prices import load_prices
from training_helpers import fit_full_batch

NO_MEMORY = EvalConfig(memory=False)  # the memory probe has its own tests below: it costs seconds per model


@pytest.fixture(scope="module")
def digits_models(tmp_path_factory):
    """A trained teacher and a small, briefly trained student on digits, saved; plus test rows."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(X))
    tr, te = order[:1200], order[1200:1500]
    teacher = fit_full_batch(mlp([64, 128, 10], seed=0), X[tr], y[tr], steps=150)
    student = fit_full_batch(mlp([64, 8, 10], seed=1), X[tr], y[tr], steps=30)
    root = tmp_path_factory.mktemp("digits")
    save_classifier(teacher, root / "teacher")
    save_classifier(student, root / "student")
    rows = [
        {"id": f"t{i}", "x": X[i].tolist(), "label": int(y[i]), "group": "even" if y[i] % 2 == 0 else "odd"}
        for i in te
    ]
    return root, teacher, student, X[te], y[te], rows


def test_classifier_numbers_match_direct_computation(digits_models, tmp_path):
    root, teacher, student, X, y, rows = digits_models
    prices = tmp_path / "prices.toml"
    prices.write_text("[teacher]\nhourly_usd = 4.0\n[student]\nhourly_usd = 1.0\n")
    result = evaluate(
        open_model(str(root / "student"), "student"),
        open_model(str(root / "teacher"), "teacher"),
        rows,
        EvalConfig(slice_column="group", memory=False),
        load_prices(prices),
        progress=False,
    )
    with torch.no_grad():
        zt, zs = teacher(torch.tensor(X)).double(), student(torch.tensor(X)).double()
    pt, ps = zt.argmax(1).numpy(), zs.argmax(1).numpy()
    lt, ls = torch.log_softmax(zt, 1), torch.log_softmax(zs, 1)
    s, t = result["student"], result["teacher"]
    assert result["n_evaluated"] == len(rows) and result["excluded"]["total"] == 0
    assert result["reference"] == "gold"
    assert s["accuracy"] == pytest.approx(np.mean(ps == y))
    assert t["accuracy"] == pytest.approx(np.mean(pt == y))
    assert s["macro_f1"] == pytest.approx(f1_score(y, ps, average="macro"))
    assert s["agreement"] == pytest.approx(np.mean(ps == pt))
    assert t["agreement"] == 1.0 and t["kl_to_teacher"] == 0.0
    assert s["kl_to_teacher"] == pytest.approx(float((lt.exp() * (lt - ls)).sum(1).mean()), rel=1e-6)
    conf = ls.exp().max(1).values.numpy()
    assert s["calibration_error"] == pytest.approx(calibration_error(conf, (ps == y).astype(float), 15))
    assert result["quality_retained"] == pytest.approx(np.mean(ps == y) / np.mean(pt == y))
    assert s["params"] == sum(p.numel() for p in student.parameters())
    # Costs: hardware $/h divided by the measured throughput.
    assert s["cost_per_1m_requests"] == pytest.approx(1.0 / 3600 / s["throughput_per_s"] * 1e6)
    assert result["cost_ratio"] == pytest.approx(s["cost_per_1m_requests"] / t["cost_per_1m_requests"])
    assert result["speedup"] == pytest.approx(t["latency_ms"]["p50"] / s["latency_ms"]["p50"])
    assert s["latency_ms"]["p50"] <= s["latency_ms"]["p95"] <= s["latency_ms"]["p99"]
    by = {x["slice"]: x for x in result["slices"]}
    even = np.array([r["group"] == "even" for r in rows])
    assert by["even"]["n"] == even.sum()
    assert by["odd"]["student_quality"] == pytest.approx(np.mean(ps[~even] == y[~even]))


def test_bad_inputs_are_counted_with_reasons_never_dropped_silently(digits_models):
    root, *_, rows = digits_models
    bad = rows[:20] + [
        {"id": "short", "x": [0.0] * 10, "label": 1},
        {"id": "none", "label": 2},
        {"id": "nan", "x": [float("nan")] * 64},
    ]
    result = evaluate(
        open_model(str(root / "student"), "student"),
        open_model(str(root / "teacher"), "teacher"),
        bad,
        NO_MEMORY,
        progress=False,
    )
    assert result["n_inputs"] == 23 and result["n_evaluated"] == 20
    by = result["excluded"]["by_reason"]
    # each bad input fails for both models and is counted under each
    assert by["student: wrong input size"]["count"] == 1 and by["teacher: no input"]["count"] == 1
    assert by["student: input not finite"]["examples"][0]["id"] == "nan"
    assert result["excluded"]["total"] == 6
    assert any("excluded" in p for p in result["problems"])


def test_user_metric_that_raises_is_counted_per_input(digits_models, tmp_path, monkeypatch):
    root, *_, rows = digits_models
    (tmp_path / "my_metrics.py").write_text(
        "def picky(prediction, reference):\n"
        "    if int(reference) == 3:\n        raise RuntimeError('no threes')\n"
        "    return float(int(prediction) == int(reference))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    result = evaluate(
        open_model(str(root / "student"), "student"),
        open_model(str(root / "teacher"), "teacher"),
        rows,
        EvalConfig(metric="my_metrics:picky", memory=False),
        progress=False,
    )
    threes = sum(r["label"] == 3 for r in rows)
    assert result["excluded"]["by_reason"]["metric raised RuntimeError"]["count"] == threes
    assert result["n_evaluated"] == len(rows) - threes
    sys.modules.pop("my_metrics", None)


def test_text_metrics():
    assert exact_match(" Paris  France ", "Paris France") == 1.0
    assert token_f1("the cat sat", "the cat") == pytest.approx(0.8)
    assert token_f1("", "") == 1.0 and token_f1("a", "b") == 0.0
    with pytest.raises(ValueError, match="no_such_module_xyz"):
        load_metric("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="metric must be"):
        EvalConfig(metric="bleu")


def test_topk_kl_is_exact_with_full_support_and_a_lower_bound_when_truncated():
    rng = np.random.default_rng(0)
    t, s = rng.normal(size=20), rng.normal(size=20)
    lt, ls = t - np.log(np.exp(t).sum()), s - np.log(np.exp(s).sum())
    full = float(np.sum(np.exp(lt) * (lt - ls)))
    ids = list(np.argsort(-lt))
    assert topk_kl([ids], [lt[ids].tolist()], lambda j, i: ls[i]) == pytest.approx(full)
    assert topk_kl([ids[:3]], [lt[ids[:3]].tolist()], lambda j, i: ls[i]) <= full + 1e-12


# ------------------------------------------------------------------------------------- language models


def _lm_rows(n=6):
    return [
        {"id": f"p{i}", "prompt": f"Invoice {i:04d} from Acme Ltd: total", "kind": "a" if i % 2 else "b"}
        for i in range(n)
    ]


def test_lm_eval_against_directly_generated_answers(tiny_lm_dir, tiny_student_dir, tmp_path):
    from distill.models.base import GenerationSettings, Request
    from distill.models.hf import HFTeacher

    settings = GenerationSettings(max_new_tokens=6, top_logprobs=5)
    rows = _lm_rows()
    reqs = [Request(r["id"], prompt=r["prompt"]) for r in rows]
    t_text = [c.text for c in HFTeacher(tiny_lm_dir).complete(reqs, settings)]
    s_text = [c.text for c in HFTeacher(tiny_student_dir).complete(reqs, settings)]
    # Gold: the teacher's own answer on even rows, something else on odd rows -> teacher EM exactly 0.5.
    for i, r in enumerate(rows):
        r["answer"] = t_text[i] if i % 2 == 0 else "zzz not this"
    student = open_model(str(tiny_student_dir), "student", settings=settings)
    teacher = open_model(str(tiny_lm_dir), "teacher", settings=settings)
    result = evaluate(student, teacher, rows, EvalConfig(slice_column="kind", memory=False), progress=False)
    s, t = result["student"], result["teacher"]
    norm = [" ".join(x.split()) for x in s_text]
    assert t["exact_match"] == 0.5
    assert s["exact_match"] == pytest.approx(
        np.mean([norm[i] == " ".join(r["answer"].split()) for i, r in enumerate(rows)])
    )
    assert s["agreement"] == pytest.approx(np.mean([a == " ".join(b.split()) for a, b in zip(norm, t_text)]))
    assert s["token_f1"] == pytest.approx(np.mean([token_f1(p, r["answer"]) for p, r in zip(s_text, rows)]))
    assert s["kl_to_teacher"] is not None and s["kl_to_teacher"] > 0
    assert s["params"] < t["params"]
    assert {x["slice"] for x in result["slices"]} == {"a", "b"}

    # The teacher against itself: identical answers, zero KL, everything retained.
    same = evaluate(teacher, teacher, rows, NO_MEMORY, progress=False)
    assert same["student"]["agreement"] == 1.0
    assert same["student"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-9)
    assert same["quality_retained"] == pytest.approx(1.0)


def test_lm_eval_counts_too_long_inputs(tiny_lm_dir, tiny_student_dir):
    from distill.models.base import GenerationSettings

    settings = GenerationSettings(max_new_tokens=4)
    rows = _lm_rows(3) + [{"id": "long", "prompt": "Invoice 0001 " * 400}, {"id": "empty", "prompt": "  "}]
    student = open_model(str(tiny_student_dir), "student", settings=settings)
    teacher = open_model(str(tiny_lm_dir), "teacher", settings=settings)
    result = evaluate(student, teacher, rows, NO_MEMORY, progress=False)
    by = result["excluded"]["by_reason"]
    assert result["n_evaluated"] == 3
    assert by["student: input too long"]["examples"][0]["id"] == "long"
    assert by["teacher: unusable input"]["count"] == 1
    assert result["reference"] == "teacher"


# ------------------------------------------------------------------------------------- peak memory


def test_memory_probe_separates_a_big_model_from_a_small_one(tmp_path):
    big = ClassifierRunner(save_classifier(mlp([64, 3000, 3000, 10], seed=0), tmp_path / "big"))
    small = ClassifierRunner(save_classifier(mlp([64, 8, 10], seed=1), tmp_path / "small"))
    rows = [{"id": f"r{i}", "x": [i / 10] * 64} for i in range(5)] + [{"id": "bad", "x": [1.0]}]
    b, s = probe_memory(big, rows), probe_memory(small, rows)
    for m in (b, s):
        assert math.isfinite(m["peak_memory_mb"]) and m["peak_memory_mb"] > 0
        assert (
            m["peak_memory_mb"]
            == m["rss_growth_mb"]
            == pytest.approx(m["peak_rss_mb"] - m["baseline_rss_mb"])
        )
        # The baseline is the child's Python + torch, far above what these models need.
        assert m["baseline_rss_mb"] > 50 and m["device"] == "cpu"
        assert m["n_inputs"] == 5 and "wrong input size" in m["input_errors"][0]
        assert m["input_ids"] == [r["id"] for r in rows]
    weights = big.info()["weights_mb"] - small.info()["weights_mb"]  # ~35 MB
    assert weights > 30
    # Loading reads every weight into memory once at least (here twice: initialised, then loaded).
    assert b["peak_memory_mb"] - s["peak_memory_mb"] >= 0.8 * weights
    assert b["peak_memory_mb"] < 3 * big.info()["weights_mb"] + 30  # the parent's models are not counted


def test_memory_probe_failure_is_reported_and_the_evaluation_stands(digits_models, tmp_path):
    import shutil

    root, *_, rows = digits_models
    for who in ("student", "teacher"):
        shutil.copytree(root / who, tmp_path / who)
    student = open_model(str(tmp_path / "student"), "student")
    teacher = open_model(str(tmp_path / "teacher"), "teacher")
    shutil.rmtree(tmp_path / "student")  # gone: caught before a child starts
    (tmp_path / "teacher" / "model.safetensors").write_bytes(b"not safetensors")  # the child fails loading
    result = evaluate(student, teacher, rows[:40], EvalConfig(memory_inputs=2), progress=False)
    assert result["n_evaluated"] == 40 and result["student"]["accuracy"] > 0
    s, t = result["student"], result["teacher"]
    assert s["peak_memory_mb"] is None and "no longer exists" in s["memory"]["error"]
    assert t["peak_memory_mb"] is None and t["memory"]["error"].startswith("probe exited with 1")
    assert sum("peak memory: probe failed" in p for p in result["problems"]) == 2
    with pytest.raises(ValueError, match="memory_inputs must be >= 1, got 0"):
        EvalConfig(memory_inputs=0)


def test_remote_teacher_memory_is_none_with_a_reason():
    from distill.models.api import APITeacher
    from distill.models.base import GenerationSettings

    runner = TeacherRunner(APITeacher("http://127.0.0.1:9/v1", model="m"), "remote", GenerationSettings())
    assert probe_memory(runner, [{"prompt": "x"}]) == {
        "peak_memory_mb": None,
        "reason": "remote endpoint: not measurable here",
    }

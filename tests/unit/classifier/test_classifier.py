"""distill_classifier, train_classifier, calibrate_temperature, compare and MLP save/load on small synthetic data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from distill import calibrate_temperature, compare, distill_classifier
from distill.classifier import (
    MLP,
    count_parameters,
    load_classifier,
    mlp,
    predict_logits,
    save_classifier,
    train_classifier,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: one thread is faster and avoids oversubscribing a shared 2-core machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _blobs(n=240, d=8, c=3, seed=0):
    """Gaussian blobs: separable enough that a small MLP learns them in a few epochs."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(c, d))
    y = rng.integers(0, c, size=n)
    X = (centres[y] + rng.normal(0, 1, size=(n, d))).astype(np.float32)
    return X, y


@pytest.fixture(scope="module")
def data():
    X, y = _blobs()
    return X[:160], y[:160], X[160:], y[160:]


@pytest.fixture(scope="module")
def teacher(data):
    X, y, _, _ = data
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(1)
        model, _ = train_classifier(mlp([8, 64, 3], seed=0), X, y, epochs=15, batch_size=32, lr=1e-2)
    return model


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def test_distill_is_deterministic_for_a_seed(data, teacher):
    X, y, Xv, yv = data
    kw = dict(X_val=Xv, y_val=yv, epochs=3, batch_size=32, seed=5)
    a, ha = distill_classifier(teacher, mlp([8, 6, 3], dropout=0.1, seed=1), X, y, **kw)
    b, hb = distill_classifier(teacher, mlp([8, 6, 3], dropout=0.1, seed=1), X, y, **kw)
    assert all(torch.equal(p, q) for p, q in zip(_weights(a), _weights(b)))
    assert ha["train_loss"] == hb["train_loss"]
    c, _ = distill_classifier(teacher, mlp([8, 6, 3], dropout=0.1, seed=1), X, y, **{**kw, "seed": 6})
    assert not all(torch.equal(p, q) for p, q in zip(_weights(a), _weights(c)))


def test_distill_leaves_global_rng_alone(data, teacher):
    X, y, _, _ = data
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    distill_classifier(teacher, mlp([8, 6, 3], seed=1), X, y, epochs=1)
    assert torch.equal(torch.rand(3), expected)


def test_student_learns_the_teacher(data, teacher):
    X, _, Xv, yv = data
    student, hist = distill_classifier(
        teacher, mlp([8, 16, 3], seed=0), X, X_val=Xv, y_val=yv, epochs=30, batch_size=32, lr=1e-2
    )
    agreement = (
        (predict_logits(student, Xv).argmax(1) == predict_logits(teacher, Xv).argmax(1)).float().mean()
    )
    assert agreement >= 0.9
    assert hist["train_loss"][-1] < hist["train_loss"][0]
    assert len(hist["val_accuracy"]) == len(hist["val_agreement"]) == 30
    assert hist["seconds"] > 0


def test_teacher_forms_agree_and_teacher_runs_once(data, teacher):
    X, y, Xv, yv = data
    calls = []

    def counted(batch):
        calls.append(len(batch))
        return teacher(batch)

    kw = dict(X_val=Xv, y_val=yv, epochs=4, batch_size=32, seed=0)
    as_module, _ = distill_classifier(teacher, mlp([8, 6, 3], seed=2), X, y, **kw)
    as_callable, _ = distill_classifier(counted, mlp([8, 6, 3], seed=2), X, y, **kw)
    # once over X_train and once over X_val (each fits in one inference batch), not once per epoch
    assert calls == [len(X), len(Xv)]
    logits = predict_logits(teacher, X).numpy()
    as_array, _ = distill_classifier(logits, mlp([8, 6, 3], seed=2), X, y, **kw)
    for other in (as_callable, as_array):
        assert all(torch.equal(p, q) for p, q in zip(_weights(as_module), _weights(other)))


def test_train_classifier_learns(data):
    X, y, Xv, yv = data
    model, hist = train_classifier(mlp([8, 16, 3], seed=0), X, y, X_val=Xv, y_val=yv, epochs=10, lr=1e-2)
    assert hist["val_accuracy"][-1] >= 0.9
    assert not model.training


# --- bad input: a clear error before training starts ---------------------------------------------


def _unchanged(student, before):
    return all(torch.equal(p, q) for p, q in zip(_weights(student), before))


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("y_rows", r"y_train must have shape \(160,\).*\(159,\)"),
        ("y_range", r"y_train must be in \[0, 2\] or -100; 1 rows are not \(first: row 7 = 3\)"),
        ("nan_teacher", r"teacher logits on X_train has NaN or infinite logits in 2 rows \(first: row 3\)"),
        ("teacher_rows", r"teacher logits on X_train must have shape \(160, C\).*\(150, 3\)"),
        ("empty", r"X_train is empty \(0 rows\)"),
        ("width", r"student outputs 4 classes but the teacher has 3"),
        ("nan_x", r"X_train has NaN or infinite values in 1 rows \(first: row 10\)"),
        ("x_1d", r"X_train must be a 2-D array"),
        ("val_features", r"X_val has 5 features per row but X_train has 8"),
        ("val_labels", r"y_val must have shape \(80,\)"),
        ("temperature", r"temperature must be a finite number > 0, got -1"),
        ("alpha", r"alpha must be in \[0, 1\], got 2"),
        ("epochs", r"epochs must be >= 1, got 0"),
        ("float_labels", r"y_train must be integer class ids"),
    ],
)
def test_bad_input_is_rejected_before_training(data, teacher, case, pattern):
    X, y, Xv, yv = data
    logits = predict_logits(teacher, X).numpy()
    student = mlp([8, 6, 4 if case == "width" else 3], seed=0)
    before = _weights(student)
    args: dict = dict(teacher=logits, student=student, X_train=X, y_train=y)
    kw: dict = {}
    if case == "y_rows":
        args["y_train"] = y[:-1]
    elif case == "y_range":
        bad = y.copy()
        bad[7] = 3
        args["y_train"] = bad
    elif case == "nan_teacher":
        bad = logits.copy()
        bad[3, 0], bad[9, 2] = np.nan, np.inf
        args["teacher"] = bad
    elif case == "teacher_rows":
        args["teacher"] = logits[:150]
    elif case == "empty":
        args.update(X_train=X[:0], y_train=y[:0], teacher=logits[:0])
    elif case == "nan_x":
        bad = X.copy()
        bad[10, 1] = np.nan
        args["X_train"] = bad
    elif case == "x_1d":
        args["X_train"] = X[:, 0]
    elif case == "val_features":
        kw = dict(X_val=Xv[:, :5], y_val=yv)
    elif case == "val_labels":
        kw = dict(X_val=Xv, y_val=yv[:10])
    elif case == "temperature":
        kw = dict(temperature=-1)
    elif case == "alpha":
        kw = dict(alpha=2)
    elif case == "epochs":
        kw = dict(epochs=0)
    elif case == "float_labels":
        args["y_train"] = y.astype(np.float32)
    with pytest.raises(ValueError, match=pattern):
        distill_classifier(
            args.pop("teacher"), args.pop("student"), args.pop("X_train"), args.pop("y_train"), **kw
        )
    assert _unchanged(student, before)


def test_module_teacher_with_wrong_width_is_caught(data, teacher):
    X, y, _, _ = data
    with pytest.raises(ValueError, match="student outputs 5 classes but the teacher has 3"):
        distill_classifier(teacher, mlp([8, 4, 5], seed=0), X, y)


def test_train_classifier_rejects_ignored_labels(data):
    X, y, _, _ = data
    bad = y.copy()
    bad[0] = -100
    with pytest.raises(ValueError, match=r"y_train must be in \[0, 2\]; 1 rows"):
        train_classifier(mlp([8, 4, 3], seed=0), X, bad)


# --- temperature calibration ---------------------------------------------------------------------


@pytest.mark.parametrize("true_t", [0.5, 3.0])
def test_calibrate_temperature_recovers_a_known_temperature(true_t):
    # Labels drawn from softmax(z); a model that reports z * true_t is off by exactly true_t.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 5, generator=g, dtype=torch.float64) * 2
    labels = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    got = calibrate_temperature(z * true_t, labels)
    assert got == pytest.approx(true_t, rel=0.1)
    nll = torch.nn.functional.cross_entropy
    assert nll(z * true_t / got, labels) <= nll(z * true_t, labels)


def test_calibrate_temperature_bad_input():
    with pytest.raises(ValueError, match="logits has NaN or infinite logits in 1 rows"):
        calibrate_temperature(np.array([[0.0, np.nan], [1.0, 0.0]]), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        calibrate_temperature(np.zeros((2, 3)), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\]"):
        calibrate_temperature(np.zeros((2, 3)), np.array([0, 5]))
    with pytest.raises(ValueError, match="empty"):
        calibrate_temperature(np.zeros((0, 3)), np.array([], dtype=int))


# --- compare -------------------------------------------------------------------------------------


def test_compare_reports_both_models(data, teacher):
    X, y, Xv, yv = data
    student, _ = distill_classifier(teacher, mlp([8, 4, 3], seed=0), X, epochs=10, lr=1e-2)
    res = compare(teacher, student, Xv, yv, latency_runs=20)
    keys = {"accuracy", "macro_f1", "agreement", "kl_to_teacher", "ece", "params"}
    keys |= {"latency_ms_p50", "latency_ms_p95", "throughput_per_s"}
    assert keys <= set(res["teacher"]) and keys <= set(res["student"])
    t, s = res["teacher"], res["student"]
    assert t["agreement"] == 1.0 and t["kl_to_teacher"] == pytest.approx(0.0, abs=1e-9)
    assert t["params"] == count_parameters(teacher) == 8 * 64 + 64 + 64 * 3 + 3
    assert s["params"] == 8 * 4 + 4 + 4 * 3 + 3
    acc = (predict_logits(student, Xv).argmax(1).numpy() == yv).mean()
    assert s["accuracy"] == pytest.approx(acc)
    assert 0 <= s["ece"] <= 1 and s["kl_to_teacher"] >= 0 and 0 < s["macro_f1"] <= 1
    assert 0 < t["latency_ms_p50"] <= t["latency_ms_p95"] and t["throughput_per_s"] > 0
    assert res["quality_retained"] == pytest.approx(s["accuracy"] / t["accuracy"])
    assert res["speedup"] == pytest.approx(t["latency_ms_p50"] / s["latency_ms_p50"])
    assert teacher.training is False


def test_compare_accepts_a_plain_callable(data, teacher):
    _, _, Xv, yv = data
    res = compare(teacher, lambda x: teacher(x) * 2.0, Xv, yv, latency_runs=5)
    assert res["student"]["params"] is None
    assert res["student"]["agreement"] == 1.0 and res["student"]["kl_to_teacher"] > 0
    assert math.isclose(res["quality_retained"], 1.0)


def test_compare_rejects_width_mismatch(data, teacher):
    _, _, Xv, yv = data
    with pytest.raises(ValueError, match="teacher must be a torch.nn.Module or a callable"):
        compare(np.zeros((len(Xv), 3)), teacher, Xv, yv)
    with pytest.raises(ValueError, match="student outputs 4 classes but the teacher has 3"):
        compare(teacher, mlp([8, 4, 4], seed=0), Xv, yv)


# --- models --------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path, teacher, data):
    _, _, Xv, _ = data
    path = save_classifier(teacher, tmp_path / "teacher")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((path / "config.json").read_text())["sizes"] == [8, 64, 3]
    loaded = load_classifier(path)
    assert isinstance(loaded, MLP) and not loaded.training
    assert torch.equal(predict_logits(loaded, Xv), predict_logits(teacher, Xv))


def test_load_and_save_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_classifier(tmp_path)
    with pytest.raises(ValueError, match="save_classifier saves distill MLPs"):
        save_classifier(torch.nn.Linear(2, 2), tmp_path / "x")
    (tmp_path / "config.json").write_text(json.dumps({"format": "other"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="expected format"):
        load_classifier(tmp_path)


def test_mlp_shapes_and_errors():
    m = mlp([64, 30, 10], dropout=0.2, seed=0)
    assert count_parameters(m) == 64 * 30 + 30 + 30 * 10 + 10
    assert m(torch.zeros(5, 64)).shape == (5, 10)
    assert torch.equal(mlp([4, 3, 2], seed=7)[0].weight, mlp([4, 3, 2], seed=7)[0].weight)
    with pytest.raises(ValueError, match="sizes"):
        mlp([10])
    with pytest.raises(ValueError, match="dropout"):
        mlp([4, 2], dropout=1.0)

"""`distill demo --quick` end to end through distill.cli.main: files, report keys, sane numbers, reloadable models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from distill.cli import main


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_demo_writes_reports_and_plot(demo_dir):
    for name in ("report.json", "report.md", "plot.png", "test_inputs.jsonl"):
        assert (demo_dir / name).is_file() and (demo_dir / name).stat().st_size > 0, name
    assert (demo_dir / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (demo_dir / "report.md").read_text()
    assert "| teacher |" in md and "hard labels" in md and "KD, T=" in md


def test_report_has_the_documented_keys_and_sane_numbers(demo_dir):
    r = json.loads((demo_dir / "report.json").read_text())
    for key in (
        "dataset",
        "seeds",
        "teacher",
        "students",
        "quality_retained",
        "speedup",
        "temperature_sweep",
    ):
        assert key in r, key
    assert set(r["students"]) == {"hard", "kd"} and len(r["seeds"]) == 3
    metrics = ("accuracy", "macro_f1", "agreement", "kl_to_teacher", "ece", "params")
    metrics += ("latency_ms_p50", "latency_ms_p95", "throughput_per_s")
    for m in (r["teacher"], r["students"]["hard"], r["students"]["kd"]):
        assert set(metrics) <= set(m)
    t, hard, kd = r["teacher"], r["students"]["hard"], r["students"]["kd"]
    # 10 balanced classes: chance is 0.1; every model must be far above it, and no metric out of range
    assert 0.5 < t["accuracy"] <= 1
    for s in (hard, kd):
        assert 0.5 < s["accuracy"]["mean"] <= 1 and s["accuracy"]["std"] >= 0
        assert len(s["accuracy"]["per_seed"]) == 3
        assert 0 <= s["ece"]["mean"] <= 1 and s["kl_to_teacher"]["mean"] >= 0
        assert s["params"] * 10 <= t["params"]
        assert 0 < s["latency_ms_p50"] <= s["latency_ms_p95"]
    assert r["quality_retained"] == pytest.approx(kd["accuracy"]["mean"] / t["accuracy"])
    assert r["speedup"] == pytest.approx(t["latency_ms_p50"] / kd["latency_ms_p50"])
    assert kd["temperature"] in [row["temperature"] for row in r["temperature_sweep"]]
    # the chosen temperature is the best on validation (never chosen on test)
    best = max(row["val_accuracy"]["mean"] for row in r["temperature_sweep"])
    assert kd["val_accuracy"]["mean"] == best
    assert math.isfinite(t["calibrated_temperature"]) and t["calibrated_temperature"] > 0
    assert r["split"]["train"] + r["split"]["val"] + r["split"]["test"] == 1797


def test_saved_models_reproduce_the_reported_teacher_accuracy(demo_dir):
    from distill.classifier import load_classifier

    rows = [json.loads(line) for line in (demo_dir / "test_inputs.jsonl").read_text().splitlines()]
    X = torch.tensor([row["x"] for row in rows])
    y = torch.tensor([row["label"] for row in rows])
    teacher = load_classifier(demo_dir / "models" / "teacher")
    acc = float((teacher(X).argmax(1) == y).float().mean())
    r = json.loads((demo_dir / "report.json").read_text())
    assert acc == pytest.approx(r["teacher"]["accuracy"], abs=1e-6)
    kd = load_classifier(demo_dir / "models" / "student_kd")
    kd_acc = float((kd(X).argmax(1) == y).float().mean())
    assert kd_acc == pytest.approx(r["students"]["kd"]["accuracy"]["per_seed"][0], abs=1e-6)
    assert (demo_dir / "models" / "student_hard" / "model.safetensors").is_file()


def test_demo_bad_flag_is_one_clear_error(tmp_path, capsys):
    assert main(["demo", "--quick", "--labelled", "5000", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "labelled must be <=" in err and "5000" in err
    assert not (tmp_path / "report.json").exists()

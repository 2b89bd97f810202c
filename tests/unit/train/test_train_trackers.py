"""`--log-with`: TensorBoard and MLflow receive, through accelerate, the values metrics.jsonl holds."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from distill.cli import main
from distill.train.config import TRACKERS


def _data(tmp_path: Path) -> Path:
    from distill.demos.tasks import make_examples, to_rows

    path = tmp_path / "data.jsonl"
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in to_rows(make_examples(12, seed=3))), encoding="utf-8"
    )
    return path


def _train(tmp_path, student, *trackers) -> Path:
    out = tmp_path / "out"
    argv = ["train", "--student", str(student), "--data", str(_data(tmp_path)), "--out", str(out),
            "--max-steps", "4", "--batch-size", "3", "--lr", "3e-3", "--no-progress",
            "--log-with", *trackers]  # fmt: skip
    assert main(argv) == 0
    return out


def _jsonl(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_and_mlflow_log_the_metrics_jsonl_values(tmp_path, tiny_student_dir, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: a file store in OUT/mlruns
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory instead
    out = _train(tmp_path, tiny_student_dir, "tensorboard", "mlflow")
    lines = _jsonl(out)
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    losses = {x["step"]: x["loss"] for x in lines}
    assert len(set(losses.values())) == 4  # a real, changing series to compare

    # TensorBoard: event files under OUT/trackers/distill; scalars are stored as float32.
    runs = list((out / "trackers" / "distill").glob("events.out.tfevents.*"))
    assert runs, sorted(p.relative_to(out) for p in out.rglob("*"))
    acc = EventAccumulator(str(out / "trackers" / "distill"), size_guidance={"scalars": 0}).Reload()
    tb = {e.step: e.value for e in acc.Scalars("loss")}
    assert tb.keys() == losses.keys()
    for step, value in losses.items():
        assert tb[step] == pytest.approx(value, rel=1e-6), step
    tb_tokens = {e.step: e.value for e in acc.Scalars("tokens")}
    assert tb_tokens == {x["step"]: x["tokens"] for x in lines}

    # MLflow: a local file store OUT/mlruns, experiment "distill", one run with the same series.
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the run's setting did not leak out
    assert not (tmp_path / "mlruns").exists()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    exp = client.get_experiment_by_name("distill")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    ml = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert ml == losses  # MLflow keeps float64: equal, not just close
    assert run.data.params["max_steps"] == "4" and run.data.params["mode"] == "sft"


def test_unavailable_tracker_is_an_error_before_training(tmp_path, tiny_student_dir, capsys):
    missing = [t for t in TRACKERS if t != "tensorboard" and not importlib.util.find_spec(t)]
    if not missing:
        pytest.skip("every tracker package is installed")
    out = tmp_path / "out"
    argv = ["train", "--student", str(tiny_student_dir), "--data", str(_data(tmp_path)), "--out", str(out),
            "--max-steps", "2", "--no-progress", "--log-with", missing[0]]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--log-with {missing[0]}" in err and "not installed" in err
    assert "Traceback" not in err
    assert not out.exists()  # refused before anything was loaded or written


def test_unknown_tracker_name_is_refused_by_the_config(tmp_path, tiny_student_dir, capsys):
    argv = ["train", "--student", str(tiny_student_dir), "--data", str(_data(tmp_path)),
            "--out", str(tmp_path / "o"), "--log-with", "tensorbored"]  # fmt: skip
    assert main(argv) == 2
    assert "unknown tracker 'tensorbored'" in capsys.readouterr().err

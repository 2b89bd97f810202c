"""`distill eval` and `distill route` end to end on saved digits classifiers and tiny causal LMs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distill.classifier import mlp, save_classifier
from distill.cli import main
from distill.route.router import Router
from training_helpers import fit_full_batch


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(X))
    tr, te = order[:1000], order[1000:]
    root = tmp_path_factory.mktemp("digits")
    save_classifier(fit_full_batch(mlp([64, 128, 10], seed=0), X[tr], y[tr], 150), root / "teacher")
    save_classifier(fit_full_batch(mlp([64, 6, 10], seed=1), X[tr], y[tr], 60), root / "student")
    inputs = root / "inputs.jsonl"
    inputs.write_text(
        "".join(json.dumps({"id": f"t{i}", "x": X[i].tolist(), "label": int(y[i])}) + "\n" for i in te)
    )
    prices = root / "prices.toml"
    prices.write_text("[teacher]\nhourly_usd = 4.0\n[student]\nhourly_usd = 1.0\n")
    return root, inputs, prices


def test_eval_cli_writes_json_html_and_prints_summary(digits, tmp_path, capsys):
    root, inputs, _ = digits
    only_student = tmp_path / "p.toml"
    only_student.write_text("[student]\nhourly_usd = 1.0\n")
    out = tmp_path / "ev"
    argv = [
        "eval",
        "--student",
        str(root / "student"),
        "--teacher",
        str(root / "teacher"),
        "--inputs",
        str(inputs),
    ]
    assert main([*argv, "--out", str(out), "--prices", str(only_student), "--limit", "100"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_evaluated"] == 100 and rep["teacher"]["cost_per_1m_requests"] is None
    assert rep["student"]["cost_per_1m_requests"] > 0
    assert any("no price for the teacher" in p for p in rep["problems"])
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    printed = capsys.readouterr().out
    assert "quality_retained" in printed
    # Peak memory per model, each measured alone in a child process (on by default).
    s_mem, t_mem = rep["student"]["memory"], rep["teacher"]["memory"]
    assert 0 < rep["student"]["peak_memory_mb"] == s_mem["rss_growth_mb"]
    assert 0 < rep["teacher"]["peak_memory_mb"] == t_mem["rss_growth_mb"]
    assert s_mem["peak_rss_mb"] > s_mem["baseline_rss_mb"] > 0 and t_mem["n_inputs"] == 4
    assert "peak memory over runtime baseline, MB" in printed and "peak memory over runtime" in page
    assert rep["process_peak_rss_mb"] > 0
    assert main([*argv, "--out", str(out), "--metric", "nope:fn"]) == 2
    assert "nope" in capsys.readouterr().err


def test_route_fit_keeps_target_on_held_out_and_saves_router(digits, tmp_path, capsys):
    root, inputs, prices = digits
    out = tmp_path / "router.json"
    argv = ["route", "fit", "--student", str(root / "student"), "--teacher", str(root / "teacher")]
    argv += ["--inputs", str(inputs), "--target", "0.99", "--out", str(out), "--prices", str(prices)]
    assert main(argv) == 0
    router = Router.load(out)
    report = json.loads(out.with_suffix(".report.json").read_text())
    cal, held = report["calibration"], report["held_out"]
    assert cal["quality_retained"] >= 0.99
    # The student alone is clearly worse, so the router must send some inputs to the teacher ...
    assert cal["student_quality"] < 0.95 * cal["teacher_quality"]
    assert 0 < router.fraction_to_teacher_ < 1
    # ... and on inputs it never saw it keeps close to the target.
    assert held["quality_retained"] >= 0.97
    # Recompute the held-out outcome from the saved features with the loaded router.
    feats = {k: np.asarray(v)[report["split"]["held_out"]] for k, v in report["features"].items()}
    to_teacher = router.predict(feats)
    routed = np.where(to_teacher, feats["teacher_quality"], feats["student_quality"]).mean()
    assert routed == pytest.approx(held["quality"])
    # Costs: each model's hourly price over its measured sequential throughput (not compared with each
    # other: which tiny MLP is faster on a busy CPU is a timing, not a property of the code).
    lat = report["latency_ms_mean"]
    assert router.teacher_cost == pytest.approx(4.0 / 3600 / (1000 / lat["teacher"]) * 1e6)
    assert router.student_cost == pytest.approx(1.0 / 3600 / (1000 / lat["student"]) * 1e6)
    assert "Router at target 0.99" in capsys.readouterr().out
    assert main(["route", "show", str(out)]) == 0
    assert main([*argv[:-4], "--target", "1.5", "--out", str(out)]) == 2


def test_route_fit_on_tiny_lms_with_ood_feature(tiny_lm_dir, tiny_student_dir, tmp_path):
    rows = [{"id": f"p{i}", "prompt": f"Invoice {i:04d} from Acme Ltd: total"} for i in range(12)]
    rows += [{"id": f"r{i}", "prompt": f"Review {i}: the kettle is loud"} for i in range(4)]
    inputs, train = tmp_path / "in.jsonl", tmp_path / "train.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train.write_text(
        "".join(json.dumps({"prompt": f"Invoice {i:04d} from Acme GmbH: total"}) + "\n" for i in range(40))
    )
    out = tmp_path / "lm_router.json"
    argv = [
        "route",
        "fit",
        "--student",
        str(tiny_student_dir),
        "--teacher",
        str(tiny_lm_dir),
        "--inputs",
        str(inputs),
    ]
    argv += ["--out", str(out), "--train", str(train), "--embedder", "tfidf", "--max-new-tokens", "3"]
    argv += ["--metric", "token_f1", "--holdout", "0.25"]
    assert main(argv) == 0
    router = Router.load(out)
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert router.ood_signal == "ood" and len(report["features"]["ood"]) == 16
    ood = np.asarray(report["features"]["ood"])
    assert ood[12:].min() > ood[:12].max()  # the reviews are the out-of-distribution inputs
    assert report["calibration"]["quality_retained"] >= 0.99


def test_eval_cli_reads_csv_inputs_with_vectors_as_json_text(digits, tmp_path):
    import csv

    root, inputs, _ = digits
    rows = [json.loads(line) for line in inputs.read_text().splitlines()[:30]]
    path = tmp_path / "in.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "x", "label"])
        w.writeheader()
        for r in rows:
            w.writerow({"id": r["id"], "x": json.dumps(r["x"]), "label": r["label"]})
        w.writerow({"id": "broken", "x": "not a list", "label": 1})
    out = tmp_path / "ev"
    argv = [
        "eval",
        "--student",
        str(root / "student"),
        "--teacher",
        str(root / "teacher"),
        "--inputs",
        str(path),
    ]
    assert main([*argv, "--out", str(out), "--no-memory"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["student"]["peak_memory_mb"] is None and "switched off" in rep["teacher"]["memory"]["reason"]
    assert rep["n_inputs"] == 31 and rep["n_evaluated"] == 30
    assert rep["excluded"]["by_reason"]["student: input not numeric"]["count"] == 1
    # CSV labels are text ("3"), predictions are ints: compared as text, so accuracy is real.
    assert rep["student"]["accuracy"] > 0.5

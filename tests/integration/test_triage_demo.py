"""`distill demo --task triage --quick` end to end: the report's shape, the stores, the choice on validation."""

from __future__ import annotations

import json

import pytest

from distill.cli import main
from distill.demos.triage_task import TEAMS


@pytest.mark.slow
def test_triage_demo_quick_writes_the_report_the_issue_specifies(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--task", "triage", "--quick", "--out", str(out), "--no-progress"]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["task"] == "triage" and r["seeds"] == [0] and r["budget"] == 60 and r["labelled"] == 30
    assert set(r["students"]) == {"hard", "sft", "logits", "on-policy"}
    t = r["teacher"]
    assert 0.3 < t["accuracy"] <= 1.0  # 8 teams: far above chance after even 50 steps
    for name, s in r["students"].items():
        assert set(s["accuracy"]) >= {"mean", "std"} and 0.0 <= s["accuracy"]["mean"] <= 1.0, name
        assert s["accuracy"]["per_seed"] == [s["accuracy"]["mean"]] and 0 <= s["ece"]["mean"] <= 1, name
        assert s["param_ratio"] >= 5, name  # the teacher has at least 5x the parameters
    assert r["students"]["hard"]["train_examples"] == 30 and r["students"]["hard"]["teacher_answers"] == 0
    assert r["students"]["sft"]["teacher_answers"] == 60
    # T and alpha were chosen on validation: the best validation accuracy of the sweep, recorded everywhere.
    points, chosen = r["sweep"]["points"], r["sweep"]["chosen"]
    assert {p["temperature"] for p in points} == {1.0, 4.0}
    best = max(points, key=lambda p: (p["exact_match"], -p["eval_ce"]))
    assert chosen == {"temperature": best["temperature"], "alpha": best["alpha"]}
    assert (
        r["students"]["logits"]["temperature"] == chosen["temperature"] == r["temperatures"]["distillation"]
    )
    assert r["temperatures"]["capture"] == 1.0
    # The curve covers both budgets; the target check is per budget and made on validation.
    assert set(r["curve"]) == {"sft", "logits", "on-policy"} and set(r["curve"]["sft"]) == {"30", "60"}
    assert [x["budget"] for x in r["target"]["per_budget"]] == [30, 60]
    assert isinstance(r["target"]["met"], bool)
    # The 60-ticket store grew from the 30-ticket one: 60 answers in all, not 90.
    assert r["store"]["answered_now"] == 60 and r["store"]["failed"] == 0
    from distill import store

    small, large = (set(store.open(out / "stores" / b).keys()) for b in ("30", "60"))
    assert small < large and len(large) == 60
    # The teacher's greedy answers are team names, and its distribution on mixed tickets is not one-hot.
    assert 0.0 < t["mean_runner_up_prob_mixed"] < t["mean_top1_prob_mixed"] < 1.0
    answers = [rec["completion"].strip() for rec in store.open(out / "stores" / "60")]
    assert sum(a in TEAMS for a in answers) / len(answers) > 0.9
    for png in ("accuracy_vs_budget.png", "calibration.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "| teacher |" in md and "Target" in md


@pytest.mark.parametrize(("flags", "message"), [
    (["--budget", "0"], "budget must be an integer >= 1, got 0"),
    (["--labelled", "5000"], "labelled must be <= the largest budget (60), got 5000"),
    (["--seeds", "0"], "seeds must be an integer >= 1, got 0"),
])  # fmt: skip
def test_triage_demo_rejects_bad_settings_before_any_work(tmp_path, capsys, flags, message):
    assert main(["demo", "--task", "triage", "--quick", "--out", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "teacher").exists()

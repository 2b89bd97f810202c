"""`distill demo --task lm --quick` end to end: report files, every model scored, the teacher cached."""

from __future__ import annotations

import json

import pytest

from distill.cli import main


@pytest.mark.slow
def test_lm_demo_quick_writes_report_and_reuses_the_teacher(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--task", "lm", "--quick", "--labelled", "30", "--out", str(out)]) == 0
    r = json.loads((out / "report.json").read_text())
    assert set(r["models"]) == {"teacher", "hard labels", "sft (teacher text)", "logits (top-k KD)"}
    # Label scarcity: the hard-label student sees only the 30 gold answers, the others every transfer prompt.
    assert r["labelled"] == 30
    gold = (out / "data" / "labelled_gold.jsonl").read_text().splitlines()
    assert len(gold) == 30
    assert r["models"]["hard labels"]["train_examples"] == 30
    assert r["models"]["sft (teacher text)"]["train_examples"] == r["config"]["n_transfer"] == 160
    assert r["models"]["logits (top-k KD)"]["train_examples"] == 160
    t = r["models"]["teacher"]
    assert t["cached"] is False and 0.0 <= t["exact_match"] <= 1.0 and t["eval_ce"] > 0
    for name, m in r["models"].items():
        assert m["latency_ms"] > 0 and m["params"] > 0
        if name != "teacher":
            assert 5 <= t["params"] / m["params"] <= 10  # a student 5-10x smaller
            assert m["tokens"] > 0
            em, ce = m["exact_match"], m["eval_ce"]  # students: {mean, std, n, per_seed} over seeds
            assert em["n"] == 1 and em["std"] == 0.0 and 0.0 <= em["mean"] == em["per_seed"][0] <= 1.0, name
            assert ce["mean"] > 0, name
    assert isinstance(r["teacher_clearly_better"], bool)
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert "| teacher |" in (out / "report.md").read_text()
    assert (out / "store" / "manifest.json").is_file()
    # A second run reuses the cached teacher (same settings) instead of training it again.
    mtime = (out / "teacher" / "model.safetensors").stat().st_mtime_ns
    from distill.demos.lm import run

    again = run(out, quick=True, progress=False, student_steps=2, seeds=2)
    assert again["models"]["teacher"]["cached"] is True
    # Two seeds: two different initialisations per student, each saved, each scored.
    for name in ("hard labels", "sft (teacher text)", "logits (top-k KD)"):
        em = again["models"][name]["exact_match"]
        assert em["n"] == 2 and len(em["per_seed"]) == 2
        assert abs(em["mean"] - sum(em["per_seed"]) / 2) < 1e-12
    assert (out / "students" / "sft-seed1" / "model.safetensors").is_file()
    assert (out / "init" / "student-seed1" / "model.safetensors").read_bytes() != (
        out / "init" / "student" / "model.safetensors"
    ).read_bytes()
    assert (out / "teacher" / "model.safetensors").stat().st_mtime_ns == mtime


def test_lm_demo_rejects_more_labelled_examples_than_transfer_prompts(tmp_path, capsys):
    assert main(["demo", "--task", "lm", "--quick", "--labelled", "500", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "labelled must be" in err and "500" in err and "160" in err
    assert not (tmp_path / "teacher").exists()  # refused before any work

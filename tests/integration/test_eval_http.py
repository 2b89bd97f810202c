"""`distill eval` with the teacher behind a real `distill serve` endpoint, behind a fault proxy,
and as answers already in a store: same numbers as the local teacher, failures counted."""

from __future__ import annotations

import json

import pytest

from distill.cli import main
from distill.evaluate import EvalConfig, evaluate
from distill.evaluate.memprobe import probe_memory
from distill.evaluate.runners import TeacherRunner, open_model
from distill.models.base import GenerationSettings
from faultproxy import FaultProxy

SETTINGS = GenerationSettings(max_new_tokens=4, top_logprobs=3)
ROWS = [{"id": f"p{i}", "prompt": f"Invoice {i:04d} from Acme Ltd: total"} for i in range(10)]


@pytest.fixture(scope="module")
def server(tiny_lm_server):
    return tiny_lm_server


@pytest.fixture(scope="module")
def local(tiny_lm_dir, tiny_student_dir):
    student = open_model(str(tiny_student_dir), "student", settings=SETTINGS)
    teacher = open_model(str(tiny_lm_dir), "teacher", settings=SETTINGS)
    return student, evaluate(student, teacher, ROWS, EvalConfig(memory=False), progress=False)


def _same_answers(a, b):
    assert [r["teacher"] for r in a["per_input"]] == [r["teacher"] for r in b["per_input"]]
    assert a["student"]["agreement"] == b["student"]["agreement"]
    assert a["student"]["kl_to_teacher"] == pytest.approx(b["student"]["kl_to_teacher"], abs=2e-3)


@pytest.mark.slow  # starts a `distill serve` subprocess (imports torch + transformers)
def test_http_teacher_gives_the_local_teachers_numbers(server, local, tiny_student_dir, tmp_path):
    _, expected = local
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "ev"
    argv = ["eval", "--student", str(tiny_student_dir), "--teacher", server, "--inputs", str(inputs)]
    assert main([*argv, "--out", str(out), "--max-new-tokens", "4", "--top-logprobs", "3"]) == 0
    got = json.loads((out / "report.json").read_text())
    assert got["n_evaluated"] == len(ROWS) and got["teacher"]["name"] == server
    _same_answers(got, expected)
    assert got["teacher"]["latency_ms"]["p50"] > 0
    # Peak memory: the local student is measured in its own process, the endpoint cannot be.
    assert got["teacher"]["peak_memory_mb"] is None
    assert got["teacher"]["memory"]["reason"] == "remote endpoint: not measurable here"
    assert "teacher peak memory: remote endpoint: not measurable here" in got["problems"]
    s_mem = got["student"]["memory"]
    assert 0 < got["student"]["peak_memory_mb"] == s_mem["rss_growth_mb"] < s_mem["peak_rss_mb"]
    assert s_mem["n_inputs"] == 4 and "transformers" in s_mem["method"]


@pytest.mark.slow
def test_teacher_endpoint_failing_mid_run_is_counted_not_fatal(server, local):
    from distill.models.api import APITeacher

    student, _ = local
    with FaultProxy(server.rsplit("/v1", 1)[0], rate=0.4, kinds=("500",), seed=3) as proxy:
        teacher = TeacherRunner(APITeacher(proxy.url + "/v1", max_retries=0), "proxied", SETTINGS)
        result = evaluate(student, teacher, ROWS, EvalConfig(memory=False), progress=False)
    failed = proxy.faults["500"]
    assert 0 < failed < len(ROWS)
    assert result["n_evaluated"] == len(ROWS) - failed
    assert result["excluded"]["by_reason"]["teacher: request failed (APIError)"]["count"] == failed


def test_store_answers_stand_in_for_the_teacher(tiny_lm_dir, local, tmp_path):
    from distill.models.hf import HFTeacher
    from distill.store.generate import generate

    student, expected = local
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:8]))
    generate(HFTeacher(tiny_lm_dir), prompts, tmp_path / "store", settings=SETTINGS, progress=False)
    teacher = open_model(str(tmp_path / "store"), "teacher")
    result = evaluate(student, teacher, ROWS, EvalConfig(memory=False), progress=False)
    # Two inputs were never generated: counted, not dropped silently.
    assert result["excluded"]["by_reason"]["teacher: not in store"]["count"] == 2
    assert [r["teacher"] for r in result["per_input"]] == [r["teacher"] for r in expected["per_input"][:8]]
    assert result["teacher"]["latency_ms"] is None and result["speedup"] is None
    assert result["student"]["kl_to_teacher"] is not None
    assert probe_memory(teacher, ROWS) == {
        "peak_memory_mb": None,
        "reason": "answers read from a store: no model runs here",
    }
    with pytest.raises(ValueError, match="only stand in for the teacher"):
        open_model(str(tmp_path / "store"), "student")

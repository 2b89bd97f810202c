"""`distill generate` against a real `distill serve` on 127.0.0.1, through a real fault-injecting proxy.

Required figures: kill -9 at 10 random moments then resume -> 0 lost, 0 duplicated, same content as
an uninterrupted greedy run; faults on a third of requests -> every prompt in the store or in
failures.jsonl, never both, never neither; no 4xx but 429 retried; a canary API key in no file,
log line or exception text; a changed setting never reuses a record; an identical re-run makes
zero requests.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from distill import store
from distill.cli import main
from distill.models.api import APIError, APITeacher
from distill.models.base import GenerationSettings, Request
from distill.store.generate import generate
from faultproxy import FaultProxy
from servers import running_server

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions")


def write_prompts(path: Path, n: int, *, start: int = 0) -> Path:
    with path.open("w") as f:
        for i in range(start, start + n):
            if i % 4 == 3:  # a quarter are chats
                row = {"id": f"q{i}", "messages": [{"role": "user", "content": f"Invoice {i:04d} total?"}]}
            else:
                row = {"id": f"q{i}", "prompt": f"Invoice {i:04d} from Acme"}
            f.write(json.dumps(row) + "\n")
    return path


def completions_seen(proxy: FaultProxy) -> int:
    return sum(proxy.seen[p] for p in COMPLETION_PATHS)


def cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distill", "generate", *args],
        env=kw.pop("env", ENV),
        capture_output=True,
        text=True,
        timeout=120,
        **kw,
    )


@pytest.fixture(scope="module")
def server(tiny_lm_server):
    return tiny_lm_server


@pytest.fixture(scope="module")
def model(tiny_lm_model_id) -> str:
    return tiny_lm_model_id


def stamp(path: Path):
    """(inode, mtime) of ``path`` or None: the manifest is rewritten (renamed over) when a writer opens."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns)


def wait_until(condition, proc, timeout: float = 60.0) -> None:
    """Poll ``condition()`` until true or ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while not condition() and proc.poll() is None:
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        time.sleep(0.01)


def records_by_id(path) -> dict:
    return {r["id"]: r for r in store.open(path)}


@pytest.mark.slow
def test_kill9_at_10_random_moments_loses_and_duplicates_nothing(server, tmp_path):
    n = 24
    prompts = write_prompts(tmp_path / "p.jsonl", n)
    common = [
        "--teacher",
        server,
        "--prompts",
        str(prompts),
        "--top-k",
        "4",
        "--max-new-tokens",
        "4",
        "--concurrency",
        "1",  # one request at a time: greedy output independent of how the server batches
        "--flush-every",
        "1",
        "--no-progress",
    ]
    ref = cli([*common, "--out", str(tmp_path / "ref")])  # the uninterrupted run
    assert ref.returncode == 0, ref.stderr
    commits = sorted(p.stat().st_mtime for p in (tmp_path / "ref").glob("shard-*.parquet"))
    assert len(commits) == n  # --flush-every 1: one shard per answer
    per_answer = (commits[-1] - commits[0]) / (n - 1)
    rng = random.Random(4)
    kills, partial = 0, []
    for _ in range(10):
        out = tmp_path / "s"
        shards = len(list(out.glob("shard-*.parquet")))
        opened = stamp(out / "manifest.json")
        proc = subprocess.Popen(
            [sys.executable, "-m", "distill", "generate", *common, "--out", str(out)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # A random moment of the work: after 0-2 more commits, somewhere before the next one
        # (inside a request, between requests, or while a shard is being written).
        wait_until(lambda o=out, t=opened: stamp(o / "manifest.json") != t, proc)  # the store is open
        target = shards + rng.randrange(3)
        wait_until(lambda o=out, t=target: len(list(o.glob("shard-*.parquet"))) >= t, proc)
        time.sleep(rng.uniform(0.0, per_answer))
        if proc.poll() is None:
            proc.kill()  # SIGKILL: no cleanup of any kind
            kills += 1
        proc.wait()
        partial.append(len(store.open(out)))
    assert kills >= 8  # the moments fell inside the runs
    assert any(0 < p < n for p in partial)  # work was cut in the middle
    final = cli([*common, "--out", str(tmp_path / "s")])
    assert final.returncode == 0, final.stderr
    keys = store.open(tmp_path / "s").keys()
    assert len(keys) == len(set(keys)) == n  # 0 duplicated, 0 lost
    assert store.open(tmp_path / "s").failures() == []
    got, want = records_by_id(tmp_path / "s"), records_by_id(tmp_path / "ref")
    assert got.keys() == want.keys()
    for rid, r in want.items():  # greedy: the same content as the uninterrupted run
        for field in (
            "key",
            "completion",
            "prompt_token_ids",
            "completion_token_ids",
            "topk_ids",
            "finish_reason",
        ):
            assert got[rid][field] == r[field], (rid, field)
        if r["topk_logprobs"] is None:  # the endpoint gave no usable top-k for this prompt
            assert got[rid]["topk_logprobs"] is None
        else:
            np.testing.assert_allclose(got[rid]["topk_logprobs"], r["topk_logprobs"], atol=1e-2)
    assert any(r["topk_ids"] is not None for r in want.values()), [
        (r["id"], r["prompt"], r["completion_token_ids"], r["finish_reason"]) for r in want.values()
    ]


def test_faults_on_a_third_of_requests_partition_prompts_then_retry(server, model, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 30)
    out = tmp_path / "s"
    settings = GenerationSettings(max_new_tokens=4, top_logprobs=3)
    with FaultProxy(server.rsplit("/v1", 1)[0], rate=1 / 3, seed=7, hang=4.0) as proxy:
        teacher = APITeacher(proxy.url + "/v1", model=model, timeout=3.0, max_retries=1, backoff=0.05, seed=0)
        res = generate(teacher, prompts, out, settings=settings, concurrency=8, progress=False)
        assert sum(proxy.faults.values()) >= 5 and len(proxy.faults) >= 3
        keys = set(store.open(out).keys())
        failed = {f["key"] for f in store.open(out).failures()}
        raw = [json.loads(x)["key"] for x in (out / "failures.jsonl").read_text().splitlines()]
        all_keys = {p.key for p in _prompt_keys(teacher, settings, prompts)}
        assert (
            keys | failed == all_keys and not keys & failed and set(raw) == failed
        )  # never both, never neither
        assert res.failed == len(failed) >= 1 and res.answered == len(keys)
        assert all(
            "gave up after 2 attempts" in f["error"] or "HTTP" in f["error"]
            for f in store.open(out).failures()
        )
        # The next run retries exactly the failures, and they never reached the training data before.
        proxy.rate = 0.0
        before = completions_seen(proxy)
        res2 = generate(teacher, prompts, out, settings=settings, concurrency=8, progress=False)
        assert completions_seen(proxy) - before == len(failed) == res2.answered
    assert set(store.open(out).keys()) == all_keys and store.open(out).failures() == []
    assert (out / "failures.jsonl").read_text() == ""


def _prompt_keys(teacher, settings, prompts):
    from distill.store.generate import Prompt, load_prompts, store_config

    chash = store.config_hash(store_config(teacher, settings))
    return [
        Prompt(
            store.record_key(chash, r["prompt"], r["messages"], r["id"]), r["id"], r["prompt"], r["messages"]
        )
        for r in load_prompts(prompts)
    ]


def test_no_4xx_but_429_is_retried(server, model):
    settings = GenerationSettings(max_new_tokens=2)
    req = [Request("a", prompt="Invoice 0001")]
    with FaultProxy(server.rsplit("/v1", 1)[0]) as proxy:
        teacher = APITeacher(proxy.url + "/v1", model=model, max_retries=3, backoff=0.01)
        # A real 400 from distill serve: top_logprobs beyond its limit.
        with pytest.raises(APIError) as err:
            teacher.complete(req, GenerationSettings(max_new_tokens=2, top_logprobs=50))
        assert err.value.status == 400 and completions_seen(proxy) == 1
        for status in (401, 403, 404, 422):
            proxy.force_status = status
            before = completions_seen(proxy)
            with pytest.raises(APIError) as err:
                teacher.complete(req, settings)
            assert err.value.status == status and completions_seen(proxy) - before == 1
    with FaultProxy(server.rsplit("/v1", 1)[0], rate=1.0, kinds=("429",), retry_after="0.3") as proxy:
        teacher = APITeacher(proxy.url + "/v1", model=model, max_retries=2, backoff=0.001)
        t0 = time.monotonic()
        with pytest.raises(APIError) as err:
            teacher.complete(req, settings)
        assert err.value.status == 429 and completions_seen(proxy) == 3  # 1 + 2 retries
        assert time.monotonic() - t0 >= 0.6  # Retry-After honoured twice
    with FaultProxy(
        server.rsplit("/v1", 1)[0], rate=1.0, kinds=("500", "drop", "malformed"), seed=3
    ) as proxy:
        teacher = APITeacher(proxy.url + "/v1", model=model, max_retries=4, backoff=0.001)
        with pytest.raises(APIError, match="gave up after 5 attempts"):
            teacher.complete(req, settings)
        assert completions_seen(proxy) == 5


@pytest.mark.slow
def test_canary_api_key_in_no_file_log_or_exception(tiny_lm_dir, model, tmp_path):
    model_name = model
    canary = "sk-canary-7f3a9c1e5b2d4f60"
    env = {**ENV, "DISTILL_TEST_KEY": canary}
    log = tmp_path / "server.log"
    prompts = write_prompts(tmp_path / "p.jsonl", 12)
    with running_server(tiny_lm_dir, api_key_env="DISTILL_TEST_KEY", env=env, log_file=log) as url:
        with FaultProxy(url.rsplit("/v1", 1)[0], rate=0.5, seed=1, hang=3.0) as proxy:
            out = tmp_path / "s"
            r = cli(
                [
                    "--teacher",
                    proxy.url + "/v1",
                    "--prompts",
                    str(prompts),
                    "--out",
                    str(out),
                    "--top-k",
                    "2",
                    "--max-new-tokens",
                    "3",
                    "--api-key-env",
                    "DISTILL_TEST_KEY",
                    "--max-retries",
                    "0",
                    "--timeout",
                    "2",
                ],
                env=env,
            )
            assert r.returncode in (0, 1), r.stderr
            assert any(
                h.get("Authorization") == f"Bearer {canary}" for h in proxy.headers_seen
            )  # the key was used
            texts = [r.stdout, r.stderr]
            # A wrong key in the environment: the 401 error text must not carry it either.
            bad = {**env, "DISTILL_TEST_KEY": canary + "-wrong"}
            args2 = [
                "--teacher",
                url,
                "--prompts",
                str(prompts),
                "--top-k",
                "2",
                "--max-new-tokens",
                "3",
                "--api-key-env",
                "DISTILL_TEST_KEY",
                "--no-progress",
            ]
            r1 = cli([*args2, "--out", str(tmp_path / "s1")], env=bad)  # the /v1/models lookup is refused
            assert r1.returncode == 2 and "HTTP 401" in r1.stderr, r1.stderr
            # With --model too: the server check before the first prompt (its /v1/models card) is refused
            # with 401, so the run stops with the error before any prompt is sent, leaving no store.
            r2 = cli([*args2, "--model", model_name, "--out", str(tmp_path / "s2")], env=bad)
            assert r2.returncode == 2 and "HTTP 401" in r2.stderr and not (tmp_path / "s2").exists(), (
                r2.stderr
            )
            texts += [r1.stdout, r1.stderr]
            texts += [r2.stdout, r2.stderr]
            os.environ["DISTILL_TEST_KEY"] = canary
            try:
                teacher = APITeacher(url, api_key_env="DISTILL_TEST_KEY")
                texts.append(repr(teacher) + repr(vars(teacher)) + json.dumps(teacher.identity()))
                os.environ["DISTILL_TEST_KEY"] = canary + "-wrong"
                with pytest.raises(APIError) as err:
                    APITeacher(url, api_key_env="DISTILL_TEST_KEY")
                texts.append(str(err.value) + repr(err.value))
            finally:
                del os.environ["DISTILL_TEST_KEY"]
    texts.append(log.read_text())
    texts += [p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file()]
    assert len(texts) > 8
    assert not [t for t in texts if canary in t]


def test_changed_setting_never_reuses_and_identical_rerun_makes_zero_requests(server, model, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 6)
    with FaultProxy(server.rsplit("/v1", 1)[0]) as proxy:
        base = [
            "generate",
            "--teacher",
            proxy.url + "/v1",
            "--model",
            model,
            "--prompts",
            str(prompts),
            "--top-k",
            "2",
            "--max-new-tokens",
            "3",
            "--no-progress",
        ]
        assert main([*base, "--out", str(tmp_path / "s")]) == 0
        assert completions_seen(proxy) == 6
        before = proxy.total_seen
        assert main([*base, "--out", str(tmp_path / "s")]) == 0
        assert proxy.total_seen == before  # identical re-run: zero requests of any kind
        for change in (
            ["--temperature", "0.7"],
            ["--top-k", "3"],
            ["--max-new-tokens", "4"],
            ["--model", "other"],
        ):
            assert main([*base, *change, "--out", str(tmp_path / "s")]) == 2  # refused: stale records
            assert proxy.total_seen == before
        # The same change into a new store asks every prompt again.
        assert main([*base, "--temperature", "0.7", "--out", str(tmp_path / "t")]) == 0
        assert completions_seen(proxy) == 12
        # A changed prompt text (new id) is asked; an id reused for another text is refused.
        rows = [json.loads(x) for x in prompts.read_text().splitlines()]
        rows[0] = {"id": "new", "prompt": "Invoice 9999 from Beta"}
        prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert main([*base, "--out", str(tmp_path / "s")]) == 0
        assert completions_seen(proxy) == 13
        rows[0] = {"id": "new", "prompt": "Invoice 9999 from Gamma"}
        prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert main([*base, "--out", str(tmp_path / "s")]) == 2
        assert completions_seen(proxy) == 13


def test_budget_stops_cleanly_and_resume_finishes(server, model, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 10)
    settings = GenerationSettings(max_new_tokens=4, top_logprobs=2)
    teacher = APITeacher(server, model=model)
    res = generate(
        teacher, prompts, tmp_path / "s", settings=settings, concurrency=2, budget_tokens=60, progress=False
    )
    assert res.stopped_by_budget and 0 < res.answered < 10 and res.left == 10 - res.answered
    assert res.tokens <= 60 and len(store.open(tmp_path / "s")) == res.answered
    res2 = generate(teacher, prompts, tmp_path / "s", settings=settings, concurrency=2, progress=False)
    assert (
        res2.done_before == res.answered and res2.answered == 10 - res.answered and not res2.stopped_by_budget
    )
    # The command says how far it got and exits 3.
    args = ["generate", "--teacher", server, "--model", model, "--prompts", str(prompts), "--top-k", "2"]
    args += ["--max-new-tokens", "4", "--out", str(tmp_path / "t"), "--budget-tokens", "60", "--no-progress"]
    assert main(args) == 3
    assert 0 < len(store.open(tmp_path / "t")) < 10


def test_replicas_share_the_load(server, model, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 8)
    upstream = server.rsplit("/v1", 1)[0]
    with FaultProxy(upstream) as a, FaultProxy(upstream) as b:
        teacher = APITeacher([a.url + "/v1", b.url + "/v1"], model=model)
        res = generate(
            teacher,
            prompts,
            tmp_path / "s",
            settings=GenerationSettings(max_new_tokens=2),
            concurrency=4,
            progress=False,
        )
        assert res.answered == 8 and completions_seen(a) == completions_seen(b) == 4

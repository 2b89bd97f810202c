"""`distill serve --router --fallback` for real: a student server routing to a second `distill serve`
acting as the teacher, driven with the official openai client (all on 127.0.0.1)."""

from __future__ import annotations

import json
import uuid

import httpx
import openai
import pytest

from distill.cli import main
from distill.evaluate.signals import confidence_signals
from distill.models.base import GenerationSettings, Request
from distill.models.hf import HFTeacher
from distill.route.router import Router
from distill.serve.routing import ROUTE_HEADER, ROUTER_TOP_K
from servers import free_port, running_server

TEACHER_KEY = f"sk-teacher-canary-{uuid.uuid4().hex}"
STUDENT_KEY = f"sk-student-{uuid.uuid4().hex}"
MAX_TOKENS = 6
PROMPTS = [
    "Invoice 0001 from",
    "Invoice 0042 from Acme GmbH: total",
    "due 2024-",
    "Acme Ltd",
    "total 3.50 EUR",
    "Invoice",
    "from Acme Inc: total 120.",
    "EUR, due",
]
CHAT = [[{"role": "user", "content": "Invoice 0007 from Acme"}], [{"role": "user", "content": "total"}]]
TEACHER_COST, STUDENT_COST = 2000.0, 100.0  # $ per 1M requests, as `route fit --prices` writes them


def _student_answers(model_dir, requests):
    """What the student says, greedy, with the router's top-k: (text, mean_logprob) per request."""
    student = HFTeacher(model_dir)
    settings = GenerationSettings(max_new_tokens=MAX_TOKENS, temperature=0.0, top_logprobs=ROUTER_TOP_K)
    out = []
    for r in requests:  # one at a time, as the server answers sequential requests
        g = student.generate([r], settings)[0]
        out.append((g.completion.text, confidence_signals(g.completion.top_logprobs)["mean_logprob"]))
    return out


@pytest.fixture(scope="module")
def setup(tiny_lm_dir, tiny_student_dir, tmp_path_factory):
    """Teacher server (key required), the student's own answers, and a router fitted so that the
    prompts split between the two at the widest gap in the student's confidence."""
    tmp = tmp_path_factory.mktemp("serve_router")
    own = _student_answers(tiny_student_dir, [Request(id=f"p{i}", prompt=p) for i, p in enumerate(PROMPTS)])
    own_chat = _student_answers(
        tiny_student_dir, [Request(id=f"c{i}", messages=tuple(m)) for i, m in enumerate(CHAT)]
    )
    values = sorted(v for _, v in own)
    gaps = [(values[i + 1] - values[i], i) for i in range(2, len(values) - 3)]  # >= 3 each side
    gap, i = max(gaps)
    # The random tiny student is nearly uniform, so gaps are small (~1e-3 nats), but the server runs
    # the same float32 code on one request at a time, so its values match these to ~1e-7.
    assert gap > 1e-4, f"student confidences too close to split: {values}"
    mid = (values[i] + values[i + 1]) / 2
    hi, lo = mid + gap / 4, mid - gap / 4
    # Constructed calibration: confident answers are right, unconfident ones wrong, so at target
    # 0.99 the only admissible threshold is ``hi`` (in the gap, gap/4 from each measured value).
    router = Router(0.99, "mean_logprob", teacher_cost=TEACHER_COST, student_cost=STUDENT_COST).fit(
        {
            "mean_logprob": [hi] * 4 + [lo] * 4,
            "student_quality": [1.0] * 4 + [0.0] * 4,
            "teacher_quality": [1.0] * 8,
        }
    )
    assert router.threshold_ == hi
    path = router.save(tmp / "router.json")
    with running_server(tiny_lm_dir, api_key_env="T_KEY", env={"T_KEY": TEACHER_KEY}) as teacher_url:
        yield {
            "tmp": tmp,
            "router_path": path,
            "threshold": hi,
            "own": own,
            "own_chat": own_chat,
            "teacher_url": teacher_url,
            "teacher": openai.OpenAI(base_url=teacher_url, api_key=TEACHER_KEY, max_retries=0),
        }


@pytest.fixture(scope="module")
def routed(setup, tiny_student_dir):
    """The student server routing to the teacher; yields (client, base_url, log path)."""
    log = setup["tmp"] / "student.log"
    args = ("--router", str(setup["router_path"]), "--fallback", setup["teacher_url"])
    args += ("--fallback-api-key-env", "T_KEY")
    env = {"T_KEY": TEACHER_KEY, "S_KEY": STUDENT_KEY}
    with running_server(tiny_student_dir, api_key_env="S_KEY", env=env, extra_args=args, log_file=log) as url:
        yield openai.OpenAI(base_url=url, api_key=STUDENT_KEY, max_retries=0), url, log


def _metrics(base_url: str) -> dict[str, float]:
    r = httpx.get(
        base_url.removesuffix("/v1") + "/metrics", headers={"authorization": f"Bearer {STUDENT_KEY}"}
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert TEACHER_KEY not in r.text
    samples = [line.rsplit(" ", 1) for line in r.text.splitlines() if line and not line.startswith("#")]
    return {name: float(value) for name, value in samples}


def _route(raw) -> str:
    return raw.headers[ROUTE_HEADER]


def test_requests_go_each_way_and_match_the_model_that_answered(setup, routed):
    client, url, log = routed
    before = _metrics(url)
    routes, bodies = [], []
    for prompt, (own_text, confidence) in zip(PROMPTS, setup["own"], strict=True):
        raw = client.completions.with_raw_response.create(
            model="any", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
        )
        bodies.append(raw.text)
        got, route = raw.parse(), _route(raw)
        expected_route = "student" if confidence >= setup["threshold"] else "teacher"
        assert route == expected_route, (prompt, confidence, setup["threshold"])
        if route == "teacher":
            direct = setup["teacher"].completions.create(
                model="any", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
            )
            assert got.choices[0].text == direct.choices[0].text
            assert got.model == direct.model  # the teacher's response, passed through unchanged
        else:
            assert got.choices[0].text == own_text
            assert got.choices[0].logprobs is None  # the router's top-k is not leaked to the client
        routes.append(route)
    assert routes.count("student") >= 3 and routes.count("teacher") >= 3, routes

    for messages, (own_text, confidence) in zip(CHAT, setup["own_chat"], strict=True):
        raw = client.chat.completions.with_raw_response.create(
            model="any", messages=messages, max_tokens=MAX_TOKENS, temperature=0
        )
        bodies.append(raw.text)
        got, route = raw.parse(), _route(raw)
        assert route == ("student" if confidence >= setup["threshold"] else "teacher")
        if route == "teacher":
            direct = setup["teacher"].chat.completions.create(
                model="any", messages=messages, max_tokens=MAX_TOKENS, temperature=0
            )
            assert got.choices[0].message.content == direct.choices[0].message.content
        else:
            assert got.choices[0].message.content == own_text
        routes.append(route)

    after = _metrics(url)
    for r in ("student", "teacher"):
        key = f'distill_requests_total{{route="{r}"}}'
        assert after[key] - before[key] == routes.count(r)
        count = f'distill_request_latency_seconds_count{{route="{r}"}}'
        assert after[count] - before[count] == routes.count(r)
    n_student = after['distill_requests_total{route="student"}']
    n_all = n_student + after['distill_requests_total{route="teacher"}']
    saved = (n_student * TEACHER_COST - n_all * STUDENT_COST) / 1e6
    assert after["distill_estimated_cost_saved"] == pytest.approx(saved, rel=1e-6)
    assert after["distill_fallback_errors_total"] == before["distill_fallback_errors_total"] == 0
    assert all(TEACHER_KEY not in b for b in bodies)
    assert TEACHER_KEY not in log.read_text()


def test_streaming_and_several_prompts(setup, routed):
    client, _, _ = routed
    by_route = {}
    for prompt, (_, confidence) in zip(PROMPTS, setup["own"], strict=True):
        by_route.setdefault("student" if confidence >= setup["threshold"] else "teacher", []).append(prompt)
    # A streamed teacher-routed request: the teacher's events pass through.
    prompt = by_route["teacher"][0]
    stream = client.completions.create(
        model="any", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    text = "".join(c.choices[0].text for c in stream if c.choices)
    direct = setup["teacher"].completions.create(
        model="any", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
    )
    assert text == direct.choices[0].text
    # A streamed student-routed request: the student's own events.
    own = dict(zip(PROMPTS, (t for t, _ in setup["own"]), strict=True))
    prompt = by_route["student"][0]
    stream = client.completions.create(
        model="any", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == own[prompt]
    # Several prompts: the whole request goes to the teacher when any one is unconfident.
    mixed = [by_route["student"][0], by_route["teacher"][0]]
    raw = client.completions.with_raw_response.create(
        model="any", prompt=mixed, max_tokens=MAX_TOKENS, temperature=0
    )
    assert _route(raw) == "teacher"
    direct = setup["teacher"].completions.create(
        model="any", prompt=mixed, max_tokens=MAX_TOKENS, temperature=0
    )
    assert [c.text for c in raw.parse().choices] == [c.text for c in direct.choices]
    confident = by_route["student"][:2]
    raw = client.completions.with_raw_response.create(
        model="any", prompt=confident, max_tokens=MAX_TOKENS, temperature=0, logprobs=2
    )
    assert _route(raw) == "student"
    choices = raw.parse().choices
    assert [c.text for c in choices] == [own[p] for p in confident]
    assert all(len(row) == 2 for c in choices for row in c.logprobs.top_logprobs)  # the client's k, not 5


def test_metrics_need_the_key(routed):
    _, url, _ = routed
    base = url.removesuffix("/v1")
    assert httpx.get(base + "/metrics").status_code == 401
    assert httpx.get(base + "/health").status_code == 200


def test_dead_fallback_is_a_counted_502(setup, tiny_student_dir):
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    log = setup["tmp"] / "dead.log"
    args = ("--router", str(setup["router_path"]), "--fallback", dead, "--fallback-api-key-env", "T_KEY")
    with running_server(tiny_student_dir, env={"T_KEY": TEACHER_KEY}, extra_args=args, log_file=log) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        teacher_prompt = next(
            p for p, (_, c) in zip(PROMPTS, setup["own"], strict=True) if c < setup["threshold"]
        )
        with pytest.raises(openai.APIStatusError) as info:
            client.completions.create(
                model="any", prompt=teacher_prompt, max_tokens=MAX_TOKENS, temperature=0
            )
        assert info.value.status_code == 502
        body = info.value.response.json()
        assert body["error"]["code"] == "fallback_failed" and TEACHER_KEY not in info.value.response.text
        student_prompt = next(
            p for p, (_, c) in zip(PROMPTS, setup["own"], strict=True) if c >= setup["threshold"]
        )
        assert client.completions.create(
            model="any", prompt=student_prompt, max_tokens=MAX_TOKENS, temperature=0
        )
        text = httpx.get(url.removesuffix("/v1") + "/metrics").text
        assert "distill_fallback_errors_total 1\n" in text
        assert 'distill_requests_total{route="teacher"} 1\n' in text
        assert 'distill_requests_total{route="student"} 1\n' in text
    assert TEACHER_KEY not in log.read_text()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--router", "ROUTER"], "--router needs --fallback"),
        (["--fallback", "http://127.0.0.1:9/v1"], "--fallback needs --router"),
        (["--router", "MISSING", "--fallback", "http://127.0.0.1:9/v1"], "--router: no such router file"),
        (["--router", "BAD", "--fallback", "http://127.0.0.1:9/v1"], "--router"),
        (["--router", "ROUTER", "--fallback", "127.0.0.1:9"], "--fallback must be an http(s) base URL"),
        (
            ["--router", "ROUTER", "--fallback", "http://u:secret@h/v1"],
            "--fallback must not carry credentials",
        ),
        (
            ["--router", "ROUTER", "--fallback", "http://h/v1", "--fallback-api-key-env", "NO_SUCH_VAR_X"],
            "NO_SUCH_VAR_X",
        ),
    ],
)
def test_bad_routing_flags_fail_before_the_model_loads(setup, tmp_path, capsys, extra, needle):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else"}))
    names = {"ROUTER": str(setup["router_path"]), "MISSING": str(tmp_path / "nope.json"), "BAD": str(bad)}
    # The model directory does not exist either: the routing error must come first.
    code = main(["serve", str(tmp_path / "no-model"), *[names.get(a, a) for a in extra]])
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert "secret" not in err


# -- out-of-distribution cut-off ----------------------------------------------------------------

OOD_TRAIN = [
    f"Invoice {i:04d} from Acme {['GmbH', 'Ltd', 'Inc'][i % 3]}: total {i * 7 % 300}.{i % 100:02d} EUR, due 2024-{i % 12 + 1:02d}"
    for i in range(40)
]
IN_PROMPT = PROMPTS[1]  # "Invoice 0042 from Acme GmbH: total"
IN_CHAT = CHAT[0]
OOD_PROMPT = "¿Dónde está la biblioteca municipal? Responde en español, por favor."
OOD_CHAT = [{"role": "user", "content": "Schreibe ein kurzes Gedicht über den Herbstwald und den Nebel."}]


@pytest.fixture(scope="module")
def ood_routed(setup, tiny_student_dir):
    """A student server whose router cuts on the OOD score of a TF-IDF scorer fitted on invoice
    lines, with a confidence threshold below every answer the student gives (so only the OOD cut
    can send a request to the teacher); yields (client, base_url, scores, router)."""
    from distill.workload.coverage import OODScorer
    from distill.workload.embed import row_text

    scorer = OODScorer(embedder="tfidf").fit(OOD_TRAIN)
    texts = {
        "in": row_text({"prompt": IN_PROMPT}, None, "t"),
        "in_chat": row_text({"messages": IN_CHAT}, None, "t"),
        "out": row_text({"prompt": OOD_PROMPT}, None, "t"),
        "out_chat": row_text({"messages": OOD_CHAT}, None, "t"),
    }
    scores = dict(zip(texts, scorer.score(list(texts.values())), strict=True))
    a, b = max(scores["in"], scores["in_chat"]), min(scores["out"], scores["out_chat"])
    assert b > a + 0.05, scores
    # Constructed calibration: the student is right on inputs scoring ``a`` and wrong on those scoring
    # ``b``, all at one low confidence; at target 0.99 the fit must cut between a and b (at its 80th
    # percentile, a + 0.2 (b - a)) and keep the confidence threshold at that low value.
    low = min(v for _, v in setup["own"] + setup["own_chat"]) - 1.0
    router = Router(
        0.99, "mean_logprob", ood_signal="ood", teacher_cost=TEACHER_COST, student_cost=STUDENT_COST
    )
    router.fit(
        {
            "mean_logprob": [low] * 10,
            "ood": [a] * 8 + [b] * 2,
            "student_quality": [1.0] * 8 + [0.0] * 2,
            "teacher_quality": [1.0] * 10,
        }
    )
    assert router.threshold_ == low and a < router.ood_threshold_ < b
    path = router.save(setup["tmp"] / "ood" / "router.json", ood_scorer=scorer)
    args = ("--router", str(path), "--fallback", setup["teacher_url"], "--fallback-api-key-env", "T_KEY")
    env = {"T_KEY": TEACHER_KEY, "S_KEY": STUDENT_KEY}
    log = setup["tmp"] / "ood-student.log"
    with running_server(tiny_student_dir, api_key_env="S_KEY", env=env, extra_args=args, log_file=log) as url:
        yield openai.OpenAI(base_url=url, api_key=STUDENT_KEY, max_retries=0), url, scores, router


def test_out_of_distribution_requests_go_to_the_teacher_with_reason_ood(setup, ood_routed):
    client, url, scores, router = ood_routed
    before = _metrics(url)
    own = dict(zip(PROMPTS, (t for t, _ in setup["own"]), strict=True))
    raw = client.completions.with_raw_response.create(
        model="any", prompt=IN_PROMPT, max_tokens=MAX_TOKENS, temperature=0
    )
    assert _route(raw) == "student" and raw.parse().choices[0].text == own[IN_PROMPT]
    raw = client.chat.completions.with_raw_response.create(
        model="any", messages=IN_CHAT, max_tokens=MAX_TOKENS, temperature=0
    )
    assert _route(raw) == "student" and raw.parse().choices[0].message.content == setup["own_chat"][0][0]

    raw = client.completions.with_raw_response.create(
        model="any", prompt=OOD_PROMPT, max_tokens=MAX_TOKENS, temperature=0
    )
    assert (_route(raw), raw.headers["x-distill-route-reason"]) == ("teacher", "ood")
    direct = setup["teacher"].completions.create(
        model="any", prompt=OOD_PROMPT, max_tokens=MAX_TOKENS, temperature=0
    )
    assert raw.parse().choices[0].text == direct.choices[0].text
    raw = client.chat.completions.with_raw_response.create(
        model="any", messages=OOD_CHAT, max_tokens=MAX_TOKENS, temperature=0
    )
    assert (_route(raw), raw.headers["x-distill-route-reason"]) == ("teacher", "ood")
    # One out-of-distribution prompt among in-distribution ones sends the whole request.
    raw = client.completions.with_raw_response.create(
        model="any", prompt=[IN_PROMPT, OOD_PROMPT], max_tokens=MAX_TOKENS, temperature=0
    )
    assert _route(raw) == "teacher" and len(raw.parse().choices) == 2

    after = _metrics(url)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta['distill_requests_total{route="student"}'] == 2
    assert delta['distill_requests_total{route="teacher"}'] == 3
    assert delta['distill_teacher_requests_total{reason="ood"}'] == 3
    assert delta['distill_teacher_requests_total{reason="confidence"}'] == 0
    assert delta["distill_ood_score_seconds_count"] == 5 and delta["distill_ood_score_seconds_sum"] > 0
    n_student = after['distill_requests_total{route="student"}']
    n_ran = (
        n_student + after['distill_teacher_requests_total{reason="confidence"}']
    )  # OOD ones skip the student
    saved = (n_student * TEACHER_COST - n_ran * STUDENT_COST) / 1e6
    assert after["distill_estimated_cost_saved"] == pytest.approx(saved, rel=1e-6)


def test_server_scores_the_text_route_fit_calibrated_on():
    from distill.serve.routing import request_texts
    from distill.workload.embed import row_text

    rows = [{"prompt": IN_PROMPT}, {"messages": IN_CHAT + [{"role": "assistant", "content": "ok"}]}]
    body_chat = {"messages": rows[1]["messages"], "model": "x"}
    assert request_texts("/chat/completions", body_chat) == [row_text(rows[1], None, "r")]
    assert request_texts("/completions", {"prompt": IN_PROMPT}) == [row_text(rows[0], None, "r")]
    assert request_texts("/completions", {"prompt": [IN_PROMPT, OOD_PROMPT]}) == [IN_PROMPT, OOD_PROMPT]
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert request_texts("/chat/completions", {"messages": parts}) == [
        row_text({"messages": parts}, None, "r")
    ]


def test_router_with_ood_cut_but_no_scorer_fails_at_start_naming_the_path(tmp_path, capsys):
    import shutil

    from distill.workload.coverage import OODScorer

    router = Router(0.99, "mean_logprob", ood_signal="ood").fit(
        {
            "mean_logprob": [-1.0] * 10,
            "ood": [0.5] * 8 + [3.0] * 2,
            "student_quality": [1.0] * 8 + [0.0] * 2,
            "teacher_quality": [1.0] * 10,
        }
    )
    assert router.cuts_on_ood
    path = router.save(tmp_path / "router.json", ood_scorer=OODScorer(embedder="tfidf").fit(OOD_TRAIN))
    shutil.rmtree(tmp_path / "router.ood")  # the router copied without its scorer directory
    # The model directory does not exist either: the scorer error must come first.
    argv = ["serve", str(tmp_path / "no-model"), "--router", str(path), "--fallback", "http://127.0.0.1:9/v1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str((tmp_path / "router.ood").resolve()) in err and "missing" in err, err
    data = json.loads(path.read_text())
    del data["ood_scorer"]
    path.write_text(json.dumps(data))
    assert main(argv) == 2
    assert "records no OOD scorer" in capsys.readouterr().err


def test_route_fit_saves_the_scorer_the_server_then_scores_with(tiny_lm_dir, tiny_student_dir, tmp_path):
    """`route fit --train` writes router.ood/ beside the router; the server's scorer, loaded from it,
    gives exactly the OOD scores the router was calibrated on."""
    from distill.serve.routing import RoutingPolicy, load_router
    from distill.workload.coverage import OODScorer
    from distill.workload.embed import row_text

    rows = [{"id": f"p{i}", "prompt": PROMPTS[i]} for i in range(6)]
    rows += [{"id": "c0", "messages": IN_CHAT}, {"id": "o0", "prompt": OOD_PROMPT}]
    rows += [{"id": "o1", "messages": OOD_CHAT}]
    inputs, train = tmp_path / "in.jsonl", tmp_path / "train.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in OOD_TRAIN))
    out = tmp_path / "fit" / "router.json"
    argv = ["route", "fit", "--student", str(tiny_student_dir), "--teacher", str(tiny_lm_dir)]
    argv += ["--inputs", str(inputs), "--out", str(out), "--train", str(train), "--embedder", "tfidf"]
    argv += ["--max-new-tokens", "2", "--metric", "token_f1", "--holdout", "0.25"]
    assert main(argv) == 0
    assert (tmp_path / "fit" / "router.ood" / "arrays.npz").is_file()
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["n_answered"] == len(rows)
    router = load_router(out)
    assert router.ood_scorer_path_ == (tmp_path / "fit" / "router.ood").resolve()
    texts = [row_text(r, None, "row") for r in rows]
    assert OODScorer.load(router.ood_scorer_path_).score(texts).tolist() == report["features"]["ood"]
    if router.cuts_on_ood:  # depends on the random tiny models' answers
        policy = RoutingPolicy(router, "http://127.0.0.1:9/v1")
        assert policy.ood_scorer.score(texts).tolist() == report["features"]["ood"]


def test_a_request_that_cannot_be_scored_goes_to_the_teacher(tmp_path):
    """Scoring that fails (here: training embeddings of the wrong width, a real scipy error) counts
    as out of distribution: the teacher is asked (a dead port here: a counted 502), never the student."""
    import asyncio

    from distill.serve.routing import REASON_HEADER, RoutingPolicy
    from distill.workload.coverage import OODScorer

    router = Router(0.99, "mean_logprob", ood_signal="ood").fit(
        {
            "mean_logprob": [-1.0] * 10,
            "ood": [0.5] * 8 + [3.0] * 2,
            "student_quality": [1.0] * 8 + [0.0] * 2,
            "teacher_quality": [1.0] * 10,
        }
    )
    scorer = OODScorer(embedder="tfidf").fit(OOD_TRAIN)
    policy = RoutingPolicy(router, f"http://127.0.0.1:{free_port()}/v1", ood_scorer=scorer)
    body = {"model": "x", "prompt": IN_PROMPT}

    async def twice():
        before = await policy.screen("/completions", body, False, 0.0)
        scorer.train_embeddings_, scorer._train_t = scorer.train_embeddings_[:, :5], None
        after = await policy.screen("/completions", body, False, 0.0)
        await policy.aclose()
        return before, after

    before, response = asyncio.run(twice())
    assert before is None  # in distribution: the student would run
    assert response.status_code == 502 and response.headers[REASON_HEADER] == "ood"
    assert policy.metrics.teacher_reasons == {"confidence": 0, "ood": 1}
    assert policy.metrics.ood_scored == 1  # the failed call is not timed as a scoring

"""`distill serve URL --router R --fallback URL` for real: a model-free gateway in front of a student
`distill serve` (key required) and a teacher `distill serve`, driven with the official openai client
(all on 127.0.0.1). Faults come from real proxies (tests/faultproxy.py) and a really killed student."""

from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
import openai
import pytest

from distill.cli import main
from distill.evaluate.signals import confidence_signals
from distill.route.router import Router
from distill.serve.gateway import UPSTREAM_HEADER
from distill.serve.routing import REASON_HEADER, ROUTE_HEADER, ROUTER_TOP_K
from faultproxy import FaultProxy
from servers import running_server

STUDENT_KEY = f"sk-student-canary-{uuid.uuid4().hex}"
TEACHER_KEY = f"sk-teacher-canary-{uuid.uuid4().hex}"
GATEWAY_KEY = f"sk-gateway-canary-{uuid.uuid4().hex}"
CANARIES = (STUDENT_KEY, TEACHER_KEY, GATEWAY_KEY)
ENV = {"S_KEY": STUDENT_KEY, "T_KEY": TEACHER_KEY, "G_KEY": GATEWAY_KEY}
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
CHATS = [[{"role": "user", "content": "Invoice 0007 from Acme"}], [{"role": "user", "content": "total"}]]
TEACHER_COST, STUDENT_COST = 2000.0, 100.0


def _confidence(choice: dict) -> float:
    return confidence_signals([row[:ROUTER_TOP_K] for row in choice["top_token_logprobs"]])["mean_logprob"]


@pytest.fixture(scope="module")
def setup(tiny_student_dir, tiny_lm_server, tmp_path_factory):
    """The student server (key required), its own confidences, and a router whose threshold falls
    in the widest gap between them (as tests/integration/test_serve_router.py fits one)."""
    tmp = tmp_path_factory.mktemp("gateway")
    with running_server(tiny_student_dir, api_key_env="S_KEY", env=ENV) as student_url:
        own = {}
        for p in PROMPTS:
            r = httpx.post(
                student_url + "/completions",
                json={"model": "m", "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 5},
                headers={"authorization": f"Bearer {STUDENT_KEY}"},
            )
            own[p] = _confidence(r.json()["choices"][0])
        values = sorted(own.values())
        gap, i = max((values[i + 1] - values[i], i) for i in range(2, len(values) - 3))
        assert gap > 1e-4, values
        hi, lo = (values[i] + values[i + 1]) / 2 + gap / 4, (values[i] + values[i + 1]) / 2 - gap / 4
        router = Router(0.99, "mean_logprob", teacher_cost=TEACHER_COST, student_cost=STUDENT_COST).fit(
            {"mean_logprob": [hi] * 4 + [lo] * 4, "student_quality": [1.0] * 4 + [0.0] * 4,
             "teacher_quality": [1.0] * 8}
        )  # fmt: skip
        yield {
            "tmp": tmp, "router": router.save(tmp / "router.json"), "threshold": hi,
            "route": {p: "student" if c >= hi else "teacher" for p, c in own.items()},
            "student_url": student_url,
            "teacher_url": tiny_lm_server,
        }  # fmt: skip


@pytest.fixture(scope="module")
def gateway(setup):
    """The gateway with two student replicas (the server, and a plain proxy in front of it), keys for
    all three sides; yields (openai client, base URL, log path, replica proxy, bodies seen)."""
    log = setup["tmp"] / "gateway.log"
    with FaultProxy(setup["student_url"].removesuffix("/v1")) as replica:
        args = ["--router", str(setup["router"]), "--fallback", setup["teacher_url"]]
        args += ["--fallback-api-key-env", "T_KEY", "--student-api-key-env", "S_KEY"]
        args += ["--student-replica", replica.url + "/v1"]
        with running_server(
            setup["student_url"], api_key_env="G_KEY", env=ENV, extra_args=args, log_file=log
        ) as url:
            seen: list[str] = []
            yield openai.OpenAI(base_url=url, api_key=GATEWAY_KEY, max_retries=0), url, log, replica, seen
    text = log.read_text()
    assert "Uvicorn running" in text
    assert all(key not in text for key in CANARIES)
    assert '"POST /v1/' not in text, "no per-request access log without --access-log"
    assert all(key not in body for body in seen for key in CANARIES)


def _get(url: str, path: str, key: str | None = GATEWAY_KEY) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.get(url.removesuffix("/v1") + path, headers=headers, timeout=30)


def _metrics(url: str) -> dict[str, float]:
    r = _get(url, "/metrics")
    assert r.status_code == 200 and all(key not in r.text for key in CANARIES)
    samples = [line.rsplit(" ", 1) for line in r.text.splitlines() if line and not line.startswith("#")]
    return {name: float(value) for name, value in samples}


def _direct(base_url: str, path: str, body: dict, key: str | None = None) -> dict:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(base_url + path, json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_answers_equal_each_models_own_and_metrics_count_them(setup, gateway):
    client, url, _, replica, seen = gateway
    before = _metrics(url)
    routes, upstreams, tokens = [], set(), {"student": [0, 0], "teacher": [0, 0]}
    for n, prompt in enumerate(PROMPTS):
        body = {"model": "any", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
        if n % 2:
            body["logprobs"] = 2  # the router's 5 are cut back to the client's 2
        raw = client.completions.with_raw_response.create(**body)
        seen.append(raw.text)
        got, route = json.loads(raw.text), raw.headers[ROUTE_HEADER]
        assert route == setup["route"][prompt], prompt
        if route == "student":
            upstreams.add(raw.headers[UPSTREAM_HEADER])
            want = _direct(setup["student_url"], "/completions", body, STUDENT_KEY)
        else:
            assert raw.headers[REASON_HEADER] == "confidence"
            want = _direct(setup["teacher_url"], "/completions", body)
        assert got["choices"] == want["choices"] and got["model"] == want["model"]
        assert got["usage"] == want["usage"]
        tokens[route][0] += got["usage"]["prompt_tokens"]
        tokens[route][1] += got["usage"]["completion_tokens"]
        routes.append(route)
    assert routes.count("student") >= 3 and routes.count("teacher") >= 3, routes
    assert upstreams == {"student-0", "student-1"}  # the replicas share the load
    assert replica.seen["/v1/completions"] >= 1

    for messages in CHATS:
        body = {"model": "any", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
        raw = client.chat.completions.with_raw_response.create(**body, logprobs=True, top_logprobs=3)
        got, route = json.loads(raw.text), raw.headers[ROUTE_HEADER]
        base, key = (
            (setup["student_url"], STUDENT_KEY) if route == "student" else (setup["teacher_url"], None)
        )
        want = _direct(base, "/chat/completions", {**body, "logprobs": True, "top_logprobs": 3}, key)
        assert got["choices"] == want["choices"]
        assert all(len(e["top_logprobs"]) == 3 for e in got["choices"][0]["logprobs"]["content"])
        tokens[route][0] += got["usage"]["prompt_tokens"]
        tokens[route][1] += got["usage"]["completion_tokens"]
        routes.append(route)

    after = _metrics(url)
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    for r in ("student", "teacher"):
        assert delta[f'distill_requests_total{{route="{r}"}}'] == routes.count(r)
        assert delta[f'distill_request_latency_seconds_count{{route="{r}"}}'] == routes.count(r)
        assert delta[f'distill_tokens_total{{route="{r}",kind="prompt"}}'] == tokens[r][0]
        assert delta[f'distill_tokens_total{{route="{r}",kind="completion"}}'] == tokens[r][1]
    assert delta['distill_teacher_requests_total{reason="confidence"}'] == routes.count("teacher")
    for reason in ("ood", "student_error", "circuit_open"):
        assert delta[f'distill_teacher_requests_total{{reason="{reason}"}}'] == 0
    n_student, n_teacher = (
        after['distill_requests_total{route="student"}'],
        after['distill_requests_total{route="teacher"}'],
    )
    saved = (n_student * TEACHER_COST - (n_student + n_teacher) * STUDENT_COST) / 1e6
    assert after["distill_estimated_cost_saved"] == pytest.approx(saved, rel=1e-6)
    assert after["distill_fallback_errors_total"] == 0


def test_streaming_text_equals_the_non_streamed_text_on_both_routes(setup, gateway):
    client, url, _, _, seen = gateway
    for route in ("student", "teacher"):
        prompt = next(p for p in PROMPTS if setup["route"][p] == route)
        body = {"model": "any", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
        whole = client.completions.create(**body)
        raw = client.completions.with_raw_response.create(
            **body, stream=True, stream_options={"include_usage": True}
        )
        assert raw.headers[ROUTE_HEADER] == route and raw.headers["content-type"].startswith(
            "text/event-stream"
        )
        chunks = list(raw.parse())
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        seen.append(whole.model_dump_json())
    messages = CHATS[0]
    body = {"model": "any", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
    whole = client.chat.completions.create(**body)
    chunks = list(client.chat.completions.create(**body, stream=True))
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == whole.choices[0].message.content
    )
    # A teacher-routed stream counts its tokens when the teacher sends a usage chunk.
    before = _metrics(url)
    prompt = next(p for p in PROMPTS if setup["route"][p] == "teacher")
    stream = client.completions.create(
        model="any", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    usage = [c.usage for c in stream if c.usage][0]
    after = _metrics(url)
    assert (
        after['distill_tokens_total{route="teacher",kind="completion"}']
        - before['distill_tokens_total{route="teacher",kind="completion"}']
        == usage.completion_tokens
    )


@pytest.mark.parametrize(
    ("path", "patch", "param"),
    [
        ("/completions", {"max_tokens": 0}, "max_tokens"),
        ("/completions", {"n": 99}, "n"),
        ("/completions", {"logprobs": 21}, "logprobs"),
        ("/completions", {"prompt": [1, 2]}, "prompt"),
        ("/completions", {"stream": "yes"}, "stream"),
        ("/completions", {"echo": True}, "echo"),
        ("/chat/completions", {"top_logprobs": 3}, "top_logprobs"),
        ("/chat/completions", {"messages": []}, "messages"),
    ],
)
def test_bad_requests_get_the_local_servers_400_and_reach_no_model(gateway, path, patch, param):
    _, url, _, _, _ = gateway
    before = _metrics(url)
    base = {"model": "m", "prompt": "x"} if path == "/completions" else {"model": "m", "messages": CHATS[1]}
    r = httpx.post(url + path, json={**base, **patch}, headers={"authorization": f"Bearer {GATEWAY_KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    after = _metrics(url)
    assert all(after[k] == before[k] for k in before if "requests_total" in k)


def test_key_body_limit_and_open_health(gateway):
    _, url, _, _, seen = gateway
    assert _get(url, "/metrics", key=None).status_code == 401
    assert _get(url, "/v1/models", key="wrong").status_code == 401
    r = httpx.post(
        url + "/completions", content=b"x" * (2 << 20), headers={"authorization": f"Bearer {GATEWAY_KEY}"}
    )
    assert r.status_code == 413
    health = _get(url, "/health", key=None)
    seen.append(health.text)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert [u["name"] for u in health.json()["upstreams"]] == ["student-0", "student-1", "teacher"]
    assert all(u["ok"] for u in health.json()["upstreams"])
    models = _get(url, "/v1/models")  # the student's card, as `APITeacher` and the openai client ask
    assert models.status_code == 200 and len(models.json()["data"]) == 1


def test_inflight_cap_timeouts_and_breaker(setup):
    """Two replicas that never answer (proxies that hang), one request in flight each at most, a
    1 s student timeout: a third concurrent request gets 429 with Retry-After; the two time out and
    go to the teacher (student_error), which opens both breakers (one failure each), after which
    the student is not asked at all (circuit_open). The teacher's key reaches it, and only it."""
    student = setup["student_url"].removesuffix("/v1")
    hang = {"rate": 1.0, "kinds": ("timeout",), "hang": 3.0}
    with (
        FaultProxy(student, **hang) as r0,
        FaultProxy(student, **hang) as r1,
        FaultProxy(setup["teacher_url"].removesuffix("/v1")) as teacher,
    ):
        args = [
            "--router",
            str(setup["router"]),
            "--fallback",
            teacher.url + "/v1",
            "--fallback-api-key-env",
            "T_KEY",
        ]
        args += ["--student-replica", r1.url + "/v1", "--student-model", "s", "--max-inflight", "1"]
        args += ["--student-timeout", "1", "--breaker-failures", "1", "--breaker-cooldown", "600"]
        log = setup["tmp"] / "faults.log"
        with running_server(r0.url + "/v1", env=ENV, extra_args=args, log_file=log) as url:
            body = {"model": "m", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0}
            answers = {}

            def ask(name):
                answers[name] = httpx.post(url + "/completions", json=body, timeout=30)

            threads = [threading.Thread(target=ask, args=(n,)) for n in ("a", "b")]
            for t, replica in zip(threads, ("student-0", "student-1")):
                t.start()
                deadline = time.monotonic() + 10
                while _metrics(url)[f'distill_upstream_inflight{{upstream="{replica}"}}'] < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
            busy = httpx.post(url + "/completions", json=body, timeout=30)
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["code"] == "rate_limit_exceeded"
            for t in threads:
                t.join()
            want = _direct(setup["teacher_url"], "/completions", body)
            for r in answers.values():
                assert r.status_code == 200 and r.headers[REASON_HEADER] == "student_error"
                assert r.json()["choices"] == want["choices"]
            opened = httpx.post(url + "/completions", json=body, timeout=30)
            assert (opened.headers[ROUTE_HEADER], opened.headers[REASON_HEADER]) == (
                "teacher",
                "circuit_open",
            )
            m = _metrics(url)
            health = _get(url, "/health", key=None).json()
        assert r0.seen["/v1/completions"] == r1.seen["/v1/completions"] == 1  # nothing retried
        assert teacher.headers_seen[-1]["Authorization"] == f"Bearer {TEACHER_KEY}"
    assert m['distill_rejected_total{side="student"}'] == 1
    assert m['distill_teacher_requests_total{reason="student_error"}'] == 2
    assert m['distill_teacher_requests_total{reason="circuit_open"}'] == 1
    assert m['distill_student_errors_total{upstream="student-0"}'] == 1
    assert m['distill_circuit_trips_total{upstream="student-1"}'] == 1
    assert m['distill_circuit_open{upstream="student-0"}'] == 1
    # The student never ran on the circuit_open request: it costs no student.
    assert m["distill_estimated_cost_saved"] == pytest.approx(-2 * STUDENT_COST / 1e6, rel=1e-6)
    assert [u["breaker"] for u in health["upstreams"][:2]] == ["open", "open"]
    text = log.read_text()
    assert "timed out after 1 s" in text and all(key not in text for key in CANARIES)


@pytest.mark.slow  # starts its own student (~10 s on 2 cores), then kills it
def test_a_killed_student_trips_the_breaker_and_the_teacher_answers(setup, tiny_student_dir):
    procs: list = []
    log = setup["tmp"] / "killed.log"
    with running_server(tiny_student_dir, processes=procs) as student_url:
        args = ["--router", str(setup["router"]), "--fallback", setup["teacher_url"]]
        args += ["--breaker-failures", "2", "--breaker-cooldown", "600"]
        with running_server(student_url, extra_args=args, log_file=log) as url:
            client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
            prompt = next(p for p in PROMPTS if setup["route"][p] == "student")
            body = {"model": "any", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            assert client.completions.with_raw_response.create(**body).headers[ROUTE_HEADER] == "student"
            procs[0].kill()  # SIGKILL: no goodbye, the port just stops answering
            procs[0].wait()
            raws = [client.completions.with_raw_response.create(**body) for _ in range(4)]
            want = _direct(setup["teacher_url"], "/completions", body)
            assert [r.headers[REASON_HEADER] for r in raws] == ["student_error"] * 2 + ["circuit_open"] * 2
            assert all(json.loads(r.text)["choices"] == want["choices"] for r in raws)
            m = _metrics(url)
            health = _get(url, "/health", key=None)
    assert m['distill_teacher_requests_total{reason="student_error"}'] == 2
    assert m['distill_teacher_requests_total{reason="circuit_open"}'] == 2
    assert (
        m['distill_requests_total{route="teacher"}'] == 4
        and m['distill_requests_total{route="student"}'] == 1
    )
    assert m['distill_circuit_open{upstream="student-0"}'] == 1 and m["distill_fallback_errors_total"] == 0
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    assert health.json()["upstreams"][0] == {"name": "student-0", "ok": False, "breaker": "open"}
    assert "circuit breaker open" in log.read_text()


def test_eval_and_route_fit_reach_the_http_student_the_gateway_routes_from(
    setup, tiny_student_dir, tiny_lm_dir, tmp_path, monkeypatch
):
    """`distill eval` and `distill route fit` with the student as the same keyed HTTP endpoint the
    gateway asks: the numbers of the same model loaded locally."""
    monkeypatch.setenv("S_KEY", STUDENT_KEY)
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    reports = {}
    for name, student in (("http", setup["student_url"]), ("local", str(tiny_student_dir))):
        key = ["--student-api-key-env", "S_KEY"] if name == "http" else []
        common = [
            "--student",
            student,
            "--teacher",
            str(tiny_lm_dir),
            "--inputs",
            str(inputs),
            "--max-new-tokens",
            "4",
            *key,
        ]
        assert main(["eval", *common, "--out", str(tmp_path / name), "--no-progress", "--no-memory"]) == 0
        out = tmp_path / f"{name}-router.json"
        assert (
            main(["route", "fit", *common, "--out", str(out), "--metric", "token_f1", "--no-progress"]) == 0
        )
        reports[name] = (
            json.loads((tmp_path / name / "report.json").read_text()),
            json.loads(out.with_suffix(".report.json").read_text()),
            Router.load(out),
        )
    (ev_http, fit_http, router_http), (ev_local, fit_local, router_local) = reports["http"], reports["local"]
    assert [r["student"] for r in ev_http["per_input"]] == [r["student"] for r in ev_local["per_input"]]
    assert ev_http["student"]["agreement"] == ev_local["student"]["agreement"]
    # KL is teacher-forced (the student scores the teacher's answer), which an HTTP endpoint cannot do.
    assert ev_http["student"]["kl_to_teacher"] is None and ev_local["student"]["kl_to_teacher"] is not None
    assert fit_http["features"]["mean_logprob"] == pytest.approx(
        fit_local["features"]["mean_logprob"], abs=1e-5
    )
    assert router_http.threshold_ == pytest.approx(router_local.threshold_, abs=1e-5)
    assert ev_http["student"]["name"] == setup["student_url"]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ([], "needs --router FILE and --fallback URL"),
        (
            ["--router", "ROUTER", "--fallback", "http://127.0.0.1:9/v1", "--device", "cuda"],
            "--device applies to a local model",
        ),
        (
            ["--router", "ROUTER", "--fallback", "http://127.0.0.1:9/v1", "--student-replica", "ftp://x"],
            "--student-replica must be an http(s) base URL",
        ),
        (
            ["--router", "ROUTER", "--fallback", "http://127.0.0.1:9/v1", "--max-inflight", "0"],
            "--max-inflight must be >= 1",
        ),
        (
            ["--router", "ROUTER", "--fallback", "http://127.0.0.1:9/v1", "--breaker-failures", "0"],
            "--breaker-failures must be >= 1",
        ),
        (
            [
                "--router",
                "ROUTER",
                "--fallback",
                "http://127.0.0.1:9/v1",
                "--student-api-key-env",
                "NO_SUCH_VAR_Y",
            ],
            "NO_SUCH_VAR_Y",
        ),
    ],
)
def test_bad_gateway_flags_fail_at_start(setup, capsys, extra, needle):
    code = main(
        ["serve", "http://127.0.0.1:9/v1", *[str(setup["router"]) if a == "ROUTER" else a for a in extra]]
    )
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err


def test_gateway_flags_with_a_model_directory_are_refused(tmp_path, capsys):
    assert main(["serve", str(tmp_path), "--student-replica", "http://127.0.0.1:9/v1"]) == 2
    assert "--student-replica needs a student URL" in capsys.readouterr().err
    for extra in (["--router", "r", "--fallback", "http://h/v1"], [], ["--device", "cuda"]):
        assert main(["serve", "http://u:secret-pw@127.0.0.1:9/v1", *extra]) == 2
        err = capsys.readouterr().err
        assert "must not carry credentials" in err and "secret-pw" not in err, err


def test_access_log_only_when_asked(setup, tmp_path):
    """--access-log writes uvicorn's line per request; the default (checked on the shared gateway's
    log at teardown too) writes none."""
    args = ["--router", str(setup["router"]), "--fallback", setup["teacher_url"]]
    args += ["--fallback-api-key-env", "T_KEY", "--student-api-key-env", "S_KEY"]
    for flag, want in (([], False), (["--access-log"], True)):
        log = tmp_path / f"gateway{len(flag)}.log"
        with running_server(setup["student_url"], env=ENV, extra_args=[*args, *flag], log_file=log) as url:
            body = {"model": "m", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0}
            assert httpx.post(url + "/completions", json=body, timeout=60).status_code == 200
        text = log.read_text()
        assert ('"POST /v1/completions HTTP/1.1" 200' in text) is want, text[-2000:]
        assert all(key not in text for key in CANARIES)

"""`distill serve` running for real (a subprocess on 127.0.0.1), driven by httpx and the official openai client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from distill.models.base import GenerationSettings, Request
from distill.models.hf import HFTeacher
from servers import free_port, running_server

CANARY = f"sk-canary-{uuid.uuid4().hex}"
BODY_LIMIT = 8192


@pytest.fixture(scope="module")
def server(tiny_lm_dir, tmp_path_factory):
    """One server for the module: API key required (a canary), small body limit, log captured."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with running_server(
        tiny_lm_dir,
        api_key_env="DISTILL_TEST_KEY",
        env={"DISTILL_TEST_KEY": CANARY},
        extra_args=["--max-body-bytes", str(BODY_LIMIT), "--batch-size", "4"],
        log_file=log,
    ) as base_url:
        seen: list[str] = []  # every response body, checked for the canary at the end
        yield base_url, log, seen
    text = log.read_text(errors="replace")
    assert "Uvicorn running on http://127.0.0.1:" in text
    assert CANARY not in text
    assert all(CANARY not in body for body in seen)


@pytest.fixture(scope="module")
def teacher(tiny_lm_dir):
    return HFTeacher(tiny_lm_dir)


def _client(base_url: str, key: str = CANARY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)


def _post(server, path: str, body, *, key: str | None = CANARY, **kw) -> httpx.Response:
    base_url, _, seen = server
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, dict):
        r = httpx.post(base_url + path, json=body, headers=headers, timeout=60, **kw)
    else:
        r = httpx.post(base_url + path, content=body, headers=headers, timeout=60, **kw)
    seen.append(r.text)
    return r


def test_openai_chat_completions_with_logprobs(server, teacher):
    base_url, _, seen = server
    messages = [{"role": "user", "content": "Invoice 0042 from Acme"}]
    r = _client(base_url).chat.completions.create(
        model="whatever", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    seen.append(r.model_dump_json())
    choice = r.choices[0]
    want = teacher.complete(
        [Request(id="x", messages=tuple(messages))], GenerationSettings(max_new_tokens=6, top_logprobs=3)
    )[0]
    assert r.model == teacher.identity()["name"]
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason
    content = choice.logprobs.content
    assert len(content) == len(want.completion_token_ids) == r.usage.completion_tokens
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    for entry, tok, top_lps in zip(content, want.completion_token_ids, want.top_logprobs):
        assert len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top_lps, abs=1e-4)
        assert entry.logprob == pytest.approx(top_lps[0], abs=1e-4)  # greedy: the chosen token is the top one
        assert entry.bytes == list(teacher.token_bytes(tok))
    assert (
        b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="replace") == choice.message.content
    )
    # distill's token-id extension, next to OpenAI's fields
    extra = choice.model_extra
    assert extra["token_ids"] == want.completion_token_ids
    assert extra["prompt_token_ids"] == want.prompt_token_ids
    assert extra["top_token_ids"] == want.top_ids
    assert r.model_extra["prompt_token_ids"] == want.prompt_token_ids


def test_openai_completions_with_logprobs(server, teacher):
    base_url, _, seen = server
    prompts = ["Invoice 0007 from", "Invoice 0123 from Acme Ltd: total"]
    r = _client(base_url).completions.create(
        model="whatever", prompt=prompts, max_tokens=5, temperature=0, logprobs=2, n=2
    )
    seen.append(r.model_dump_json())
    want = teacher.complete(
        [Request(id=str(i), prompt=p) for i, p in enumerate(prompts)],
        GenerationSettings(max_new_tokens=5, top_logprobs=2),
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]  # prompt-major, n choices each
    for c in r.choices:
        w = want[c.index // 2]
        assert c.text == w.text and c.finish_reason == w.finish_reason
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(w.completion_token_ids)
        assert lp.token_logprobs == pytest.approx([row[0] for row in w.top_logprobs], abs=1e-4)
        assert all(1 <= len(d) <= 2 for d in lp.top_logprobs)  # two ids may share a text
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(len(lp.tokens))]
        assert c.model_extra["token_ids"] == w.completion_token_ids
        assert c.model_extra["top_token_ids"] == w.top_ids
        got = [lp for row in c.model_extra["top_token_logprobs"] for lp in row]
        assert got == pytest.approx([lp for row in w.top_logprobs for lp in row], abs=1e-5)
    assert r.usage.prompt_tokens == sum(len(w.prompt_token_ids) for w in want)  # once per prompt
    assert r.usage.completion_tokens == 2 * sum(len(w.completion_token_ids) for w in want)


def test_chat_without_max_tokens_fits_the_context(server):
    messages = [{"role": "user", "content": "Invoice 0001 from Acme GmbH: total 3.50 EUR " * 4}]
    r = _post(server, "/chat/completions", {"model": "m", "messages": messages, "temperature": 0})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["total_tokens"] <= 256  # the tiny model's context, not prompt + the 256 default
    assert usage["completion_tokens"] == len(r.json()["choices"][0]["token_ids"]) >= 1


def test_stop_strings_cut_text_ids_and_logprobs(server, teacher):
    body = {"model": "m", "max_tokens": 12, "temperature": 0, "logprobs": 2}
    for prompt in [f"Invoice {i:04d} from Acme" for i in range(20)]:
        full = _post(server, "/completions", {**body, "prompt": prompt}).json()["choices"][0]
        texts = [teacher.token_bytes(t).decode("utf-8", errors="replace") for t in full["token_ids"]]
        j = next(
            (j for j in range(2, len(texts)) if _clean(texts[j]) and texts[j] not in "".join(texts[:j])), None
        )
        if j is not None:
            break
    else:
        pytest.skip("no printable, unrepeated token in the tiny model's answers")
    stop = texts[j]
    cut = _post(server, "/completions", {**body, "prompt": prompt, "stop": [stop, "never-there"]}).json()
    choice = cut["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == full["text"][: full["text"].index(stop)] and stop not in choice["text"]
    assert choice["token_ids"] == full["token_ids"][: j + 1]  # through the token that completed the stop
    assert choice["logprobs"]["token_logprobs"] == full["logprobs"]["token_logprobs"][: j + 1]
    assert choice["top_token_ids"] == full["top_token_ids"][: j + 1]
    assert cut["usage"]["completion_tokens"] == j + 1
    assert _post(server, "/completions", {**body, "prompt": prompt, "stop": [""]}).status_code == 400
    assert _post(server, "/completions", {**body, "prompt": prompt, "stop": ["a"] * 5}).status_code == 400


def _clean(text: str) -> bool:
    return text.strip() != "" and text.isprintable() and "\ufffd" not in text and "<" not in text


def test_openai_client_streaming(server):
    base_url, _, _ = server
    client = _client(base_url)
    messages = [{"role": "user", "content": "Invoice 0042 from Acme"}]
    args = {"model": "m", "max_tokens": 6, "temperature": 0}
    whole = client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=2, **args)
    chunks = list(
        client.chat.completions.create(
            messages=messages,
            logprobs=True,
            top_logprobs=2,
            stream=True,
            stream_options={"include_usage": True},
            **args,
        )
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == whole.choices[0].message.content
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    streamed_lps = [
        e.logprob
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert streamed_lps == [e.logprob for e in whole.choices[0].logprobs.content]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    text = client.completions.create(prompt="Invoice 0042", **args)
    streamed = list(client.completions.create(prompt="Invoice 0042", stream=True, **args))
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text
    assert streamed[-1].choices[0].finish_reason == text.choices[0].finish_reason


def _sse(server, path: str, body: dict) -> list[dict]:
    """The data events of a streamed answer, in order ([DONE] checked and dropped)."""
    base_url, _, seen = server
    with httpx.stream(
        "POST", base_url + path, json=body, headers={"Authorization": f"Bearer {CANARY}"}, timeout=60
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    seen.extend(lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_streaming_sends_each_token_as_it_is_decoded(server):
    """Tokens stream as they are decoded (not one event after the whole answer), and the events add up to
    the non-streamed answer exactly: text, token ids, log-probabilities, also across a stop cut."""
    body = {"model": "m", "max_tokens": 12, "temperature": 0, "logprobs": 2, "prompt": "Invoice 0042 from"}
    whole = _post(server, "/completions", body).json()["choices"][0]
    events = _sse(server, "/completions", {**body, "stream": True})
    token_events = [e for e in events if e["choices"] and e["choices"][0].get("token_ids")]
    # One event per decoded token (tokens that queue up while an event is sent leave together).
    assert 2 < len(token_events) <= len(whole["token_ids"])
    choices = [e["choices"][0] for e in events if e["choices"]]
    assert "".join(c["text"] for c in choices) == whole["text"]
    assert [t for c in choices for t in c.get("token_ids") or []] == whole["token_ids"]
    assert [t for c in choices for t in c.get("top_token_ids") or []] == whole["top_token_ids"]
    lps = [c["logprobs"] for c in choices if c["logprobs"]]
    assert [v for lp in lps for v in lp["token_logprobs"]] == whole["logprobs"]["token_logprobs"]
    assert [v for lp in lps for v in lp["text_offset"]] == whole["logprobs"]["text_offset"]
    assert choices[-1]["finish_reason"] == whole["finish_reason"]
    assert choices[-1]["prompt_token_ids"] == whole["prompt_token_ids"]
    # A stop string in the middle of the answer: nothing past it is streamed.
    stop = next(
        (
            whole["text"][i : i + 2]
            for i in range(3, len(whole["text"]) - 2)
            if _clean(whole["text"][i : i + 2])
        ),
        None,
    )
    if stop is None:
        pytest.skip("no printable piece in the tiny model's answer to stop at")
    cut = _post(server, "/completions", {**body, "stop": stop}).json()["choices"][0]
    choices = [
        e["choices"][0]
        for e in _sse(server, "/completions", {**body, "stop": stop, "stream": True})
        if e["choices"]
    ]
    assert "".join(c["text"] for c in choices) == cut["text"] and stop not in cut["text"]
    assert [t for c in choices for t in c.get("token_ids") or []] == cut["token_ids"]
    assert choices[-1]["finish_reason"] == "stop"
    # Chat: the role first, then the content token by token.
    chat = {
        "model": "m",
        "max_tokens": 8,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Invoice"}],
    }
    whole = _post(server, "/chat/completions", chat).json()["choices"][0]
    choices = [
        e["choices"][0] for e in _sse(server, "/chat/completions", {**chat, "stream": True}) if e["choices"]
    ]
    assert choices[0]["delta"]["role"] == "assistant"
    assert "".join(c["delta"].get("content") or "" for c in choices) == whole["message"]["content"]
    assert [t for c in choices for t in c.get("token_ids") or []] == whole["token_ids"]
    assert 1 < sum(1 for c in choices if c.get("token_ids")) <= len(whole["token_ids"])


def test_streaming_a_request_the_model_refuses_is_a_400(server):
    body = {"model": "m", "max_tokens": 2048, "prompt": "Invoice " * 200, "stream": True}
    r = _post(server, "/completions", body)
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]


def test_models_and_health(server, teacher):
    base_url, _, seen = server
    models = _client(base_url).models.list()
    seen.append(models.model_dump_json())
    card = models.data[0]
    assert card.id == teacher.identity()["name"]
    assert card.model_extra["tokenizer"] == teacher.identity()["tokenizer"]
    assert card.model_extra["weights_fingerprint"] == teacher.identity()["weights_fingerprint"]
    assert _client(base_url).models.retrieve(card.id).id == card.id
    health = httpx.get(base_url.removesuffix("/v1") + "/health")  # open without a key
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_every_route_but_health_needs_the_key(server):
    base_url, _, seen = server
    root = base_url.removesuffix("/v1")
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("GET", "/v1/nothing-here"), ("GET", "/docs")]:  # fmt: skip
        for headers in [{}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": CANARY}]:
            r = httpx.request(method, root + path, headers=headers, json={"prompt": "x"})
            seen.append(r.text)
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["code"] == "invalid_api_key"
    wrong = f"sk-wrong-{uuid.uuid4().hex}"
    with pytest.raises(openai.AuthenticationError) as err:
        _client(base_url, key=wrong).models.list()
    assert wrong not in str(err.value) and CANARY not in str(err.value)
    assert httpx.get(root + "/health").status_code == 200


def test_large_bodies_get_413(server):
    big = {"model": "m", "prompt": "Invoice " * BODY_LIMIT, "max_tokens": 1}
    r = _post(server, "/completions", big)
    assert r.status_code == 413 and "8192" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        yield b'{"model": "m", "prompt": "'
        for _ in range(BODY_LIMIT // 64 + 1):
            yield b"x" * 64
        yield b'"}'

    r = _post(server, "/completions", chunks())
    assert r.status_code == 413
    ok = _post(server, "/completions", {"model": "m", "prompt": "Invoice", "max_tokens": 1})
    assert ok.status_code == 200


@pytest.mark.parametrize(
    ("path", "patch", "param"),
    [
        ("/completions", {"max_tokens": 0}, "max_tokens"),
        ("/completions", {"max_tokens": 10**6}, "max_tokens"),
        ("/completions", {"max_tokens": "5"}, "max_tokens"),
        ("/completions", {"n": 0}, "n"),
        ("/completions", {"n": 1000}, "n"),
        ("/completions", {"logprobs": 21}, "logprobs"),
        ("/completions", {"logprobs": -1}, "logprobs"),
        ("/completions", {"temperature": -0.5}, "temperature"),
        ("/completions", {"temperature": 7}, "temperature"),
        ("/completions", {"temperature": "hot"}, "temperature"),
        ("/completions", {"top_p": 0}, "top_p"),
        ("/completions", {"stream": "yes"}, "stream"),
        ("/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
        ("/completions", {"stop": ""}, "stop"),
        ("/completions", {"prompt": [1, 2, 3]}, "prompt"),
        ("/chat/completions", {"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ("/chat/completions", {"top_logprobs": 3}, "top_logprobs"),  # without logprobs=true
        ("/chat/completions", {"max_completion_tokens": 0}, "max_completion_tokens"),
        ("/chat/completions", {"n": 9}, "n"),
        ("/chat/completions", {"messages": []}, "messages"),
    ],
)
def test_out_of_range_values_get_400(server, path, patch, param):
    if path == "/completions":
        body = {"model": "m", "prompt": "Invoice", "max_tokens": 2}
    else:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = _post(server, path, {**body, **patch})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert param in err["message"]


def test_other_bad_requests_get_400(server):
    assert _post(server, "/completions", b"{not json").status_code == 400
    assert _post(server, "/completions", b"[1, 2]").status_code == 400
    r = _post(server, "/completions", {"model": "m", "prompt": "Invoice " * 400, "max_tokens": 4})
    assert r.status_code == 400 and "context length 256" in r.json()["error"]["message"]
    base_url, _, _ = server
    with pytest.raises(openai.BadRequestError) as err:
        _client(base_url).completions.create(model="m", prompt="x", max_tokens=0)
    assert "max_tokens" in str(err.value) and CANARY not in str(err.value)


def test_concurrent_requests_are_batched_correctly(server, teacher):
    """16 requests at once, two different settings interleaved, one bad request among them."""
    prompts = [f"Invoice {i:04d} from Acme" + " Ltd" * (i % 3) for i in range(16)]
    bodies = [
        {"model": "m", "prompt": p, "max_tokens": 6 - 2 * (i % 2), "temperature": 0, "logprobs": 1}
        for i, p in enumerate(prompts)
    ]
    bodies[5]["prompt"] = "Invoice " * 300  # too long for the context: a 400 that must not fail the others
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda b: _post(server, "/completions", b), bodies))
    for i, (r, b) in enumerate(zip(answers, bodies)):
        if i == 5:
            assert r.status_code == 400 and "context length" in r.text
            continue
        want = teacher.complete(
            [Request(id="x", prompt=b["prompt"])], GenerationSettings(max_new_tokens=b["max_tokens"])
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == want[0].completion_token_ids


def test_seeded_sampling_is_reproducible(server):
    body = {"model": "m", "prompt": "Invoice 0001", "max_tokens": 8, "temperature": 1.5, "seed": 11}
    a, b = (_post(server, "/completions", body).json()["choices"][0]["token_ids"] for _ in range(2))
    assert a == b
    c = _post(server, "/completions", {**body, "seed": 12}).json()["choices"][0]["token_ids"]
    assert c != a


def test_default_bind_is_loopback_only(tiny_lm_dir, tmp_path):
    from distill.cli import build_parser

    assert build_parser("serve").parse_args(["serve", "m"]).host == "127.0.0.1"
    port = free_port()
    log = tmp_path / "default.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "distill", "serve", str(tiny_lm_dir), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 120
        while "Uvicorn running" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.2)
        assert f"Uvicorn running on http://127.0.0.1:{port}" in log.read_text()
        assert httpx.get(f"http://127.0.0.1:{port}/health").json() == {"status": "ok"}
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 200  # no key configured: open
        for addr in _non_loopback_addresses():  # not reachable from other interfaces
            with pytest.raises(OSError), socket.create_connection((addr, port), timeout=2):
                pass
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _non_loopback_addresses() -> list[str]:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            addr = s.getsockname()[0]
    except OSError:
        return []
    return [addr] if not addr.startswith("127.") else []


def test_missing_key_variable_is_a_clear_error(tiny_lm_dir):
    env = {k: v for k, v in os.environ.items() if k != "DISTILL_UNSET_KEY"}
    out = subprocess.run(
        [sys.executable, "-m", "distill", "serve", str(tiny_lm_dir), "--api-key-env", "DISTILL_UNSET_KEY"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 2
    assert "DISTILL_UNSET_KEY" in out.stderr and "not set" in out.stderr


def test_running_server_is_not_fooled_by_a_taken_port(tiny_lm_dir, monkeypatch):
    """An impostor answering /health on the first port picked: the helper must retry, not use it."""
    import http.server
    import threading

    import servers

    class Impostor(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"status": "ok"}')

        def log_message(self, *args):
            pass

    impostor = http.server.HTTPServer(("127.0.0.1", 0), Impostor)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    ports = iter([impostor.server_address[1], free_port()])
    monkeypatch.setattr(servers, "free_port", lambda: next(ports))
    try:
        with running_server(tiny_lm_dir) as base_url:
            assert not base_url.endswith(f":{impostor.server_address[1]}/v1")
            assert httpx.get(base_url + "/models").json()["data"][0]["id"] == tiny_lm_dir.name
    finally:
        impostor.shutdown()

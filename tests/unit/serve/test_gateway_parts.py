"""The gateway's parts on their own: the circuit breaker, replica choice, reading the router's signal
from OpenAI answers, trimming top-k back to the client's, and the asyncio upstream client against
real sockets on 127.0.0.1 (Content-Length, chunked and close-delimited bodies, stale keep-alive
connections, timeouts)."""

from __future__ import annotations

import asyncio
import json

import pytest

from distill.evaluate.signals import confidence_signals
from distill.route.router import Router
from distill.serve.metrics import REASONS, RouteMetrics
from distill.serve.routing import ROUTER_TOP_K, RoutingPolicy
from distill.serve.students import BUSY, Breaker, StudentPool, choice_rows, student_body, trim_for_client
from distill.serve.upstream import Upstream, UpstreamError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_failures_in_a_row_then_probes_once():
    clock = Clock()
    b = Breaker(failures=3, cooldown=10.0, clock=clock)
    b.failure(), b.failure(), b.success(), b.failure(), b.failure()
    assert b.state == "closed"  # a success in between resets the count
    b.failure()
    assert b.state == "open" and not b.available() and b.trips == 1
    clock.now = 9.9
    assert b.state == "open"
    clock.now = 10.0
    assert b.state == "half_open" and b.available()
    b.enter()  # the probe
    assert b.state == "open" and not b.available()  # one probe at a time
    b.failure()  # the probe failed: open for another cool-down, not a new trip
    assert b.state == "open" and b.trips == 1
    clock.now = 20.0
    b.enter()
    b.success()
    assert b.state == "closed" and b.in_a_row == 0
    with pytest.raises(ValueError, match="--breaker-failures"):
        Breaker(failures=0)
    with pytest.raises(ValueError, match="--breaker-cooldown"):
        Breaker(cooldown=0)


def test_replicas_round_robin_skip_open_breakers_and_full_ones():
    pool = StudentPool(["http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"], max_inflight=1)
    a, b = pool.replicas
    first = pool.acquire()
    second = pool.acquire()
    assert (first, second) == (a, b)
    assert pool.acquire() == BUSY  # both full
    a.upstream.release()
    assert pool.acquire() is a
    a.upstream.release(), b.upstream.release()
    for _ in range(5):
        b.breaker.failure()
    for _ in range(2):  # b is open: a, whatever the turn
        assert pool.acquire() is a
        a.upstream.release()
    for _ in range(5):
        a.breaker.failure()
    assert pool.acquire() is None  # every breaker open: the caller sends to the teacher


TOPS = [[-0.1, -2.5, -3.0, -4.0, -5.0, -6.0], [-0.7, -0.9, -3.2, -3.3, -4.0, -4.1]]


def test_choice_rows_read_every_shape_of_answer():
    distill = {"top_token_logprobs": TOPS, "logprobs": {"top_logprobs": [{"a": 1.0}]}}
    assert choice_rows(distill, chat=False) == TOPS  # the exact, aligned values first
    legacy = {"logprobs": {"top_logprobs": [{f"t{j}": v for j, v in enumerate(r)} for r in TOPS]}}
    assert choice_rows(legacy, chat=False) == TOPS
    chat = {"logprobs": {"content": [{"top_logprobs": [{"logprob": v} for v in r]} for r in TOPS]}}
    assert choice_rows(chat, chat=True) == TOPS
    assert choice_rows({"logprobs": None}, chat=True) is None
    assert choice_rows({"logprobs": {"content": [{"top_logprobs": "junk"}]}}, chat=True) is None


def test_legacy_rows_start_with_the_chosen_tokens_own_logprob_when_strings_collide():
    # vLLM's legacy /v1/completions (no return_tokens_as_token_ids): two ids that read " 4" share one
    # key, and the dict keeps the last value (the less likely id's); seen as a lower confidence and a
    # wrongly routed request with a real vLLM student. The chosen token's value is in token_logprobs.
    merged = {
        "logprobs": {
            "tokens": [" 4", ","],
            "token_logprobs": [-0.1, -0.7],
            "top_logprobs": [{" 4": -2.5, " 5": -3.0}, {",": -0.7, ".": -0.9, ";": -3.2}],
        }
    }
    rows = choice_rows(merged, chat=False)
    assert rows == [[-0.1, -2.5, -3.0], [-0.7, -0.9, -3.2]]  # no duplicate of an unmerged chosen entry
    assert confidence_signals(rows)["mean_logprob"] == pytest.approx(-0.4)


def test_the_decision_uses_route_fits_k_whatever_k_the_client_asked_for():
    router = Router(0.99, "entropy").fit(
        {"entropy": [0.5, 3.0], "student_quality": [1.0, 0.0], "teacher_quality": [1.0, 1.0]}
    )
    policy = RoutingPolicy(router, "http://127.0.0.1:9/v1")
    five = confidence_signals([r[:ROUTER_TOP_K] for r in TOPS])["entropy"]
    six = confidence_signals(TOPS)["entropy"]
    assert five != six  # entropy depends on k: the rows are cut to the router's k
    router.threshold_ = -(five + six) / 2  # confident on 5 columns (oriented: larger = more confident)
    assert (five < six) == (policy.decide_rows([TOPS]) == "student")
    assert policy.decide_rows([TOPS, None]) == "teacher"  # every choice must be confident
    assert policy.decide_rows([[]]) == "teacher"


def test_trim_gives_the_client_its_k_and_student_body_asks_for_the_routers():
    data = {
        "choices": [
            {
                "text": "x",
                "logprobs": {"top_logprobs": [{"a": -0.1, "b": -1.0, "c": -2.0}]},
                "top_token_ids": [[1, 2, 3]],
                "top_token_logprobs": [[-0.1, -1.0, -2.0]],
            }
        ]
    }
    out = trim_for_client(json.loads(json.dumps(data)), chat=False, k=2)
    c = out["choices"][0]
    assert c["logprobs"]["top_logprobs"] == [{"a": -0.1, "b": -1.0}] and c["top_token_ids"] == [[1, 2]]
    none = trim_for_client(json.loads(json.dumps(data)), chat=False, k=None)["choices"][0]
    assert none["logprobs"] is None and "top_token_ids" not in none and "top_token_logprobs" not in none
    chat = {"choices": [{"logprobs": {"content": [{"top_logprobs": [{"logprob": -1}, {"logprob": -2}]}]}}]}
    assert trim_for_client(chat, chat=True, k=1)["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == [
        {"logprob": -1}
    ]
    body = {"prompt": "p", "stream": True, "stream_options": {"include_usage": True}, "logprobs": 2}
    assert student_body(body, chat=False) == {"prompt": "p", "logprobs": ROUTER_TOP_K}
    assert student_body({"messages": [], "logprobs": True, "top_logprobs": 9}, chat=True)["top_logprobs"] == 9


def test_metrics_charge_no_student_cost_where_it_did_not_run():
    m = RouteMetrics(teacher_cost=10.0, student_cost=1.0, reasons=REASONS)
    m.record("student", 0.01, usage={"prompt_tokens": 3, "completion_tokens": 4})
    for reason in REASONS:
        m.record("teacher", 0.2, reason=reason)
    # ran on: the student-routed one, confidence, student_error (not ood, not circuit_open)
    assert m.cost_saved() == pytest.approx((1 * 10.0 - 3 * 1.0) / 1e6)
    text = m.render(["extra_line 1"])
    assert 'distill_teacher_requests_total{reason="circuit_open"} 1' in text
    assert 'distill_tokens_total{route="student",kind="completion"} 4' in text
    assert text.endswith("extra_line 1\n")
    with pytest.raises(ValueError, match="unknown routing reasons"):
        RouteMetrics(1.0, 0.0, reasons=("nope",))


# -- the upstream client against a real server --------------------------------------------------


async def _server(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"


async def _read_request(reader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    n = int(
        next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")).split(b":")[
            1
        ]
    )
    return head, await reader.readexactly(n)


def test_upstream_reads_every_body_kind_and_reuses_connections():
    connections, heads = [], []

    async def handler(reader, writer):
        connections.append(writer)
        try:
            while True:
                head, body = await _read_request(reader)
                heads.append(head)
                path = head.split(b" ")[1]
                if path.endswith(b"/length"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                elif path.endswith(b"/chunked"):
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    for piece in (b"data: 1\n\n", b"data: [DONE]\n\n"):
                        writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        await writer.drain()
                    writer.write(b"0\r\n\r\n")
                else:  # no length: the body ends with the connection
                    writer.write(b"HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\ngone")
                    await writer.drain()
                    writer.close()
                    return
        except asyncio.IncompleteReadError:
            writer.close()

    async def run():
        server, url = await _server(handler)
        up = Upstream(url, api_key="sk-secret-value", timeout=5)
        assert "sk-secret" not in repr(up)
        one = await up.request("POST", "/length", b'{"a": 1}')
        two = await up.request("POST", "/length", b'{"b": 2}')
        reply, pieces = await up.stream("POST", "/chunked", b"{}")
        got = [p async for p in pieces]
        closed = await up.request("GET", "/close")
        await up.aclose()
        server.close()
        return one, two, reply, got, closed

    one, two, reply, got, closed = asyncio.run(run())
    assert (one.status, one.body, two.body) == (200, b'{"a": 1}', b'{"b": 2}')
    assert reply.status == 200 and got == [b"data: 1\n\n", b"data: [DONE]\n\n"]
    assert (closed.status, closed.body) == (404, b"gone")
    assert len(connections) == 1  # one kept-alive connection for all four
    assert all(b"Authorization: Bearer sk-secret-value" in h and b"/v1/" in h for h in heads)


def test_upstream_replaces_a_connection_the_server_closed_while_idle_and_times_out():
    served = []

    async def handler(reader, writer):
        head, body = await _read_request(reader)
        served.append(head.split(b" ")[1])
        if head.split(b" ")[1].endswith(b"/slow"):
            await asyncio.sleep(2)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # keep-alive not honoured: closes after one answer, without saying so

    async def run():
        server, url = await _server(handler)
        up = Upstream(url, timeout=0.5)
        first = await up.request("POST", "/a", b"{}")
        await asyncio.sleep(0.05)  # the close reaches us while the connection idles in the pool
        second = await up.request("POST", "/b", b"{}")
        with pytest.raises(UpstreamError, match=r"timed out after 0.5 s \(http://127.0.0.1:\d+/v1/slow\)"):
            await up.request("POST", "/slow", b"{}")
        await up.aclose()
        server.close()
        dead = Upstream(url.replace(url.split(":")[-1].split("/")[0], "1"), timeout=1)
        with pytest.raises(UpstreamError, match="connecting to http://127.0.0.1:1/v1"):
            await dead.request("GET", "/models")
        return first, second

    first, second = asyncio.run(run())
    assert first.body == second.body == b"ok"
    assert served == [b"/v1/a", b"/v1/b", b"/v1/slow"]  # nothing sent twice


def test_upstream_checks_its_arguments():
    with pytest.raises(ValueError, match="expected an http"):
        Upstream("ftp://x/v1")
    with pytest.raises(ValueError, match="max_inflight"):
        Upstream("http://h/v1", max_inflight=0)
    with pytest.raises(ValueError, match="--student-ca-bundle 'nope.pem' is not a file"):
        Upstream("https://h/v1", ca_bundle="nope.pem", where="--student-ca-bundle")
    up = Upstream("http://h/v1", max_inflight=1)
    assert up.try_acquire() and not up.try_acquire()
    up.release()
    assert up.try_acquire()


def test_a_malformed_or_refusing_student_is_a_failure_or_the_clients_error():
    from distill.serve.students import StudentFailed, StudentRejected

    answers = iter(
        [
            (200, b'{"choices": [1]}'),
            (200, b"not json"),
            (503, b'{"error": {"message": "overloaded"}}'),
            (400, b'{"error": {"message": "prompt too long"}}'),
            (200, b'{"choices": [{"text": "ok"}]}'),
        ]
    )

    async def handler(reader, writer):
        try:
            while True:
                await _read_request(reader)
                status, body = next(answers)
                writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))
        except (asyncio.IncompleteReadError, StopIteration):
            writer.close()

    async def run():
        server, url = await _server(handler)
        clock = Clock()
        pool = StudentPool([url], model="m", breaker_failures=3)
        (replica,) = pool.replicas
        replica.breaker = Breaker(3, 10.0, clock=clock)
        got = []
        for _ in range(5):
            if pool.acquire() is None:  # open: after the cool-down, this call is the probe
                clock.now += 10.0
                got.append("probe")
                assert pool.acquire() is replica
            try:
                got.append(await pool.ask(replica, "/completions", {"prompt": "x"}))
            except (StudentFailed, StudentRejected) as err:
                got.append(err)
            got.append(replica.breaker.state)
        await pool.aclose()
        server.close()
        return got, replica.errors

    got, errors = asyncio.run(run())
    kinds = [type(x).__name__ if isinstance(x, Exception) else x for x in got]
    assert kinds[:6] == ["StudentFailed", "closed", "StudentFailed", "closed", "StudentFailed", "open"]
    assert errors == 3 and "HTTP 503" in str(got[4]) and "overloaded" in str(got[4])
    # The probe gets a 400: the client's error, and proof the endpoint answers: the breaker closes.
    assert got[6] == "probe" and isinstance(got[7], StudentRejected) and got[7].status == 400
    assert got[8] == "closed" and got[9] == {"choices": [{"text": "ok"}]} and got[10] == "closed"


def test_a_probe_that_never_ends_frees_the_way_for_the_next():
    clock = Clock()
    b = Breaker(1, 5.0, clock=clock)
    b.failure()
    clock.now = 5.0
    b.enter()
    assert b.state == "open"
    b.abandon()  # the probing request was cancelled
    assert b.state == "half_open" and b.available()

"""`APITeacher` and `distill generate` over HTTPS, against real parts: a throwaway CA and server
certificate (made with `cryptography`), a TLS-terminating `FaultProxy` in front of a real
`distill serve` on 127.0.0.1.

Checked: a trusted CA (``ca_bundle=`` / ``--ca-bundle`` or ``SSL_CERT_FILE``) works; an untrusted
certificate fails at once, unretried, naming the URL and how to trust a CA, without the API key;
keep-alive holds one TLS connection for many requests; a connection the server closed while idle
is replaced without a retry; the serve router's fallback (httpx) trusts ``--fallback-ca-bundle``
or ``SSL_CERT_FILE``.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from distill import store
from distill.cli import main
from distill.models.api import APIError, APITeacher
from distill.models.base import GenerationSettings, Request
from faultproxy import FaultProxy, make_test_pki

CANARY = "sk-canary-tls-7f3a9c21e5"  # must appear in no error text
SETTINGS = GenerationSettings(max_new_tokens=4, top_logprobs=3)


@pytest.fixture(scope="module")
def server(tiny_lm_server):
    return tiny_lm_server


@pytest.fixture(scope="module")
def model(tiny_lm_model_id) -> str:
    return tiny_lm_model_id


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory):
    """A second, unrelated CA: trusting it must not make the first CA's server trusted."""
    return make_test_pki(tmp_path_factory.mktemp("pki-other"), name="some other CA")


@pytest.fixture
def tls_proxy(server, pki):
    with FaultProxy(server.rsplit("/v1", 1)[0], server_tls=pki.server_context()) as proxy:
        yield proxy


def eventually(condition, timeout: float = 5.0) -> bool:
    """True once ``condition()`` holds: the proxy counts a failed handshake in its own thread, a
    moment after the client has already given up."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def ask(teacher: APITeacher, i: int) -> str:
    (c,) = teacher.complete([Request(id=f"r{i}", prompt=f"Invoice {i:04d} from Acme")], SETTINGS)
    assert c.completion_token_ids and c.top_ids is not None  # token-level answer, not just text
    return c.text


def test_https_with_ca_bundle_keeps_one_connection_alive(tls_proxy, pki, model):
    assert tls_proxy.url.startswith("https://")
    teacher = APITeacher(tls_proxy.url + "/v1", model=model, ca_bundle=pki.ca_cert, max_retries=0)
    try:
        after_check = tls_proxy.connections  # the constructor's one verifying handshake
        assert after_check == 1 and tls_proxy.tls_failures == 0
        texts = [ask(teacher, i) for i in range(5)]
    finally:
        teacher.close()
    assert all(isinstance(t, str) for t in texts)
    # The first request looks the server's kind up once (/v1/models: vLLM needs its token-id switches).
    assert tls_proxy.seen["/v1/completions"] == 5 and tls_proxy.seen["/v1/models"] == 1
    assert tls_proxy.forwarded == 6
    # Six requests from one thread over one kept-alive TLS connection.
    assert tls_proxy.connections - after_check == 1
    assert teacher.stats == {"requests": 6, "retries": 0, "errors": 0}


def test_localhost_name_and_model_lookup_over_https(tls_proxy, pki, model):
    # Host-name check against the DNS name in the certificate; /v1/models over TLS picks the model.
    url = tls_proxy.url.replace("127.0.0.1", "localhost") + "/v1"
    teacher = APITeacher(url, ca_bundle=str(pki.ca_cert), max_retries=0)
    try:
        assert teacher.model == model
        ask(teacher, 0)
    finally:
        teacher.close()


def test_ssl_cert_file_environment_variable_is_honoured(tls_proxy, pki, model, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_cert))
    teacher = APITeacher(tls_proxy.url + "/v1", model=model, max_retries=0)
    try:
        ask(teacher, 1)
    finally:
        teacher.close()
    assert tls_proxy.tls_failures == 0


def test_server_closing_idle_tls_connections_costs_no_retry(server, pki, model):
    upstream = server.rsplit("/v1", 1)[0]
    with FaultProxy(upstream, server_tls=pki.server_context(), idle_close=0.1) as proxy:
        teacher = APITeacher(proxy.url + "/v1", model=model, ca_bundle=pki.ca_cert, max_retries=3)
        try:
            base = proxy.connections
            for i in range(3):
                ask(teacher, i)
                time.sleep(0.4)  # longer than the server's keep-alive timeout: it closes the connection
        finally:
            teacher.close()
    # Each request found its connection closed, noticed it before sending and opened a new one.
    assert proxy.connections - base == 3 and proxy.tls_failures == 0
    assert teacher.stats == {"requests": 3, "retries": 0, "errors": 0}


@pytest.mark.parametrize("trust", ["system store", "another CA"])
def test_untrusted_certificate_fails_at_once_without_retry_or_key(
    tls_proxy, other_pki, model, monkeypatch, trust
):
    monkeypatch.setenv("DISTILL_TLS_TEST_KEY", CANARY)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    bundle = other_pki.ca_cert if trust == "another CA" else None
    url = tls_proxy.url + "/v1"
    # No retry: one attempt each (below) and one TLS connection each at the proxy, not a wall-clock
    # bound, which a busy CI machine could break. The constructor's handshake finds it (model given: no request would be made otherwise) ...
    with pytest.raises(APIError) as caught:
        APITeacher(url, model=model, api_key_env="DISTILL_TLS_TEST_KEY", ca_bundle=bundle, backoff=5.0)
    # ... and so does the /v1/models lookup (no model given), unretried despite max_retries=5.
    with pytest.raises(APIError) as caught_lookup:
        APITeacher(url, api_key_env="DISTILL_TLS_TEST_KEY", ca_bundle=bundle, backoff=5.0)
    for err in (caught.value, caught_lookup.value):
        text = str(err)
        assert "certificate" in text and "could not be verified" in text
        assert url in text and "--ca-bundle" in text and "SSL_CERT_FILE" in text
        assert CANARY not in text and CANARY not in repr(err)
        assert err.retryable is False and err.attempts == 1
    assert eventually(lambda: tls_proxy.tls_failures == 2) and tls_proxy.connections == 2
    assert tls_proxy.total_seen == 0  # no HTTP request (with its key) ever crossed


def test_certificate_replaced_mid_run_fails_the_request_unretried(tls_proxy, pki, other_pki, model):
    # Trusted when built; then the server presents a certificate from a CA the client does not trust:
    # the request path, too, must treat it as permanent: one attempt, no retry counted.
    teacher = APITeacher(
        tls_proxy.url + "/v1", model=model, ca_bundle=pki.ca_cert, max_retries=4, backoff=5.0
    )
    tls_proxy.server_tls = other_pki.server_context()
    with pytest.raises(APIError, match="could not be verified") as caught:
        ask(teacher, 0)
    teacher.close()
    assert caught.value.attempts == 1 and not caught.value.retryable
    assert teacher.stats == {"requests": 1, "retries": 0, "errors": 1}
    assert eventually(lambda: tls_proxy.tls_failures == 1) and tls_proxy.total_seen == 0


def test_certificate_for_another_host_name_is_refused(server, tmp_path, model):
    pki = make_test_pki(tmp_path / "pki", hosts=("teacher.internal",))
    with FaultProxy(server.rsplit("/v1", 1)[0], server_tls=pki.server_context()) as proxy:
        with pytest.raises(APIError, match=r"could not be verified \(IP address mismatch") as caught:
            APITeacher(proxy.url + "/v1", model=model, ca_bundle=pki.ca_cert)
    assert proxy.url in str(caught.value) and "issued for" in str(caught.value)
    assert not caught.value.retryable


def test_https_to_a_plain_http_server_fails_at_once(server, model):
    url = server.replace("http://", "https://")
    for kw in ({"model": model}, {}):  # the constructor's handshake, then the /v1/models lookup
        with pytest.raises(APIError, match="did not answer with TLS .*plain http:// endpoint") as caught:
            APITeacher(url, backoff=5.0, **kw)
        assert url in str(caught.value) and not caught.value.retryable and caught.value.attempts == 1


def test_bad_ca_bundle_is_refused_before_any_connection(tls_proxy, tmp_path, model):
    with pytest.raises(ValueError, match="is not a file"):
        APITeacher(tls_proxy.url + "/v1", model=model, ca_bundle=tmp_path / "missing.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="no usable PEM CA certificate"):
        APITeacher(tls_proxy.url + "/v1", model=model, ca_bundle=junk)
    with pytest.raises(ValueError, match="is not a file"):  # checked even when no URL is https
        APITeacher("http://127.0.0.1:9/v1", model=model, ca_bundle=tmp_path / "missing.pem")
    assert tls_proxy.connections == 0


def test_generate_cli_over_https(tls_proxy, pki, model, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": f"q{i}", "prompt": f"Invoice {i:04d} from Acme"} for i in range(4)]
    rows.append({"id": "q4", "messages": [{"role": "user", "content": "Invoice 0004 total?"}]})
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("DISTILL_TLS_TEST_KEY", CANARY)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    common = ["generate", "--teacher", tls_proxy.url + "/v1", "--prompts", str(prompts)]
    common += ["--top-k", "3", "--max-new-tokens", "4", "--no-progress"]
    common += ["--api-key-env", "DISTILL_TLS_TEST_KEY"]

    # Untrusted: one clear line, exit 2, nothing written, no request sent.
    out_bad = tmp_path / "store-bad"
    assert main([*common, "--out", str(out_bad)]) == 2
    err = capsys.readouterr().err
    assert "could not be verified" in err and "--ca-bundle" in err and CANARY not in err
    assert tls_proxy.total_seen == 0

    out = tmp_path / "store"
    assert main([*common, "--out", str(out), "--ca-bundle", str(pki.ca_cert)]) == 0
    captured = capsys.readouterr()
    assert CANARY not in captured.out + captured.err
    got = list(store.open(out))
    assert sorted(r["id"] for r in got) == [f"q{i}" for i in range(5)]
    assert all(r["topk_ids"] is not None for r in got)
    assert tls_proxy.seen["/v1/completions"] == 4 and tls_proxy.seen["/v1/chat/completions"] == 1
    assert tls_proxy.headers_seen[-1]["Authorization"] == f"Bearer {CANARY}"  # the key did travel
    for path in out.rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path


def test_serve_router_fallback_over_https(tls_proxy, pki, model, tmp_path, monkeypatch):
    """The serve router's fallback (`RoutingPolicy.forward`, `distill.serve.upstream`) to a teacher behind TLS: with
    ``fallback_ca_bundle`` (``--fallback-ca-bundle``) it answers; with neither it nor SSL_CERT_FILE
    the client gets a 502 naming the URL, counted; SSL_CERT_FILE alone works; a bad bundle fails at
    construction, before any request."""
    from distill.route.router import Router
    from distill.serve.routing import REASON_HEADER, ROUTE_HEADER, RoutingPolicy

    router = Router(0.99, "mean_logprob").fit(
        {"mean_logprob": [-0.1, -3.0], "student_quality": [1.0, 0.0], "teacher_quality": [1.0, 1.0]}
    )
    body = {"model": model, "prompt": "Invoice 0001 from", "max_tokens": 3, "temperature": 0}
    fallback = tls_proxy.url + "/v1"

    async def forward(policy: RoutingPolicy):
        try:
            return await policy.forward("/completions", body, False, time.perf_counter())
        finally:
            await policy.aclose()

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    ok = asyncio.run(forward(RoutingPolicy(router, fallback, fallback_ca_bundle=str(pki.ca_cert))))
    assert ok.status_code == 200 and ok.headers[ROUTE_HEADER] == "teacher"
    assert json.loads(ok.body)["choices"][0]["text"]
    untrusted = RoutingPolicy(router, fallback)
    failed = asyncio.run(forward(untrusted))
    assert failed.status_code == 502 and failed.headers[REASON_HEADER] == "confidence"
    assert fallback in json.loads(failed.body)["error"]["message"]
    assert "distill_fallback_errors_total 1" in untrusted.metrics.render()
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_cert))
    assert asyncio.run(forward(RoutingPolicy(router, fallback))).status_code == 200
    with pytest.raises(ValueError, match="--fallback-ca-bundle .* is not a file"):
        RoutingPolicy(router, fallback, fallback_ca_bundle=str(tmp_path / "nope.pem"))
    assert main(["serve", str(tmp_path), "--fallback-ca-bundle", str(pki.ca_cert)]) == 2  # needs --router


def test_plain_http_still_works(server, model):
    with FaultProxy(server.rsplit("/v1", 1)[0]) as proxy:
        teacher = APITeacher(proxy.url + "/v1", model=model, ca_bundle=None, max_retries=0)
        try:
            ask(teacher, 0)
            ask(teacher, 1)
        finally:
            teacher.close()
    assert proxy.connections == 1 and proxy.url.startswith("http://")


def test_ca_bundle_with_a_local_teacher_is_refused(tiny_lm_dir, pki, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "x"}\n')
    args = ["generate", "--teacher", str(tiny_lm_dir), "--prompts", str(prompts)]
    assert main([*args, "--out", str(tmp_path / "s"), "--ca-bundle", str(pki.ca_cert)]) == 2
    assert "--ca-bundle" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_eval_and_route_fit_with_an_https_teacher(
    tls_proxy, pki, tiny_student_dir, tmp_path, capsys, monkeypatch
):
    """`distill eval --ca-bundle` and `distill route fit --ca-bundle` reach a teacher behind a private
    CA; without a way to trust it, eval stops with one line naming the URL; a bundle with only local
    models is refused before any work."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text(
        "".join(json.dumps({"id": f"r{i}", "prompt": f"Invoice {i:04d} from"}) + "\n" for i in range(6))
    )
    url = tls_proxy.url + "/v1"
    common = [
        "--student",
        str(tiny_student_dir),
        "--teacher",
        url,
        "--inputs",
        str(inputs),
        "--max-new-tokens",
        "3",
    ]
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                *common,
                "--out",
                str(out),
                "--ca-bundle",
                str(pki.ca_cert),
                "--no-memory",
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["n_evaluated"] == 6 and report["excluded"]["total"] == 0
    router = tmp_path / "router.json"
    assert (
        main(
            ["route", "fit", *common, "--out", str(router), "--ca-bundle", str(pki.ca_cert), "--no-progress"]
        )
        == 0
    )
    fitted = json.loads(router.with_suffix(".report.json").read_text())
    assert fitted["n_answered"] == 6  # both models answered every input, the teacher over TLS
    capsys.readouterr()
    assert main(["eval", *common, "--out", str(tmp_path / "eval2"), "--no-memory", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert url in err and "certificate" in err and "Traceback" not in err
    local = ["--student", str(tiny_student_dir), "--teacher", str(tiny_student_dir), "--inputs", str(inputs)]
    assert main(["eval", *local, "--out", str(tmp_path / "e3"), "--ca-bundle", str(pki.ca_cert)]) == 2
    assert "is an http(s) URL" in capsys.readouterr().err  # neither model is remote
    assert not (tmp_path / "e3").exists()

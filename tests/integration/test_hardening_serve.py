"""Issue #11 item 6: a real `distill serve` on 127.0.0.1 against hostile clients over real sockets.

A deeply nested JSON body under the size limit gets 400 in OpenAI's error format (it was a 500 with
a plain-text RecursionError); clients that never finish their headers are disconnected after
``--header-timeout`` (five were seen open after 60 s), while a slow client that does finish its
headers in time, and ordinary requests, are still answered.
"""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from servers import running_server

HEADER_TIMEOUT = 1.5


@pytest.fixture(scope="module")
def server(tiny_lm_dir):
    with running_server(tiny_lm_dir, extra_args=["--header-timeout", str(HEADER_TIMEOUT)]) as url:
        yield url


def _address(url: str) -> tuple[str, int]:
    host_port = url.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    return host, int(port)


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_deeply_nested_json_is_a_400_in_openai_format(server, path):
    depth = 100_000  # 200 kB: under the 1 MiB body limit
    field = "messages" if "chat" in path else "prompt"
    body = '{"model": "m", "' + field + '": ' + "[" * depth + "]" * depth + "}"
    r = httpx.post(server + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "nested too deeply" in err["message"]
    assert httpx.get(server.removesuffix("/v1") + "/health").status_code == 200  # the server is fine


def test_clients_that_never_finish_their_headers_are_dropped(server):
    address = _address(server)
    stalled = []
    for _ in range(5):
        s = socket.create_connection(address, timeout=30)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        stalled.append(s)
    for s in stalled:
        assert s.recv(1024) == b""  # closed by the server (the client's own 30 s timeout would raise)
        s.close()

    # A client that trickles its headers but finishes within the timeout is answered.
    with socket.create_connection(address, timeout=30) as s:
        for part in (b"GET /health HTTP/1.1\r\n", b"Host: x\r\n", b"Connection: close\r\n", b"\r\n"):
            s.sendall(part)
            time.sleep(HEADER_TIMEOUT / 5)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200") and b'"ok"' in reply

    # A kept-alive connection that then stalls in its second request's headers is dropped too.
    with socket.create_connection(address, timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b'{"status":"ok"}' not in first:  # the head and the body may come in separate reads
            first += s.recv(4096)
        assert first.startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /health HTTP/1.1\r\nHost:")
        assert s.recv(4096) == b""

    # Ordinary requests still work.
    r = httpx.post(
        server + "/completions", json={"model": "m", "prompt": "Invoice", "max_tokens": 4}, timeout=60
    )
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None

"""`APITeacher` pieces that need no server: Retry-After parsing, key scrubbing, response parsing, validation."""

from __future__ import annotations

import email.utils
import time

import pytest

from distill.models.api import APITeacher, _parse, _retry_after, _scrubber


def test_retry_after_seconds_and_http_date():
    assert _retry_after("2") == 2.0 and _retry_after("0.25") == 0.25 and _retry_after(None) is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= _retry_after(later) <= 31
    assert _retry_after("soon") is None


def test_scrubber_removes_the_key_and_masked_pieces():
    scrub = _scrubber("sk-canary-7f3a9c1e5b2d4f60")
    text = scrub("bad key sk-canary-7f3a9c1e5b2d4f60; provided: sk-can*******4f60 (invalid_api_key)")
    assert "7f3a9c1e5b2d4f60" not in text and "sk-can" not in text and "invalid_api_key" in text
    assert _scrubber("")("nothing to hide") == "nothing to hide"


def test_parse_keeps_topk_only_when_aligned():
    choice = {
        "text": "ab",
        "finish_reason": "length",
        "prompt_token_ids": [1, 2],
        "token_ids": [5, 6],
        "top_token_ids": [[5, 7], [6, 8]],
        "logprobs": {"top_logprobs": [{"a": -0.1, "c": -2.0}, {"b": -0.2, "d": -3.0}]},
    }
    c = _parse("r", {"choices": [choice], "usage": {"prompt_tokens": 2, "completion_tokens": 2}}, 2, False)
    assert c.top_ids == [[5, 7], [6, 8]] and c.top_logprobs == [[-0.1, -2.0], [-0.2, -3.0]]
    # Two top-k ids with the same text: the legacy dict merged them, values cannot be matched to ids.
    choice["logprobs"]["top_logprobs"][1] = {"b": -0.2}
    c = _parse("r", {"choices": [choice]}, 2, False)
    assert c.top_ids is None and c.completion_token_ids == [5, 6] and c.usage["completion_tokens"] == 2
    # An endpoint without token ids: a text-only answer.
    c = _parse("r", {"choices": [{"text": "ab", "finish_reason": "stop"}]}, 2, False)
    assert c.completion_token_ids is None and c.top_ids is None and c.text == "ab"


def test_constructor_validates_before_any_request(monkeypatch):
    with pytest.raises(ValueError, match="http"):
        APITeacher("localhost:8000/v1", model="m")
    with pytest.raises(ValueError, match="chat"):
        APITeacher("http://127.0.0.1:9/v1", model="m", chat="sometimes")
    monkeypatch.delenv("DISTILL_NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="DISTILL_NO_SUCH_KEY"):
        APITeacher("http://127.0.0.1:9/v1", model="m", api_key_env="DISTILL_NO_SUCH_KEY")

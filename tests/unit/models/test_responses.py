"""The response parsers against answers shaped as real servers send them (vLLM 0.32 with and without
its token-id switches, OpenAI's chat and legacy completions), built here from recorded shapes."""

from __future__ import annotations

import pytest

from distill.models.responses import PAD_LOGPROB, parse_completion, parse_prompt_logprobs, token_id


def _vllm_completion(ids, tops, prompt_ids=(5, 6), finish="length"):
    """vLLM /v1/completions with return_token_ids and return_tokens_as_token_ids (as seen on 0.32)."""
    return {
        "choices": [
            {
                "index": 0,
                "text": "xyz",
                "logprobs": {
                    "text_offset": list(range(len(ids))),
                    "token_logprobs": [t[0][1] for t in tops],
                    "tokens": [f"token_id:{i}" for i in ids],
                    "top_logprobs": [{f"token_id:{i}": lp for i, lp in row} for row in tops],
                },
                "finish_reason": finish,
                "token_ids": list(ids),
                "prompt_token_ids": list(prompt_ids),
            }
        ],
        "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(ids)},
    }


def test_token_id_spelling():
    assert token_id("token_id:42") == 42 and token_id("token_id:x") is None and token_id(" 42") is None


def test_vllm_legacy_completion_gives_ids_sorted_and_cut_to_k():
    # The sampled token is added as a (k+1)-th entry when it is not in the top k; rows come unsorted.
    tops = [[(7, -0.5), (9, -0.1), (3, -2.0)], [(4, -0.2), (8, -1.5), (2, -0.9)]]
    c = parse_completion("r", _vllm_completion([7, 4], tops), 2, chat=False)
    assert c.completion_token_ids == [7, 4] and c.prompt_token_ids == [5, 6]
    assert c.top_ids == [[9, 7], [4, 2]] and c.top_logprobs == [[-0.1, -0.5], [-0.2, -0.9]]
    assert c.top_bytes is None and c.completion_token_bytes is None


def test_vllm_chat_gives_ids_and_top_level_prompt_ids():
    content = [
        {
            "token": "token_id:58",
            "logprob": -0.3,
            "bytes": [85],
            "top_logprobs": [
                {"token": "token_id:58", "logprob": -0.3, "bytes": list(b"token_id:58")},
                {"token": "token_id:144", "logprob": -1.2, "bytes": list(b"token_id:144")},
            ],
        },
        {
            "token": "token_id:1",
            "logprob": -0.01,
            "bytes": [],
            "top_logprobs": [
                {"token": "token_id:1", "logprob": -0.01, "bytes": []},
                {"token": "token_id:9", "logprob": -5.0, "bytes": []},
            ],
        },
    ]
    data = {
        "choices": [
            {
                "message": {"role": "assistant", "content": "U"},
                "logprobs": {"content": content},
                "finish_reason": "stop",
                "token_ids": [58, 1],
            }
        ],
        "prompt_token_ids": [4, 5, 6],
    }
    c = parse_completion("r", data, 2, chat=True)
    assert c.prompt_token_ids == [4, 5, 6] and c.completion_token_ids == [58, 1]  # the EOS as given
    assert c.top_ids == [[58, 144], [1, 9]] and c.top_logprobs[1] == [-0.01, -5.0]
    assert c.finish_reason == "stop"


def test_hosted_chat_keeps_strings_as_bytes_and_never_merges_colliding_strings():
    # Two alternatives with the same string (different tokens on the server): both kept.
    content = [
        {
            "token": " 4",
            "logprob": -0.2,
            "bytes": [32, 52],
            "top_logprobs": [
                {"token": " 4", "logprob": -0.2, "bytes": [32, 52]},
                {"token": " 4", "logprob": -1.0, "bytes": [32, 52]},
                {"token": "\ufffd", "logprob": -3.0, "bytes": [0xE2, 0x82]},  # half of a UTF-8 character
            ],
        },
        {
            "token": ",",
            "logprob": -0.1,
            "bytes": None,  # some APIs omit it: the string's UTF-8
            "top_logprobs": [
                {"token": ",", "logprob": -0.1, "bytes": None},
                {"token": ".", "logprob": -2.5, "bytes": [46]},
                {"token": ";", "logprob": -4.0, "bytes": [59]},
            ],
        },
    ]
    data = {
        "choices": [
            {"message": {"content": " 4,"}, "logprobs": {"content": content}, "finish_reason": "length"}
        ]
    }
    c = parse_completion("r", data, 3, chat=True)
    assert c.top_ids is None and c.completion_token_ids is None and c.prompt_token_ids is None
    assert c.completion_token_bytes == [b" 4", b","] and b"".join(c.completion_token_bytes) == b" 4,"
    assert c.top_bytes == [[b" 4", b" 4", b"\xe2\x82"], [b",", b".", b";"]]
    assert c.top_logprobs == [[-0.2, -1.0, -3.0], [-0.1, -2.5, -4.0]]
    assert c.usage["completion_tokens"] == 2


def test_hosted_legacy_completion_pads_rows_a_string_dict_merged():
    data = {
        "choices": [
            {
                "text": "ab",
                "logprobs": {
                    "tokens": ["a", "b"],
                    "token_logprobs": [-0.1, -0.2],
                    # the server's dict merged two tokens that read "b": 1 entry for k=2
                    "top_logprobs": [{"a": -0.1, "c": -3.0}, {"b": -0.2}],
                },
                "finish_reason": "length",
            }
        ]
    }
    c = parse_completion("r", data, 2, chat=False)
    assert c.top_bytes == [[b"a", b"c"], [b"b", b""]]
    assert c.top_logprobs == [[-0.1, -3.0], [-0.2, PAD_LOGPROB]]


def test_text_only_answer_and_distill_serve_shape():
    plain = {"choices": [{"text": "hi", "finish_reason": "stop"}]}
    c = parse_completion("r", plain, 5, chat=False)
    assert (c.top_ids, c.top_bytes, c.completion_token_ids, c.completion_token_bytes) == (None,) * 4
    served = {
        "choices": [
            {
                "text": "hi",
                "finish_reason": "stop",
                "token_ids": [3, 1],
                "prompt_token_ids": [2],
                "top_token_ids": [[3, 4], [1, 0]],
                "top_token_logprobs": [[-0.1, -2.0], [-0.05, -3.0]],
                "logprobs": {"tokens": ["h", ""], "top_logprobs": [{"h": -0.1, "x": -2.0}, {"": -0.05}]},
            }
        ]
    }
    c = parse_completion("r", served, 2, chat=False)
    assert c.top_ids == [[3, 4], [1, 0]] and c.top_logprobs == [[-0.1, -2.0], [-0.05, -3.0]]


def test_malformed_answers_raise():
    with pytest.raises((KeyError, IndexError, TypeError)):
        parse_completion("r", {"choices": []}, 2, chat=False)
    with pytest.raises((KeyError, TypeError)):
        parse_completion("r", {"object": "list"}, 2, chat=True)


def test_prompt_logprobs_rows_sorted_cut_and_first_row_zero():
    data = {
        "choices": [
            {
                "prompt_token_ids": [5, 6, 7],
                "prompt_logprobs": [
                    None,
                    {
                        "6": {"logprob": -4.0, "rank": 9},
                        "2": {"logprob": -0.5, "rank": 1},
                        "3": {"logprob": -1.0, "rank": 2},
                    },
                    {"7": {"logprob": -0.2, "rank": 1}, "8": {"logprob": -2.0, "rank": 2}},
                ],
            }
        ]
    }
    ids, top_ids, top_lps = parse_prompt_logprobs(data, 2)
    assert ids == [5, 6, 7] and top_ids == [[0, 0], [2, 3], [7, 8]] and top_lps[1] == [-0.5, -1.0]
    with pytest.raises(ValueError, match="prompt_logprobs"):
        parse_prompt_logprobs({"choices": [{"text": "x"}]}, 2)

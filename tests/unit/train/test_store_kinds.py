"""`distill train` on stores whose top-k is not ids: one line for `--mode logits`, notes where the
store-vs-student tokenizer check cannot run (never skipped silently)."""

from __future__ import annotations

import pytest

from distill.models.base import Completion
from distill.store import writer as store_writer
from distill.train.examples import load_examples

K = 2


def _store(path, c: Completion, tokenizer=None, k: int = K):
    cfg = {"teacher": {"kind": "api", "name": "m"}, "tokenizer": tokenizer, "settings": {}, "k": k,
           "capture_temperature": 1.0}  # fmt: skip
    with store_writer.StoreWriter(path, cfg) as w:
        w.write([store_writer.completion_row("k", "p", "hello", None, c, k)])
        w.manifest["endpoints"] = ["http://127.0.0.1:9/v1"]
    return path


def test_logits_mode_on_a_text_only_store_is_one_line_naming_the_endpoint(tmp_path, tiny_tokenizer):
    path = _store(
        tmp_path / "s", Completion("p", "total", "stop", usage={"prompt_tokens": 1, "completion_tokens": 1})
    )
    with pytest.raises(ValueError, match=r"text only: http://127.0.0.1:9/v1 returned no top-k.*--mode sft"):
        load_examples(path, tiny_tokenizer, max_length=64, need_topk=True, token_level=True)
    examples, stats = load_examples(path, tiny_tokenizer, max_length=64)  # sft: re-tokenised, counted
    assert stats.retokenized == 1 and "1 re-tokenised from their text" in stats.summary()
    assert examples[0]["input_ids"][-1].item() == tiny_tokenizer.eos_token_id  # stopped: EOS appended


def test_logits_mode_on_a_bytes_store_is_one_line(tmp_path, tiny_tokenizer):
    c = Completion("p", "ab", "length", completion_token_bytes=[b"a", b"b"], top_bytes=[[b"a", b"c"], [b"b", b""]],
                   top_logprobs=[[-0.1, -2.0], [-0.2, -65504.0]])  # fmt: skip
    path = _store(tmp_path / "s", c)
    with pytest.raises(ValueError, match="top-k as token strings"):
        load_examples(path, tiny_tokenizer, max_length=64, need_topk=True, token_level=True)


def test_a_store_without_a_tokenizer_is_noted_and_a_probe_hash_is_checked(tmp_path, tiny_tokenizer):
    from distill.models.server import local_probe_ids, probe_hash
    from distill.train.vocab import check_store_tokenizer

    c = Completion("p", "x", "length", [5], [6, 7], [[6, 1], [7, 1]], [[-0.5, -1.0], [-0.1, -2.0]])
    _, stats = load_examples(_store(tmp_path / "s", c), tiny_tokenizer, max_length=64, token_level=True)
    assert "records no teacher tokenizer" in stats.summary()
    good = {
        "tokenizer": {
            "name": "t",
            "vocab_hash": None,
            "probe_hash": probe_hash(local_probe_ids(tiny_tokenizer)),
        }
    }
    check_store_tokenizer(good, tiny_tokenizer, "S")
    bad = {"tokenizer": {"name": "t", "vocab_hash": None, "probe_hash": probe_hash([1, 2, 3])}}
    with pytest.raises(ValueError, match="tokenises the probe text differently"):
        check_store_tokenizer(bad, tiny_tokenizer, "S")

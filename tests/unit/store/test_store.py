"""The teacher-output store: records, manifest, crash repair, failures, reader tensors, size."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distill import store
from distill.models.base import Completion
from distill.store import writer as store_writer

K = 3
CONFIG = {
    "teacher": {"kind": "test", "name": "t"},
    "tokenizer": {"name": "tok", "vocab_hash": "abc"},
    "settings": {"max_new_tokens": 4, "temperature": 0.0, "top_logprobs": K},
    "k": K,
    "capture_temperature": 1.0,
}


def completion(i: int, n: int = 3, k: int = K) -> Completion:
    rng = np.random.default_rng(i)
    return Completion(
        id=f"p{i}",
        text=f"answer {i}",
        finish_reason="length",
        prompt_token_ids=[10 + i, 11, 12],
        completion_token_ids=[20 + i + j for j in range(n)],
        top_ids=rng.integers(0, 400, size=(n, k)).tolist(),
        top_logprobs=np.sort(-rng.random((n, k)) * 5, axis=1)[:, ::-1].tolist(),
        usage={"prompt_tokens": 3, "completion_tokens": n},
    )


def row(i: int, **kw) -> dict:
    key = store.record_key(store.config_hash(CONFIG), f"prompt {i}", None, f"p{i}")
    return store_writer.completion_row(key, f"p{i}", f"prompt {i}", None, completion(i, **kw), K)


def test_roundtrip_records_manifest_and_examples(tmp_path):
    with store_writer.StoreWriter(tmp_path / "s", CONFIG) as w:
        w.write([row(0), row(1)], spent={"prompt_tokens": 6, "completion_tokens": 6})
        w.write([row(2, n=2)])
    st = store.open(tmp_path / "s")
    assert len(st) == 3
    m = st.manifest
    assert m["tokenizer"]["vocab_hash"] == "abc" and m["k"] == K and m["capture_temperature"] == 1.0
    assert m["counts"] == {"records": 3, "failed": 0, "shards": 2}
    assert m["tokens"] == {"prompt": 9, "completion": 8} and m["spent"]["prompt_tokens"] == 6
    recs = list(st)
    assert [r["id"] for r in recs] == ["p0", "p1", "p2"]
    c = completion(1)
    assert recs[1]["completion"] == c.text and recs[1]["completion_token_ids"] == c.completion_token_ids
    assert recs[1]["topk_ids"] == c.top_ids
    np.testing.assert_allclose(recs[1]["topk_logprobs"], c.top_logprobs, atol=5e-3)  # float16
    assert recs[1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3}

    ex = list(st.examples())[1]
    assert ex["id"] == "p1"
    assert ex["input_ids"].tolist() == c.prompt_token_ids + c.completion_token_ids
    assert ex["labels"].tolist() == [-100] * 3 + c.completion_token_ids
    assert ex["topk_ids"].dtype == torch.long and ex["topk_logprobs"].dtype == torch.float32
    assert ex["topk_ids"].shape == (6, K)
    # Row i is the distribution for the token at position i: prompt rows zero, completion rows the teacher's.
    assert ex["topk_ids"][:3].abs().sum() == 0 and ex["topk_logprobs"][:3].abs().sum() == 0
    assert ex["topk_ids"][3:].tolist() == c.top_ids
    np.testing.assert_allclose(ex["topk_logprobs"][3:].numpy(), c.top_logprobs, atol=5e-3)


def test_max_length_cuts_from_the_end_and_counts_skips(tmp_path):
    with store_writer.StoreWriter(tmp_path, CONFIG) as w:
        w.write([row(0, n=3)])
    st = store.open(tmp_path)
    (ex,) = st.examples(max_length=4)
    assert (
        ex["input_ids"].shape == (4,) and ex["labels"].tolist()[-1] == 20 and ex["topk_ids"].shape == (4, K)
    )
    assert list(st.examples(max_length=3)) == []
    assert st.rejected == {"no completion tokens within max_length": 1}


def test_non_finite_logprobs_rejected_at_write_and_at_load(tmp_path):
    bad = completion(0)
    bad.top_logprobs[1][0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        store_writer.completion_row("k", "p0", "x", None, bad, K)
    with store_writer.StoreWriter(tmp_path, CONFIG) as w:
        w.write([row(0), row(1)])
    # A shard written by another tool with an inf inside: the reader rejects that record and counts it.
    shard = next(tmp_path.glob("shard-*.parquet"))
    t = pq.read_table(shard)
    lps = [np.frombuffer(b, "<f2").copy() for b in t.column("topk_logprobs").to_pylist()]
    lps[0][2] = -np.inf
    blobs = pa.array([x.tobytes() for x in lps], pa.binary())
    t = t.set_column(t.schema.get_field_index("topk_logprobs"), "topk_logprobs", blobs)
    pq.write_table(t, shard)
    st = store.open(tmp_path)
    assert [e["id"] for e in st.examples()] == ["p1"]
    assert st.rejected == {"non-finite log-probabilities": 1}


def test_torn_shard_and_temporaries_are_removed_and_redone(tmp_path):
    with store_writer.StoreWriter(tmp_path, CONFIG) as w:
        w.write([row(0)])
        w.write([row(1)])
    second = tmp_path / "shard-000001.parquet"
    second.write_bytes(second.read_bytes()[:-20])  # torn: footer cut off
    (tmp_path / ".shard-000002.parquet.123.tmp").write_bytes(b"PAR1 half")
    with pytest.raises(ValueError, match="shard-000001.parquet unreadable .* 1 of the 2 records"):
        store.open(tmp_path)  # the manifest lists 2 records: the reader refuses to lose one silently
    assert len(store.open(tmp_path, allow_partial=True)) == 1  # or goes on, counting what was lost
    with store_writer.StoreWriter(tmp_path, CONFIG) as w:
        assert w.done == {row(0)["key"]}
        assert sorted(w.repaired) == [
            "removed temporary file .shard-000002.parquet.123.tmp",
            "removed torn or damaged shard shard-000001.parquet (1 records; their prompts are asked again)",
        ]
        w.write([row(1)])
    st = store.open(tmp_path)
    assert [r["id"] for r in st] == ["p0", "p1"] and st.manifest["counts"]["records"] == 2


def test_failures_are_dropped_once_answered_and_torn_lines_skipped(tmp_path):
    r0 = row(0)
    with store_writer.StoreWriter(tmp_path, CONFIG) as w:
        w.fail(r0["key"], "p0", "HTTP 500", attempts=3)
        w.fail("other", "p9", "timeout", attempts=3)
    with (tmp_path / "failures.jsonl").open("a") as f:
        f.write('{"key": "torn", "id"')  # a killed run's half line
    st = store.open(tmp_path)
    assert sorted(f["id"] for f in st.failures()) == ["p0", "p9"]
    with store_writer.StoreWriter(tmp_path, CONFIG) as w:
        w.write([r0])
    lines = [json.loads(x) for x in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == ["p9"]  # p0 is in the store now: never both
    assert store.open(tmp_path).manifest["counts"]["failed"] == 1


def test_changed_setup_is_refused_and_changes_every_key(tmp_path):
    with store_writer.StoreWriter(tmp_path, CONFIG) as w:
        w.write([row(0)])
    base = store.record_key(store.config_hash(CONFIG), "prompt 0", None, "p0")
    variants = [
        {**CONFIG, "teacher": {"kind": "test", "name": "t2"}},
        {**CONFIG, "settings": {**CONFIG["settings"], "temperature": 0.7}},
        {**CONFIG, "k": K + 1},
    ]
    for cfg in variants:
        assert store.record_key(store.config_hash(cfg), "prompt 0", None, "p0") != base
        with pytest.raises(ValueError, match="another setup"):
            store_writer.StoreWriter(tmp_path, cfg)
    assert store.record_key(store.config_hash(CONFIG), "prompt 0!", None, "p0") != base


def test_second_writer_is_refused(tmp_path):
    with store_writer.StoreWriter(tmp_path, CONFIG):
        with pytest.raises(ValueError, match="another process"):
            store_writer.StoreWriter(tmp_path, CONFIG)


def test_bytes_per_generated_token_at_k20(tmp_path):
    """Realistic-looking top-20 data (32k vocabulary, sorted log-probabilities) stays <= 6k + 16 B/token."""
    k, n_tok, n_rec = 20, 200, 100
    cfg = {**CONFIG, "k": k}
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_rec):
        logits = rng.gumbel(size=(n_tok, 1000)) * 3
        top = np.sort(logits, axis=1)[:, ::-1][:, :k]
        lps = top - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        ids = rng.choice(32000, size=(n_tok, k))
        c = Completion(
            f"p{i}",
            "x" * 4 * n_tok,
            "length",
            list(range(50)),
            ids[:, 0].tolist(),
            ids.tolist(),
            lps.tolist(),
        )
        rows.append(store_writer.completion_row(f"k{i}", f"p{i}", "y" * 200, None, c, k))
    with store_writer.StoreWriter(tmp_path, cfg) as w:
        w.write(rows)
    size = sum(p.stat().st_size for p in tmp_path.glob("shard-*.parquet"))
    assert size / (n_tok * n_rec) <= 6 * k + 16


def test_black_box_records_are_tokenised_with_a_tokenizer(tmp_path, tiny_tokenizer):
    c = Completion("p0", "total 3.50 EUR", "stop", usage={"prompt_tokens": 4, "completion_tokens": 5})
    with store_writer.StoreWriter(tmp_path, CONFIG) as w:
        w.write([store_writer.completion_row("k0", "p0", "Invoice 0001", None, c, K)])
    st = store.open(tmp_path)
    assert list(st)[0]["topk_ids"] is None and list(st)[0]["completion_token_ids"] is None
    with pytest.raises(ValueError, match="no token ids"):
        list(st.examples())
    (ex,) = st.examples(tokenizer=tiny_tokenizer)
    p = tiny_tokenizer("Invoice 0001")["input_ids"]
    # finish_reason "stop": the tokenizer's EOS ends the completion, so an SFT student learns to stop.
    c_ids = tiny_tokenizer("total 3.50 EUR", add_special_tokens=False)["input_ids"] + [
        tiny_tokenizer.eos_token_id
    ]
    assert ex["input_ids"].tolist() == p + c_ids and ex["labels"].tolist() == [-100] * len(p) + c_ids
    assert "topk_ids" not in ex
    assert st.retokenized == 1  # counted, and reported by `distill train`

"""Store format version 2 (CONTRACT-bytes.md): byte columns for a hosted API's top-k, ``topk_kind``,
version-1 stores still readable (and continued as version 2), colliding strings kept apart."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill import store
from distill.models.base import Completion
from distill.store import writer as store_writer
from distill.store.format import V2_COLUMNS

K = 2
CONFIG = {
    "teacher": {"kind": "test", "name": "t"},
    "tokenizer": None,
    "settings": {"max_new_tokens": 4, "temperature": 0.0, "top_logprobs": K},
    "k": K,
    "capture_temperature": 1.0,
}


def hosted(i: int) -> Completion:
    """An answer whose top-k came as strings: two alternatives read " 4" (kept apart)."""
    return Completion(
        id=f"p{i}",
        text=" 4,",
        finish_reason="length",
        completion_token_bytes=[b" 4", b","],
        top_bytes=[[b" 4", b" 4"], [b",", b"\xe2\x82"]],
        top_logprobs=[[-0.25, -1.0], [-0.125, -3.0]],
        usage={"prompt_tokens": 3, "completion_tokens": 2},
    )


def test_bytes_round_trip_and_topk_kind(tmp_path):
    rows = [store_writer.completion_row(f"k{i}", f"p{i}", "q", None, hosted(i), K) for i in range(3)]
    assert rows[0]["topk_ids"] is None and rows[0]["topk_bytes"] == [b" 4", b" 4", b",", b"\xe2\x82"]
    with store_writer.StoreWriter(tmp_path, CONFIG) as w:
        w.write(rows)
    st = store.open(tmp_path)
    assert st.manifest["version"] == 2 and st.manifest["topk_kind"] == "bytes" and st.topk_kind == "bytes"
    recs = list(st)
    assert recs[0]["topk_bytes"] == [
        [b" 4", b" 4"],
        [b",", b"\xe2\x82"],
    ]  # (n, k): colliding entries both kept
    assert recs[0]["completion_token_bytes"] == [b" 4", b","] and recs[0]["topk_ids"] is None
    assert recs[0]["topk_logprobs"] == [[-0.25, -1.0], [-0.125, -3.0]]
    schema = pq.read_schema(next(tmp_path.glob("shard-*.parquet")))
    assert schema.field("topk_bytes").type == pa.list_(pa.binary())
    assert schema.field("completion_token_bytes").type == pa.list_(pa.binary())


def test_ids_store_has_kind_ids_and_null_bytes(tmp_path):
    c = Completion("p", "x", "stop", [1], [2, 3], [[2, 4], [3, 5]], [[-0.5, -1.0], [-0.1, -2.0]])
    with store_writer.StoreWriter(tmp_path, CONFIG) as w:
        w.write([store_writer.completion_row("k", "p", "q", None, c, K)])
    st = store.open(tmp_path)
    (rec,) = list(st)
    assert st.topk_kind == "ids" and rec["topk_ids"] == [[2, 4], [3, 5]] and rec["topk_bytes"] is None
    (ex,) = st.examples()
    assert ex["topk_ids"].shape == (3, K)


def test_text_only_store_has_kind_null(tmp_path):
    c = Completion("p", "x", "stop", usage={"prompt_tokens": 1, "completion_tokens": 1})
    with store_writer.StoreWriter(tmp_path, CONFIG) as w:
        w.write([store_writer.completion_row("k", "p", "q", None, c, K)])
    assert store.open(tmp_path).manifest["topk_kind"] is None


def test_mixed_kinds_are_refused(tmp_path):
    c = Completion("p", "x", "stop", [1], [2, 3], [[2, 4], [3, 5]], [[-0.5, -1.0], [-0.1, -2.0]])
    with store_writer.StoreWriter(tmp_path, CONFIG) as w:
        w.write([store_writer.completion_row("k", "p", "q", None, c, K)])
        with pytest.raises(ValueError, match="one store, one kind"):
            w.write([store_writer.completion_row("k2", "p2", "q", None, hosted(2), K)])


def test_bytes_of_the_wrong_shape_are_an_error():
    bad = hosted(0)
    bad.top_bytes = [[b"a"], [b",", b"."]]
    with pytest.raises(ValueError, match="top-k data"):
        store_writer.completion_row("k", "p", "q", None, bad, K)


def _make_v1(path):
    """A version-1 store as the code before version 2 wrote it: no byte columns, no topk_kind."""
    c = Completion("p", "x", "length", [1], [2, 3], [[2, 4], [3, 5]], [[-0.5, -1.0], [-0.1, -2.0]])
    with store_writer.StoreWriter(path, CONFIG) as w:
        w.write([store_writer.completion_row("k", "p", "q", None, c, K)])
    shard = next(path.glob("shard-*.parquet"))
    t = pq.read_table(shard).drop_columns(list(V2_COLUMNS))
    pq.write_table(t, shard, write_page_checksum=True)
    m = json.loads((path / "manifest.json").read_text())
    m["version"] = 1
    del m["topk_kind"]
    (path / "manifest.json").write_text(json.dumps(m))


def test_version_1_store_reads_and_continues_as_version_2(tmp_path):
    _make_v1(tmp_path)
    st = store.open(tmp_path)
    assert st.manifest["version"] == 1 and st.topk_kind == "ids"  # k > 0: ids
    (rec,) = list(st)
    assert (
        rec["topk_ids"] == [[2, 4], [3, 5]]
        and rec["topk_bytes"] is None
        and rec["completion_token_bytes"] is None
    )
    (ex,) = st.examples()
    assert ex["topk_ids"][1:].tolist() == [[2, 4], [3, 5]]
    c = Completion("p2", "y", "length", [1], [6, 7], [[6, 1], [7, 1]], [[-0.5, -1.0], [-0.1, -2.0]])
    with store_writer.StoreWriter(tmp_path, CONFIG) as w:  # the same setup: continued
        assert w.done == {"k"}
        w.write([store_writer.completion_row("k2", "p2", "q2", None, c, K)])
    st = store.open(tmp_path)
    assert st.manifest["version"] == 2 and st.manifest["topk_kind"] == "ids" and len(list(st)) == 2


def test_unknown_version_and_kind_are_refused(tmp_path):
    _make_v1(tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**m, "version": 3}))
    with pytest.raises(ValueError, match="version 3"):
        store.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**m, "topk_kind": "strings"}))
    with pytest.raises(ValueError, match="topk_kind"):
        store.open(tmp_path)

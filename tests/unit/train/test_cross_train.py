"""The cross-tokenizer data path against the exact id path on two identical tokenizers, and a store of
bytes (format 2 fields) read through the contract's record fields."""

from __future__ import annotations

import math

import pytest
import torch

from distill.models.token_bytes import token_bytes
from distill.train.config import TrainConfig
from distill.train.cross_data import load_cross_store, store_examples
from distill.train.examples import DataStats, collate, load_examples
from distill.train.objective import Objective

ROWS = [
    {
        "prompt": f"Invoice {i:04d} from Acme",
        "completion": f" total {i * 3.5:.2f} EUR, due 2024-{i % 12 + 1:02d}",
    }
    for i in range(6)
]


def _store(path, tok, k=3):
    """A store of the tiny tokenizer's ids, EOS included, top-k of ordinary tokens (as a local teacher's)."""
    from distill.models.base import Completion
    from distill.store import StoreWriter, completion_row
    from distill.train.vocab import vocab_hash

    cfg = {"teacher": {"kind": "hf", "name": "t"}, "tokenizer": {"name": "tiny", "vocab_hash": vocab_hash(tok)},
           "settings": {}, "k": k, "capture_temperature": 1.0}  # fmt: skip
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, r in enumerate(ROWS):
        p = tok(r["prompt"])["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        top, lps = [], []
        for t in c:
            others = [a for a in torch.randperm(len(tok) - 10, generator=g)[:5].add(10).tolist() if a != t]
            top.append([t, *others[: k - 1]])
            p_rest = torch.rand(k - 1, generator=g) * 0.15
            lps.append([math.log(0.6), *p_rest.log().tolist()])
        comp = Completion(id=str(i), text=r["completion"], finish_reason="stop", prompt_token_ids=p,
                          completion_token_ids=c, top_ids=top, top_logprobs=lps)  # fmt: skip
        rows.append(completion_row(f"key{i}", str(i), r["prompt"], None, comp, k))
    with StoreWriter(path, cfg) as w:
        w.write(rows)
    return path


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "generalized_jsd"])
def test_cross_path_on_identical_tokenizers_equals_the_id_path(tmp_path, tiny_tokenizer, loss):
    from distill.models.tiny import tiny_causal_lm

    store = _store(tmp_path / "s", tiny_tokenizer)
    ids_ex, _ = load_examples(store, tiny_tokenizer, max_length=256, need_topk=True, token_level=True)
    spec = {"teacher_bytes": token_bytes(tiny_tokenizer), "top_k": 3, "method": "project"}
    cross_ex, stats = load_cross_store(store, tiny_tokenizer, spec, max_length=256)
    assert stats.cross["aligned"] == stats.cross["positions"] > 0  # every position aligned
    assert [e["id"] for e in ids_ex] == [e["id"] for e in cross_ex]
    for a, b in zip(ids_ex, cross_ex):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    model = tiny_causal_lm(len(tiny_tokenizer), n_layer=1, n_embd=32, n_head=2, seed=3)
    cfg = TrainConfig(
        student="s", data=str(store), out="o", mode="logits", loss=loss, alpha=0.7, temperature=1.0
    )
    obj = Objective.from_config(cfg, n_vocab=len(tiny_tokenizer))
    values = []
    for examples in (ids_ex, cross_ex):
        batch = collate(examples, tiny_tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total, parts = obj.loss_sum(logits, batch, None, on_policy=False)
        values.append((float(total.detach()), float(parts["kd"])))
    assert values[1][0] == pytest.approx(values[0][0], rel=1e-5)
    assert values[1][1] == pytest.approx(values[0][1], rel=1e-5)


class _Records(list):
    """Record dicts as `distill.store.Store` yields them, for the format-2 fields (CONTRACT-bytes.md)."""

    def __init__(self, rows, k):
        super().__init__(rows)
        self.manifest, self.k, self.path, self.rejected = {"topk_kind": "bytes", "k": k}, k, "bytes-store", {}


def test_store_of_bytes_records(tiny_tokenizer, metaspace_tokenizer):
    """A hosted API's answer: token strings as bytes (its own tokenizer, here a Metaspace one), top-k as bytes."""
    tb = token_bytes(metaspace_tokenizer)
    rows = []
    for i, r in enumerate(ROWS):
        ids = metaspace_tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
        toks = [tb.table[t] for t in ids]
        toks[0] = toks[0][1:] if toks[0][:1] == b" " and not r["completion"].startswith(" ") else toks[0]
        rows.append({"id": str(i), "prompt": r["prompt"], "completion": r["completion"], "completion_token_ids": None,
                     "completion_token_bytes": toks, "topk_ids": None, "topk_bytes": [[b, b" EUR"] for b in toks],
                     "topk_logprobs": [[math.log(0.7), math.log(0.2)] for _ in toks]})  # fmt: skip
    stats = DataStats(source="bytes-store")
    examples = store_examples(_Records(rows, 2), tiny_tokenizer, None, max_length=256, stats=stats)
    assert len(examples) == len(ROWS) and stats.used == 0  # used is set by the caller
    assert 0.3 < stats.cross["aligned"] / stats.cross["positions"] < 1  # EOS (no API token) is never aligned
    for e in examples:
        P = e["prompt_len"]
        aligned = e["kd_mask"][P:]
        assert aligned.any() and not aligned[-1]
        top = e["topk_ids"][P:][aligned, 0]
        assert (top == e["labels"][P:][aligned]).float().mean() > 0.9  # the answer's own tokens
        assert torch.isinf(e["topk_logprobs"][:P]).all() and not e["kd_mask"][:P].any()
    missing = _Records([{**rows[0], "completion_token_bytes": None}], 2)
    assert store_examples(missing, tiny_tokenizer, None, max_length=256, stats=stats) == []
    assert any("token bytes missing" in r for r in stats.skipped)


def test_a_vllm_store_of_another_tokenizer_is_checked_by_its_probe_hash(
    tmp_path, tiny_tokenizer, metaspace_tokenizer
):
    """vLLM publishes no vocabulary: the manifest records its tokenisation of a probe text (issue #12)."""
    from distill.models.server import local_probe_ids, probe_hash
    from distill.store import StoreWriter
    from distill.train.cross_data import cross_store

    def store(path, tok):
        cfg = {"teacher": {"kind": "api", "name": "m"}, "settings": {}, "k": 3, "capture_temperature": 1.0,
               "tokenizer": {"name": "m", "vocab_hash": None, "probe_hash": probe_hash(local_probe_ids(tok))}}  # fmt: skip
        with StoreWriter(path, cfg):
            pass
        return path

    metaspace_tokenizer.save_pretrained(tmp_path / "meta")
    other = store(tmp_path / "other", metaspace_tokenizer)
    cfg = TrainConfig(student="s", data=str(other), out="o", mode="logits")
    with pytest.raises(ValueError, match="probe hash .* --teacher-tokenizer DIR"):
        cross_store(cfg, tiny_tokenizer)
    spec = cross_store(TrainConfig(student="s", data=str(other), out="o", mode="logits",
                                   teacher_tokenizer=str(tmp_path / "meta")), tiny_tokenizer)  # fmt: skip
    assert spec["teacher_bytes"] is token_bytes(metaspace_tokenizer) or len(spec["teacher_bytes"]) == len(
        metaspace_tokenizer
    )
    tiny_tokenizer.save_pretrained(tmp_path / "tiny")
    with pytest.raises(ValueError, match="is not the store's probe hash"):
        cross_store(TrainConfig(student="s", data=str(other), out="o", mode="logits",
                                teacher_tokenizer=str(tmp_path / "tiny")), tiny_tokenizer)  # fmt: skip
    same = store(tmp_path / "same", tiny_tokenizer)
    assert (
        cross_store(TrainConfig(student="s", data=str(same), out="o", mode="logits"), tiny_tokenizer) is None
    )

"""The training loop's contracts: normalisation under accumulation, config, vocabulary agreement, data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from distill.train import accumulate_gradients
from distill.train.config import TrainConfig, load_config
from distill.train.examples import DataStats, collate, load_examples
from distill.train.vocab import shared_vocab_size

ROOT = Path(__file__).resolve().parents[3]


def _rows(n):
    from distill.demos.tasks import make_examples, to_rows

    return to_rows(make_examples(n, seed=5))


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["sft", "logits"])
def test_gradient_accumulation_equals_full_batch(tmp_path, tiny_tokenizer, mode):
    from accelerate import Accelerator

    from distill.models.tiny import tiny_causal_lm

    data = _write_jsonl(tmp_path / "d.jsonl", _rows(6))
    examples, stats = load_examples(data, tiny_tokenizer, max_length=128)
    counts = [int((e["labels"][1:] != -100).sum()) for e in examples]
    assert len(set(counts)) > 1  # unequal token counts: a per-micro-batch mean would be wrong
    student = tiny_causal_lm(len(tiny_tokenizer), n_layer=1, n_embd=32, n_head=2, seed=1)
    teacher = (
        tiny_causal_lm(len(tiny_tokenizer), n_layer=1, n_embd=32, n_head=2, seed=2)
        if mode == "logits"
        else None
    )
    cfg = TrainConfig(student="s", data=str(data), out="o", mode=mode, alpha=0.3, temperature=2.0)
    acc = Accelerator(cpu=True)
    pad = tiny_tokenizer.pad_token_id
    kw = dict(stats=stats, on_policy=False, n_vocab=len(tiny_tokenizer))

    _, _, n_full = accumulate_gradients(cfg, acc, student, teacher, [collate(examples, pad)], **kw)
    full = _grads(student)
    student.zero_grad(set_to_none=True)
    micro = [collate(examples[:1], pad), collate(examples[1:4], pad), collate(examples[4:], pad)]
    _, _, n_acc = accumulate_gradients(cfg, acc, student, teacher, micro, **kw)
    acc_grads = _grads(student)
    assert n_full == n_acc == sum(counts)
    for name, g in full.items():
        torch.testing.assert_close(acc_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    # The same check fails for the common bug (mean per micro-batch, then averaged).
    student.zero_grad(set_to_none=True)
    for b in micro:
        accumulate_gradients(cfg, acc, student, teacher, [b], **kw)
    wrong = _grads(student)
    assert any(not torch.allclose(wrong[n] / len(micro), g, rtol=1e-3, atol=1e-6) for n, g in full.items())


def test_config_validation_names_the_value():
    base = dict(student="s", data="d", out="o")
    for bad, match in [
        ({"temperature": 0}, "temperature must be a finite number > 0, got 0"),
        ({"temperature": -1.5}, "got -1.5"),
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\], got 1.5"),
        ({"alpha": -0.1}, "alpha"),
        ({"lmbda": 2.0}, "lambda must be in"),
        ({"mode": "dpo"}, "mode must be one of sft, logits, on-policy, got 'dpo'"),
        ({"grad_accum": 0}, "grad_accum must be an integer >= 1, got 0"),
        ({"mode": "on-policy"}, "needs a teacher"),
    ]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**base, **bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig(**base).lr = 1.0  # type: ignore[misc]


def test_recipe_file_parses_and_flags_override(tmp_path):
    cfg = load_config(ROOT / "examples" / "recipe.toml")
    assert cfg.mode == "logits" and cfg.grad_accum == 4 and cfg.lmbda == 0.5
    assert cfg.lora_target_modules == ("q_proj", "v_proj")
    cfg2 = load_config(ROOT / "examples" / "recipe.toml", {"lr": 0.01, "mode": None, "lambda": 0.25})
    assert cfg2.lr == 0.01 and cfg2.mode == "logits" and cfg2.lmbda == 0.25
    assert cfg2.changed_fields(cfg) == {"lr": (3e-4, 0.01), "lmbda": (0.5, 0.25)}
    bad = tmp_path / "bad.toml"
    bad.write_text('student = "s"\ndata = "d"\nout = "o"\nlearning_rate = 1\n')
    with pytest.raises(ValueError, match="bad.toml: unknown setting 'learning_rate'"):
        load_config(bad)
    with pytest.raises(ValueError, match="missing required setting"):
        load_config(None, {"student": "s"})


def test_padded_teacher_vocab_accepted_and_other_tokenizer_refused(tiny_tokenizer):
    from distill.models.tiny import train_tokenizer

    n = len(tiny_tokenizer)
    assert (
        shared_vocab_size(tiny_tokenizer, tiny_tokenizer, student_vocab_size=n, teacher_vocab_size=n + 64)
        == n
    )
    other = train_tokenizer([f"Shipment {i} to Berlin weighs {i * 2} kg" for i in range(200)], vocab_size=400)
    other.name_or_path = "other-tok"
    tiny_tokenizer.name_or_path = "tiny-tok"
    with pytest.raises(
        ValueError, match=r"'tiny-tok' and teacher tokenizer 'other-tok' differ at token id \d+"
    ):
        shared_vocab_size(tiny_tokenizer, other)
    with pytest.raises(ValueError, match="has 10 vocabulary rows"):
        shared_vocab_size(tiny_tokenizer, tiny_tokenizer, teacher_vocab_size=10)


def test_table_data_truncation_and_skips_are_counted(tmp_path, tiny_tokenizer):
    rows = _rows(3) + [{"prompt": "x " * 200, "completion": " y"}, {"prompt": None, "completion": "z"}]
    ex, stats = load_examples(_write_jsonl(tmp_path / "d.jsonl", rows), tiny_tokenizer, max_length=120)
    assert isinstance(stats, DataStats) and stats.read == 5 and stats.used == len(ex) == 3
    assert sum(stats.skipped.values()) == 2 and "no completion token left" in stats.summary()
    assert all(len(e["input_ids"]) <= 120 for e in ex)
    ex, stats = load_examples(
        _write_jsonl(tmp_path / "t.jsonl", [{"text": "Invoice 12 total 3 EUR"}]), tiny_tokenizer, max_length=4
    )
    assert stats.truncated == 1 and len(ex[0]["input_ids"]) == 4
    with pytest.raises(ValueError, match="no usable training examples"):
        load_examples(_write_jsonl(tmp_path / "e.jsonl", [{"text": ""}]), tiny_tokenizer, max_length=120)
    with pytest.raises(ValueError, match="expected 'prompt' and 'completion' columns or a 'text' column"):
        load_examples(_write_jsonl(tmp_path / "c.jsonl", [{"question": "q"}]), tiny_tokenizer, max_length=120)
    with pytest.raises(ValueError, match="has no teacher log-probabilities"):
        load_examples(tmp_path / "d.jsonl", tiny_tokenizer, max_length=40, need_topk=True)


def _store(path, tokenizer, n=4, k=3):
    """A real store with ``n`` records whose top-k data is valid, written by `StoreWriter`."""
    from distill.models.base import Completion
    from distill.store import StoreWriter, completion_row
    from distill.train.vocab import vocab_hash

    cfg = {"teacher": {"kind": "hf", "name": "t"}, "tokenizer": {"name": "tiny", "vocab_hash": vocab_hash(tokenizer)},
           "settings": {}, "k": k, "capture_temperature": 1.0}  # fmt: skip
    rows = []
    for i, r in enumerate(_rows(n)):
        p = tokenizer(r["prompt"])["input_ids"]
        c = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
        comp = Completion(id=str(i), text=r["completion"], finish_reason="stop", prompt_token_ids=p,
                          completion_token_ids=c, top_ids=[[t, 5, 6][:k] if t not in (5, 6) else [t, 7, 8] for t in c],
                          top_logprobs=[[-0.1, -3.0, -4.0] for _ in c])  # fmt: skip
        rows.append(completion_row(f"key{i}", str(i), r["prompt"], None, comp, k))
    with StoreWriter(path, cfg) as w:
        if rows:
            w.write(rows)
    return path


def test_store_with_nan_logprobs_is_counted_and_all_bad_is_an_error(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = _store(tmp_path / "s", tiny_tokenizer)
    ex, stats = load_examples(store, tiny_tokenizer, max_length=256, need_topk=True)
    assert stats.used == 4 and stats.has_topk and ex[0]["topk_ids"].shape[1] == 3
    # Corrupt one record's log-probabilities on disk (NaN), as a foreign writer might.
    shard = next(store.glob("shard-*.parquet"))
    table = pq.read_table(shard)
    col = table.column("topk_logprobs").to_pylist()
    idx = table.schema.get_field_index("topk_logprobs")
    if isinstance(col[1], bytes):  # stored as a little-endian float16 blob
        import numpy as np

        col[1] = np.full(len(col[1]) // 2, np.nan, dtype="<f2").tobytes()
    else:
        col[1] = [float("nan")] * len(col[1])
    table = table.set_column(idx, table.schema.field(idx), pa.array(col, type=table.schema.field(idx).type))
    pq.write_table(table, shard)
    ex, stats = load_examples(store, tiny_tokenizer, max_length=256, need_topk=True)
    assert stats.used == 3 and stats.read == 4
    assert any("non-finite" in reason for reason in stats.skipped)
    empty = _store(tmp_path / "empty", tiny_tokenizer, n=0)
    with pytest.raises(ValueError, match="no usable training examples"):
        load_examples(empty, tiny_tokenizer, max_length=256)

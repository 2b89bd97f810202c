"""`generate` with a local `HFTeacher`, and prompt-file validation (no server needed)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill import store
from distill.models.base import GenerationSettings
from distill.prices import TokenPrice
from distill.store.generate import generate, load_prompts


def test_prompts_from_jsonl_csv_parquet_and_clear_errors(tmp_path):
    (tmp_path / "p.csv").write_text("id,prompt\n1,hello\n2,world\n")
    pq.write_table(pa.table({"prompt": ["a", "b"]}), tmp_path / "p.parquet")
    assert [r["id"] for r in load_prompts(tmp_path / "p.csv")] == ["1", "2"]
    assert [r["prompt"] for r in load_prompts(tmp_path / "p.parquet")] == ["a", "b"]
    chat = tmp_path / "c.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert load_prompts(chat)[0]["messages"] == ({"role": "user", "content": "hi"},)
    bad = {
        '{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n': "id 'a' repeats row 1",
        '{"text": "x"}\n': "row 1: give exactly one of 'prompt' and 'messages'",
        '{"prompt": ""}\n': "row 1: 'prompt' must be a non-empty string",
        '{"prompt": "x", "messages": []}\n': "exactly one",
        '{"messages": [{"role": "user"}]}\n': "string 'role' and 'content'",
        '{"id": true, "prompt": "x"}\n': "'id' must be a non-empty string or integer",
    }
    for text, msg in bad.items():
        f = tmp_path / "bad.jsonl"
        f.write_text(text)
        with pytest.raises(ValueError, match=msg) as err:
            load_prompts(f)
        assert "bad.jsonl" in str(err.value)


def test_local_teacher_store_is_aligned_with_teacher_scores(tiny_lm_dir, tmp_path):
    """The store's top-k rows match the teacher's own teacher-forced scores at the same positions."""
    from distill.models.hf import HFTeacher

    teacher = HFTeacher(tiny_lm_dir, batch_size=4)
    prompts = tmp_path / "p.jsonl"
    rows = [{"id": f"r{i}", "prompt": f"Invoice {i:04d} from Acme"} for i in range(5)]
    rows.append({"id": "chat", "messages": [{"role": "user", "content": "Invoice total?"}]})
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = GenerationSettings(max_new_tokens=5, top_logprobs=4)
    price = TokenPrice(input_per_1m=1.0, output_per_1m=2.0)
    res = generate(teacher, prompts, tmp_path / "s", settings=settings, progress=False, price=price)
    assert res.answered == 6 and res.failed == 0 and 0 < res.completion_tokens <= 6 * 5
    assert res.cost == pytest.approx((res.prompt_tokens * 1.0 + res.completion_tokens * 2.0) / 1e6)
    st = store.open(tmp_path / "s")
    assert st.manifest["tokenizer"] == teacher.identity()["tokenizer"] and st.manifest["k"] == 4
    assert st.manifest["spent"]["cost"] == pytest.approx(res.cost)
    assert st.manifest["tokens"] == {"prompt": res.prompt_tokens, "completion": res.completion_tokens}
    for ex in st.examples():
        labels = ex["labels"]
        P = int((labels == -100).sum())
        score = teacher.score(ex["input_ids"][:P].tolist(), ex["input_ids"][P:].tolist(), 4)
        assert ex["topk_ids"][P:].tolist() == score.top_ids
        np.testing.assert_allclose(ex["topk_logprobs"][P:].numpy(), score.top_logprobs, atol=2e-2)
    again = generate(teacher, prompts, tmp_path / "s", settings=settings, progress=False)
    assert again.answered == 0 and again.done_before == 6


def test_retrained_weights_in_the_same_directory_never_reuse_records(tiny_lm_dir, tiny_tokenizer, tmp_path):
    import shutil

    from distill.models.hf import HFTeacher
    from distill.models.tiny import save_tiny, tiny_causal_lm

    model_dir = shutil.copytree(tiny_lm_dir, tmp_path / "teacher")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "Invoice 0001"}) + "\n")
    settings = GenerationSettings(max_new_tokens=2, top_logprobs=2)
    generate(HFTeacher(model_dir), prompts, tmp_path / "s", settings=settings, progress=False)
    save_tiny(
        tiny_causal_lm(len(tiny_tokenizer), seed=5), tiny_tokenizer, model_dir
    )  # same name, new weights
    with pytest.raises(ValueError, match="another setup.*weights"):
        generate(HFTeacher(model_dir), prompts, tmp_path / "s", settings=settings, progress=False)

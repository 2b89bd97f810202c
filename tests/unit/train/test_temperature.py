"""Distillation temperature against a store captured at another one: `distill train` rescales the top-k.

The store keeps the teacher's log-probabilities at its capture temperature (1 for `HFTeacher`);
training at T divides them by T (``rho = capture / T``) and renormalises over the top-k plus a
tail bucket. With k = the whole vocabulary the bucket is empty and the rescaled store must be the
teacher's own distribution at T: the loss of a store-trained step equals that of a step against the
local teacher's full logits at T (up to the store's float16 rounding).
"""

from __future__ import annotations

import json

import pytest

from distill.train import train
from distill.train.config import TrainConfig


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_full_vocabulary_store_rescaled_to_t_equals_the_teacher_at_t(tmp_path, tiny_lm_dir, tiny_student_dir,
                                                                     temperature):  # fmt: skip
    from transformers import AutoConfig

    from distill.models.base import GenerationSettings
    from distill.models.hf import HFTeacher
    from distill.store.generate import generate

    vocab = AutoConfig.from_pretrained(tiny_lm_dir).vocab_size
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": str(i), "prompt": f"Invoice {i} from Acme"}) + "\n" for i in range(4))
    )
    generate(HFTeacher(tiny_lm_dir), prompts, tmp_path / "store", progress=False,
             settings=GenerationSettings(max_new_tokens=4, temperature=0.0, top_logprobs=vocab))  # fmt: skip
    common = dict(student=str(tiny_student_dir), data=str(tmp_path / "store"), mode="logits", alpha=1.0,
                  temperature=temperature, max_steps=1, batch_size=4, lr=1e-3, progress=False)  # fmt: skip
    from_store = train(TrainConfig(**common, out=str(tmp_path / "a"))).history[0]["kd"]
    from_teacher = train(TrainConfig(**common, out=str(tmp_path / "b"), teacher=str(tiny_lm_dir))).history[0][
        "kd"
    ]
    assert from_store == pytest.approx(from_teacher, rel=2e-3)
    state = json.loads(next((tmp_path / "a" / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert state["capture_temperature"] == 1.0 and state["config"]["temperature"] == temperature

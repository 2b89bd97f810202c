"""`distill train` end to end with the fused loss and its knobs: the same losses whichever way they run.

Full-batch steps (every example in every step) on tiny models, so that packing, which regroups the
examples into rows, still trains on the same tokens each step: the default (fused), ``--no-fused``,
``--chunk-size``, ``--pack`` and ``--gradient-checkpointing`` give the same per-step losses. Bad values
are refused before training with one line naming the flag and the value.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from distill.cli import main

N = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from distill.demos.tasks import make_examples, to_rows

    p = tmp_path_factory.mktemp("fused_data") / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in to_rows(make_examples(N, seed=11))))
    return p


def _train(student, data, out, *extra) -> int:
    return main(["train", "--student", str(student), "--data", str(data), "--out", str(out), "--max-steps", "3",
                 "--lr", "3e-3", "--no-progress", *extra])  # fmt: skip


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def _packed_rows(student, data) -> int:
    from distill.train.examples import load_examples
    from distill.train.packing import pack_examples
    from distill.train.setup import load_model

    _, tok = load_model(str(student), "student")
    ex, _ = load_examples(data, tok, max_length=256)
    return len(pack_examples(ex, 256))


@pytest.mark.parametrize("mode", ["sft", "logits"])
def test_fused_no_fused_chunks_pack_and_checkpointing_give_the_same_losses(
    mode, data, tiny_student_dir, tiny_lm_dir, tmp_path
):
    teacher = ["--mode", "logits", "--teacher", str(tiny_lm_dir), "--alpha", "0.5", "--temperature", "2"]
    common = [*(teacher if mode == "logits" else []), "--max-length", "256"]
    full = ["--batch-size", str(N), *common]
    rows = _packed_rows(tiny_student_dir, data)
    assert rows < N  # packing really regrouped the examples
    runs = {
        "fused": full,
        "no-fused": [*full, "--no-fused"],
        "chunk-size 7": [*full, "--chunk-size", "7"],
        "gradient-checkpointing": [*full, "--gradient-checkpointing"],
        "pack": ["--batch-size", str(rows), *common, "--pack"],
    }
    losses = {}
    for name, extra in runs.items():
        assert _train(tiny_student_dir, data, tmp_path / name.replace(" ", "_"), *extra) == 0, name
        losses[name] = _losses(tmp_path / name.replace(" ", "_"))
    ref = losses["no-fused"]
    assert len(ref) == 3 and ref[-1] < ref[0]  # it trained
    for name, got in losses.items():
        assert got == pytest.approx(ref, rel=2e-5), name


def test_a_packed_token_cannot_see_the_previous_example(tiny_student_dir):
    from distill.train.packing import check_isolation
    from distill.train.setup import load_model

    model, _ = load_model(str(tiny_student_dir), "student")
    assert check_isolation(model) < 1e-5


def _no_eos_student(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["eos_token"] = None
    cfg_path.write_text(json.dumps(cfg))
    return dst


def _jetmoe(tokenizer, dst: Path) -> Path:
    """A causal LM transformers says cannot be gradient-checkpointed (JetMoe)."""
    import torch
    from transformers import JetMoeConfig, JetMoeForCausalLM

    torch.manual_seed(0)
    model = JetMoeForCausalLM(JetMoeConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                           num_key_value_heads=2, kv_channels=8, intermediate_size=32,
                                           num_local_experts=2, num_experts_per_tok=1, max_position_embeddings=128))  # fmt: skip
    assert not model.supports_gradient_checkpointing
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return dst


@pytest.mark.parametrize(
    "case", ["chunk 0", "chunk too big", "pack without eos", "checkpointing unsupported"]
)
def test_bad_knobs_are_refused_before_training(
    case, data, tiny_student_dir, tiny_tokenizer, tmp_path, capsys
):
    student, extra = tiny_student_dir, []
    if case == "chunk 0":
        extra, needle = ["--chunk-size", "0"], "chunk_size (--chunk-size) must be an integer >= 1, got 0"
    elif case == "chunk too big":
        extra, needle = (
            ["--chunk-size", "100000", "--batch-size", "2"],
            "chunk_size (--chunk-size) 100000 is larger",
        )
    elif case == "top-k without teacher":
        extra, needle = (
            ["--mode", "logits", "--teacher-top-k", "5"],
            "teacher_top_k (--teacher-top-k) 5 needs a teacher",
        )
    elif case == "pack without eos":
        student = _no_eos_student(tiny_student_dir, tmp_path / "noeos")
        extra, needle = ["--pack"], "--pack needs a tokenizer with an EOS token"
    else:
        student = _jetmoe(tiny_tokenizer, tmp_path / "jetmoe")
        extra, needle = ["--gradient-checkpointing"], "JetMoeForCausalLM"
    out = tmp_path / "out"
    assert _train(student, data, out, *extra) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert len([x for x in err.strip().splitlines() if x.strip()]) <= 3  # one message (rich may wrap it)
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()

"""Every training mode end to end from a store made by `distill generate` against `distill serve`.

The teacher is served over HTTP on 127.0.0.1; its answers (with top-k log-probabilities) land in a
real store; `distill train` reads it. Outputs are loaded back with `AutoModelForCausalLM`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.cli import main
from servers import running_server


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, tiny_lm_dir):
    from distill.demos.tasks import make_examples

    root = tmp_path_factory.mktemp("store")
    prompts = root / "prompts.jsonl"
    # Chat prompts: /v1/chat/completions returns top-k log-probabilities as lists aligned with the ids,
    # which survive the random teacher's odd byte tokens (legacy completions key them by token text).
    rows = [
        {"id": e.id, "messages": [{"role": "user", "content": e.prompt}]} for e in make_examples(12, seed=7)
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with running_server(tiny_lm_dir) as url:
        done = subprocess.run(
            [sys.executable, "-m", "distill", "generate", "--teacher", url, "--prompts", str(prompts),
             "--out", str(root / "store"), "--top-k", "5", "--max-new-tokens", "8", "--no-progress"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "without top-k" not in done.stdout + done.stderr
    return root / "store"


def _train(student, data, out, *extra) -> int:
    return main(["train", "--student", str(student), "--data", str(data), "--out", str(out), "--max-steps", "2",
                 "--batch-size", "2", "--lr", "1e-3", "--no-progress", *extra])  # fmt: skip


def _changed(out: Path, start: Path) -> float:
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(out).state_dict()
    b = AutoModelForCausalLM.from_pretrained(start).state_dict()
    return max((a[k] - b[k]).abs().max().item() for k in b)


@pytest.mark.parametrize(
    "mode,extra",
    [
        ("sft", []),
        ("logits", ["--loss", "forward_kl", "--alpha", "0.7"]),
        ("logits-teacher", ["--loss", "reverse_kl", "--lora-r", "4", "--merge-lora"]),
        ("on-policy", ["--lambda", "1.0", "--beta", "0.5", "--max-new-tokens", "6"]),
    ],
)
def test_each_mode_end_to_end_from_a_generated_store(
    tmp_path, store_dir, tiny_student_dir, tiny_lm_dir, mode, extra
):
    args = list(extra)
    if mode in ("logits-teacher", "on-policy"):
        args += ["--teacher", str(tiny_lm_dir)]
    out = tmp_path / "out"
    assert _train(tiny_student_dir, store_dir, out, "--mode", mode.replace("-teacher", ""), *args) == 0
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    if mode != "sft":
        assert all(m["kd"] >= 0 for m in metrics)
    if mode == "on-policy":
        assert all(m["on_policy"] for m in metrics)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert _changed(out, Path(tiny_student_dir)) > 0


def test_lora_adapters_saved_unmerged(tmp_path, tiny_student_dir, store_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    assert (
        _train(tiny_student_dir, store_dir, out, "--lora-r", "2", "--lora-target-modules", "q_proj", "v_proj")
        == 0
    )
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and set(cfg["target_modules"]) == {"q_proj", "v_proj"}
    base = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    model = PeftModel.from_pretrained(base, out)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())


def test_padded_teacher_accepted_and_other_tokenizer_distilled_through_the_text(
    tmp_path, tiny_tokenizer, tiny_student_dir, store_dir, capsys
):
    from distill.models.tiny import save_tiny, tiny_causal_lm, train_tokenizer

    padded = save_tiny(tiny_causal_lm(len(tiny_tokenizer) + 64, n_layer=1, n_embd=32, n_head=2, seed=3),
                       tiny_tokenizer, tmp_path / "padded")  # fmt: skip
    assert (
        _train(tiny_student_dir, store_dir, tmp_path / "ok", "--mode", "logits", "--teacher", str(padded))
        == 0
    )
    other_tok = train_tokenizer([f"Parcel {i} shipped to Oslo, {i} kg" for i in range(200)], vocab_size=400)
    other = save_tiny(
        tiny_causal_lm(len(other_tok), n_layer=1, n_embd=32, n_head=2), other_tok, tmp_path / "other"
    )
    capsys.readouterr()
    # A local teacher of another tokenizer: its top-k is mapped onto the student's vocabulary (issue #13).
    assert (
        _train(tiny_student_dir, store_dir, tmp_path / "cross", "--mode", "logits", "--teacher", str(other))
        == 0
    )
    err = " ".join(capsys.readouterr().err.split())
    assert "cross-tokenizer" in err and "completion positions aligned" in err
    # The store holds the teacher's token ids: a student with another tokenizer needs that tokenizer.
    assert _train(other, store_dir, tmp_path / "bad2", "--mode", "logits") == 2
    err = capsys.readouterr().err
    assert "not the student's" in err and "--teacher-tokenizer" in err
    # ... but sequence-level training works across tokenizers: the store's text is re-tokenised.
    assert _train(other, store_dir, tmp_path / "sft-other", "--mode", "sft") == 0
    assert "12 of 12 records used" in capsys.readouterr().err
    assert not (tmp_path / "bad2" / "model.safetensors").exists()


def test_bad_settings_fail_before_training(tmp_path, tiny_student_dir, store_dir, capsys):
    for flags, msg in [
        (["--temperature", "0"], "temperature must be a finite number > 0, got 0"),
        (["--alpha", "1.5"], "alpha must be in [0, 1], got 1.5"),
        (["--loss", "kl_typo"], "loss must be one of"),
        (["--log-with", "tensorboard_typo"], "unknown tracker 'tensorboard_typo'"),
        (
            ["--mode", "on-policy", "--teacher", str(tiny_student_dir), "--max-new-tokens", "250"],
            "exceeds the student's context",
        ),
    ]:
        assert _train(tiny_student_dir, store_dir, tmp_path / "x", *flags) == 2
        assert msg in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert _train(tiny_student_dir, empty, tmp_path / "y") == 2
    assert "no rows" in capsys.readouterr().err

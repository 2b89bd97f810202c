"""`distill train --mode logits` (and on-policy) with a teacher of another tokenizer, end to end.

A local teacher with a SentencePiece-style tokenizer (Metaspace, byte fallback) writes a store of its
token ids through `distill generate --teacher DIR`; a byte-level BPE student trains from it with
``--teacher-tokenizer``, or straight against the local teacher (``--teacher DIR``)."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_TEXTS
from distill.cli import main


@pytest.fixture(scope="module")
def meta_teacher_dir(tmp_path_factory, metaspace_tokenizer):
    from distill.models.tiny import save_tiny, tiny_causal_lm

    root = tmp_path_factory.mktemp("meta_teacher")
    model = tiny_causal_lm(len(metaspace_tokenizer), n_layer=1, n_embd=32, n_head=2, seed=5)
    init = save_tiny(model, metaspace_tokenizer, root / "init")
    # A little training, so that its answers are text (a random model writes stray byte-fallback pieces)
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": t[:20], "completion": t[20:]}) + "\n" for t in TINY_TEXTS))
    args = ["train", "--student", str(init), "--data", str(rows), "--out", str(root / "teacher"), "--mode", "sft",
            "--max-steps", "150", "--batch-size", "16", "--lr", "3e-3", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    return root / "teacher"


@pytest.fixture(scope="module")
def meta_store(tmp_path_factory, meta_teacher_dir):
    root = tmp_path_factory.mktemp("meta_store")
    prompts = root / "prompts.jsonl"
    rows = [{"id": f"p{i}", "prompt": t[:20]} for i, t in enumerate(TINY_TEXTS[:12])]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["generate", "--teacher", str(meta_teacher_dir), "--prompts", str(prompts), "--out", str(root / "s"),
            "--top-k", "5", "--max-new-tokens", "8", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    return root / "s"


def _train(student, data, out, *extra) -> int:
    return main(["train", "--student", str(student), "--data", str(data), "--out", str(out), "--max-steps", "2",
                 "--batch-size", "2", "--lr", "1e-3", "--no-progress", *extra])  # fmt: skip


def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_store_of_another_tokenizer_needs_and_checks_its_tokenizer(
    tmp_path, meta_store, meta_teacher_dir, tiny_student_dir, tiny_lm_dir, capsys
):
    capsys.readouterr()
    assert _train(tiny_student_dir, meta_store, tmp_path / "a", "--mode", "logits") == 2
    err = capsys.readouterr().err
    assert "--teacher-tokenizer DIR" in err and "not the student's" in err
    assert _train(tiny_student_dir, meta_store, tmp_path / "b", "--mode", "logits", "--teacher-tokenizer", str(tiny_lm_dir)) == 2  # fmt: skip
    assert "is not the store's" in capsys.readouterr().err
    assert not (tmp_path / "b" / "model.safetensors").exists()


@pytest.mark.parametrize("method", ["project", "uld"])
def test_logits_from_a_store_of_another_tokenizer(
    tmp_path, meta_store, meta_teacher_dir, tiny_student_dir, method, capsys
):
    capsys.readouterr()
    out = tmp_path / method
    flags = ["--mode", "logits", "--teacher-tokenizer", str(meta_teacher_dir), "--cross-tokenizer", method]
    assert _train(tiny_student_dir, meta_store, out, *flags) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"--cross-tokenizer {method}," in err and "completion positions aligned" in err
    share = float(
        err.split("completion positions aligned")[0].split("--cross-tokenizer")[1].split(",")[1].split("%")[0]
    )
    assert 0 < share <= 100
    m = _metrics(out)
    assert len(m) == 2 and all(x["kd"] > 0 for x in m) and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("mode", ["logits", "on-policy"])
def test_local_teacher_of_another_tokenizer(
    tmp_path, meta_store, meta_teacher_dir, tiny_student_dir, mode, capsys
):
    capsys.readouterr()
    out = tmp_path / mode
    extra = ["--lambda", "1.0", "--max-new-tokens", "6"] if mode == "on-policy" else []
    assert (
        _train(tiny_student_dir, meta_store, out, "--mode", mode, "--teacher", str(meta_teacher_dir), *extra)
        == 0
    )
    assert "cross-tokenizer" in capsys.readouterr().err
    m = _metrics(out)
    assert len(m) == 2 and all(x["kd"] >= 0 for x in m)
    if mode == "on-policy":
        assert all(x["on_policy"] for x in m)

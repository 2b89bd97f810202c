"""Issue #11 items 5, 8 and 10, with real files: corrupt checkpoints, an absurd temperature, ids past
the tokenizer.

Item 5: checkpoints carry the sha256 of every file (COMPLETE.json; trainer_state.json for the files
written before it); a checkpoint whose bytes were flipped in place (same size) is skipped on
``--resume`` with a line saying why, and the run continues from the newest good one; every field of
trainer_state.json is validated (``"step": -4`` is refused even when the file's checksum is consistent).
Item 8: ``--temperature 1e308`` is refused where it is validated. Item 10: store records whose token
ids lie beyond the tokenizer are refused when reading, counted and named; a local teacher whose head is
padded past its tokenizer never generates (or lists in its top-k) a padded slot.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from distill.train import checkpoint as ckpt
from hardening_helpers import cli, flat, one_line_error, snapshot


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from distill.demos.tasks import make_examples, to_rows

    p = tmp_path_factory.mktemp("hard_train") / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in to_rows(make_examples(8, seed=2))))
    return p


def _argv(student, data, out, steps):
    return ["train", "--student", student, "--data", data, "--out", out, "--max-steps", steps, "--batch-size", 2,
            "--save-every", 1, "--lr", "1e-3", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory, tiny_student_dir, data):
    """A run of 3 steps with a checkpoint after each (step-1, step-2, step-3)."""
    out = tmp_path_factory.mktemp("hard_ckpt") / "run"
    from distill.cli import main

    assert main([str(a) for a in _argv(tiny_student_dir, data, out, 3)]) == 0
    assert [p.name for _, p in ckpt.step_dirs(out / "checkpoints")] == [f"step-0000000{i}" for i in (3, 2, 1)]
    return out


def _copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


def _flip_tensor_bytes(f: Path) -> None:
    """Flip 8 bytes inside the tensor data of a safetensors file (after its header): same size, header intact."""
    raw = bytearray(f.read_bytes())
    start = 8 + struct.unpack("<Q", bytes(raw[:8]))[0] + 64
    for i in range(start, start + 8):
        raw[i] ^= 0xFF
    f.write_bytes(bytes(raw))


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(x["step"], x["loss"]) for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_checkpoints_record_a_sha256_per_file(three_steps):
    step3 = three_steps / "checkpoints" / "step-00000003"
    marker = json.loads((step3 / "COMPLETE.json").read_text())
    state = json.loads((step3 / "trainer_state.json").read_text())
    assert (
        set(marker["sha256"]) == set(marker["files"]) == {p.name for p in step3.iterdir()} - {"COMPLETE.json"}
    )
    for name, digest in marker["sha256"].items():
        assert ckpt.sha256(step3 / name) == digest
    assert set(state["sha256"]) == set(marker["files"]) - {"trainer_state.json"}
    assert ckpt.verify(step3) is None


def test_flipped_bytes_in_the_newest_checkpoint_skip_it_and_resume_from_the_previous(
    three_steps, tiny_student_dir, data, tmp_path, capsys
):
    run = _copy(three_steps, tmp_path / "run")
    step2, step3 = run / "checkpoints" / "step-00000002", run / "checkpoints" / "step-00000003"
    size = (step3 / "model.safetensors").stat().st_size
    _flip_tensor_bytes(step3 / "model.safetensors")
    assert (step3 / "model.safetensors").stat().st_size == size  # sizes alone would not see it
    why = ckpt.verify(step3)
    assert why is not None and "model.safetensors is corrupt: sha256" in why
    kept, before = snapshot(step2), _losses(run)

    code, text = cli([*_argv(tiny_student_dir, data, run, 4), "--resume"], capsys)
    assert code == 0, text
    said = flat(text)
    assert "skipping step-00000003: model.safetensors is corrupt: sha256" in said
    assert "resumed from step-00000002 at step 2" in said
    assert snapshot(step2) == kept  # the earlier checkpoint is untouched
    after = _losses(run)
    assert after[:3] == before  # earlier metrics kept
    assert [s for s, _ in after[3:]] == [3, 4]
    assert after[3][1] == before[2][1]  # step 3 redone from step 2 exactly as the first time
    assert ckpt.verify(step3) is None  # rewritten whole by the resumed run


def _rewrite_state(step_dir: Path, edit) -> None:
    """Edit trainer_state.json and make COMPLETE.json agree (size and sha256), as a buggy writer would."""
    f = step_dir / "trainer_state.json"
    state = json.loads(f.read_text())
    edit(state)
    f.write_text(json.dumps(state))
    marker = json.loads((step_dir / "COMPLETE.json").read_text())
    marker["files"]["trainer_state.json"] = f.stat().st_size
    marker["sha256"]["trainer_state.json"] = ckpt.sha256(f)
    (step_dir / "COMPLETE.json").write_text(json.dumps(marker))


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda s: s.update(step=-4), "trainer_state.json: step must be an integer >= 1, got -4"),
        (lambda s: s.update(step=7), "trainer_state.json: step 7 does not match the checkpoint's step 3"),
        (lambda s: s.update(tokens="many"), "trainer_state.json: tokens must be an integer >= 0, got 'many'"),
        (lambda s: s.update(world_size=0), "trainer_state.json: world_size must be an integer >= 1, got 0"),
        (lambda s: s.pop("data_position"), "trainer_state.json: data_position must hold integers"),
        (
            lambda s: s["config"].update(lr=-1),
            "trainer_state.json: config is not a valid training configuration",
        ),
    ],
    ids=["negative-step", "other-step", "tokens", "world-size", "data-position", "config"],
)
def test_every_trainer_state_field_is_validated(
    edit, needle, three_steps, tiny_student_dir, data, tmp_path, capsys
):
    run = _copy(three_steps, tmp_path / "run")
    step3 = run / "checkpoints" / "step-00000003"
    _rewrite_state(step3, edit)
    assert needle in (ckpt.verify(step3) or "")
    with pytest.raises(ValueError, match="not usable"):
        ckpt.read(step3, shapes={})
    code, text = cli([*_argv(tiny_student_dir, data, run, 4), "--resume"], capsys)
    assert code == 0, text
    said = flat(text)
    assert f"skipping step-00000003: {needle}" in said and "resumed from step-00000002 at step 2" in said


# --- item 8: a temperature that overflows T**2 ------------------------------------------------


def test_huge_temperature_refused_naming_the_flag(tiny_student_dir, data, tmp_path, capsys):
    from distill.train.config import TrainConfig

    out = tmp_path / "out"
    code, text = cli([*_argv(tiny_student_dir, data, out, 2), "--mode", "logits", "--teacher", tiny_student_dir,
                      "--temperature", "1e308"], capsys)  # fmt: skip
    line = one_line_error(text, "train")
    assert code == 2
    assert "temperature (--temperature) must be at most 1000, got 1e+308" in line
    assert not out.exists()  # refused before anything was written
    toml = tmp_path / "r.toml"
    toml.write_text(f'student = "{tiny_student_dir}"\ndata = "{data}"\nout = "{out}"\ntemperature = 5e3\n')
    code, text = cli(["train", "--config", toml, "--no-progress"], capsys)
    assert code == 2 and "must be at most 1000, got 5000.0" in one_line_error(text, "train")
    assert (
        TrainConfig(student="s", data="d", out="o", temperature=1000).temperature == 1000
    )  # the bound itself


# --- item 10: token ids beyond the tokenizer -----------------------------------------------------


def _store_with_ids(path: Path, tokenizer, bad: dict[int, str]) -> Path:
    """A real store of 4 records (written by `StoreWriter`, as a foreign teacher's answers would be);
    record i in ``bad`` carries token id 64932 of a 400-token tokenizer in its completion ("token") or
    in its top-k ("topk")."""
    from distill.demos.tasks import make_examples, to_rows
    from distill.models.base import Completion
    from distill.store import StoreWriter, completion_row
    from distill.train.vocab import vocab_hash

    cfg = {"teacher": {"kind": "hf", "name": "t"}, "tokenizer": {"name": "tiny", "vocab_hash": vocab_hash(tokenizer)},
           "settings": {}, "k": 3, "capture_temperature": 1.0}  # fmt: skip
    rows = []
    for i, r in enumerate(to_rows(make_examples(4, seed=9))):
        p = tokenizer(r["prompt"])["input_ids"]
        c = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
        top = [[t, 5, 6] if t not in (5, 6) else [t, 7, 8] for t in c]
        if bad.get(i) == "token":
            c = [64932, *c[1:]]
            top[0] = [64932, 5, 6]
        elif bad.get(i) == "topk":
            top[0] = [top[0][0], 64932, top[0][2]]
        comp = Completion(id=str(i), text=r["completion"], finish_reason="stop", prompt_token_ids=p,
                          completion_token_ids=c, top_ids=top, top_logprobs=[[-0.1, -3.0, -4.0] for _ in c])  # fmt: skip
        rows.append(completion_row(f"key{i}", str(i), r["prompt"], None, comp, 3))
    with StoreWriter(path, cfg) as w:
        w.write(rows)
    return path


@pytest.mark.parametrize("mode", ["sft", "logits"])
def test_store_records_with_ids_beyond_the_tokenizer_are_refused_counted_and_named(
    mode, tiny_student_dir, tiny_tokenizer, tmp_path, capsys
):
    st = _store_with_ids(tmp_path / "store", tiny_tokenizer, {1: "token", 3: "topk"})
    out = tmp_path / "out"

    def argv(store_dir, out_dir):
        return ["train", "--student", tiny_student_dir, "--data", store_dir, "--out", out_dir, "--max-steps", 1,
                "--batch-size", 2, "--mode", mode, "--no-progress"]  # fmt: skip

    code, text = cli(argv(st, out), capsys)
    assert code == 0, text
    said = flat(text)
    n = len(tiny_tokenizer)
    if mode == "sft":  # sft reads no top-k: only record 1's completion is out of range
        assert (
            "3 of 4 records used" in said
            and f"1 skipped: token ids beyond the tokenizer's {n} entries: '1' (id 64932)" in said
        )
    else:
        assert "2 of 4 records used" in said
        assert (
            f"2 skipped: token ids beyond the tokenizer's {n} entries: '1' (id 64932), '3' (id 64932)" in said
        )
    assert (out / "model.safetensors").exists()

    every = _store_with_ids(
        tmp_path / "all-bad", tiny_tokenizer, {0: "token", 1: "token", 2: "token", 3: "token"}
    )
    code, text = cli(argv(every, tmp_path / "out2"), capsys)
    line = one_line_error(text, "train")
    assert (
        code == 2 and "no usable training examples (4 records read; 4 token ids beyond the tokenizer" in line
    )


def test_a_local_teacher_never_generates_padded_slots(tiny_tokenizer, tmp_path, capsys):
    from distill import store
    from distill.models.tiny import save_tiny, tiny_causal_lm
    from hardening_helpers import small_store, write_prompts

    n = len(tiny_tokenizer)
    model = tiny_causal_lm(
        n + 2000, n_layer=1, n_embd=32, n_head=2, seed=3
    )  # a head padded far past the tokenizer
    with torch.no_grad():
        model.lm_head.weight[n:] *= 30  # padded slots that would win every argmax and every top-k
        probe = model(input_ids=torch.tensor([tiny_tokenizer("Invoice 0001")["input_ids"]])).logits[0, -1]
    assert int(probe.argmax()) >= n  # without the fix, the teacher would emit a slot that is no token
    teacher = save_tiny(model, tiny_tokenizer, tmp_path / "padded")
    code, text = small_store(teacher, tmp_path / "store", write_prompts(tmp_path / "p.jsonl", 5), capsys)
    assert code == 0, text
    records = list(store.open(tmp_path / "store").examples(max_length=256, tokenizer=tiny_tokenizer))
    assert len(records) == 5
    for r in records:
        assert int(r["input_ids"].max()) < n and int(r["topk_ids"].max()) < n

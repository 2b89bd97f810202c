"""Issue #11 items 4 and 9: damaged stores and output that cannot be written, with real files.

Item 4: a store of 20 records in 4 shards made by a real `distill generate`; one shard then has its
last 100 bytes cut off, or bytes cut out of its middle (the footer still reads), or bytes flipped in
place. `distill train` refuses it in one line naming the store, the shard and the records lost;
``--allow-partial-store`` trains on the rest and says how many were lost; `distill generate` on the
same store redoes exactly the lost shard's prompts. Item 9: a real tmpfs, full or remounted
read-only, under `distill generate` and `distill train`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from distill import store
from distill.train import checkpoint as ckpt
from hardening_helpers import (
    cli,
    fill,
    flat,
    one_line_error,
    remount,
    small_store,
    snapshot,
    tmpfs,
    write_prompts,
)


@pytest.fixture(scope="module")
def made_store(tmp_path_factory, tiny_lm_dir):
    """(prompts file, a pristine 20-record store of 4 shards) made once by `distill generate`."""
    root = tmp_path_factory.mktemp("store")
    prompts = write_prompts(root / "prompts.jsonl", 20)

    class _Cap:  # capsys is function-scoped: a module fixture reads nothing back
        def readouterr(self):
            return type("O", (), {"out": "", "err": ""})()

    code, _ = small_store(tiny_lm_dir, root / "store", prompts, _Cap())
    assert code == 0
    assert len(sorted((root / "store").glob("shard-*.parquet"))) == 4
    return prompts, root / "store"


def _train(st: Path, out: Path, student: Path, capsys, *extra) -> tuple[int, str]:
    argv = ["train", "--student", student, "--data", st, "--out", out, "--max-steps", 1, "--batch-size", 4]
    return cli([*argv, "--no-progress", *extra], capsys)


def _cut_tail(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[:-100])


def _cut_middle(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[:1500] + data[1700:])
    pq.read_metadata(p)  # the footer still reads: only the data is cut


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    for i in range(1500, 1510):
        data[i] ^= 0xFF
    p.write_bytes(bytes(data))  # same size, footer intact


@pytest.mark.parametrize("damage", [_cut_tail, _cut_middle, _flip], ids=["tail", "middle", "flipped"])
def test_damaged_shard_refused_counted_and_redone(damage, made_store, tiny_lm_dir, tmp_path, capsys):
    prompts, pristine = made_store
    st = shutil.copytree(pristine, tmp_path / "store")
    victim = st / "shard-000002.parquet"
    lost_ids = set(pq.read_table(victim, columns=["id"]).column("id").to_pylist())
    damage(victim)

    # Refused by default: one line naming the store, the shard and what is missing; nothing trained.
    code, out = _train(st, tmp_path / "run", tiny_lm_dir, capsys)
    line = one_line_error(out, "train")
    assert code == 2
    assert str(st) in line and "shard-000002.parquet" in line and "5 of the 20 records" in line
    assert "--allow-partial-store" in line
    assert not (tmp_path / "run" / "model.safetensors").exists()

    # --allow-partial-store trains on the 15 readable records and says 5 were lost.
    code, out = _train(st, tmp_path / "run", tiny_lm_dir, capsys, "--allow-partial-store")
    assert code == 0, out
    out = flat(out)
    assert "15 of 15 records used" in out and "5 records lost" in out and "shard-000002.parquet" in out
    assert (tmp_path / "run" / "model.safetensors").is_file()

    # generate on the same store asks again exactly the lost shard's prompts, and no other.
    code, out = small_store(tiny_lm_dir, st, prompts, capsys)
    assert code == 0, out
    assert "removed torn or damaged shard shard-000002.parquet" in flat(out)
    st_after = store.open(st)
    ids = [r["id"] for r in st_after]
    assert sorted(ids) == sorted(f"p{i}" for i in range(20))  # every prompt once
    newest = sorted(st.glob("shard-*.parquet"))[-1]
    assert set(pq.read_table(newest, columns=["id"]).column("id").to_pylist()) == lost_ids
    assert st_after.manifest["counts"]["records"] == 20
    code, out = _train(st, tmp_path / "run2", tiny_lm_dir, capsys)  # whole again: trains, nothing lost
    assert code == 0 and "20 of 20 records used" in flat(out) and "lost" not in out


def test_manifest_counts_more_records_than_readable(made_store, tmp_path):
    """The manifest lists a shard that is gone: the reader says so; allow_partial counts it."""
    _, pristine = made_store
    st = shutil.copytree(pristine, tmp_path / "store")
    (st / "shard-000001.parquet").unlink()
    with pytest.raises(ValueError, match=r"shard-000001.parquet missing: 5 of the 20 records"):
        store.open(st)
    partial = store.open(st, allow_partial=True)
    assert partial.lost_records == 5 and len(partial) == 15 and len(list(partial)) == 15


# --- item 9: read-only and full file systems ---------------------------------------------------


def test_generate_into_a_full_then_read_only_file_system(made_store, tiny_lm_dir, capsys):
    prompts, _ = made_store
    first = write_prompts(prompts.parent / "first10.jsonl", 10)
    with tmpfs("4m") as fs:
        st = fs / "store"
        assert small_store(tiny_lm_dir, st, first, capsys)[0] == 0
        before = snapshot(st)
        fill(fs, free_pages=1)  # room to rewrite the manifest on opening, not for a shard
        code, out = small_store(tiny_lm_dir, st, prompts, capsys)
        line = one_line_error(out, "generate")
        assert code == 2
        assert "could not write shard shard-000002.parquet" in line and "No space left on device" in line
        assert "the 2 shards committed before (10 records) are intact" in line
        assert not list(st.glob(".*.tmp")), "a half-written temporary shard was left"
        assert {k: v for k, v in snapshot(st).items() if k.startswith("shard-")} == {
            k: v for k, v in before.items() if k.startswith("shard-")
        }
        assert len(store.open(st)) == 10

        remount(fs, "ro")
        code, out = small_store(tiny_lm_dir, st, prompts, capsys)
        line = one_line_error(out, "generate")
        assert code == 2 and "Read-only file system" in line and "nothing was sent to the teacher" in line

        remount(fs, "rw")
        (fs / "filler").unlink()
        code, out = small_store(tiny_lm_dir, st, prompts, capsys)  # room again: only the rest is asked
        assert code == 0, out
        assert len(store.open(st)) == 20


def test_train_on_a_full_then_read_only_file_system(made_store, tiny_lm_dir, capsys):
    _, st = made_store
    with tmpfs("32m") as fs:
        out = fs / "run"
        argv = ["train", "--student", tiny_lm_dir, "--data", st, "--out", out, "--batch-size", 4]
        argv += ["--save-every", 2, "--no-progress"]
        code, text = cli([*argv, "--max-steps", 2], capsys)
        assert code == 0, text
        step2 = out / "checkpoints" / "step-00000002"
        assert ckpt.verify(step2) is None
        kept = snapshot(step2)
        fill(fs)
        code, text = cli([*argv, "--max-steps", 4, "--resume"], capsys)
        line = one_line_error(text, "train")
        assert code == 2
        assert "could not write checkpoint step-00000004" in line and "No space left on device" in line
        assert "no half-written .tmp-step-00000004 is left" in line
        assert "the earlier checkpoints are intact (newest step-00000002" in line
        assert not (out / "checkpoints" / ".tmp-step-00000004").exists()
        assert ckpt.verify(step2) is None and snapshot(step2) == kept

        remount(fs, "ro")
        code, text = cli([*argv, "--max-steps", 4, "--resume"], capsys)
        line = one_line_error(text, "train")
        assert code == 2 and "Read-only file system" in line and f"the output directory {out}" in line
        assert "newest step-00000002" in line

        remount(fs, "rw")
        (fs / "filler").unlink()
        code, text = cli([*argv, "--max-steps", 4, "--resume"], capsys)  # room again: it finishes
        assert code == 0, text
        assert ckpt.verify(out / "checkpoints" / "step-00000004") is None

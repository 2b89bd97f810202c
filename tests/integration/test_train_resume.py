"""Checkpoints under real failure: a process killed with SIGKILL, a torn checkpoint, SIGTERM.

Resuming must give the weights an uninterrupted run gives, bit for bit, on CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.train import train
from distill.train.config import TrainConfig


def _data(tmp_path: Path, n: int = 32) -> Path:
    from distill.demos.tasks import make_examples, to_rows

    path = tmp_path / "data.jsonl"
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in to_rows(make_examples(n, seed=2))), encoding="utf-8"
    )
    return path


def _cmd(student, data, out, *extra) -> list[str]:
    return [sys.executable, "-m", "distill", "train", "--student", str(student), "--data", str(data),
            "--out", str(out), "--batch-size", "4", "--lr", "3e-3", "--no-progress", *extra]  # fmt: skip


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


@pytest.mark.slow
def test_kill_9_then_resume_gives_bit_identical_weights(tmp_path, tiny_student_dir):
    data = _data(tmp_path)
    steps = ["--max-steps", "60", "--save-every", "5", "--seed", "3"]
    full_out, killed_out = tmp_path / "full", tmp_path / "killed"
    full = subprocess.Popen(
        _cmd(tiny_student_dir, data, full_out, *steps), env=_env(), stderr=subprocess.PIPE
    )
    victim = subprocess.Popen(
        _cmd(tiny_student_dir, data, killed_out, *steps), env=_env(), stderr=subprocess.PIPE
    )
    first = killed_out / "checkpoints" / "step-00000005"
    deadline = time.monotonic() + 240
    while not (first / "COMPLETE.json").exists():
        assert victim.poll() is None, victim.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed_out / "model.safetensors").exists(), "the run finished before it was killed"
    done_steps = [json.loads(x)["step"] for x in (killed_out / "metrics.jsonl").read_text().splitlines()]
    assert max(done_steps) < 60

    resumed = subprocess.run(_cmd(tiny_student_dir, data, killed_out, *steps, "--resume"), env=_env(),
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step-" in resumed.stderr
    assert full.wait(timeout=300) == 0, full.stderr.read().decode()
    a, b = _weights(full_out), _weights(killed_out)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_torn_checkpoint_is_skipped_and_changed_settings_reported(tmp_path, tiny_student_dir, capsys):
    from rich.console import Console

    data = _data(tmp_path, 16)
    base = dict(student=str(tiny_student_dir), data=str(data), batch_size=4, lr=3e-3, progress=False, seed=1)
    train(TrainConfig(out=str(tmp_path / "ref"), max_steps=6, **base))
    out = tmp_path / "run"
    train(TrainConfig(out=str(out), max_steps=4, save_every=2, **base))
    ck = out / "checkpoints"
    assert (ck / "step-00000004" / "COMPLETE.json").is_file()
    # A newer checkpoint torn mid-write (file cut short), one never finished (no marker), and a temp dir.
    for name in ("step-00000005", "step-00000007"):
        shutil.copytree(ck / "step-00000004", ck / name)
    with open(ck / "step-00000005" / "model.safetensors", "r+b") as f:
        f.truncate(100)
    (ck / "step-00000007" / "COMPLETE.json").unlink()
    shutil.copytree(ck / "step-00000004", ck / ".tmp-step-00000008")

    console = Console(file=open(tmp_path / "log.txt", "w"), width=200)  # noqa: SIM115
    res = train(TrainConfig(out=str(out), max_steps=6, resume=True, **base), console=console)
    console.file.close()
    log = (tmp_path / "log.txt").read_text()
    assert res.resumed_from.endswith("step-00000004")
    assert (
        "skipping step-00000007: no COMPLETE.json" in log
        and "skipping step-00000005: model.safetensors" in log
    )
    assert res.changed_on_resume == {"max_steps": (4, 6), "save_every": (2, 0)}
    assert "max_steps changed since the checkpoint: 4 -> 6" in log
    a, b = _weights(tmp_path / "ref"), _weights(out)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path, tiny_student_dir):
    data = _data(tmp_path, 16)
    out = tmp_path / "out"
    proc = subprocess.Popen(_cmd(tiny_student_dir, data, out, "--max-steps", "100000"), env=_env(),
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM" in err
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "COMPLETE.json").is_file()
    assert 1 <= int(ckpts[0].name.split("-")[1]) < 100000

"""Mixed precision in `distill train`: bf16 autocast really runs on CPU, fp16 without a GPU is refused,
and `accelerate launch --mixed_precision` (ACCELERATE_MIXED_PRECISION) is honoured, not overridden."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from distill.cli import main

# Runs `distill train` in a fresh process (accelerate's state is a per-process singleton) with a global
# forward hook that records, for every nn.Linear call, whether CPU autocast was on and at which dtype.
PROBE = """
import json, sys, torch
seen = set()
def hook(module, args, out):
    if isinstance(module, torch.nn.Linear):
        on = torch.is_autocast_enabled("cpu")
        seen.add((on, str(torch.get_autocast_dtype("cpu")) if on else None, str(out.dtype)))
torch.nn.modules.module.register_module_forward_hook(hook)
from distill.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "seen": sorted(map(list, seen), key=str)}))
"""


def _train(tmp_path, tiny_student_dir, name, *extra, env=None):
    from distill.demos.tasks import make_examples, to_rows

    data = tmp_path / "data.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in to_rows(make_examples(16, seed=3))))
    out = tmp_path / name
    args = ["train", "--student", str(tiny_student_dir), "--data", str(data), "--out", str(out), "--mode", "sft",
            "--max-steps", "3", "--batch-size", "4", "--lr", "1e-2", "--no-progress", *extra]  # fmt: skip
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["code"] == 0
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {tuple(s) for s in probe["seen"]}, losses, out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU paths")
def test_bf16_autocast_runs_on_cpu_and_the_launcher_setting_is_honoured(tmp_path, tiny_student_dir):
    seen32, loss32, _ = _train(tmp_path, tiny_student_dir, "fp32")
    assert seen32 == {(False, None, "torch.float32")}  # no autocast at all without mixed precision
    seen16, loss16, out = _train(tmp_path, tiny_student_dir, "bf16", "--mixed-precision", "bf16")
    # The student's linear layers ran under bf16 autocast and produced bf16 activations.
    assert (True, "torch.bfloat16", "torch.bfloat16") in seen16
    assert all(on for on, _, _ in seen16)
    # Master weights and the saved model stay float32; losses are close to float32's, not equal.
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}
    assert loss16 != loss32
    assert all(abs(a - b) <= 0.02 * abs(b) for a, b in zip(loss16, loss32)), (loss16, loss32)
    # `accelerate launch --mixed_precision bf16` sets ACCELERATE_MIXED_PRECISION: the config's default
    # "no" must not silently override it.
    seen_env, loss_env, _ = _train(
        tmp_path, tiny_student_dir, "env", env={"ACCELERATE_MIXED_PRECISION": "bf16"}
    )
    assert seen_env == seen16 and loss_env == loss16


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed with a GPU")
def test_fp16_without_a_gpu_and_conflicting_settings_are_refused(
    tmp_path, tiny_student_dir, capsys, monkeypatch
):
    args = [
        "train",
        "--student",
        str(tiny_student_dir),
        "--data",
        str(tmp_path / "none.jsonl"),
        "--mode",
        "sft",
    ]
    assert main([*args, "--out", str(tmp_path / "a"), "--mixed-precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "fp16 needs a CUDA GPU" in err and "Traceback" not in err
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert main([*args, "--out", str(tmp_path / "b"), "--mixed-precision", "fp16"]) == 2
    assert "conflicts with accelerate launch's --mixed_precision 'bf16'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before any work

"""Two CPU processes (gloo) through `accelerate launch` give the weights one process gives."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ACCELERATE = Path(sys.executable).with_name("accelerate")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_student_dir, tiny_lm_dir):
    from distill.demos.tasks import make_examples, to_rows

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in to_rows(make_examples(24, seed=4))))
    common = ["train", "--student", str(tiny_student_dir), "--data", str(data), "--max-steps", "3",
              "--lr", "3e-3", "--grad-accum", "2", "--no-progress", "--mode", "logits",
              "--teacher", str(tiny_lm_dir), "--alpha", "0.5"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # On a machine without GPUs, accelerate's --multi_gpu launcher (torchrun) starts the processes and
    # distill joins them in a gloo group; `--cpu` alone would need mpirun.
    launch = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
              "-m", "distill", *common, "--batch-size", "2", "--out", str(tmp_path / "two")]  # fmt: skip
    two = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "distill", *common, "--batch-size", "4", "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [x["tokens"] for x in m2] == [x["tokens"] for x in m1]  # the same global batches
    a, b = (
        load_file(tmp_path / "two" / "model.safetensors"),
        load_file(tmp_path / "one" / "model.safetensors"),
    )
    start = load_file(Path(tiny_student_dir) / "model.safetensors")
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)

"""`distill train` under FSDP: the same weights as one process, whole-tensor checkpoints, exact resume.

accelerate 1.15 never selects FSDP for CPU processes (``accelerate launch --use_fsdp`` on a machine
without GPUs silently gives plain DDP), so `distill train` refuses that launch; the first test checks
the refusal through the real launcher. To still run distill's FSDP code paths on CPU, the second test
starts two real gloo processes with ``accelerate launch`` and hands `distill.train.train` an
`Accelerator` whose state is switched to FSDP with an FSDP2 plugin: accelerate's own FSDP2
preparation (``fully_shard``, DTensor shards) then runs unchanged. Only accelerate's device check is
bypassed, and only in this test.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ACCELERATE = Path(sys.executable).with_name("accelerate")

# Run by `accelerate launch` in each of the two processes.
FORCED_FSDP = """
import json, sys
import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.utils import DistributedType
from distill.train.config import TrainConfig
from distill.train import train

version = int(sys.argv[2])
acc = Accelerator(cpu=True)  # joins the gloo group the launcher set up
acc.state.distributed_type = DistributedType.FSDP  # what accelerate does on GPUs for --use_fsdp
acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=version, auto_wrap_policy="transformer_based_wrap")
if version == 1:  # FSDP1 compares its device_id (accelerate's "cpu:0") with the compute device "cpu"
    acc.state.device = torch.device("cpu")
assert acc.is_fsdp2 == (version == 2)
r = train(TrainConfig(**json.loads(sys.argv[1])), accelerator=acc)
print("RESUMED_FROM", r.resumed_from, flush=True)
# Leave the gloo group before the interpreter exits rather than in its teardown: one run of this test
# ended with a process aborting ("terminate called without an active exception", not reproduced since;
# pytorch/pytorch#90549 reports that abort at the exit of FSDP test processes).
acc.wait_for_everyone()
torch.distributed.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE"):
        env.pop(k, None)
    return env


def _launch(*args: str) -> list[str]:
    return [str(ACCELERATE), "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *args]  # fmt: skip


def _data(tmp_path: Path) -> Path:
    from distill.demos.tasks import make_examples, to_rows

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in to_rows(make_examples(24, seed=4))))
    return data


def test_use_fsdp_on_cpu_is_refused_with_one_clear_line(tmp_path, tiny_student_dir):
    cmd = _launch("--use_fsdp", "--fsdp_version", "2", "-m", "distill", "train",
                  "--student", str(tiny_student_dir), "--data", str(_data(tmp_path)),
                  "--out", str(tmp_path / "out"), "--max-steps", "2", "--no-progress")  # fmt: skip
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "asked for FSDP (ACCELERATE_USE_FSDP=true) but accelerate set up MULTI_CPU" in run.stderr
    assert "[rank0]: Traceback" not in run.stderr and "[rank1]: Traceback" not in run.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_deepspeed_and_a_short_process_group_are_refused(tmp_path, tiny_student_dir, monkeypatch, capsys):
    from accelerate import Accelerator

    from distill.cli import main
    from distill.train.distributed import check_launch

    argv = ["train", "--student", str(tiny_student_dir), "--data", str(_data(tmp_path)),
            "--out", str(tmp_path / "out"), "--max-steps", "2", "--no-progress"]  # fmt: skip
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch --use_deepspeed` sets
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "DeepSpeed is not supported by distill train" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "model.safetensors").exists()
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    acc = Accelerator(cpu=True)
    monkeypatch.setenv("WORLD_SIZE", "2")  # a launcher started 2 processes; accelerate joined only this one
    with pytest.raises(ValueError, match="started 2 processes .* accelerate joined 1"):
        check_launch(acc, lora=False)


COMMON = dict(lr=3e-3, grad_accum=2, progress=False, mode="logits", alpha=0.5)


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_student_dir, tiny_lm_dir):
    """One process, 4 steps of 4 examples: the run FSDP's 2 processes x 2 examples must reproduce."""
    tmp = tmp_path_factory.mktemp("fsdp_single")
    common = dict(student=str(tiny_student_dir), data=str(_data(tmp)), teacher=str(tiny_lm_dir), **COMMON)
    flags = ["--student", common["student"], "--data", common["data"], "--lr", "3e-3", "--grad-accum", "2",
             "--no-progress", "--mode", "logits", "--teacher", common["teacher"], "--alpha", "0.5",
             "--batch-size", "4", "--max-steps", "4"]  # fmt: skip
    one = subprocess.run([sys.executable, "-m", "distill", "train", *flags, "--out", str(tmp / "one")],
                         env=_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    return common, flags, tmp / "one"


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("version", [1, 2])
def test_fsdp_two_processes_match_one_process_and_resume_exactly(tmp_path, single, version):
    from transformers import AutoModelForCausalLM

    common, flags, one_out = single
    script = tmp_path / "forced_fsdp.py"
    script.write_text(FORCED_FSDP)

    def forced_fsdp(**cfg) -> str:
        # One training per launch: a second FSDP2 training in the same processes came out ~1e-6 off the
        # first (seen on CPU, cause not found), while separate launches are bit-identical.
        args = [str(script), json.dumps({**common, "batch_size": 2, **cfg}), str(version)]
        run = subprocess.run(
            _launch("--multi_gpu", *args), env=_env(), capture_output=True, text=True, timeout=600
        )
        assert run.returncode == 0, run.stderr[-4000:]
        # The fused loss's empty logits are no view that FSDP2 hooks (an in-place op would drop the hook).
        assert "returned a view tensor" not in run.stderr, run.stderr[-4000:]
        return run.stdout

    forced_fsdp(out=str(tmp_path / "fsdp"), max_steps=4, save_every=2)
    assert [x["tokens"] for x in _metrics(tmp_path / "fsdp")] == [x["tokens"] for x in _metrics(one_out)]
    fsdp, single_w = (
        load_file(tmp_path / "fsdp" / "model.safetensors"),
        load_file(one_out / "model.safetensors"),
    )
    start = load_file(Path(common["student"]) / "model.safetensors")
    assert fsdp.keys() == single_w.keys() == start.keys()
    assert max((fsdp[k] - start[k]).abs().max().item() for k in fsdp) > 1e-3  # it trained
    for k in fsdp:  # the reduce-scatter sums in another order than one process: not bit-equal
        torch.testing.assert_close(fsdp[k], single_w[k], rtol=0, atol=1e-5, msg=k)

    # Checkpoints written under FSDP hold whole tensors (gathered from the shards), not rank 0's shard.
    step2 = tmp_path / "fsdp" / "checkpoints" / "step-00000002"
    ckpt = load_file(step2 / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in ckpt.items()} == {k: tuple(start[k].shape) for k in ckpt}
    opt = load_file(step2 / "optimizer.safetensors")
    assert sorted(tuple(v.shape) for k, v in opt.items() if k.endswith("exp_avg")) == sorted(
        tuple(v.shape) for v in ckpt.values()
    )

    # Resumed under FSDP from the step-2 checkpoint the FSDP run wrote: bit-identical to that run.
    shutil.copytree(step2, tmp_path / "resumed" / "checkpoints" / step2.name)
    said = forced_fsdp(out=str(tmp_path / "resumed"), max_steps=4, resume=True)
    assert said.split("RESUMED_FROM")[1].strip().endswith("step-00000002")
    assert [x["step"] for x in _metrics(tmp_path / "resumed")] == [3, 4]
    assert [x["loss"] for x in _metrics(tmp_path / "resumed")] == [
        x["loss"] for x in _metrics(tmp_path / "fsdp")
    ][2:]
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    for k in fsdp:
        assert torch.equal(resumed[k], fsdp[k]), k

    # The same checkpoint resumes in one process (whole tensors, index-keyed optimizer state).
    shutil.copytree(step2, tmp_path / "one_resumed" / "checkpoints" / step2.name)
    one_resumed = subprocess.run(
        [sys.executable, "-m", "distill", "train", *flags, "--out", str(tmp_path / "one_resumed"), "--resume"],
        env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert one_resumed.returncode == 0, one_resumed.stderr[-3000:]
    assert "processes changed 2 -> 1" in one_resumed.stderr
    back = load_file(tmp_path / "one_resumed" / "model.safetensors")
    for k in fsdp:
        torch.testing.assert_close(back[k], fsdp[k], rtol=0, atol=1e-5, msg=k)

    # The saved model is an ordinary transformers model.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp")
    sd = model.state_dict()
    for k, v in fsdp.items():
        assert torch.equal(sd[k], v), k

"""How `distill train` meets accelerate's process setups: refusals before training, full state for saving.

One process, DDP and FSDP (accelerate's FSDP2 ``fully_shard`` and FSDP1) share one code path: the
trainable parameters and the optimizer state are read and written through
`torch.distributed.checkpoint.state_dict` with ``full_state_dict=True``, which gathers the shards
of an FSDP model into whole tensors (and is a plain ``state_dict`` for an unsharded one). A
checkpoint therefore holds whole tensors keyed the same way whatever the setup wrote it, so a run
saved under FSDP resumes under FSDP, DDP or one process. What was run and what was not: docs/train.md.

Setups that accelerate accepts but that would train wrongly are refused before anything loads:

- ``accelerate launch --use_fsdp`` on CPU processes: accelerate 1.15 selects FSDP only for GPU-like
  devices; on CPU it silently sets up plain DDP (``MULTI_CPU``), so "FSDP" would not shard anything.
- DeepSpeed: its engine steps the optimizer inside ``backward`` and keeps optimizer state in its own
  partitions, saved with pickle-based ``torch.save``; distill's checkpoints (safetensors, no pickle)
  cannot hold it. On CPU, accelerate also reports one process per rank (every rank "main").
- Any launch where accelerate joined fewer processes than the launcher started (``WORLD_SIZE``):
  each process would train alone on the same data and write the same files.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


_NO_DEEPSPEED = (
    "DeepSpeed is not supported by distill train: its engine steps the optimizer inside backward and keeps "
    "optimizer state in pickle-based checkpoints that distill will not load; use FSDP (accelerate launch "
    "--use_fsdp, on GPUs) or DDP (--multi_gpu) instead"
)


def check_requested() -> None:
    """Raise ``ValueError`` for a launch `train` refuses whatever accelerate makes of it; call it before
    creating the `Accelerator` (which fails with an ImportError of its own when DeepSpeed is missing)."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        raise ValueError(f"{_NO_DEEPSPEED} (ACCELERATE_USE_DEEPSPEED=true)")


def mixed_precision(requested: str, *, cuda: bool) -> str:
    """The mixed precision to give `Accelerator`: ``requested`` (the config's), or the launcher's.

    `accelerate launch --mixed_precision X` reaches the processes as ``ACCELERATE_MIXED_PRECISION``, and
    an explicit ``Accelerator(mixed_precision="no")`` would silently override it: so the launcher's
    choice wins when the config says ``"no"`` (the default), and two different non-``"no"`` choices
    are an error. fp16 without a CUDA GPU is refused: accelerate then runs no fp16 autocast at all and
    training would stay in float32 without a word (bf16 autocast does run on CPU)."""
    launcher = (os.environ.get("ACCELERATE_MIXED_PRECISION") or "no").lower()
    choice = requested
    if requested == "no":
        choice = launcher
    elif launcher not in ("no", requested):
        raise ValueError(
            f"mixed_precision {requested!r} (config/--mixed-precision) conflicts with accelerate launch's "
            f"--mixed_precision {launcher!r} (ACCELERATE_MIXED_PRECISION); give one of them"
        )
    if choice not in ("no", "bf16", "fp16"):
        raise ValueError(
            f"mixed precision {choice!r} (ACCELERATE_MIXED_PRECISION) is not supported: no, bf16 or fp16"
        )
    if choice == "fp16" and not cuda:
        raise ValueError(
            "mixed precision fp16 needs a CUDA GPU: on CPU accelerate runs no fp16 autocast and training would "
            "silently stay in float32; use bf16 (autocast runs on CPU) or no"
        )
    return choice


def check_launch(accelerator, *, lora: bool) -> None:
    """Raise ``ValueError`` (one line, naming the setup) for a process setup `train` would get wrong."""
    from accelerate.utils import DistributedType

    check_requested()
    kind = accelerator.distributed_type
    name = getattr(kind, "value", str(kind))
    if kind == DistributedType.DEEPSPEED:
        raise ValueError(f"{_NO_DEEPSPEED} (accelerate set up {name})")
    if _flag("ACCELERATE_USE_FSDP") and kind != DistributedType.FSDP:
        raise ValueError(
            f"accelerate launch asked for FSDP (ACCELERATE_USE_FSDP=true) but accelerate set up {name}: "
            "accelerate runs FSDP only on GPUs (or similar accelerators), not on CPU processes, where the run "
            "would silently be plain DDP; launch with --multi_gpu for DDP on CPU, or run on GPUs"
        )
    started = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if started != accelerator.num_processes:
        raise ValueError(
            f"the launcher started {started} processes (WORLD_SIZE) but accelerate joined "
            f"{accelerator.num_processes} ({name}): every process would train alone and write the same files"
        )
    if kind == DistributedType.FSDP and lora:
        raise ValueError(
            "LoRA (--lora-r) under FSDP is not supported by distill train (not verified); "
            "use DDP (--multi_gpu) or one process for LoRA students"
        )


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # On GPUs, cpu_offload moves each gathered tensor to rank 0's CPU memory (no whole copy per GPU). On
    # CPU there is nothing to offload to, and FSDP1's offload path fails there ("setStorage: ... out of
    # bounds for storage of size 0"): every rank gets the whole tensors instead.
    return StateDictOptions(full_state_dict=True, cpu_offload=torch.cuda.is_available(), **kw)


def full_model_state(model) -> dict[str, torch.Tensor]:
    """The whole state dict of a prepared model as whole tensors (with GPUs: on rank 0's CPU only); a collective.

    Not ``accelerator.get_state_dict``: under FSDP2 on CPU (accelerate 1.15, torch 2.13) that returned
    the DTensor shards themselves, which ``save_pretrained`` cannot write."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def gather_train_state(model, optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trainable parameters, optimizer state) as whole CPU tensors; a collective: every process calls it.

    ``names``: the trainable parameters in the order the optimizer was given them (its indices).
    Returns the parameters keyed by name and the optimizer state in `torch.optim.Optimizer.state_dict`
    form (keyed by index). With GPUs only rank 0 gets the tensors; other ranks get empty dicts.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    full = get_model_state_dict(model, options=_options())
    params = {n: full[n] for n in names if n in full}
    osd = get_optimizer_state_dict(model, optimizer, options=_options())
    if not params:  # not rank 0 under a gathering setup
        return {}, {}
    index = {n: i for i, n in enumerate(names)}
    state = {index[fqn]: st for fqn, st in osd["state"].items()}
    groups = [{**g, "params": [index[fqn] for fqn in g["params"]]} for g in osd["param_groups"]]
    return params, {"state": state, "param_groups": groups}


def load_train_state(
    model, optimizer, names: list[str], params: dict[str, torch.Tensor], optim_state: dict[str, Any]
) -> None:
    """Put whole ``params`` and an index-keyed ``optim_state`` (as `gather_train_state` returns them) back
    into ``model`` and ``optimizer``, sharding them where the model is sharded. Every process calls it
    with the same values."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, params, options=_options(strict=False))
    state = {names[int(i)]: st for i, st in optim_state["state"].items()}
    groups = [{**g, "params": [names[int(i)] for i in g["params"]]} for g in optim_state["param_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups}, options=_options())


__all__ = ["check_requested", "check_launch", "full_model_state", "gather_train_state", "load_train_state"]

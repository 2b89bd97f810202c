"""Atomic training checkpoints that never load pickle.

Layout of ``<out>/checkpoints/step-00000040/``::

    model.safetensors        trainable parameters (all weights, or only the LoRA adapters)
    optimizer.safetensors    optimizer state tensors, keyed "state.<param index>.<name>"
    optimizer.json           param groups and non-tensor optimizer state
    rng.safetensors          torch RNG state of every process ("cpu.<rank>", "cuda.<rank>")
    trainer_state.json       step, tokens seen, data position, the config that wrote it
    COMPLETE.json            written last: every file's size and sha256; a directory without it is torn

A checkpoint is written into ``.tmp-step-…`` beside its final name, every file fsynced, then renamed
in one `os.rename` and the parent directory fsynced, so a crash leaves either no checkpoint or a
complete one. `latest` still verifies each candidate (marker, sizes, sha256 of every file, readable
headers, every trainer-state field), because a directory can be damaged after the fact (flipped bytes
keep the size): damaged ones are skipped and reported, never chosen. ``trainer_state.json`` also
records the sha256 of the four files written before it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from distill.data import fsync_dir, fsync_file, output_error, read_document

MARKER = "COMPLETE.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True), encoding="utf-8")


def _optimizer_to_files(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    storages: set[int] = set()
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                t = v.detach().cpu().contiguous()
                # FSDP1 hands out one `step` tensor for every parameter of a flat group; safetensors
                # refuses tensors that share memory, so later sharers get a copy.
                if t.untyped_storage().data_ptr() in storages:
                    t = t.clone()
                storages.add(t.untyped_storage().data_ptr())
                tensors[f"state.{idx}.{k}"] = t
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for idx, st in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def sha256(path: Path) -> str:
    """Hex sha256 of the file at ``path``, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _is_int(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def check_trainer_state(state: Any, step: int | None = None) -> str | None:
    """``None`` when every field of a ``trainer_state.json`` is valid (and its step is ``step`` when
    given), else what is wrong, naming the field and its value (one line)."""
    from distill.train.config import TrainConfig

    if not isinstance(state, dict):
        return f"trainer_state.json is not a JSON object (got {type(state).__name__})"
    want = {"step": 1, "tokens": 0, "world_size": 1, "n_examples": 1}
    for name, low in want.items():
        if not _is_int(state.get(name), low):
            return f"trainer_state.json: {name} must be an integer >= {low}, got {state.get(name)!r}"
    if step is not None and state["step"] != step:
        return f"trainer_state.json: step {state['step']!r} does not match the checkpoint's step {step}"
    ct = state.get("capture_temperature")
    if isinstance(ct, bool) or not isinstance(ct, int | float) or not math.isfinite(ct) or ct <= 0:
        return f"trainer_state.json: capture_temperature must be a finite number > 0, got {ct!r}"
    pos = state.get("data_position")
    if not isinstance(pos, dict) or not all(
        _is_int(pos.get(k), 0) for k in ("epoch", "offset", "examples_seen")
    ):
        return f"trainer_state.json: data_position must hold integers epoch, offset, examples_seen >= 0, got {pos!r}"
    cfg = state.get("config")
    if not isinstance(cfg, dict):
        return f"trainer_state.json: config must be an object, got {cfg!r}"
    try:
        TrainConfig(**cfg)
    except (TypeError, ValueError) as err:
        return f"trainer_state.json: config is not a valid training configuration: {err}"
    sums = state.get("sha256", {})
    if not isinstance(sums, dict) or not all(
        isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v) for v in sums.values()
    ):
        return f"trainer_state.json: sha256 must map file names to hex digests, got {sums!r}"
    return None


def step_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step-NNNNNNNN`` directory under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def verify(path: str | Path) -> str | None:
    """``None`` when the checkpoint at ``path`` is complete, else why it is not (one line)."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        return f"no {MARKER} (written last): torn by a crash mid-write"
    try:
        marker_data = json.loads(marker.read_text(encoding="utf-8"))
        files = marker_data["files"]
        if not isinstance(files, dict) or not isinstance(marker_data.get("sha256") or {}, dict):
            raise ValueError("files and sha256 must be objects")
    except (ValueError, KeyError, OSError, TypeError) as err:
        return f"unreadable {MARKER}: {err}"
    sums = marker_data.get("sha256") or {}
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"missing {name}"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, expected {size}"
        if name in sums and (got := sha256(f)) != sums[name]:
            return (
                f"{name} is corrupt: sha256 {got[:12]}... differs from the {sums[name][:12]}... recorded when "
                "it was written (same size: its bytes changed)"
            )
        if name.endswith(".safetensors"):
            try:
                with safe_open(f, framework="pt") as st:
                    st.keys()
            except Exception as err:  # noqa: BLE001 - any unreadable header means damaged
                return f"{name} unreadable: {err}"
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"trainer_state.json unreadable: {err}"
    m = _STEP_DIR.match(path.name)
    return check_trainer_state(state, int(m.group(1)) if m else None)


def latest(root: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint under ``root`` (or ``None``) and the damaged ones skipped on the way."""
    skipped: list[tuple[Path, str]] = []
    for _, path in step_dirs(root):
        why = verify(path)
        if why is None:
            return path, skipped
        skipped.append((path, why))
    return None, skipped


def save(
    root: str | Path,
    step: int,
    *,
    params: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    rng: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    keep: int = 3,
) -> Path:
    """Write checkpoint ``step`` atomically under ``root`` and keep only the newest ``keep``; returns its path.

    ``params``: name -> whole tensor of each trainable parameter; ``optimizer``: the optimizer state in
    `torch.optim.Optimizer.state_dict` form (keyed by parameter index); ``rng``: name -> uint8 RNG
    state tensors.
    """
    root = Path(root)
    tmp = root / f".tmp-step-{step:08d}"
    try:
        return _save(root, step, tmp, params, optimizer, rng, trainer_state, keep)
    except (OSError, SafetensorError) as err:  # read-only or full file system: one line, nothing half-written
        shutil.rmtree(tmp, ignore_errors=True)
        left = (
            f"could not remove the half-written {tmp}"
            if tmp.exists()
            else f"no half-written {tmp.name} is left"
        )
        raise output_error(
            err, f"checkpoint step-{step:08d} under {root}", f"{left}; {intact(root)}"
        ) from None


def intact(root: str | Path) -> str:
    """What a failed write left intact under checkpoint directory ``root``, for its error message."""
    done = step_dirs(root)
    if not done:
        return "no earlier checkpoint exists"
    return f"the earlier checkpoints are intact (newest {done[0][1].name}: continue from it with --resume)"


def prepare_output(out: str | Path) -> None:
    """Create output directory ``out`` and check that it can be written, before the first step: a
    read-only or unwritable directory fails here with one line (`OutputError`), not after training."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise output_error(err, f"the output directory {out}", intact(out / "checkpoints")) from None


def _save(root: Path, step: int, tmp: Path, params, optimizer, rng, trainer_state, keep: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    if tmp.exists():  # left by an earlier crash
        shutil.rmtree(tmp)
    tmp.mkdir()
    opt_tensors, opt_meta = _optimizer_to_files(optimizer)
    save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, tmp / "model.safetensors")
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    _write_json(tmp / "optimizer.json", opt_meta)
    save_file({k: v.cpu().contiguous() for k, v in rng.items()}, tmp / "rng.safetensors")
    names = ["model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors"]
    sums = {n: sha256(tmp / n) for n in names}
    _write_json(tmp / "trainer_state.json", {**trainer_state, "sha256": dict(sums)})
    names.append("trainer_state.json")
    sums["trainer_state.json"] = sha256(tmp / "trainer_state.json")
    for name in names:
        fsync_file(tmp / name)
    sizes = {n: (tmp / n).stat().st_size for n in names}
    _write_json(tmp / MARKER, {"step": step, "files": sizes, "sha256": sums})
    fsync_file(tmp / MARKER)
    fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. SIGTERM right after a periodic save)
        old = root / f".old-step-{step:08d}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(root)
    for _, path in step_dirs(root)[keep:]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def read(path: str | Path, *, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Read checkpoint ``path`` after checking it is complete and fits a model with these trainable ``shapes``.

    Returns ``{"params", "optimizer", "trainer_state", "rng"}``: whole parameter tensors by name, the
    optimizer state keyed by parameter index, the trainer state, the RNG tensors. Raises ``ValueError``
    when the checkpoint's parameters do not match (another model or another LoRA setting). Only
    safetensors and JSON are read: no pickle.
    """
    path = Path(path)
    why = verify(path)
    if why is not None:
        raise ValueError(f"checkpoint {path} is not usable: {why}")
    saved = load_file(path / "model.safetensors")
    if set(saved) != set(shapes):
        extra, missing = sorted(set(saved) - set(shapes)), sorted(set(shapes) - set(saved))
        raise ValueError(
            f"checkpoint {path} does not match the model: {len(missing)} parameters missing "
            f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})"
        )
    for name, shape in shapes.items():
        if tuple(saved[name].shape) != tuple(shape):
            raise ValueError(f"checkpoint {path}: {name} has shape {tuple(saved[name].shape)}, model {shape}")
    meta = read_document(path / "optimizer.json", "optimizer state")
    if not isinstance(meta.get("param_groups"), list) or not isinstance(meta.get("scalars", {}), dict):
        raise ValueError(f"{path / 'optimizer.json'}: not an optimizer state (no param_groups list)")
    state = read_document(path / "trainer_state.json", "trainer state")  # valid: `verify` checked it
    return {
        "params": saved,
        "optimizer": _optimizer_from_files(load_file(path / "optimizer.safetensors"), meta),
        "trainer_state": state,
        "rng": load_file(path / "rng.safetensors"),
    }

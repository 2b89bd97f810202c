"""Per-model peak memory, measured in a child process that loads and runs only that one model.

    mem = probe_memory(runner, rows)  # {"peak_memory_mb": 41.2, "peak_rss_mb": 388.0, ...}

Why a child process: the evaluation process holds the student AND the teacher (and whatever ran
before), so its own peak RSS cannot tell one model's memory from the other's. The child
(``python -m distill.evaluate.memprobe SPEC.json``, started with `sys.executable`):

1. imports torch and the code that loads this kind of model (for a causal LM also transformers,
   the tokenizer library and the architecture's module) and runs a few tiny torch operations (thread
   pools, kernel set-up), so that none of it counts as the model's;
2. resets the kernel's peak-RSS counter (Linux: ``/proc/self/clear_refs`` ``5``) and records its
   RSS: the *runtime baseline* (Python + torch + libraries, ~200-450 MB on CPU);
3. loads the model from its directory and answers the given inputs exactly as the evaluation does
   (`distill.evaluate.runners`, same generation settings, batch size 1; a classifier also runs one batch of
   256, as its throughput is measured);
4. prints one JSON line: the peak RSS (``VmHWM``, else ``ru_maxrss``), the growth over the baseline
   and, on CUDA, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.

``peak_memory_mb`` is what the model itself needs: the RSS growth over the runtime baseline on CPU
(weights + inference activations + allocator slack + one-time kernel set-up), or the peak bytes
allocated by tensors on a CUDA device (``max_memory_allocated``: without the CUDA context and the
caching allocator's spare reserve). ``peak_rss_mb`` is the whole child process: what running this
model alone on CPU costs, runtime included.

A model that is not local (HTTP endpoint, answers read from a store) gets ``peak_memory_mb = None``
and a ``reason``; a probe that fails or times out gets ``None`` and an ``error``: never an exception.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CLASSIFIER_BATCH = 256
"""Batch the child runs a classifier at once, as `ClassifierRunner.throughput` does."""


def _status_mb(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process in MiB from /proc (Linux); ``None`` elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _maxrss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS (Linux >= 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _preload(spec: Mapping[str, Any]) -> None:
    """Import the code that loading ``spec``'s model needs and warm torch up, so the baseline includes both."""
    import safetensors.torch  # noqa: F401
    import torch

    import distill.evaluate.runners  # noqa: F401

    # torch's first operations set up thread pools and kernels (~6 MB on CPU): the runtime's, not the model's.
    with torch.inference_mode():
        x = torch.nn.functional.linear(torch.ones(CLASSIFIER_BATCH, 64), torch.ones(16, 64))
        torch.log_softmax(x.double(), -1).sort(descending=True)
        torch.nn.functional.embedding(torch.zeros(4, dtype=torch.long), x)

    if spec["kind"] == "classifier":
        import distill.classifier  # noqa: F401

        return
    import tokenizers  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    import distill.models.hf  # noqa: F401

    with (
        torch.inference_mode()
    ):  # a decoder's first attention / activation calls set up their kernels (~3 MB)
        q = torch.ones(1, 2, 5, 16)
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        torch.topk(torch.nn.functional.silu(q) * torch.rsqrt(q.pow(2).mean(-1, keepdim=True)), 2)

    from distill.models.loading import load_config

    try:  # the architecture's module (modeling_llama, ...): code, not the model's memory
        config = load_config(spec["model"], trust_remote_code=bool(spec.get("trust_remote_code")))
        MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except Exception:  # an unknown architecture fails at load time with a clear message instead
        pass


def _open(spec: Mapping[str, Any]) -> Any:
    from distill.evaluate.runners import ClassifierRunner, ModelRunner

    if spec["kind"] == "classifier":
        return ClassifierRunner(spec["model"], spec.get("input_column") or "x")
    from distill.models.base import GenerationSettings
    from distill.models.open import open_model

    teacher = open_model(
        spec["model"],
        role="model",
        device=spec["device"],
        dtype=spec.get("dtype"),
        trust_remote_code=bool(spec.get("trust_remote_code")),
    )
    settings = GenerationSettings(**spec["settings"])
    return ModelRunner(teacher, Path(spec["model"]).name, settings, spec.get("input_column"))


def measure(spec: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Run in the child: load ``spec``'s model, answer ``rows``, return the memory figures (MiB)."""
    _preload(spec)
    import numpy as np
    import torch

    cuda = str(spec["device"]).startswith("cuda")
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(spec["device"])
    reset = _reset_peak()
    baseline = _status_mb("VmRSS") or _maxrss_mb()
    t0 = time.perf_counter()
    runner = _open(spec)
    answered, errors = [], []
    for row in rows:
        a = runner.answer(row)
        if a.error:
            errors.append(a.error[:200])
        else:
            answered.append(row)
    if hasattr(runner, "throughput") and answered:
        x = np.array([runner.features(r) for r in answered])
        x = np.resize(x, (CLASSIFIER_BATCH, x.shape[1]))  # rows repeated up to one full batch
        with torch.inference_mode():
            runner.model(torch.from_numpy(x))
    if cuda:
        torch.cuda.synchronize(spec["device"])
    peak = _status_mb("VmHWM") if reset else None
    peak = peak if peak is not None else _maxrss_mb()
    out: dict[str, Any] = {
        "peak_rss_mb": peak,
        "baseline_rss_mb": baseline,
        "rss_growth_mb": max(0.0, peak - baseline),
        "device": str(spec["device"]),
        "n_inputs": len(answered),
        "input_errors": errors[:3],
        "probe_seconds": time.perf_counter() - t0,
        "method": (
            "child process: peak RSS (VmHWM, reset after imports and warm-up) minus the RSS then (Python + torch"
            + (" + transformers + the architecture's code)" if spec["kind"] != "classifier" else ")")
            if reset
            else "child process: ru_maxrss (peak since start, import transients included) minus RSS after imports"
        ),
    }
    if cuda:
        out["peak_gpu_allocated_mb"] = torch.cuda.max_memory_allocated(spec["device"]) / 2**20
        out["peak_gpu_reserved_mb"] = torch.cuda.max_memory_reserved(spec["device"]) / 2**20
        out["peak_memory_mb"] = out["peak_gpu_allocated_mb"]
        out["method"] = "child process: torch.cuda.max_memory_allocated after reset_peak_memory_stats"
    else:
        out["peak_memory_mb"] = out["rss_growth_mb"]
    return out


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy arrays and scalars from Parquet / CSV readers
        return o.tolist()
    raise TypeError(f"input value of type {type(o).__name__} cannot be passed to the memory probe")


def probe_memory(
    runner: Any, rows: Sequence[Mapping[str, Any]], *, timeout_s: float = 600.0
) -> dict[str, Any]:
    """Peak memory of ``runner``'s model alone, answering ``rows``, measured in a child process.

    ``runner``: a `distill.evaluate.runners` runner; its ``memory_spec()`` says how to reopen the model, or
    why it cannot be measured here. ``rows``: the inputs to run (a few of the evaluation's, e.g. the
    longest). Returns ``{"peak_memory_mb", "peak_rss_mb", "baseline_rss_mb", "rss_growth_mb",
    "device", "method", "n_inputs", "input_ids", "probe_seconds"}`` (MiB, seconds), plus
    ``peak_gpu_allocated_mb`` / ``peak_gpu_reserved_mb`` on CUDA; or ``{"peak_memory_mb": None,
    "reason"}`` (not measurable) / ``{"peak_memory_mb": None, "error"}`` (the probe failed).
    """
    spec_of = getattr(runner, "memory_spec", None)
    spec = spec_of() if spec_of is not None else f"{type(runner).__name__}: no memory_spec, not measurable"
    if isinstance(spec, str):
        return {"peak_memory_mb": None, "reason": spec}
    if not Path(spec["model"]).exists():  # moved or deleted since it was loaded: no child needed to say so
        return {"peak_memory_mb": None, "error": f"model directory {spec['model']} no longer exists"}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="distill-memprobe-") as tmp:
        path = Path(tmp) / "spec.json"
        try:
            path.write_text(json.dumps({"spec": spec, "rows": list(rows)}, default=_jsonable))
        except (TypeError, ValueError) as err:
            return {"peak_memory_mb": None, "error": str(err)}
        cmd = [sys.executable, "-m", "distill.evaluate.memprobe", str(path)]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ)
            )
        except subprocess.TimeoutExpired:
            return {"peak_memory_mb": None, "error": f"probe timed out after {timeout_s:.0f} s (killed)"}
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        tail = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or ["no output"]
        return {"peak_memory_mb": None, "error": f"probe exited with {proc.returncode}: {tail[0][:300]}"}
    out = json.loads(lines[-1])
    out["input_ids"] = [r.get("id") for r in rows]
    out["wall_seconds"] = time.perf_counter() - t0  # the child's torch import included
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m distill.evaluate.memprobe SPEC.json``: ``{"spec": ..., "rows": [...]}`` in, one JSON line out."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m distill.evaluate.memprobe SPEC.json", file=sys.stderr)
        return 2
    job = json.loads(Path(args[0]).read_text())
    print(json.dumps(measure(job["spec"], job["rows"])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

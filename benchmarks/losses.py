"""Time and peak memory of the distillation losses: fused/chunked vs the plain approach.

    .venv/bin/python benchmarks/losses.py                 # CPU, float32, N in {1024, 4096}, H=512, V=32,000
    .venv/bin/python benchmarks/losses.py --cuda          # CUDA, bf16, Liger-Kernel's distillation shapes
    .venv/bin/python benchmarks/losses.py --n 1024 --reps 1 --cases plain,fused   # a quick subset

Each case runs in a fresh Python process so that its peak memory is its own: on CPU the OS's peak resident
set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), read once after the inputs are built and once
after the timed runs; on CUDA ``torch.cuda.max_memory_allocated``. "extra" = peak during the loss minus the
memory held by the inputs, i.e. what the loss itself costs.

Cases (forward + backward of one scalar loss, gradients for hidden states and head):
- ``plain``: logits = hidden @ W.T; F.kl_div(log_softmax(logits / T), log_softmax(teacher / T), log_target)
- ``dense:<name>``: logits = hidden @ W.T, then ``LOSSES[name]`` (distill's dense losses)
- ``fused``: ``fused_linear_kd_loss`` with the dense teacher logits, forward KL
- ``fused_top20``: ``fused_linear_kd_loss`` with a top-20 ``SparseTargets`` teacher (bucket tail)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CPU_CASES = ["plain", "fused", "fused_top20"] + [
    f"dense:{n}"
    for n in (
        "forward_kl",
        "reverse_kl",
        "generalized_jsd",
        "skew_kl",
        "skew_reverse_kl",
        "tvd",
        "soft_cross_entropy",
    )
]
CUDA_CASES = ["plain", "fused"]
# Liger-Kernel's published distillation benchmark: BT 1024-8192, V = 128,256, teacher H 4096, student H 2048.
LIGER = {"n": [1024, 2048, 4096, 8192], "v": 128_256, "h": 2048, "h_teacher": 4096}


def _peak_mib(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _reset_peak(device: str) -> bool:
    """Start a new peak from the current usage, so that transients while building inputs do not count."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return True
    try:  # Linux >= 4.0: writing 5 resets the peak RSS (VmHWM, which ru_maxrss reports)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_case(
    case: str,
    n: int,
    h: int,
    v: int,
    reps: int,
    device: str,
    h_teacher: int,
    threads: int | None = None,
    chunk_size: int | None = None,
) -> dict:
    """One case in this process: build inputs, one warm-up, ``reps`` timed forward+backward passes."""
    import torch
    import torch.nn.functional as F

    from distill.losses import LOSSES, SparseTargets, fused_linear_kd_loss

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    temperature = 2.0
    hidden = torch.randn(n, h, device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device, dtype=dtype) / h**0.5).requires_grad_()
    if device == "cuda":
        # As in Liger's benchmark, the teacher's head runs inside the timed step (no grad) for both methods.
        t_hidden = torch.randn(n, h_teacher, device=device, dtype=dtype)
        t_weight = torch.randn(v, h_teacher, device=device, dtype=dtype) / h_teacher**0.5

        def teacher_signal():
            with torch.no_grad():
                return t_hidden @ t_weight.T
    else:
        if case == "fused_top20":
            # Built a block of rows at a time, so that no (N, V) teacher matrix is ever resident.
            blocks = [
                SparseTargets.from_logits(
                    torch.randn(min(256, n - i), v).mul_(3.0), 20, temperature=temperature
                )
                for i in range(0, n, 256)
            ]
            ids = torch.cat([b.ids for b in blocks])
            fixed = SparseTargets(
                ids=ids, logprobs=torch.cat([b.logprobs for b in blocks]), temperature=temperature
            )
        else:
            fixed = torch.randn(n, v).mul_(3.0)  # in place: no transient second copy

        def teacher_signal():
            return fixed

    def step():
        teacher = teacher_signal()
        if case == "plain":
            logits = hidden @ weight.T
            s = F.log_softmax(logits.float() / temperature, dim=-1)
            t = F.log_softmax(teacher.float() / temperature, dim=-1)
            loss = F.kl_div(s, t, log_target=True, reduction="sum") / n
        elif case.startswith("dense:"):
            name = case.split(":", 1)[1]
            loss = LOSSES[name](hidden @ weight.T, teacher, temperature=temperature)
        elif case in ("fused", "fused_top20"):
            loss = fused_linear_kd_loss(
                hidden, weight, teacher, temperature=temperature, chunk_size=chunk_size
            )
        else:
            raise ValueError(f"unknown case {case!r}; expected one of {CPU_CASES}")
        loss.backward()
        hidden.grad = weight.grad = None
        return float(loss)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    sync()
    gc.collect()
    peak_reset = _reset_peak(device)
    base_mib = _peak_mib(device)  # the inputs (and, on CPU, the interpreter and torch)
    value = step()  # warm-up (allocator, thread pools)
    sync()
    times, cpu = [], []
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    peak = _peak_mib(device)
    return {
        "case": case,
        "n": n,
        "h": h,
        "v": v,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "loss": value,
        "ms": 1000 * statistics.median(times),
        "ms_all": [1000 * t for t in times],
        # CPU seconds of this process (all its threads): less sensitive than wall time to other load.
        "cpu_ms": 1000 * statistics.median(cpu),
        "threads": torch.get_num_threads(),
        "peak_mib": peak,
        "inputs_mib": base_mib,
        "extra_mib": peak - base_mib,
        "peak_reset": peak_reset,
        "chunk_size": chunk_size,
    }


def _child(args: argparse.Namespace) -> int:
    result = run_case(
        args.case,
        args.n[0],
        args.hidden,
        args.vocab,
        args.reps,
        args.device,
        args.teacher_hidden,
        args.threads,
    )
    print("RESULT " + json.dumps(result))
    return 0


def _spawn(case: str, n: int, args: argparse.Namespace, device: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--case", case, "--n", str(n), "--hidden", str(args.hidden)]
    cmd += ["--vocab", str(args.vocab), "--reps", str(args.reps), "--device", device]
    cmd += ["--teacher-hidden", str(args.teacher_hidden)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"case": case, "n": n, "device": device, "error": f"exit {proc.returncode}: {tail[0]}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cuda", action="store_true", help="bf16 on CUDA at Liger-Kernel's shapes (needs a GPU)")
    p.add_argument(
        "--n", type=int, nargs="+", default=None, help="positions N (default 1024 4096; CUDA: Liger's BT)"
    )
    p.add_argument("--hidden", type=int, default=None, help="student hidden size H (default 512; CUDA 2048)")
    p.add_argument(
        "--teacher-hidden", type=int, default=LIGER["h_teacher"], help="CUDA only: teacher hidden size"
    )
    p.add_argument("--vocab", type=int, default=None, help="vocabulary V (default 32000; CUDA 128256)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per case (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per case (default: torch's)")
    p.add_argument(
        "--chunk-size", type=int, default=None, help="fused cases: rows per chunk (default: the library's)"
    )
    p.add_argument("--cases", default=None, help="comma-separated subset of the cases")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON output (default bench-results/losses[-cuda].json)"
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args)

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    device = "cpu"
    if args.cuda:
        import torch

        if not torch.cuda.is_available():
            print("--cuda: no CUDA device available; nothing run", file=sys.stderr)
            return 2
        device = "cuda"
    cuda = device == "cuda"
    args.n = args.n or (LIGER["n"] if cuda else [1024, 4096])
    args.hidden = args.hidden or (LIGER["h"] if cuda else 512)
    args.vocab = args.vocab or (LIGER["v"] if cuda else 32_000)
    cases = args.cases.split(",") if args.cases else (CUDA_CASES if cuda else CPU_CASES)
    out = args.out or Path("bench-results") / ("losses-cuda.json" if cuda else "losses.json")

    results = []
    with Progress() as progress:
        task = progress.add_task("loss benchmark (one process per case)", total=len(cases) * len(args.n))
        for n in args.n:
            for case in cases:
                progress.update(task, description=f"{case} N={n}")
                results.append(_spawn(case, n, args, device))
                progress.advance(task)

    plain = {r["n"]: r for r in results if r["case"] == "plain" and "error" not in r}
    table = Table(title=f"losses fwd+bwd, {device}, H={args.hidden}, V={args.vocab} (median of {args.reps})")
    for col in (
        "case",
        "N",
        "wall ms",
        "x plain",
        "CPU ms",
        "x plain CPU",
        "peak MiB",
        "extra MiB",
        "plain extra / extra",
    ):
        table.add_column(col, justify="left" if col == "case" else "right")
    for r in results:
        if "error" in r:
            table.add_row(r["case"], str(r["n"]), r["error"], *[""] * 6)
            continue
        ref = plain.get(r["n"])
        table.add_row(
            r["case"],
            str(r["n"]),
            f"{r['ms']:.0f}",
            f"{r['ms'] / ref['ms']:.2f}" if ref else "",
            f"{r['cpu_ms']:.0f}",
            f"{r['cpu_ms'] / ref['cpu_ms']:.2f}" if ref else "",
            f"{r['peak_mib']:.0f}",
            f"{r['extra_mib']:.0f}",
            f"{ref['extra_mib'] / r['extra_mib']:.1f}" if ref and r["extra_mib"] >= 1 else "",
        )
    Console(width=160).print(table)

    import torch

    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {out}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The digits demo: soft-label distillation pays when labels are scarce and the teacher labels the rest.

scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes; offline) are split once,
seeded, into train / validation / test. A large teacher MLP is trained on the labelled training
split. Then, for each seed, one small student initialisation is trained twice:

- ``hard``: on ``labelled`` examples of the training split with their hard labels only;
- ``kd``: on the teacher's soft labels for every training input (the transfer set; labels withheld
  except for the same ``labelled`` examples, whose hard labels enter the loss with weight 1 - alpha).

The distillation temperature is chosen from a sweep by mean validation accuracy over seeds, the
teacher's own temperature is calibrated on validation NLL; the test split is used only to report.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill import report
from distill.classifier import (
    clone,
    distill_classifier,
    mlp,
    predict_logits,
    save_classifier,
    train_classifier,
)
from distill.classifier.metrics import calibrate_temperature, compare, expected_calibration_error

DATASET = "sklearn digits: 1,797 8x8 grey-level images (0-16), 10 classes; features scaled to [0, 1]"


@dataclass(frozen=True)
class DigitsDemoConfig:
    """Settings of the digits demo; chosen on the validation split, never on test."""

    labelled: int = 200
    """Training examples whose label the students may use; the rest of the split is unlabelled."""
    seeds: int = 3
    """Student seeds (labelled subset, initialisation, shuffling); mean and spread are reported."""
    temperatures: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)
    """Distillation temperatures swept on the validation split."""
    alpha: float = 0.9
    """Weight of the soft (teacher) term in the KD loss; 1 - alpha weighs the hard labels."""
    calibrate: bool = True
    """Divide the teacher's logits by its calibrated temperature before distilling."""
    teacher_sizes: tuple[int, ...] = (64, 1200, 1200, 10)
    """Teacher MLP layer widths."""
    teacher_dropout: float = 0.2
    """Teacher dropout after each hidden layer."""
    teacher_epochs: int = 30
    """Teacher epochs (batch 256)."""
    teacher_lr: float = 1e-3
    """Teacher Adam learning rate."""
    student_sizes: tuple[int, ...] = (64, 30, 10)
    """Student MLP layer widths (both students)."""
    kd_epochs: int = 100
    """KD student epochs over the transfer set (~1,000 inputs, batch 128: ~8 steps an epoch)."""
    hard_epochs: int = 120
    """Hard-label student epochs over the labelled subset (batch 32), about as many steps as KD."""
    student_lr: float = 1e-2
    """Adam learning rate of both students."""
    latency_runs: int = 200
    """Single-example calls timed for the latency percentiles."""
    split_seed: int = 0
    """Seed of the train / validation / test split (fixed across student seeds)."""

    def __post_init__(self) -> None:
        if self.labelled < 10:
            raise ValueError(f"labelled must be >= 10 (one per class at least), got {self.labelled}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if not self.temperatures or any(not t > 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be a non-empty list of numbers > 0, got {self.temperatures}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


# --quick: a smaller teacher, fewer epochs and temperatures; the same pipeline, within ~20 s.
QUICK = {
    "teacher_sizes": (64, 256, 256, 10),
    "teacher_epochs": 20,
    "teacher_lr": 3e-3,
    "kd_epochs": 30,
    "hard_epochs": 40,
    "temperatures": (1.0, 4.0, 16.0),
    "latency_runs": 50,
}


def load_split(split_seed: int = 0) -> dict[str, np.ndarray]:
    """Digits split 56% / 14% / 30% into train / val / test (stratified, seeded); X float32 in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    X_tv, X_te, y_tv, y_te = train_test_split(X, y, test_size=0.3, random_state=split_seed, stratify=y)
    X_tr, X_va, y_tr, y_va = train_test_split(
        X_tv, y_tv, test_size=0.2, random_state=split_seed, stratify=y_tv
    )
    return {"X_train": X_tr, "y_train": y_tr, "X_val": X_va, "y_val": y_va, "X_test": X_te, "y_test": y_te}


def _aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Metrics of one student over seeds: quality as {mean, std, per_seed}, cost as the mean."""
    out: dict[str, Any] = {}
    for key in ("accuracy", "macro_f1", "agreement", "kl_to_teacher", "ece"):
        vals = [m[key] for m in per_seed]
        out[key] = {**report.mean_std(vals), "per_seed": vals}
    out["params"] = per_seed[0]["params"]
    for key in ("latency_ms_p50", "latency_ms_p95", "throughput_per_s"):
        out[key] = float(np.mean([m[key] for m in per_seed]))
    return out


def run_digits_demo(
    out: str | Path = "runs/demo",
    *,
    quick: bool = False,
    labelled: int = 200,
    seeds: int = 3,
    temperatures: tuple[float, ...] | None = None,
    alpha: float = 0.9,
    calibrate: bool = True,
    console: Any = None,
    progress: bool = True,
    threads: int = 1,
) -> dict[str, Any]:
    """Run the demo, write ``report.json``, ``report.md``, ``plot.png``, models and test inputs to ``out``.

    ``threads``: torch intra-op threads while the demo runs (restored after). One is fastest here:
    these models are so small that thread synchronisation costs more than it saves, and on a busy
    2-core machine two threads made the quick run ~10x slower (measured).

    Returns the report dict (the content of ``report.json``). See the module docstring for the setting.
    """
    import torch

    overrides: dict[str, Any] = dict(QUICK) if quick else {}
    if temperatures is not None:
        overrides["temperatures"] = tuple(float(t) for t in temperatures)
    cfg = DigitsDemoConfig(labelled=labelled, seeds=seeds, alpha=alpha, calibrate=calibrate, **overrides)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(cfg, Path(out), quick, console, progress)
    finally:
        torch.set_num_threads(previous)


def _run(cfg: DigitsDemoConfig, out: Path, quick: bool, console: Any, progress: bool) -> dict[str, Any]:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console()
    start = time.perf_counter()
    data = load_split(cfg.split_seed)
    X_tr, y_tr, X_va, y_va, X_te, y_te = (
        data[k] for k in ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test")
    )
    if cfg.labelled > len(X_tr):
        raise ValueError(f"labelled must be <= {len(X_tr)} (the training split), got {cfg.labelled}")

    bar = Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not progress,
    )
    runs_total = 1 + cfg.seeds * (1 + len(cfg.temperatures))
    with bar:
        overall = bar.add_task("demo: models trained", total=runs_total)
        teacher = mlp(cfg.teacher_sizes, dropout=cfg.teacher_dropout, seed=cfg.split_seed)
        train_classifier(
            teacher, X_tr, y_tr, epochs=cfg.teacher_epochs, batch_size=256, lr=cfg.teacher_lr, progress=bar
        )
        bar.advance(overall)
        z_tr, z_va = predict_logits(teacher, X_tr), predict_logits(teacher, X_va)
        t_cal = calibrate_temperature(z_va, y_va)
        targets = z_tr / t_cal if cfg.calibrate else z_tr

        hard_students, kd_students = [], {}  # kd_students[T] = one student per seed
        sweep: dict[float, list[float]] = {t: [] for t in cfg.temperatures}
        hard_val = []
        for seed in range(cfg.seeds):
            rng = np.random.default_rng(seed)
            idx = np.sort(rng.choice(len(X_tr), cfg.labelled, replace=False))
            init = mlp(cfg.student_sizes, seed=1000 + seed)  # both students start from these weights
            hard, h = train_classifier(
                clone(init), X_tr[idx], y_tr[idx], X_val=X_va, y_val=y_va,
                epochs=cfg.hard_epochs, batch_size=32, lr=cfg.student_lr, seed=seed, progress=bar,
            )  # fmt: skip
            hard_students.append(hard)
            hard_val.append(h["val_accuracy"][-1])
            bar.advance(overall)
            y_masked = np.full(len(X_tr), -100)
            y_masked[idx] = y_tr[idx]
            for t in cfg.temperatures:
                kd, h = distill_classifier(
                    targets, clone(init), X_tr, y_masked, X_val=X_va, y_val=y_va, temperature=t,
                    alpha=cfg.alpha, epochs=cfg.kd_epochs, batch_size=128, lr=cfg.student_lr, seed=seed,
                    progress=bar,
                )  # fmt: skip
                kd_students.setdefault(t, []).append(kd)
                sweep[t].append(h["val_accuracy"][-1])
                bar.advance(overall)

        # Model selection on the validation split only; ties go to the lower temperature.
        best_t = max(cfg.temperatures, key=lambda t: (np.mean(sweep[t]), -t))
        measure = bar.add_task("measuring on test", total=2 * cfg.seeds)
        per_seed: dict[str, list[dict[str, Any]]] = {"hard": [], "kd": []}
        teacher_metrics = None
        for name, students in (("hard", hard_students), ("kd", kd_students[best_t])):
            for student in students:
                res = compare(teacher, student, X_te, y_te, latency_runs=cfg.latency_runs)
                teacher_metrics = teacher_metrics or res["teacher"]
                per_seed[name].append(res["student"])
                bar.advance(measure)

    z_te = predict_logits(teacher, X_te)
    teacher_metrics = {
        **teacher_metrics,
        "sizes": list(cfg.teacher_sizes),
        "calibrated_temperature": t_cal,
        "ece_after_calibration": expected_calibration_error(
            torch.softmax(z_te / t_cal, 1), torch.as_tensor(y_te)
        ),
        "val_accuracy": float((z_va.argmax(1).numpy() == y_va).mean()),
    }
    students = {"hard": _aggregate(per_seed["hard"]), "kd": _aggregate(per_seed["kd"])}
    students["hard"].update(
        sizes=list(cfg.student_sizes), labelled=cfg.labelled, val_accuracy=report.mean_std(hard_val)
    )
    students["kd"].update(
        sizes=list(cfg.student_sizes),
        labelled=cfg.labelled,
        transfer_set=len(X_tr),
        temperature=best_t,
        alpha=cfg.alpha,
        val_accuracy=report.mean_std(sweep[best_t]),
    )
    kd_acc, hard_acc = students["kd"]["accuracy"]["mean"], students["hard"]["accuracy"]["mean"]
    result: dict[str, Any] = {
        "dataset": DATASET,
        "split": {"train": len(X_tr), "val": len(X_va), "test": len(X_te), "split_seed": cfg.split_seed},
        "seeds": list(range(cfg.seeds)),
        "quick": quick,
        "settings": asdict(cfg),
        "teacher": teacher_metrics,
        "students": students,
        "temperature_sweep": [
            {"temperature": t, "val_accuracy": report.mean_std(sweep[t])} for t in cfg.temperatures
        ],
        "quality_retained": kd_acc / teacher_metrics["accuracy"],
        "speedup": teacher_metrics["latency_ms_p50"] / students["kd"]["latency_ms_p50"],
        "kd_gain": kd_acc - hard_acc,
        "param_ratio": teacher_metrics["params"] / students["kd"]["params"],
    }
    _save_artifacts(out, teacher, hard_students[0], kd_students[best_t][0], X_te, y_te)
    result["seconds"] = time.perf_counter() - start
    result["files"] = _write_reports(out, result, console)
    report.write_json(out / "report.json", result)
    return result


def _save_artifacts(out: Path, teacher, hard, kd, X_te: np.ndarray, y_te: np.ndarray) -> None:
    """Models (seed 0's students) and the test split, for ``distill eval`` to reload."""
    save_classifier(teacher, out / "models" / "teacher")
    save_classifier(hard, out / "models" / "student_hard")
    save_classifier(kd, out / "models" / "student_kd")
    with (out / "test_inputs.jsonl").open("w", encoding="utf-8") as f:
        for i, (x, y) in enumerate(zip(X_te, y_te)):
            f.write(
                json.dumps({"id": f"test-{i:04d}", "x": [round(float(v), 6) for v in x], "label": int(y)})
                + "\n"
            )


def _rows(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    headers = [
        "model",
        "params",
        "accuracy",
        "macro-F1",
        "agreement",
        "KL(T||S)",
        "ECE",
        "p50 ms",
        "p95 ms",
        "ex/s @256",
    ]
    t, s = result["teacher"], result["students"]
    rows = []
    for name, m in (
        ("teacher", t),
        ("hard labels", s["hard"]),
        (f"KD, T={s['kd']['temperature']:g}", s["kd"]),
    ):
        rows.append([name, m["params"], m["accuracy"], m["macro_f1"], m["agreement"], m["kl_to_teacher"], m["ece"],
                     m["latency_ms_p50"], m["latency_ms_p95"], m["throughput_per_s"]])  # fmt: skip
    return headers, rows


def _write_reports(out: Path, result: dict[str, Any], console: Any) -> dict[str, str]:
    headers, rows = _rows(result)
    s = result["students"]
    summary = (
        f"Test accuracy, {len(result['seeds'])} seeds (mean ± std), {s['hard']['labelled']} labelled examples. "
        f"KD student keeps {result['quality_retained']:.1%} of the teacher's accuracy with "
        f"{result['param_ratio']:.0f}x fewer parameters, {result['speedup']:.1f}x lower p50 latency; "
        f"KD - hard = {result['kd_gain'] * 100:+.1f} points. ({result['seconds']:.0f} s)"
    )
    keep = [0, 1, 2, 4, 7, 9]  # the terminal gets the main columns; report.md has all of them
    report.print_table(
        "distill demo: digits (test split)",
        [headers[i] for i in keep],
        [[r[i] for i in keep] for r in rows],
        console=console,
    )
    console.print(summary)
    sweep_rows = [[f"{r['temperature']:g}", r["val_accuracy"]] for r in result["temperature_sweep"]]
    split = result["split"]
    report.write_markdown(
        out / "report.md",
        "distill demo: soft-label distillation on digits",
        [
            ("", f"{result['dataset']}. Split: {split['train']} train / {split['val']} val / {split['test']} test."),
            ("Test results", (headers, rows)),
            ("", summary),
            ("Distillation temperature (validation accuracy of the KD student)", (["T", "val accuracy"], sweep_rows)),
            ("", f"Teacher calibrated temperature (validation NLL): {result['teacher']['calibrated_temperature']:.3f}; "
                 f"test ECE {result['teacher']['ece']:.4f} before, {result['teacher']['ece_after_calibration']:.4f} after."),
            ("", "Latency is per example at batch size 1 on this machine's CPU; settings were chosen on the validation split."),
        ],
    )  # fmt: skip
    _plot(out / "plot.png", result)
    return {
        k: str(out / v) for k, v in (("json", "report.json"), ("markdown", "report.md"), ("plot", "plot.png"))
    }


def _plot(path: Path, result: dict[str, Any]) -> None:
    fig, (ax_p, ax_l, ax_t) = report.figure(3, width=4.6, height=3.8)
    t, s = result["teacher"], result["students"]
    points = [
        ("teacher", t, "black", "s"),
        ("hard labels", s["hard"], "tab:orange", "o"),
        ("KD", s["kd"], "tab:blue", "D"),
    ]
    for label, m, color, marker in points:
        acc = m["accuracy"] if isinstance(m["accuracy"], dict) else {"mean": m["accuracy"], "std": 0.0}
        for ax, x in ((ax_p, m["params"]), (ax_l, m["latency_ms_p50"])):
            ax.errorbar(
                x, acc["mean"] * 100, yerr=acc["std"] * 100, fmt=marker, color=color, label=label, capsize=3
            )
    ax_p.set(xscale="log", xlabel="parameters (log)", ylabel="test accuracy (%)", title="accuracy vs size")
    ax_l.set(xlabel="p50 latency, batch 1 (ms)", ylabel="test accuracy (%)", title="accuracy vs latency")
    ax_l.set_xlim(left=0)  # from zero: a ratio of latencies should look like one
    temps = [r["temperature"] for r in result["temperature_sweep"]]
    mean = np.array([r["val_accuracy"]["mean"] for r in result["temperature_sweep"]]) * 100
    std = np.array([r["val_accuracy"]["std"] for r in result["temperature_sweep"]]) * 100
    ax_t.errorbar(temps, mean, yerr=std, fmt="D-", color="tab:blue", capsize=3, label="KD student")
    ax_t.axhline(s["hard"]["val_accuracy"]["mean"] * 100, color="tab:orange", ls="--", label="hard labels")
    ax_t.axhline(t["val_accuracy"] * 100, color="black", ls=":", label="teacher")
    ax_t.set(
        xscale="log",
        xlabel="distillation temperature T",
        ylabel="validation accuracy (%)",
        title="accuracy vs T",
    )
    ax_t.set_xticks(temps, [f"{x:g}" for x in temps])
    levels = [*(mean - std), *(mean + std), s["hard"]["val_accuracy"]["mean"] * 100, t["val_accuracy"] * 100]
    ax_t.set_ylim(min(levels) - 0.5, max(levels) + 0.5)  # keep the reference lines off the frame
    for ax in (ax_p, ax_l, ax_t):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center right" if ax is ax_t else "lower right")
    report.save_figure(fig, path)

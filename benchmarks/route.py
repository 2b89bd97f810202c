"""Routed quality and cost against "teacher only" and "student only", as a curve, on the built-in tasks.

    .venv/bin/python benchmarks/route.py                               # digits classifier (about a minute)
    .venv/bin/python benchmarks/route.py --task lm --lm-dir runs/demo-lm   # the narrow invoice task
    .venv/bin/python benchmarks/route.py --task all --lm-dir runs/demo-lm --out bench-results/route.json

Per task: the teacher and the student answer every benchmark input once (one request at a time,
timed); the inputs are split at random into a calibration half and a held-out half; a `Router` at
each target is fitted on the calibration half and every threshold of its curve is applied to the
held-out half. Reported per task (held-out numbers, averaged over ``--splits`` random splits):
teacher-only and student-only quality and cost, and the router's chosen point (share answered by
the student, routed quality as a fraction of the teacher's, cost per 1M requests), for each of
``--targets``.

Costs: both models priced at the same hardware price (``--hourly``, $/h) divided by their measured
throughput (sequential, batch size 1), so the ratio reflects compute only. The routed system pays
the student on every request (it answers first) plus the teacher on the share sent to it.

``--task lm`` needs the LM demo's models: ``--lm-dir`` is the output directory of
``distill demo --task lm`` (``teacher/`` and ``students/<name>/``); it is created there by running
the demo when missing (a quarter of an hour on a CPU). ``--lm-student best`` (the default) picks, among
every student the demo trained (each method, each seed), the one with the highest exact match on
``--select-inputs`` selection prompts (seed 4) that are neither the demo's nor the benchmark's
inputs (seed 3), as a team would pick the model to deploy before routing it.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from distill.evaluate import EvalConfig, run_pair
from distill.report import figure, print_table, save_figure, write_json
from distill.route.fit import routed_outcome, split_indices
from distill.route.router import Router


def _digits_models(work: Path, seed: int) -> tuple[Path, Path, list[dict]]:
    """Teacher (64-1200-1200-10, hard labels) and KD student (64-30-10), trained here; test rows."""
    import torch

    from distill.classifier import distill_classifier, mlp, save_classifier, train_classifier
    from distill.demos.digits import load_split

    split = load_split(seed)
    rows = [
        {"id": f"test-{i}", "x": x.tolist(), "label": int(y)}
        for i, (x, y) in enumerate(zip(split["X_test"], split["y_test"]))
    ]
    marker = work / "seed.txt"
    if (
        (work / "student" / "model.safetensors").is_file()
        and marker.is_file()
        and marker.read_text() == str(seed)
    ):
        return work / "teacher", work / "student", rows  # trained by an earlier run with this seed
    torch.set_num_threads(1)  # tiny matrices: more threads only contend
    # The digits demo's sizes and settings: a 1200-1200 teacher, a 30-unit KD student.
    teacher, _ = train_classifier(
        mlp([64, 1200, 1200, 10], dropout=0.2, seed=seed), split["X_train"], split["y_train"],
        X_val=split["X_val"], y_val=split["y_val"], epochs=30, batch_size=256, lr=1e-3, seed=seed,
    )  # fmt: skip
    student, _ = distill_classifier(
        teacher, mlp([64, 30, 10], seed=seed + 1), split["X_train"], split["y_train"],
        epochs=100, temperature=4.0, alpha=0.9, lr=1e-2, seed=seed,
    )  # fmt: skip
    save_classifier(teacher, work / "teacher")
    save_classifier(student, work / "student")
    (work / "seed.txt").write_text(str(seed))
    return work / "teacher", work / "student", rows


def _pick_student(lm_dir: Path, n: int) -> tuple[str, dict[str, float]]:
    """The student under ``lm_dir/students`` with the best exact match on ``n`` selection prompts.

    Selection prompts come from seed 4, which neither the demo (seeds 0-2) nor the benchmark's
    inputs (seed 3) use, so the choice does not peek at the routed evaluation."""
    import torch

    from distill.demos.tasks import exact_match_rate, make_examples
    from distill.models.base import GenerationSettings, Request
    from distill.models.hf import HFTeacher

    torch.set_num_threads(1)
    select = make_examples(n, seed=4)
    reqs = [Request(id=e.id, prompt=e.prompt) for e in select]
    scores = {}
    for d in sorted(p.parent for p in (lm_dir / "students").glob("*/model.safetensors")):
        answers = [
            c.text for c in HFTeacher(d, batch_size=32).complete(reqs, GenerationSettings(max_new_tokens=24))
        ]
        scores[d.name] = exact_match_rate(answers, [e.answer for e in select])
    if not scores:
        raise FileNotFoundError(f"{lm_dir}/students: no trained student")
    return max(scores, key=lambda k: (scores[k], k == "sft", k)), scores  # ties: a stable choice


def _lm_models(lm_dir: Path, n: int, student: str, n_select: int) -> tuple[Path, Path, list[dict], dict]:
    from distill.demos.tasks import make_examples

    if not (lm_dir / "teacher" / "model.safetensors").is_file():
        from distill.demos.lm import run as run_lm_demo

        print(
            f"no LM demo models under {lm_dir}: running the LM demo (a quarter of an hour)", file=sys.stderr
        )
        run_lm_demo(lm_dir, progress=False)
    selection: dict = {}
    if student == "best":
        student, scores = _pick_student(lm_dir, n_select)
        selection = {"picked": student, "selection_exact_match": scores, "selection_prompts": n_select}
        print(f"student picked on {n_select} selection prompts: {student} ({scores})", file=sys.stderr)
    if not (lm_dir / "students" / student / "model.safetensors").is_file():
        raise FileNotFoundError(f"--lm-student {student}: no model at {lm_dir / 'students' / student}")
    # seed 3: prompts none of the demo's models saw (the demo uses seeds 0, 1 and 2)
    rows = [
        {"id": e.id, "prompt": e.prompt, "answer": e.answer, "field": e.field}
        for e in make_examples(n, seed=3)
    ]
    return lm_dir / "teacher", lm_dir / "students" / student, rows, selection


def bench_task(
    name: str, teacher_dir: Path, student_dir: Path, rows: list[dict], args, selection=None
) -> dict:
    import torch

    from distill.evaluate.runners import open_model
    from distill.models.base import GenerationSettings

    torch.set_num_threads(1)
    settings = GenerationSettings(max_new_tokens=24, top_logprobs=5)
    student = open_model(str(student_dir), "student", settings=settings)
    teacher = open_model(str(teacher_dir), "teacher", settings=settings)
    cfg = EvalConfig(first_line=True)  # LM answers: the first line is the answer
    t0 = time.perf_counter()
    records, excl = run_pair(student, teacher, rows, cfg, progress=True)
    seconds = time.perf_counter() - t0
    lat = {w: float(np.mean([r[w].latency_ms for r in records])) for w in ("student", "teacher")}
    cost = {w: args.hourly / 3600.0 / (1000.0 / lat[w]) * 1e6 for w in lat}  # $ per 1M requests
    cols = {k: np.array([r["signals"][k] for r in records]) for k in records[0]["signals"]}
    cols["student_quality"] = np.array([r["student_quality"] for r in records])
    cols["teacher_quality"] = np.array([r["teacher_quality"] for r in records])

    routed, curve = {}, []
    for target in args.targets:
        held = []
        for split_seed in range(args.splits):
            cal, test = split_indices(len(records), 0.5, seed=split_seed)
            router = Router(
                target,
                args.signal,
                teacher_cost=cost["teacher"],
                student_cost=cost["student"],
                delta=args.delta,
            )
            router.fit({k: v[cal] for k, v in cols.items()})
            test_cols = {k: v[test] for k, v in cols.items()}
            held.append({**routed_outcome(router, test_cols), "threshold": router.threshold_})
            if (
                not curve
            ):  # the trade-off: every calibration threshold of split 0, applied to its held-out half
                for p in router.curve_:
                    r = Router(
                        target, args.signal, teacher_cost=cost["teacher"], student_cost=cost["student"]
                    )
                    r.threshold_, r.ood_threshold_ = p["threshold"], float("inf")
                    curve.append(routed_outcome(r, test_cols))
        routed[str(target)] = {
            "target": target,
            **{k: float(np.mean([h[k] for h in held])) for k in ("fraction_to_student", "quality", "quality_retained", "cost")},
            "fraction_to_student_min": float(min(h["fraction_to_student"] for h in held)),
            "quality_retained_min": float(min(h["quality_retained"] for h in held)),
            "per_split": held,
        }  # fmt: skip
        routed[str(target)]["cost_vs_teacher"] = routed[str(target)]["cost"] / cost["teacher"]

    # Teacher-only and student-only on the same held-out halves as the routed numbers (mean over splits).
    first = next(iter(routed.values()))["per_split"]
    teacher_q = float(np.mean([h["teacher_quality"] for h in first]))
    student_q = float(np.mean([h["student_quality"] for h in first]))
    return {
        "task": name,
        "student_dir": str(student_dir),
        "student_selection": selection or None,
        "n_inputs": len(rows),
        "n_answered": len(records),
        "excluded": excl.to_dict(),
        "signal": args.signal,
        "splits": args.splits,
        "latency_ms_mean": lat,
        "cost_per_1m_requests": cost,
        "teacher_only": {"quality": teacher_q, "cost": cost["teacher"]},
        "student_only": {
            "quality": student_q,
            "quality_retained": student_q / teacher_q,
            "cost": cost["student"],
        },
        "routed": routed,
        "curve_split0": curve,
        "seconds": seconds,
    }


def _plot(results: list[dict], path: Path) -> None:
    fig, axes = figure(len(results))
    for ax, res in zip(axes, results):
        curve = res["curve_split0"]
        ax.plot(
            [p["fraction_to_teacher"] for p in curve], [p["quality_retained"] for p in curve], label="routed"
        )
        for key, point in res["routed"].items():
            chosen = point["per_split"][0]
            ax.scatter(
                [1 - chosen["fraction_to_student"]],
                [chosen["quality_retained"]],
                zorder=3,
                label=f"target {key}",
            )
        ax.set_xscale("symlog", linthresh=0.01)  # the interesting part is near 0
        ax.set_xlabel("fraction of requests sent to the teacher (symlog)")
        ax.set_ylabel("quality / teacher quality (held-out)")
        ax.set_title(res["task"])
        ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["digits", "lm", "all"], default="digits")
    p.add_argument("--lm-dir", default="runs/demo-lm", help="output directory of `distill demo --task lm`")
    p.add_argument(
        "--lm-student",
        default="best",
        help="LM demo student: a directory name under LM_DIR/students (sft, logits, hard, sft-seed1, ...) "
        "or 'best' (picked on separate selection prompts)",
    )
    p.add_argument("--select-inputs", type=int, default=200, help="selection prompts for --lm-student best")
    p.add_argument("--lm-inputs", type=int, default=400, help="benchmark prompts for the LM task")
    p.add_argument("--targets", default="0.99,0.995,1.0", help="comma-separated router targets")
    p.add_argument("--signal", default="mean_logprob")
    p.add_argument(
        "--delta", type=float, default=None, help="Router delta (conservative bound); default none"
    )
    p.add_argument("--splits", type=int, default=5, help="random calibration/held-out splits averaged")
    p.add_argument("--hourly", type=float, default=1.0, help="$/h of the hardware, both models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/route-bench", help="where the digits models are written")
    p.add_argument("--out", default="bench-results/route.json")
    args = p.parse_args(argv)
    args.targets = [float(t) for t in args.targets.split(",")]

    results = []
    if args.task in ("digits", "all"):
        work = Path(args.work) / "digits"
        results.append(bench_task("digits (MLP classifier)", *_digits_models(work, args.seed), args))
    if args.task in ("lm", "all"):
        teacher_dir, student_dir, rows, selection = _lm_models(
            Path(args.lm_dir), args.lm_inputs, args.lm_student, args.select_inputs
        )
        name = f"invoice task (tiny causal LMs, student {student_dir.name})"
        results.append(bench_task(name, teacher_dir, student_dir, rows, args, selection))

    rows = []
    for r in results:
        rows.append(
            [r["task"], "teacher only", 0.0, r["teacher_only"]["quality"], 1.0, r["teacher_only"]["cost"]]
        )
        rows.append([r["task"], "student only", 1.0, r["student_only"]["quality"], r["student_only"]["quality_retained"], r["student_only"]["cost"]])  # fmt: skip
        for key, routed in r["routed"].items():
            rows.append([r["task"], f"routed @ {key}", routed["fraction_to_student"], routed["quality"], routed["quality_retained"], routed["cost"]])  # fmt: skip
    print_table(
        f"Routing on held-out inputs (mean of {args.splits} splits; cost $ per 1M requests at ${args.hourly}/h)",
        ["task", "system", "answered by student", "quality", "retained", "cost"],
        rows,
        Console(width=150),  # wide enough for one line per row when piped to a file
    )
    out = Path(args.out)
    _plot(results, out.with_suffix(".png"))
    write_json(
        out,
        {
            "machine": platform.platform(),
            "python": sys.version.split()[0],
            "args": vars(args),
            "results": results,
        },
    )
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

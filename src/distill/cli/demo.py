"""`distill demo`: the built-in end-to-end run (classifier distillation on digits, ``--task lm`` or ``--task triage``)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        default=None,
        help="output directory (default: runs/demo; --task lm: runs/demo-lm; --task triage: runs/demo-triage)",
    )
    parser.add_argument("--quick", action="store_true", help="smaller, faster run (~20 s) for tests")
    parser.add_argument(
        "--task", choices=("digits", "lm", "triage"), default="digits", help="which demo (default: digits)"
    )
    parser.add_argument(
        "--labelled",
        type=int,
        default=None,
        help="labelled training examples (gold answers) the students get; digits: default 200, "
        "lm: default 150 of the 1500 transfer prompts (--quick: 40 of 160); triage: default 100 (--quick: 30)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="student seeds (initialisation and data order), mean ± std shown; digits: default 3, "
        "lm: default 2, triage: default 3 (--quick: 1)",
    )
    parser.add_argument(
        "--budget",
        type=int,
        default=None,
        help="triage: teacher answers (transfer tickets) of the main table; default 300 (--quick: 60); "
        "the curve adds 100, 300 and 1000",
    )
    parser.add_argument(
        "--temperatures",
        type=float,
        nargs="+",
        default=None,
        metavar="T",
        help="digits: distillation temperatures swept on validation (default 1 2 4 8 16; --quick: 1 4 16)",
    )
    parser.add_argument(
        "--alpha", type=float, default=0.9, help="digits: weight of the soft term (default 0.9)"
    )
    parser.add_argument(
        "--no-calibrate",
        dest="calibrate",
        action="store_false",
        help="digits: distil from the raw teacher logits instead of the temperature-calibrated ones",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    if args.task == "triage":
        from distill.demos import triage

        out = args.out or "runs/demo-triage"
        given = {"labelled": args.labelled, "seeds": args.seeds, "budget": args.budget}
        triage.run(
            out=out,
            quick=args.quick,
            progress=args.progress,
            **{k: v for k, v in given.items() if v is not None},
        )
        print(f"wrote {out}/report.json, report.md, accuracy_vs_budget.png and calibration.png")
        return 0
    if args.task == "lm":
        from distill.demos import lm

        out = args.out or "runs/demo-lm"
        given = {"labelled": args.labelled, "seeds": args.seeds}
        lm.run(
            out=out,
            quick=args.quick,
            progress=args.progress,
            **{k: v for k, v in given.items() if v is not None},
        )
        print(f"wrote {out}/report.json, report.md and plot.png")
        return 0
    from distill.demos.digits import run_digits_demo

    out = args.out or "runs/demo"
    run_digits_demo(
        out,
        quick=args.quick,
        labelled=200 if args.labelled is None else args.labelled,
        seeds=3 if args.seeds is None else args.seeds,
        temperatures=args.temperatures,
        alpha=args.alpha,
        calibrate=args.calibrate,
        progress=args.progress,
    )
    print(f"wrote {out}/report.json, report.md, plot.png, models/ and test_inputs.jsonl")
    return 0

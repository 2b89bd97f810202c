"""`distill route fit ...` fits a calibrated router; `distill route show router.json` prints its curve."""

from __future__ import annotations

import argparse
import json

from distill.models.loading import TRUST_REMOTE_CODE_HELP
from distill.route.router import SIGNALS, Router


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="route_command", metavar="ACTION", required=True)
    fit = sub.add_parser(
        "fit", help="run student and teacher on inputs, fit the router, check it on held-out inputs"
    )
    fit.add_argument("--student", required=True, help="student: model directory or http(s) URL")
    fit.add_argument("--teacher", required=True, help="teacher: model directory or http(s) URL")
    fit.add_argument(
        "--inputs", required=True, help="calibration inputs (JSONL/JSON/CSV/Parquet), gold answers optional"
    )
    fit.add_argument(
        "--target", type=float, default=0.99, help="fraction of teacher quality to keep (default 0.99)"
    )
    fit.add_argument("--out", required=True, help="router JSON file to write (report: OUT with .report.json)")
    fit.add_argument(
        "--signal", default="mean_logprob", choices=sorted(SIGNALS), help="student confidence signal"
    )
    fit.add_argument(
        "--train",
        default=None,
        help="distillation training inputs: adds the coverage OOD score (scorer saved beside OUT as OUT-stem.ood/)",
    )
    fit.add_argument("--delta", type=float, default=None, help="keep the target with probability >= 1-delta")
    fit.add_argument("--embedder", default="auto", choices=["auto", "minilm", "tfidf"], help="for --train")
    fit.add_argument(
        "--holdout", type=float, default=0.3, help="share of inputs kept out of fitting (default 0.3)"
    )
    fit.add_argument("--seed", type=int, default=0, help="split seed")
    fit.add_argument("--metric", default="auto", help="accuracy, exact_match, token_f1 or module:function")
    fit.add_argument("--prices", default=None, help="prices TOML: costs on the curve in $ per 1M requests")
    fit.add_argument("--input-column", default=None, help="input column (default: prompt/messages, or x)")
    fit.add_argument(
        "--reference-column", default=None, help="gold-answer column (default: label/answer/...)"
    )
    fit.add_argument("--first-line", action="store_true", help="compare only the first line of text answers")
    fit.add_argument("--max-new-tokens", type=int, default=32, help="generation limit for language models")
    fit.add_argument(
        "--teacher-api-key-env", default=None, help="NAME of the env variable holding the API key"
    )
    fit.add_argument(
        "--student-api-key-env",
        default=None,
        help="NAME of the env variable holding an http(s) student's API key",
    )
    fit.add_argument("--ca-bundle", metavar="PEM", default=None, help="CA certificates for https models")
    fit.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    fit.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    show = sub.add_parser("show", help="print a saved router's trade-off curve")
    show.add_argument("router", help="router JSON file")


def _print_curve(router: Router, title: str, points: int = 12) -> None:
    from distill.report import print_table

    curve = router.curve_
    step = max(1, len(curve) // points)
    picked = curve[::step] + ([curve[-1]] if (len(curve) - 1) % step else [])
    rows = [
        [p["threshold"], p["fraction_to_teacher"], p["quality"], p["quality_retained"], p["cost"]]
        for p in picked
    ]
    print_table(title, ["threshold", "to teacher", "quality", "retained", "cost"], rows)


def run(args: argparse.Namespace) -> int:
    if args.route_command == "show":
        router = Router.load(args.router)
        _print_curve(router, f"{args.router}: signal {router.signal}, threshold {router.threshold_:.4g}")
        if router.cuts_on_ood:
            print(
                f"OOD cut-off: {router.ood_signal} > {router.ood_threshold_:.4g} goes to the teacher "
                f"(scorer: {router.ood_scorer_path_ or 'none recorded'})"
            )
        return 0
    from distill.data import read_table
    from distill.evaluate import EvalConfig
    from distill.evaluate.runners import open_pair
    from distill.models.base import GenerationSettings
    from distill.prices import load_prices
    from distill.report import print_table
    from distill.route.fit import fit_and_save

    # Bad --target / --signal / --metric / prices fail before any model is opened.
    router = Router(
        target=args.target, signal=args.signal, ood_signal="ood" if args.train else None, delta=args.delta
    ).check_params()
    cfg = EvalConfig(metric=args.metric, reference_column=args.reference_column, first_line=args.first_line)
    prices = load_prices(args.prices) if args.prices else None
    rows = read_table(args.inputs)
    train_rows = read_table(args.train) if args.train else None
    student, teacher = open_pair(
        args.student,
        args.teacher,
        settings=GenerationSettings(max_new_tokens=args.max_new_tokens, top_logprobs=5),
        input_column=args.input_column,
        api_key_env=args.teacher_api_key_env,
        student_api_key_env=args.student_api_key_env,
        ca_bundle=args.ca_bundle,
        trust_remote_code=args.trust_remote_code,
    )
    fitted = fit_and_save(
        router, student, teacher, rows, args.out, train_rows=train_rows, train_source=args.train or "",
        embedder=args.embedder, eval_cfg=cfg, holdout=args.holdout, seed=args.seed,
        text_column=args.input_column, prices=prices, progress=args.progress,
    )  # fmt: skip
    report = fitted["report"]
    _print_curve(
        router, f"Trade-off on {report['n_calibration']} calibration inputs (signal {router.signal})"
    )
    rows_out = [[name, o["n"], o["fraction_to_student"], o["quality"], o["teacher_quality"], o["quality_retained"], o["cost"]]
                for name, o in (("calibration", report["calibration"]), ("held-out", report["held_out"])) if o]  # fmt: skip
    print_table(
        f"Router at target {args.target}: threshold {router.threshold_:.4g}",
        ["split", "n", "to student", "routed quality", "teacher quality", "retained", "cost"],
        rows_out,
    )
    if report["excluded"]["total"]:
        print(
            f"excluded {report['excluded']['total']} inputs: {json.dumps(report['excluded']['by_reason'])[:500]}"
        )
    if fitted["scorer"] is not None:
        cut = (
            f"inputs scoring above {router.ood_threshold_:.4g} go to the teacher"
            if router.cuts_on_ood
            else "no OOD cut-off helped on these inputs"
        )
        print(
            f"OOD scorer ({fitted['scorer'].embedder_.name}, {fitted['n_train_texts']} training inputs): {cut}"
        )
        print(
            f"wrote {fitted['router_path']}, its OOD scorer {fitted['scorer_path']} and {fitted['report_path']}"
        )
    else:
        print(f"wrote {fitted['router_path']} and {fitted['report_path']}")
    return 0

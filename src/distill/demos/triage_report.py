"""The triage demo's outputs: a rich table, ``report.md``, ``accuracy_vs_budget.png`` and ``calibration.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill import report

NAMES = {
    "hard": "hard ({labelled} gold labels)",
    "sft": "sft (teacher's text)",
    "logits": "logits (top-k, T {T:g}, alpha {a:g})",
    "on-policy": "on-policy (GKD, alpha {a:g})",
}


def _size(size) -> str:
    layers, width, heads = size
    return f"{layers}x{width} ({heads} heads)"


def _name(kind: str, result: dict[str, Any]) -> str:
    s = result["students"][kind]
    return NAMES[kind].format(labelled=result["labelled"], T=s.get("temperature", 1), a=s.get("alpha", 0))


def _main_table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    headers = [
        "model",
        "params",
        "teacher answers",
        "accuracy",
        "expected acc.",
        "agreement",
        "ECE",
        "retained",
    ]
    t = result["teacher"]
    rows: list[list[Any]] = [
        ["teacher", t["params"], None, t["accuracy"], t["expected_accuracy"], 1.0, t["ece"], 1.0]
    ]
    for kind, s in result["students"].items():
        rows.append([_name(kind, result), s["params"], s["teacher_answers"], s["accuracy"], s["expected_accuracy"],
                     s["agreement"], s["ece"], s["retained"]])  # fmt: skip
    return headers, rows


def _curve_table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    budgets = list(next(iter(result["curve"].values())))
    headers = ["student", *[f"{b} answers" for b in budgets]]
    rows = [[k, *[result["curve"][k][b] for b in budgets]] for k in result["curve"]]
    return headers, rows


def _target_table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    headers = ["teacher answers", "best soft (on validation)", "accuracy", "gain over sft", "retained",
               "expected-acc. gain", "expected-acc. retained", "params ratio", "target met"]  # fmt: skip
    rows = [[t["budget"], t["best_soft"], t["accuracy"], t["gap_over_sft"], t["retained"], t["expected_gap_over_sft"],
             t["expected_retained"], t["param_ratio"], "yes" if t["met"] else "no"]
            for t in result["target"]["per_budget"]]  # fmt: skip
    return headers, rows


def verdict(result: dict[str, Any]) -> str:
    """One paragraph: was the issue's target met, and where."""
    met = [t for t in result["target"]["per_budget"] if t["met"]]
    best = max(result["target"]["per_budget"], key=lambda t: t["gap_over_sft"])
    if met:
        where = ", ".join(f"{t['budget']} ({t['best_soft']}: +{100 * t['gap_over_sft']:.1f} points over sft, "
                          f"{100 * t['retained']:.1f}% of the teacher)" for t in met)  # fmt: skip
        text = (f"Target met at teacher budget(s) {where}: the best soft-label student (chosen on validation) "
                "beats sft by >= 3 points of test accuracy (mean over seeds), keeps >= 95% of the teacher's "
                "accuracy, with >= 5x fewer parameters.")  # fmt: skip
        short = [t for t in met if t["expected_gap_over_sft"] < 0.03 or t["expected_retained"] < 0.95]
        if short:
            text += (
                " Measured by expected accuracy (against the known label distribution, no sampling noise) "
            )
            text += "the same check fails at " + ", ".join(
                f"{t['budget']} (+{100 * t['expected_gap_over_sft']:.1f} points, "
                f"{100 * t['expected_retained']:.1f}% of the teacher)" for t in short) + ": the margin is thin."  # fmt: skip
        return text
    return (f"Target NOT met: at no budget <= 1,000 does the best soft-label student (chosen on validation) beat sft "
            f"by >= 3 points while keeping >= 95% of the teacher. Largest gain: {100 * best['gap_over_sft']:+.1f} "
            f"points at {best['budget']} answers ({best['best_soft']}, {100 * (best['retained'] or 0):.1f}% of the "
            "teacher).")  # fmt: skip


def write_reports(out: Path, result: dict[str, Any], console) -> None:
    """Print the main table and the verdict; write report.md and the two plots."""
    headers, rows = _main_table(result)
    report.print_table(f"distill demo --task triage ({result['budget']} teacher answers, test tickets)", headers,
                       rows, console=console)  # fmt: skip
    report.print_table("test accuracy against teacher budget", *_curve_table(result), console=console)
    text = verdict(result)
    console.print(text)
    cfg, t = result["config"], result["teacher"]
    sweep = result["sweep"]
    sweep_rows = [[p["temperature"], p["alpha"], p["exact_match"], p["eval_ce"]] for p in sweep["points"]]
    temps = result["temperatures"]
    report.write_markdown(
        out / "report.md",
        "distill demo: support-ticket triage, soft labels against the teacher's text",
        [
            ("", f"Ticket triage (`distill.demos.triage_task`): 8 teams; a ticket mentioning two issues has a gold "
                 f"team sampled from a known distribution. Teacher Llama {_size(cfg['teacher_size'])} "
                 f"trained on {cfg['n_teacher_train']:,} gold tickets{' (cached)' if t['cached'] else ''}; students "
                 f"{_size(cfg['student_size'])}, {cfg['student_steps']} steps of {cfg['batch_size']} "
                 f"from one initialisation per seed; {len(result['seeds'])} seed(s); {cfg['n_val']} validation and "
                 f"{cfg['n_test']} test tickets. Accuracy: the answer's first line against the sampled gold team; "
                 "expected accuracy: the same against the known label distribution (no sampling noise). Bayes "
                 f"(always the most likely team): accuracy {result['reference']['bayes_accuracy']:.3f}, expected "
                 f"{result['reference']['bayes_expected_accuracy']:.3f}."),
            (f"Students at {result['budget']} teacher answers (test)", (headers, rows)),
            ("Test accuracy against teacher budget", _curve_table(result)),
            ("Target (best soft-label student chosen on validation)", _target_table(result)),
            ("", text),
            ("By kind of ticket (test)", (["model", "accuracy, one issue", "expected accuracy, two issues"],
                [["teacher", t["accuracy_one_issue"], t["expected_accuracy_two_issues"]]] + [
                 [k, st["accuracy_one_issue"], st["expected_accuracy_two_issues"]]
                 for k, st in result["students"].items()])),
            ("What the teacher's distribution carries", (["on mixed test tickets", "value"], [
                ["teacher's mean top-1 probability", t["mean_top1_prob_mixed"]],
                ["teacher's mean runner-up probability", t["mean_runner_up_prob_mixed"]],
                ["gold distribution's mean top-1 probability", t["gold_mean_top1_prob_mixed"]],
                ["total variation, teacher to gold distribution (all tickets)", t["total_variation_to_gold_distribution"]],
            ])),  # fmt: skip
            ("Temperature and alpha chosen on validation (logits, seed 0)",
             (["T", "alpha", "val accuracy", "val CE"], sweep_rows)),
            ("", f"Chosen: T = {sweep['chosen']['temperature']:g}, alpha = {sweep['chosen']['alpha']:g} "
                 f"({sweep['metric']}). The store's log-probabilities were captured at T = {temps['capture']:g} and "
                 f"rescaled to the distillation temperature T = {temps['distillation']:g} by `distill train` "
                 "(top-k ratios exact, renormalised over the top-k plus a tail bucket). on-policy: GKD at T = 1, "
                 f"lambda {cfg['lmbda']}, beta {cfg['beta']}, the chosen alpha on its off-policy steps; its teacher "
                 "scores every student answer during training (the budget counts the tickets, not those scorings)."),
        ],
    )  # fmt: skip
    _plots(out, result)


def _plots(out: Path, result: dict[str, Any]) -> None:
    fig, (ax,) = report.figure(1, width=5.6, height=4.0)
    budgets = [int(b) for b in next(iter(result["curve"].values()))]
    for kind, color in (("sft", "tab:gray"), ("logits", "tab:blue"), ("on-policy", "tab:green")):
        c = result["curve"][kind]
        ax.errorbar(budgets, [100 * c[str(b)]["mean"] for b in budgets], yerr=[100 * c[str(b)]["std"] for b in budgets],
                    marker="o", capsize=3, label=kind, color=color)  # fmt: skip
    ax.axhline(100 * result["teacher"]["accuracy"], color="black", linestyle="--", label="teacher")
    hard = result["students"]["hard"]["accuracy"]["mean"]
    ax.axhline(100 * hard, color="tab:red", linestyle=":", label=f"hard ({result['labelled']} gold)")
    ax.set_xscale("log")
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("teacher answers (transfer tickets)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("triage: accuracy against teacher budget")
    ax.legend(fontsize=8)
    report.save_figure(fig, out / "accuracy_vs_budget.png")
    fig, (ax,) = report.figure(1, width=5.6, height=3.6)
    names = ["teacher", *result["students"]]
    eces = [result["teacher"]["ece"], *[s["ece"]["mean"] for s in result["students"].values()]]
    errs = [0.0, *[s["ece"]["std"] for s in result["students"].values()]]
    ax.bar(range(len(names)), eces, yerr=errs, capsize=3, color="tab:orange")
    ax.set_xticks(range(len(names)), names)
    ax.set_title(f"calibration error (ECE) at {result['budget']} teacher answers")
    report.save_figure(fig, out / "calibration.png")

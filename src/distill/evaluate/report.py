"""Writing `distill eval` results: ``report.json``, a self-contained ``report.html`` with embedded PNG
plots (quality vs cost, latency distributions, per-slice quality), and a rich summary table."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from distill import report as rep

SUMMARY_ROWS = [
    ("quality", "quality ({metric})"),
    ("accuracy", "accuracy"),
    ("macro_f1", "macro-F1"),
    ("exact_match", "exact match"),
    ("token_f1", "token-F1"),
    ("agreement", "agreement with teacher"),
    ("kl_to_teacher", "KL(teacher || model), nats"),
    ("calibration_error", "calibration error (ECE)"),
    ("params", "parameters"),
    ("weights_mb", "weights, MB"),
    ("peak_memory_mb", "peak memory over runtime baseline, MB"),
    ("memory_peak_rss_mb", "peak RSS running this model alone, MB"),
    ("latency_p50", "latency p50, ms"),
    ("latency_p95", "latency p95, ms"),
    ("latency_p99", "latency p99, ms"),
    ("throughput_per_s", "throughput, requests/s"),
    ("cost_per_1m_requests", "cost per 1M requests, $"),
]


def summary_table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """``(headers, rows)``: one row per metric, columns student / teacher."""
    rows = []
    for key, label in SUMMARY_ROWS:
        vals = []
        for who in ("student", "teacher"):
            m = result[who]
            if key.startswith("latency_"):
                vals.append(m["latency_ms"][key.split("_")[1]] if m["latency_ms"] else None)
            elif key.startswith("memory_"):
                vals.append((m.get("memory") or {}).get(key.removeprefix("memory_"), "n/a"))
            else:
                vals.append(m.get(key, "n/a"))
        if vals == ["n/a", "n/a"]:
            continue
        rows.append([label.format(metric=result["metric"]), *[None if v == "n/a" else v for v in vals]])
    return ["metric", "student", "teacher"], rows


def headline(result: dict[str, Any]) -> list[list[Any]]:
    return [
        ["inputs", result["n_inputs"]],
        ["evaluated", result["n_evaluated"]],
        ["excluded", result["excluded"]["total"]],
        ["quality reference", result["reference"]],
        ["quality_retained", result["quality_retained"]],
        ["speedup (p50)", result["speedup"]],
        ["cost_ratio", result["cost_ratio"]],
        ["eval process peak RSS (both models), MB", result.get("process_peak_rss_mb")],
    ]


def print_summary(result: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console

    console = console or Console()
    headers, rows = summary_table(result)
    rep.print_table("Student vs teacher", headers, rows, console)
    rep.print_table("Summary", ["", "value"], headline(result), console)
    if result["slices"]:
        rep.print_table(f"Per slice ({result['slice_by']})", *slice_table(result), console)
    for p in result["problems"]:
        console.print(f"[yellow]note[/]: {p}")
    for reason, e in result["excluded"]["by_reason"].items():
        console.print(f"[yellow]excluded[/] {e['count']} × {reason}; e.g. {e['examples'][0]}")


def slice_table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    rows = [
        [
            s["slice"],
            s["n"],
            s["student_quality"],
            s["teacher_quality"],
            s["agreement"],
            s["quality_retained"],
        ]
        for s in result["slices"]
    ]
    return ["slice", "n", "student", "teacher", "agreement", "retained"], rows


def _plots(result: dict[str, Any], out: Path) -> dict[str, Path]:
    paths = {}
    s, t = result["student"], result["teacher"]
    fig, (ax,) = rep.figure(1)
    costs = [s["cost_per_1m_requests"], t["cost_per_1m_requests"]]
    use_cost = all(c is not None for c in costs)
    xs = costs if use_cost else [(m["latency_ms"] or {}).get("p50", float("nan")) for m in (s, t)]
    for x, q, name, colour in zip(
        xs, [s["quality"], t["quality"]], ["student", "teacher"], ["tab:blue", "tab:red"]
    ):
        ax.scatter([x], [q], s=80, color=colour, label=name)
    ax.set_xlabel("cost per 1M requests ($)" if use_cost else "latency p50 (ms)")
    ax.set_ylabel(f"quality ({result['metric']})")
    ax.set_title("Quality vs cost" if use_cost else "Quality vs latency (no prices given)")
    ax.legend()
    paths["quality_vs_cost"] = rep.save_figure(fig, out / "plots" / "quality_vs_cost.png")

    fig, (ax,) = rep.figure(1)
    lat = [[r[f"{who}_latency_ms"] for r in result["per_input"]] for who in ("student", "teacher")]
    lat = [[v for v in vs if v == v] or [float("nan")] for vs in lat]  # store answers have no latency (NaN)
    ax.boxplot(lat, showfliers=True)
    ax.set_xticks([1, 2], ["student", "teacher"])
    ax.set_yscale("log")
    ax.set_ylabel("latency per request (ms, log scale)")
    ax.set_title("Latency distributions")
    paths["latency"] = rep.save_figure(fig, out / "plots" / "latency.png")

    fig, (ax,) = rep.figure(1, width=max(5.0, 0.9 * len(result["slices"]) + 2))
    names = [str(x["slice"]) for x in result["slices"]]
    idx = range(len(names))
    ax.bar([i - 0.2 for i in idx], [x["student_quality"] for x in result["slices"]], 0.4, label="student")
    ax.bar([i + 0.2 for i in idx], [x["teacher_quality"] for x in result["slices"]], 0.4, label="teacher")
    ax.set_xticks(list(idx), names, rotation=30, ha="right")
    ax.set_ylabel(f"quality ({result['metric']})")
    ax.set_title(f"Per-slice quality ({result['slice_by']})")
    ax.legend()
    paths["slices"] = rep.save_figure(fig, out / "plots" / "slices.png")
    return paths


def _html_table(headers, rows) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(rep.fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_reports(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``report.json``, ``report.html`` (plots embedded as base64 PNG) and ``plots/*.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(result, out)
    images = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"></figure>'
        for name, p in plots.items()
    )
    excluded = [
        [reason, e["count"], str(e["examples"][:2])] for reason, e in result["excluded"]["by_reason"].items()
    ]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>distill eval</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
img{{max-width:100%}}figure{{display:inline-block;margin:0.5em}}</style></head><body>
<h1>distill eval: {html.escape(str(result["student"]["name"]))} vs {html.escape(str(result["teacher"]["name"]))}</h1>
<h2>Summary</h2>{_html_table(["", "value"], headline(result))}
<h2>Student vs teacher</h2>{_html_table(*summary_table(result))}
<h2>Per slice ({html.escape(result["slice_by"])})</h2>{_html_table(*slice_table(result))}
<h2>Excluded inputs ({result["excluded"]["total"]} of {result["n_inputs"]})</h2>
{_html_table(["reason", "count", "examples"], excluded) if excluded else "<p>none</p>"}
<h2>Notes</h2><ul>{"".join(f"<li>{html.escape(p)}</li>" for p in result["problems"]) or "<li>none</li>"}</ul>
<h2>Plots</h2>{images}</body></html>
"""
    html_path = out / "report.html"
    html_path.write_text(page, encoding="utf-8")
    json_path = rep.write_json(out / "report.json", result)
    return {"json": json_path, "html": html_path, **plots}

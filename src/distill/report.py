"""Writing a command's results: ``report.json``, ``report.md`` (markdown tables), a rich table, PNG plots.

Every command that measures something (``distill demo``, ``distill eval``, benchmarks) reports the
same way, so the helpers are generic:

- ``write_json(path, obj)``: JSON with numpy / torch scalars and paths converted, NaN/inf as ``null``;
- ``markdown_table(headers, rows)`` and ``write_markdown(path, title, sections)``;
- ``print_table(title, headers, rows)``: the same table on the terminal with rich;
- ``figure(ncols)`` and ``save_figure(fig, path)``: matplotlib on the Agg backend (no display needed);
- ``fmt(value)`` / ``mean_std(values)``: one number format for all three outputs.

A table is ``headers: list[str]`` and ``rows: list[list[Any]]``; cells are formatted with ``fmt``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Table = tuple[Sequence[str], Sequence[Sequence[Any]]]


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "std", "n"}`` of a list of numbers (sample std; 0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std of an empty list")
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
    }


def fmt(value: Any, digits: int = 3) -> str:
    """A cell: ints as is, floats with ``digits`` significant places, ``{"mean","std"}`` as ``m ± s``."""
    if value is None:
        return "–"
    if isinstance(value, dict) and "mean" in value:
        m, sd = float(value["mean"]), float(value.get("std", 0.0))
        if abs(m) < 10 and (m == 0 or abs(m) >= 1e-3):  # the spread in the mean's decimals: 0.931 ± 0.002
            return f"{m:.{digits}f} ± {sd:.{digits}f}"
        return f"{fmt(m, digits)} ± {fmt(sd, digits)}"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 1e3:
            return f"{value:,.0f}"
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.{digits}g}"
        return f"{value:.{max(digits, 1)}f}" if abs(value) < 10 else f"{value:,.{max(digits - 2, 0)}f}"
    return str(value)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and not isinstance(obj, str | bytes):  # numpy arrays/scalars, torch tensors
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN/inf; null says "not measurable" without breaking strict parsers
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (parents created); numpy/torch values become plain numbers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; numeric-looking columns are right-aligned."""
    cells = [[fmt(c) for c in row] for row in rows]
    numeric = [
        all(isinstance(row[i], int | float | dict) or row[i] is None for row in rows) and bool(rows)
        for i in range(len(headers))
    ]
    head = [str(h).replace("|", "\\|") for h in headers]  # a "|" inside a cell would split it
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    return "\n".join(lines)


def write_markdown(path: str | Path, title: str, sections: Sequence[tuple[str, str | Table]]) -> Path:
    """Write ``# title`` then, per section, ``## heading`` and either text or a ``(headers, rows)`` table."""
    parts = [f"# {title}", ""]
    for heading, body in sections:
        if heading:
            parts += [f"## {heading}", ""]
        parts += [body if isinstance(body, str) else markdown_table(*body), ""]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def print_table(
    title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], console: Any = None
) -> None:
    """Print a rich table to ``console`` (a ``rich.console.Console``; a new one on stdout if ``None``)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table as RichTable

    # No vertical borders: a results table should fit an 80-column terminal.
    table = RichTable(title=title, box=box.SIMPLE_HEAD)
    cells = [[fmt(c) for c in row] for row in rows]
    for i, h in enumerate(headers):
        numeric = bool(rows) and all(isinstance(r[i], int | float | dict) or r[i] is None for r in rows)
        if i == 0:  # the row names: never squeezed away when the table is wider than the terminal
            longest = max([len(h), *(len(c[0]) for c in cells)])
            table.add_column(h, no_wrap=True, min_width=min(longest, 28), overflow="fold")
        else:
            table.add_column(h, justify="right" if numeric else "left", no_wrap=numeric)
    for row in cells:
        table.add_row(*row)
    console = console or Console()
    natural = console.measure(table, options=console.options.update_width(1000)).maximum
    if console.is_terminal or natural <= console.width:
        console.print(table)
        return
    # Piped into a file or a log, no terminal limits the width: print the table whole, not squeezed.
    width = console.width
    console.width = natural
    try:
        console.print(table)
    finally:
        console.width = width


def figure(ncols: int = 1, *, width: float = 5.0, height: float = 4.0):
    """A ``(fig, axes)`` pair on the Agg backend: ``axes`` is a list of ``ncols`` axes."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only: works without a display, in CI and over SSH
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig: Any, path: str | Path, *, dpi: int = 120) -> Path:
    """Save ``fig`` as PNG (parents created) and close it so figures do not pile up in memory."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path

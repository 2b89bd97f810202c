"""distill.report: number formatting, markdown tables, JSON without NaN, rich tables, PNG output."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from distill import report


def test_mean_std():
    assert report.mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    assert report.mean_std([5]) == {"mean": 5.0, "std": 0.0, "n": 1}
    with pytest.raises(ValueError, match="empty"):
        report.mean_std([])


@pytest.mark.parametrize(
    "value, text",
    [
        (None, "–"),
        (1531210, "1,531,210"),
        (0.97412, "0.974"),
        (12.345, "12.3"),
        (2988361.4, "2,988,361"),
        (0.0001234, "0.000123"),
        ({"mean": 0.9321, "std": 0.0049}, "0.932 ± 0.005"),
        (True, "True"),
        ("KD", "KD"),
    ],
)
def test_fmt(value, text):
    assert report.fmt(value) == text


def test_markdown_table_aligns_numbers_and_escapes_pipes():
    md = report.markdown_table(["model", "KL(T||S)"], [["a|b", 0.5], ["c", None]])
    lines = md.splitlines()
    assert lines[0] == "| model | KL(T\\|\\|S) |"
    assert lines[1] == "|---|---:|"
    assert lines[2] == "| a\\|b | 0.500 |"
    assert all(line.count("|") - line.count("\\|") == 3 for line in lines)


def test_write_json_converts_numpy_and_nan(tmp_path):
    path = report.write_json(
        tmp_path / "sub" / "r.json", {"a": np.float32(0.5), "b": np.arange(3), "c": math.nan}
    )
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [0, 1, 2], "c": None}


def test_write_markdown_and_print_table(tmp_path, capsys):
    path = report.write_markdown(
        tmp_path / "r.md", "Title", [("Results", (["x", "y"], [[1, 2.5]])), ("", "text")]
    )
    assert path.read_text().startswith("# Title\n\n## Results\n\n| x | y |")
    from rich.console import Console

    report.print_table("T", ["x", "y"], [[1, {"mean": 0.5, "std": 0.1}]], console=Console(width=80))
    out = capsys.readouterr().out
    assert "0.500 ± 0.100" in out


def test_save_figure_writes_png(tmp_path):
    fig, (ax,) = report.figure(1)
    ax.plot([0, 1], [1, 0])
    path = report.save_figure(fig, tmp_path / "p" / "plot.png")
    assert path.read_bytes()[:4] == b"\x89PNG"

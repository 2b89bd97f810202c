"""Prices for cost estimates (`distill eval`, `distill route`, `distill scout`), read from a TOML file.

# USD per 1,000,000 tokens for the teacher used by `distill eval` / `distill route`
[teacher]
input_per_1m = 2.50
output_per_1m = 10.00

# the hardware the student runs on; eval divides by the measured throughput
[student]
hourly_usd = 1.20
requests_per_second = 40     # used only where nothing is measured (scout)

# per-model token prices for the models named in request logs (scout)
[models."gpt-4o"]
input_per_1m = 2.50
output_per_1m = 10.00
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from distill.data import read_document


@dataclass(frozen=True)
class TokenPrice:
    """USD per 1,000,000 input and output tokens; both >= 0."""

    input_per_1m: float
    output_per_1m: float

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """USD for one request of that many tokens."""
        return (input_tokens * self.input_per_1m + output_tokens * self.output_per_1m) / 1e6


@dataclass(frozen=True)
class Prices:
    """Parsed prices file; every section optional, checked when a cost needs it."""

    teacher: TokenPrice | None = None
    """Token prices of the teacher in eval/route; ``None`` when the file has no ``[teacher]``."""
    teacher_hourly_usd: float | None = None
    """USD per hour of the teacher's hardware, for a self-hosted teacher without token prices."""
    student_hourly_usd: float | None = None
    """USD per hour of the student's hardware."""
    student_requests_per_second: float | None = None
    """Assumed student throughput where none is measured (scout)."""
    models: dict[str, TokenPrice] = field(default_factory=dict)
    """Token prices by model name as it appears in request logs."""
    source: str = "<prices>"
    """Where the prices came from, for error messages."""

    def request_cost(self, model: str, input_tokens: int, output_tokens: int) -> float | None:
        """USD for one logged request, or ``None`` when ``model`` has no price (the caller counts it)."""
        price = self.models.get(model)
        return None if price is None else price.cost(input_tokens, output_tokens)

    def student_cost_per_request(self, requests_per_second: float | None = None) -> float:
        """USD per student request: hourly price / (3600 x throughput). Measured throughput wins."""
        if self.student_hourly_usd is None:
            raise ValueError(f"{self.source}: no [student] hourly_usd, needed for the student's cost")
        rps = requests_per_second if requests_per_second is not None else self.student_requests_per_second
        if rps is None or not rps > 0:
            raise ValueError(
                f"{self.source}: no student throughput (measured or [student] requests_per_second)"
            )
        return self.student_hourly_usd / 3600.0 / rps


def _number(table: dict, key: str, where: str, required: bool = True) -> float | None:
    if key not in table:
        if required:
            raise ValueError(f"{where}: missing {key!r}")
        return None
    v = table[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{where}: {key} must be a number >= 0, got {v!r}")
    return float(v)


def _token_price(table: object, where: str) -> TokenPrice:
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a table with input_per_1m and output_per_1m")
    return TokenPrice(_number(table, "input_per_1m", where), _number(table, "output_per_1m", where))


def load_prices(path: str | Path) -> Prices:
    """Parse a prices TOML file; errors name the file and the table."""
    path = Path(path)
    data = read_document(path, "prices file", toml=True)
    unknown = set(data) - {"teacher", "student", "models"}
    if unknown:
        raise ValueError(f"{path}: unknown tables {sorted(unknown)}; expected teacher, student, models")
    teacher_table = data.get("teacher", {})
    teacher = None
    if "input_per_1m" in teacher_table or "output_per_1m" in teacher_table:
        teacher = _token_price(teacher_table, f"{path} [teacher]")
    student = data.get("student", {})
    models = {
        name: _token_price(t, f'{path} [models."{name}"]') for name, t in data.get("models", {}).items()
    }
    return Prices(
        teacher=teacher,
        teacher_hourly_usd=_number(teacher_table, "hourly_usd", f"{path} [teacher]", required=False),
        student_hourly_usd=_number(student, "hourly_usd", f"{path} [student]", required=False),
        student_requests_per_second=_number(
            student, "requests_per_second", f"{path} [student]", required=False
        ),
        models=models,
        source=str(path),
    )

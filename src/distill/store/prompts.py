"""Reading and checking the prompts file of `distill generate` (every row checked before any request)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill.data import read_table


def load_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Rows ``{"id": str | None, "prompt": str | None, "messages": tuple | None}`` from a JSONL/JSON
    (``{"id"?, "prompt"}`` or ``{"id"?, "messages"}``), CSV or Parquet (a ``prompt`` column) file.

    Every row is checked before any request; errors name the file and the row (1-based)."""
    rows = read_table(path)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    out, seen = [], {}
    for n, row in enumerate(rows, 1):
        where = f"{path}: row {n}"
        prompt, messages, rid = row.get("prompt"), row.get("messages"), row.get("id")
        if isinstance(messages, str) and messages.strip().startswith("["):  # CSV/Parquet: JSON text
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError:
                raise ValueError(f"{where}: 'messages' is not valid JSON") from None
        if (prompt is None) == (messages is None):
            raise ValueError(f"{where}: give exactly one of 'prompt' and 'messages' (keys: {sorted(row)})")
        if prompt is not None and (not isinstance(prompt, str) or not prompt):
            raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r:.60}")
        if messages is not None:
            if not isinstance(messages, list | tuple) or not messages:
                raise ValueError(f"{where}: 'messages' must be a non-empty list, got {messages!r:.60}")
            for m in messages:
                if not (
                    isinstance(m, dict)
                    and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)
                ):
                    raise ValueError(
                        f"{where}: each message needs string 'role' and 'content', got {m!r:.60}"
                    )
            messages = tuple({"role": m["role"], "content": m["content"]} for m in messages)
        if rid is not None:
            if isinstance(rid, bool) or not isinstance(rid, str | int) or str(rid) == "":
                raise ValueError(f"{where}: 'id' must be a non-empty string or integer, got {rid!r}")
            rid = str(rid)
            if rid in seen:
                raise ValueError(f"{where}: id {rid!r} repeats row {seen[rid]}; ids must be unique")
            seen[rid] = n
        out.append({"id": rid, "prompt": prompt, "messages": messages})
    return out

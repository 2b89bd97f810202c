"""Pieces the language-model demos share: data files, a cached teacher, parameter counts, student jobs.

Both LM demos (`distill.demos.lm`, `distill.demos.triage`) train a tiny teacher once (cached under
the output directory, keyed by every setting that shapes it), let it answer a transfer set through
`distill.store.generate`, and then train several students from one initialisation. The students
are independent, so they train side by side in worker processes (`distill.train.parallel`), each
job training one student and scoring it with the demo's own function.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` as JSONL (parents created); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def model_params(model_dir: Path) -> int:
    """Parameters in ``model_dir/model.safetensors`` (read from the header, no weights loaded)."""
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        total = 0
        for k in f.keys():
            n = 1
            for d in f.get_slice(k).get_shape():
                n *= int(d)
            total += n
    return total


def stop_if_terminated(res) -> None:
    """Raise KeyboardInterrupt when a `TrainResult` says SIGTERM stopped it: the demo must stop too.

    (`distill.train.train` turns SIGTERM into a checkpoint and a normal return.)"""
    if res.stopped == "sigterm":
        raise KeyboardInterrupt(f"SIGTERM: stopped after step {res.steps} of {res.out}")


def load_or_train_tokenizer(tok_dir: Path, texts: Sequence[str], vocab_size: int):
    """The tokenizer saved in ``tok_dir``, or a byte-level BPE trained on ``texts`` and saved there."""
    if (tok_dir / "tokenizer.json").is_file():
        from distill.models.loading import load_tokenizer

        return load_tokenizer(tok_dir, "tokenizer")
    from distill.models.tiny import train_tokenizer

    tok = train_tokenizer(texts, vocab_size=vocab_size)
    tok.save_pretrained(tok_dir)
    return tok


def cached_teacher(
    out: Path,
    key: dict[str, Any],
    tok,
    rows: list[dict[str, Any]],
    *,
    size: tuple[int, int, int],
    seed: int,
    console: Any,
    **train_settings: Any,
) -> tuple[Path, bool]:
    """Train the teacher (``sft`` on ``rows``) into ``out/teacher``, or reuse it; returns (directory, reused).

    ``key``: every setting that shapes the teacher; the cached one is reused only when its key is equal.
    ``size``: (layers, width, heads); ``train_settings``: `TrainConfig` fields (steps, batch, lr, ...)."""
    from distill.models.tiny import save_tiny, tiny_causal_lm
    from distill.train import train
    from distill.train.config import TrainConfig

    tdir = out / "teacher"
    key = json.loads(json.dumps(key))
    meta = tdir / "demo_teacher.json"
    if (tdir / "model.safetensors").is_file() and meta.is_file() and json.loads(meta.read_text()) == key:
        return tdir, True
    layers, width, heads = size
    init = save_tiny(tiny_causal_lm(len(tok), n_layer=layers, n_embd=width, n_head=heads, seed=seed),
                     tok, out / "init" / "teacher")  # fmt: skip
    data = write_rows(out / "data" / "teacher_train.jsonl", rows)
    cfg = TrainConfig(
        student=str(init), data=str(data), out=str(tdir), mode="sft", seed=seed, **train_settings
    )
    stop_if_terminated(train(cfg, console=console))
    meta.write_text(json.dumps(key))
    return tdir, False


def run_jobs(
    fn: Callable[[dict[str, Any]], dict[str, Any]],
    jobs: Sequence[dict[str, Any]],
    *,
    pool: Any,
    console: Any,
    progress: bool,
    what: str = "students",
) -> list[dict[str, Any]]:
    """``[fn(job) for job in jobs]`` on ``pool`` (a `distill.train.parallel.WorkerPool`), with one progress bar.

    Each job is a plain dict (it crosses a process boundary); its ``"name"`` is shown as it finishes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    results: list[dict[str, Any] | None] = [None] * len(jobs)
    columns = (TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[last]}"))  # fmt: skip
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task(what, total=len(jobs), last="")
        for i, res in pool.map(fn, list(jobs)):
            results[i] = res
            bar.update(task, advance=1, last=str(jobs[i].get("name", "")))
    return [r for r in results if r is not None]

"""`generate`: send prompts to a teacher and keep its answers in a store, resumably.

The loop, in order: read and validate every prompt (before any request); derive each prompt's key
(a content hash of the store's setup and the prompt, `distill.store.record_key`); open the store
(which repairs what a killed run left and knows the keys already done); send only the rest, with
bounded concurrency (HTTP teachers) or in batches (local teachers); commit answers as shards every
``flush_every`` records or ``flush_seconds``; log failures to ``failures.jsonl`` (the next run
retries them). Store writes (shard commits and failure lines, each fsynced) run in order on one
background thread, at most one shard commit behind the request loop, so a commit does not hold
back the next requests; an error there stops the run at the next commit or at the end. A prompt therefore ends in the store or in the failures, never in both, and a
re-run after ``kill -9`` finishes the rest: nothing is lost (uncommitted answers are asked again)
and nothing is duplicated (a committed key is never asked again).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distill import store
from distill.models.base import GenerationSettings, Request, Teacher
from distill.store import writer as store_writer
from distill.store.prompts import load_prompts

__all__ = ["GenerateResult", "Prompt", "check_top_k", "generate", "load_prompts", "store_config"]


@dataclass(frozen=True)
class Prompt:
    """One validated prompt: ``user_id`` as given (None when the file has no id), text or messages."""

    key: str
    user_id: str | None
    prompt: str | None
    messages: tuple[dict[str, str], ...] | None

    @property
    def record_id(self) -> str:
        """The record's ``id``: the user's id, or the content-hash key when none was given."""
        return self.user_id if self.user_id is not None else self.key


@dataclass
class GenerateResult:
    """What a `generate` run did. Token counts are those the teacher reported (or counted)."""

    total: int
    """Distinct prompts in the file (identical prompts without ids count once)."""
    done_before: int
    """Prompts already in the store when the run started (no request made for them)."""
    answered: int = 0
    """Prompts answered and committed by this run."""
    failed: int = 0
    """Prompts that failed in this run (logged to failures.jsonl, retried by the next run)."""
    left: int = 0
    """Prompts not attempted (the budget stopped the run)."""
    without_topk: int = 0
    """Answers without top-k data although k > 0 (the endpoint gave none; kept only with
    ``allow_text_only``)."""
    text_only: Any = field(default=None, repr=False)
    """The first such answer: ``(record id, Completion)``."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float | None = None
    """USD, when prices were given."""
    stopped_by_budget: bool = False
    seconds: float = 0.0
    repaired: list[str] = field(default_factory=list)
    """What opening the store repaired (temporary files, torn shards)."""

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def store_config(teacher: Teacher | Sequence[Teacher], settings: GenerationSettings) -> dict[str, Any]:
    """The store's setup: what every key hashes. Replicas must share their identity. No URL is in it:
    the identity follows the model, so replicas and a moved host reuse the records (the URLs are in
    the manifest's ``endpoints``, for information)."""
    teachers = _as_list(teacher)
    idents = [{k: v for k, v in t.identity().items() if k != "endpoints"} for t in teachers]
    if any(store.canonical(c) != store.canonical(idents[0]) for c in idents):
        raise ValueError(f"teachers given together must serve the same model; identities differ: {idents!r}")
    ident = dict(idents[0])
    return {
        "teacher": ident,
        # A local model's identity carries its weights' fingerprint (`distill.models.identity`); kept
        # as its own field so a store's manifest shows at a glance which weights answered.
        "weights": ident.get("weights_fingerprint"),
        "tokenizer": ident.get("tokenizer"),
        "settings": asdict(settings),
        "k": int(settings.top_logprobs),
        "capture_temperature": float(ident.get("capture_temperature", 1.0)),
    }


def check_top_k(teachers: Sequence[Teacher], settings: GenerationSettings) -> None:
    """``settings.top_logprobs`` within what each teacher can return (its ``max_top_logprobs``, when it
    has one: a local model's vocabulary, a server's limit), before any request and before a store is
    made: a store is locked to its k, so a k no request can meet would leave a store nothing can fill."""
    k = int(settings.top_logprobs)
    for t in teachers:
        limit = getattr(t, "max_top_logprobs", None)
        if limit is not None and k > int(limit):
            raise ValueError(
                f"top_logprobs (--top-k) {k} exceeds the {int(limit)} log-probabilities per token that "
                f"teacher {t!r} can return; nothing was sent and no store was made"
            )


def _as_list(teacher) -> list:
    teachers = list(teacher) if isinstance(teacher, list | tuple) else [teacher]
    if not teachers:
        raise ValueError("no teacher given")
    return teachers


def generate(
    teacher: Teacher | Sequence[Teacher],
    prompts_path: str | Path,
    out: str | Path,
    *,
    settings: GenerationSettings,
    concurrency: int = 8,
    budget_tokens: int | None = None,
    price: Any = None,
    flush_every: int = 64,
    flush_seconds: float = 2.0,
    progress: bool = True,
    console: Any = None,
    allow_text_only: bool = False,
) -> GenerateResult:
    """Answer every prompt of ``prompts_path`` not yet in store ``out``; see the module docstring.

    ``teacher``: one teacher or several replicas of one model (used round-robin). A teacher with
    ``remote = True`` (`APITeacher`) gets up to ``concurrency`` requests at once (in total, over all
    replicas); others get batches
    of their ``batch_size`` one at a time. ``budget_tokens``: stop sending before the tokens spent by
    this run (prompt + completion, the in-flight requests counted at their upper bound) would pass
    it. ``price``: a `distill.prices.TokenPrice` for the cost column. ``flush_every``/``flush_seconds``:
    commit a shard after that many answers or seconds (what a ``kill -9`` can cost in re-asking).
    ``allow_text_only``: with k > 0, keep answers that came without top-k as text-only records;
    otherwise (the default) the first such answer stops the run with a ``ValueError`` naming the
    endpoint and what it lacked (nothing of that answer is stored; earlier records stay).

    Before the first prompt is sent, each HTTP teacher's `prepare` checks the server (an endpoint that
    is not OpenAI-compatible, a k above its limit, a ``--teacher-tokenizer`` it disagrees with: one
    ``ValueError``, and a store this run would have created is removed again) and what the server
    reports (its weights fingerprint, its tokenizer) must match what the store recorded before.
    """
    teachers = _as_list(teacher)
    if int(concurrency) < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency!r}")
    if budget_tokens is not None and int(budget_tokens) < 1:
        raise ValueError(f"budget_tokens must be >= 1, got {budget_tokens!r}")
    if int(flush_every) < 1 or not flush_seconds > 0:
        raise ValueError(
            f"flush_every must be >= 1 and flush_seconds > 0, got {flush_every!r}, {flush_seconds!r}"
        )
    check_top_k(teachers, settings)
    rows = load_prompts(prompts_path)
    config = store_config(teachers, settings)
    chash = store.config_hash(config)
    prompts: dict[str, Prompt] = {}
    for r in rows:
        p = Prompt(
            store.record_key(chash, r["prompt"], r["messages"], r["id"]), r["id"], r["prompt"], r["messages"]
        )
        prompts.setdefault(p.key, p)  # identical prompts without ids: one request, one record
    t0 = time.monotonic()
    existed, created = Path(out).exists(), not (Path(out) / store.MANIFEST).exists()
    with store_writer.StoreWriter(out, config) as writer:
        for p in prompts.values():
            old = writer.ids.get(p.record_id)
            if old is not None and old != p.key:
                raise ValueError(
                    f"{prompts_path}: prompt id {p.record_id!r} was answered before in {out} for another "
                    "prompt text; give the changed prompt a new id or use a new --out (no stale records)"
                )
        todo = [p for p in prompts.values() if p.key not in writer.done]
        result = GenerateResult(
            total=len(prompts), done_before=len(prompts) - len(todo), repaired=writer.repaired
        )
        if todo:
            try:
                _prepare(teachers, settings, writer)
            except ValueError:
                writer.close()
                if created:  # refused before any prompt was sent: leave no empty store behind
                    _remove_new_store(Path(out), existed)
                raise
            strict = bool(settings.top_logprobs) and not allow_text_only
            _run(
                teachers,
                todo,
                writer,
                settings,
                int(concurrency),
                budget_tokens,
                price,
                result,
                flush_every,
                flush_seconds,
                progress,
                console,
                strict,
            )
    result.seconds = time.monotonic() - t0
    return result


def _remove_new_store(path: Path, existed: bool) -> None:
    for name in (store.MANIFEST, store.FAILURES, ".lock"):
        (path / name).unlink(missing_ok=True)
    if not existed and not any(path.iterdir()):
        path.rmdir()


def _prepare(teachers, settings: GenerationSettings, writer) -> None:
    """The HTTP teachers' checks (`APITeacher.prepare`) before the first prompt; what the server reports
    is recorded in the manifest (``server``, ``endpoints``) and must match what it reported before."""
    old = writer.manifest.get("server") or {}
    reports = [t.prepare(settings, old) for t in teachers if hasattr(t, "prepare")]
    if not reports:
        return
    new = reports[0]
    for r in reports[1:]:
        if store.canonical(r) != store.canonical(new):
            raise ValueError(f"teachers given together report different models: {new!r} vs {r!r}")
    checks = [("fingerprint", old.get("fingerprint"), new.get("fingerprint"))]
    for h in ("vocab_hash", "probe_hash"):
        checks.append(
            (f"tokenizer {h}", (old.get("tokenizer") or {}).get(h), (new.get("tokenizer") or {}).get(h))
        )
    for what, was, now in checks:
        if was and now and was != now:
            raise ValueError(
                f"store {writer.path} holds answers of a server that reported {what} {str(was)[:16]}; "
                f"{' '.join(getattr(teachers[0], 'urls', []))} now reports {str(now)[:16]} (other weights "
                "or tokenizer under the same name): use a new --out (or --teacher-revision to mark them)"
            )
    writer.manifest["server"] = new
    writer.manifest["endpoints"] = sorted({u for t in teachers for u in getattr(t, "urls", [])})
    if not writer.manifest.get("tokenizer") and new.get("tokenizer"):
        writer.manifest["tokenizer"] = new["tokenizer"]


class TextOnlyError(ValueError):
    """Top-k was asked (k > 0) and the endpoint answered without it: no silent downgrade to text."""


def _lacked(teacher, first: tuple[str, Any], k: int) -> str:
    rid, c = first
    where = " ".join(getattr(teacher, "urls", [])) or repr(teacher)
    if c.completion_token_ids is None and c.completion_token_bytes is None:
        what = "no per-token log-probabilities at all (no logprobs in the answer)"
    else:
        what = f"per-token log-probabilities but no top-{k} alternatives"
    return (
        f"--top-k {k} was asked, but teacher {where} answered prompt {rid!r} with text only: {what}. "
        "Stopped after the first answers (the text-only ones were not stored; the records committed "
        "before are intact). Use an endpoint that returns top-k log-probabilities (vLLM, distill serve, "
        "an OpenAI-compatible API with logprobs), or pass --allow-text-only to keep text-only records"
    )


class _Budget:
    """Tokens spent plus tokens reserved by requests in flight (each at its upper bound)."""

    def __init__(self, limit: int | None, max_new: int) -> None:
        self.limit, self.max_new = limit, max_new
        self.spent = self.reserved = 0
        self.chars = self.prompt_tokens = 0  # observed prompt size, to bound the next prompts

    def estimate(self, prompts: list[Prompt], teacher) -> int:
        total = 0
        for p in prompts:
            if hasattr(teacher, "encode"):  # a local teacher counts exactly
                n = len(teacher.encode(Request(p.record_id, p.prompt, p.messages)))
            else:
                chars = len(p.prompt or store.canonical(list(p.messages or ())))
                ratio = self.prompt_tokens / self.chars if self.chars else 1.0
                n = math.ceil(chars * min(1.0, ratio * 1.5)) + 16
            total += n + self.max_new
        return total

    def allows(self, cost: int) -> bool:
        return self.limit is None or self.spent + self.reserved + cost <= self.limit


def _run(
    teachers,
    todo,
    writer,
    settings,
    concurrency,
    budget_tokens,
    price,
    result,
    flush_every,
    flush_seconds,
    progress,
    console,
    strict=False,
) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    remote = bool(getattr(teachers[0], "remote", False))
    workers = concurrency if remote else 1
    chunk = 1 if remote else max(1, int(getattr(teachers[0], "batch_size", 8)))
    jobs = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
    budget = _Budget(budget_tokens, settings.max_new_tokens)
    k = int(settings.top_logprobs)
    buffer: list[dict[str, Any]] = []
    pending_spent = {"prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0}
    last_flush = time.monotonic()
    console = console or Console(stderr=True)
    columns = [
        TextColumn("[bold]generate"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("failed {task.fields[failed]}  tokens {task.fields[tokens]:,}  {task.fields[cost]}"),
        TimeElapsedColumn(),
    ]

    # One thread does every store write, in submission order (`StoreWriter` is not thread-safe).
    # A commit takes ~10-30 ms (Parquet, fsyncs): done in the loop it left finished requests
    # uncollected and their slots idle (~2% of the rate at concurrency 32, docs/store.md).
    store_thread = ThreadPoolExecutor(1, thread_name_prefix="distill-store")
    store_ops: list[Future] = []

    def settle(block: bool) -> None:
        """Raise the first store error; with ``block``, wait for every write sent so far."""
        for op in list(store_ops):
            if block or op.done():
                store_ops.remove(op)
                op.result()

    def fail(*args) -> None:
        store_ops.append(store_thread.submit(writer.fail, *args))

    def flush() -> None:
        nonlocal last_flush, pending_spent
        settle(block=True)  # at most one commit in flight: bounded memory, errors surface promptly
        store_ops.append(store_thread.submit(writer.write, list(buffer), spent=pending_spent))
        buffer.clear()
        pending_spent = {"prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0}
        last_flush = time.monotonic()

    def ask(teacher, batch: list[Prompt]):
        reqs = [Request(p.key, p.prompt, p.messages) for p in batch]
        return teacher.complete(reqs, settings)

    with (
        Progress(*columns, console=console, disable=not progress) as bar,
        ThreadPoolExecutor(workers) as pool,
    ):
        task = bar.add_task("generate", total=len(todo), failed=0, tokens=0, cost="")
        inflight: dict[Future, tuple[list[Prompt], int, Any]] = {}
        next_job, rr = 0, 0
        try:
            while next_job < len(jobs) or inflight:
                while next_job < len(jobs) and len(inflight) < workers:
                    batch = jobs[next_job]
                    cost = budget.estimate(batch, teachers[0]) if budget.limit is not None else 0
                    if not budget.allows(cost):
                        break
                    teacher = teachers[rr % len(teachers)]
                    rr += 1
                    budget.reserved += cost
                    inflight[pool.submit(ask, teacher, batch)] = (batch, cost, teacher)
                    next_job += 1
                if not inflight:
                    break
                finished, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                for fut in finished:
                    batch, cost, teacher = inflight.pop(fut)
                    budget.reserved -= cost
                    _collect(fut, batch, fail, buffer, pending_spent, budget, price, result, k)
                    if strict and result.without_topk:  # keep none of it; what came with top-k is kept
                        buffer[:] = [r for r in buffer if store_writer.row_topk_kind(r)]
                        raise TextOnlyError(_lacked(teacher, result.text_only, k))
                bar.update(
                    task,
                    completed=result.answered + result.failed,
                    failed=result.failed,
                    tokens=result.tokens,
                    cost="" if result.cost is None else f"${result.cost:,.4f}",
                )
                if len(buffer) >= flush_every or (buffer and time.monotonic() - last_flush >= flush_seconds):
                    flush()
                settle(block=False)
        finally:
            for fut in inflight:
                fut.cancel()
            try:
                flush()
                settle(block=True)
            finally:
                store_thread.shutdown(wait=True)
    result.left = len(todo) - result.answered - result.failed
    result.stopped_by_budget = result.left > 0


def _collect(fut, batch, fail, buffer, spent, budget, price, result, k) -> None:
    """File one finished job's answers into ``buffer`` and its failures into the store's log
    (``fail(key, record_id, error, attempts)``, `StoreWriter.fail` on the store thread)."""
    try:
        completions = fut.result()
        by_key = {c.id: c for c in completions}
        missing = [p.record_id for p in batch if p.key not in by_key]
        if missing:
            raise ValueError(f"the teacher's answer lacks prompts {missing[:3]!r}")
    except Exception as err:  # the whole call failed: every prompt in it is a failure
        for p in batch:
            fail(p.key, p.record_id, f"{type(err).__name__}: {err}", getattr(err, "attempts", 1))
            result.failed += 1
        return
    for p in batch:
        c = by_key[p.key]
        try:
            row = store_writer.completion_row(p.key, p.record_id, p.prompt, p.messages, c, k)
        except ValueError as err:  # e.g. non-finite log-probabilities: never training data
            fail(p.key, p.record_id, f"ValueError: {err}", 1)
            result.failed += 1
            continue
        if k and store_writer.row_topk_kind(row) is None:
            result.without_topk += 1
            result.text_only = (p.record_id, c)
        buffer.append(row)
        result.answered += 1
        pt, ct = row["prompt_tokens"], row["completion_tokens"]
        result.prompt_tokens += pt
        result.completion_tokens += ct
        spent["prompt_tokens"] += pt
        spent["completion_tokens"] += ct
        budget.spent += pt + ct
        budget.prompt_tokens += pt
        budget.chars += len(p.prompt or store.canonical(list(p.messages or ())))
        if price is not None:
            c_usd = price.cost(pt, ct)
            result.cost = (result.cost or 0.0) + c_usd
            spent["cost"] += c_usd

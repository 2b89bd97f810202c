"""Training examples for language-model students, from a store or a table file, and their batches.

An example is a dict::

    {"id": str, "input_ids": LongTensor (L,), "labels": LongTensor (L,), "prompt_len": int,
     "topk_ids": LongTensor (L, K), "topk_logprobs": FloatTensor (L, K)}   # top-k keys only from a store

``labels`` is -100 on prompt positions (and on padding); row i of the top-k tensors is the teacher's
distribution for the token at position i given the tokens before it (aligned with ``labels``), so a
causal LM's ``logits[:, :-1]`` are scored against ``labels[:, 1:]`` and ``topk[:, 1:]``.

Sequences longer than ``max_length`` are truncated from the end and counted in `DataStats`; an
example with no completion token left, or with non-finite teacher log-probabilities, is skipped and
counted. Nothing here crashes deep inside the loop: bad input fails at load with a clear message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

IGNORE = -100


@dataclass
class DataStats:
    """What loading did to the data; reported by `distill train` and stored in the training result."""

    source: str
    read: int = 0
    """Records read from the source."""
    used: int = 0
    """Examples kept for training."""
    truncated: int = 0
    """Examples cut to ``max_length`` tokens (kept)."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Reason -> number of records left out."""
    has_topk: bool = False
    """Whether every kept example carries the teacher's top-k log-probabilities."""
    capture_temperature: float = 1.0
    """Temperature at which the store's log-probabilities were captured."""
    manifest: dict[str, Any] = field(default_factory=dict)
    """The store's manifest (empty for a table file)."""
    cross: dict[str, Any] = field(default_factory=dict)
    """Across tokenizers: ``teacher_tokenizer``, ``method``, ``positions`` and ``aligned`` (completion
    positions, and those with a KD target), ``unspelled`` (records whose tokens do not spell the text)."""
    retokenized: int = 0
    """Store records tokenised from their text with the student's tokenizer (the teacher gave no ids)."""
    notes: list[str] = field(default_factory=list)
    """What loading could not check (e.g. a store that records no teacher tokenizer)."""
    lost: dict[str, int] = field(default_factory=dict)
    """Damaged shard (or row group) -> records of the manifest that could not be read (only when a
    partial store is allowed; otherwise reading refuses the store)."""

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def summary(self) -> str:
        parts = [f"{self.used} of {self.read} records used from {self.source}"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated")
        parts += [f"{n} skipped: {why}" for why, n in sorted(self.skipped.items())]
        if self.retokenized:
            parts.append(f"{self.retokenized} re-tokenised from their text (the teacher gave no token ids)")
        parts += self.notes
        if self.lost:
            parts.append(f"{sum(self.lost.values())} records lost in damaged shards ({', '.join(self.lost)})")
        return "; ".join(parts)


def is_store(path: str | Path) -> bool:
    """A store made by `distill generate` is a directory; a table is a file."""
    return Path(path).is_dir()


def _finish(ids: list[int], labels: list[int], prompt_len: int, max_length: int, stats: DataStats):
    if len(ids) > max_length:
        stats.truncated += 1
        ids, labels = ids[:max_length], labels[:max_length]
    if not any(lab != IGNORE for lab in labels[1:]):
        stats.skip("no completion token left (prompt fills max_length)" if prompt_len else "empty text")
        return None
    return ids, labels, min(prompt_len, len(ids))


def _from_table(path: Path, tokenizer, max_length: int, stats: DataStats) -> list[dict[str, Any]]:
    from distill.data import read_table

    rows = read_table(path)
    if not rows:
        raise ValueError(f"{path}: no rows to train on")
    cols = set(rows[0])
    if not ({"prompt", "completion"} <= cols or "text" in cols):
        raise ValueError(
            f"{path}: expected 'prompt' and 'completion' columns or a 'text' column, got {sorted(cols)}"
        )
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for i, row in enumerate(rows):
        stats.read += 1
        rid = str(row.get("id", i))
        if "prompt" in row and "completion" in row:
            prompt, completion = row.get("prompt"), row.get("completion")
            if not isinstance(prompt, str) or not isinstance(completion, str):
                stats.skip("prompt or completion missing or not text")
                continue
            p = tokenizer(prompt)["input_ids"]
            c = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
            ids, labels, plen = p + c, [IGNORE] * len(p) + c, len(p)
            text = (prompt, completion)
        else:
            text = row.get("text")
            if not isinstance(text, str) or not text:
                stats.skip("text missing or empty")
                continue
            ids = tokenizer(text)["input_ids"] + eos
            labels, plen = list(ids), 0
            text = ("", text)
        done = _finish(ids, labels, plen, max_length, stats)
        if done is None:
            continue
        ids, labels, plen = done
        out.append(
            {
                "id": rid,
                "input_ids": torch.tensor(ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long),
                "prompt_len": plen,
                "text": text,
            }
        )
    return out


def text_example(rec: dict[str, Any], tokenizer, max_length: int, stats: DataStats):
    """``(example, completion ids)`` of one store record re-tokenised from its text with the student's
    tokenizer, or ``None`` (skipped and counted). The example keeps its ``text`` (prompt, completion)
    for a teacher of another tokenizer; the completion ids include EOS and are not truncated."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompt, completion = rec.get("prompt"), rec.get("completion")
    if not isinstance(completion, str) or not completion:
        stats.skip("empty completion")
        return None
    if isinstance(prompt, list):  # a chat: rendered with the student's own template
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        p = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        p = tokenizer(prompt or "")["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
    done = _finish(p + c, [IGNORE] * len(p) + c, len(p), max_length, stats)
    if done is None:
        return None
    ids, labels, plen = done
    ex = {"id": str(rec["id"]), "input_ids": torch.tensor(ids, dtype=torch.long),
          "labels": torch.tensor(labels, dtype=torch.long), "prompt_len": plen, "text": (prompt, completion)}  # fmt: skip
    return ex, c


def _store_as_text(st, tokenizer, max_length: int, stats: DataStats) -> list[dict[str, Any]]:
    """Records re-tokenised from their text with the student's tokenizer (sequence-level training
    across tokenizers: the store's token ids belong to the teacher's vocabulary)."""
    out = []
    for rec in st:
        stats.read += 1
        made = text_example(rec, tokenizer, max_length, stats)
        if made is not None:
            out.append(made[0])
    return out


def _from_store(
    path: Path,
    tokenizer,
    max_length: int,
    need_topk: bool,
    stats: DataStats,
    token_level: bool,
    allow_partial: bool = False,
    as_text: bool = False,
) -> list[dict[str, Any]]:
    from distill import store as store_mod
    from distill.train.vocab import check_store_tokenizer, vocab_hash

    st = store_mod.open(path, allow_partial=allow_partial)
    stats.lost = st.lost  # the same dict: row groups found damaged while reading are added to it
    manifest = dict(getattr(st, "manifest", {}) or {})
    stats.manifest = manifest
    stats.capture_temperature = float(manifest.get("capture_temperature") or 1.0)
    if need_topk:
        _check_topk_kind(path, manifest)
    theirs = (manifest.get("tokenizer") or {}).get("vocab_hash")
    if token_level and not manifest.get("tokenizer"):
        stats.notes.append(
            "the store records no teacher tokenizer: its token ids are taken to be the student's (not checked)"
        )
    if as_text:
        return _store_as_text(st, tokenizer, max_length, stats)
    if theirs and theirs != vocab_hash(tokenizer):
        if token_level:
            check_store_tokenizer(manifest, tokenizer, str(path))  # raises, naming both tokenizers
        return _store_as_text(st, tokenizer, max_length, stats)
    out, beyond, n_tok = [], [], len(tokenizer)
    # The store cuts sequences to max_length and skips (and counts) records with no completion token
    # left or with non-finite log-probabilities; it tokenises black-box records with the student's tokenizer.
    for ex in st.examples(max_length=max_length, tokenizer=tokenizer):
        stats.read += 1
        labels = ex["labels"]
        counted = labels != IGNORE
        # Ids past the tokenizer (a teacher's padded head slots) are no token: the record cannot be trained on.
        top = int(ex["input_ids"].max()) if len(ex["input_ids"]) else -1
        if need_topk and "topk_ids" in ex and bool(counted.any()):  # top-k is read only when used
            top = max(top, int(ex["topk_ids"][counted].max()))
        if top >= n_tok:
            beyond.append((str(ex["id"]), top))
            continue
        plen = int(counted.long().argmax()) if bool(counted.any()) else len(labels)
        topk = "topk_ids" in ex and "topk_logprobs" in ex
        if need_topk and not topk:
            stats.skip("no top-k log-probabilities (black-box teacher or top_k 0)")
            continue
        if len(labels) == max_length:
            stats.truncated += 1  # at the limit: cut, or exactly that long
        item: dict[str, Any] = {"id": str(ex["id"]), "prompt_len": plen, "input_ids": ex["input_ids"].long()}
        item["labels"] = labels.long()
        if topk:
            lp = ex["topk_logprobs"].float()
            if not bool(torch.isfinite(lp[counted]).all()):
                stats.skip("non-finite teacher log-probabilities")
                continue
            item["topk_ids"], item["topk_logprobs"] = ex["topk_ids"].long(), lp
        out.append(item)
    stats.retokenized = getattr(st, "retokenized", 0)
    for reason, n in getattr(st, "rejected", {}).items():
        stats.read += n
        stats.skipped[reason] = stats.skipped.get(reason, 0) + n
    if beyond:
        named = ", ".join(f"{rid!r} (id {v})" for rid, v in beyond[:3]) + (", ..." if len(beyond) > 3 else "")
        stats.skipped[f"token ids beyond the tokenizer's {n_tok} entries: {named}"] = len(beyond)
    return out


def _check_topk_kind(path: Path, manifest: dict[str, Any]) -> None:
    """``logits`` mode without a local teacher needs top-k *ids*: one line for a store without them."""
    from distill.store.format import topk_kind

    kind = topk_kind(manifest)
    if kind == "ids":
        return
    teacher = manifest.get("teacher") or {}
    where = " ".join(manifest.get("endpoints") or []) or teacher.get("name") or "its teacher"
    if kind is None:
        what = (
            f"text only: {where} returned no top-k log-probabilities"
            if int(manifest.get("k") or 0)
            else "text only (generated with --top-k 0)"
        )
    else:
        what = f"top-k as token strings (bytes) from {where}, not token ids in the student's vocabulary"
    raise ValueError(
        f"{path}: --mode logits needs the teacher's top-k token ids, but this store holds {what}; "
        "use --mode sft, give --teacher DIR, or regenerate from an endpoint that returns them (vLLM, distill serve)"
    )


def load_examples(
    data: str | Path,
    tokenizer,
    *,
    max_length: int,
    need_topk: bool = False,
    token_level: bool = False,
    allow_partial_store: bool = False,
    as_text: bool = False,
) -> tuple[list[dict[str, Any]], DataStats]:
    """Examples from a store directory or a table file, and what loading did (`DataStats`).

        ``need_topk``: keep only store records with top-k log-probabilities (``logits`` mode without a
        local teacher). ``token_level``: a store captured with another tokenizer is an error (otherwise
        its records are re-tokenised from their text with ``tokenizer``). ``allow_partial_store``: go on
    when shards the store's manifest lists cannot be read (counted in ``DataStats.lost``); by default
    such a store is refused (`distill.store.Store`). A store of another tokenizer's top-k is read by
    `distill.train.cross_data.load_cross_store` instead. ``as_text``: re-tokenise every record from its text (a local teacher of another tokenizer). Raises ``ValueError`` when nothing usable is left, naming the source and the reasons.
    """
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"no such data file or store: {path}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    stats = DataStats(source=str(path))
    if is_store(path):
        examples = _from_store(
            path, tokenizer, max_length, need_topk, stats, token_level, allow_partial_store, as_text
        )
    else:
        if need_topk:
            raise ValueError(
                f"{path}: a table file has no teacher log-probabilities; use a store made by "
                "`distill generate` with top_logprobs, or give --teacher DIR"
            )
        examples = _from_table(path, tokenizer, max_length, stats)
    stats.used = len(examples)
    stats.has_topk = bool(examples) and all("topk_ids" in e for e in examples)
    if not examples:
        why = ", ".join(f"{n} {r}" for r, n in sorted(stats.skipped.items())) or "it is empty"
        raise ValueError(f"{path}: no usable training examples ({stats.read} records read; {why})")
    return examples, stats


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``/``attention_mask``/``labels`` ``(B, L)`` and, when every
    example has them, ``topk_ids``/``topk_logprobs`` ``(B, L, K)`` (padding and unlabelled rows: id 0, log-prob -inf, label -100)."""
    n = max(len(e["input_ids"]) for e in examples)
    b = len(examples)
    input_ids = torch.full((b, n), pad_id, dtype=torch.long)
    labels = torch.full((b, n), IGNORE, dtype=torch.long)
    mask = torch.zeros((b, n), dtype=torch.long)
    for i, e in enumerate(examples):
        m = len(e["input_ids"])
        input_ids[i, :m], labels[i, :m], mask[i, :m] = e["input_ids"], e["labels"], 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if all(
        "kd_mask" in e for e in examples
    ):  # rows whose KD is masked out (e.g. unaligned cross-tokenizer rows)
        kd = torch.zeros((b, n), dtype=torch.bool)
        for i, e in enumerate(examples):
            kd[i, : len(e["input_ids"])] = e["kd_mask"].bool()
        batch["kd_mask"] = kd
    if all("position_ids" in e for e in examples):  # packed rows (`distill.train.packing`)
        pos = torch.zeros((b, n), dtype=torch.long)
        for i, e in enumerate(examples):
            m = len(e["input_ids"])
            pos[i, :m], pos[i, m:] = e["position_ids"], torch.arange(n - m)  # padding: a segment of its own
        batch["position_ids"] = pos
    if all("topk_ids" in e for e in examples):
        k = max(e["topk_ids"].shape[-1] for e in examples)
        ids = torch.zeros((b, n, k), dtype=torch.long)
        lps = torch.zeros((b, n, k), dtype=torch.float32)
        for i, e in enumerate(examples):
            m, kk = e["topk_ids"].shape
            ids[i, :m, :kk], lps[i, :m, :kk] = e["topk_ids"], e["topk_logprobs"]
            if kk < k:  # a record with fewer entries: the missing ones are padding
                lps[i, :m, kk:] = -math.inf
        # Rows without a label (prompt, padding) carry no teacher signal: mark every entry as padding.
        lps[labels == IGNORE] = -math.inf
        batch["topk_ids"], batch["topk_logprobs"] = ids, lps
    # Across tokenizers (`distill.train.cross_data`): which positions have a KD target, and for ULD the
    # teacher's own sorted top-k; padding rows have no target.
    if all("kd_mask" in e for e in examples):
        batch["kd_mask"] = torch.zeros((b, n), dtype=torch.bool)
        for i, e in enumerate(examples):
            batch["kd_mask"][i, : len(e["kd_mask"])] = e["kd_mask"]
    if all("uld_logprobs" in e for e in examples):
        k = max(e["uld_logprobs"].shape[-1] for e in examples)
        batch["uld_logprobs"] = torch.full((b, n, k), -math.inf)
        for i, e in enumerate(examples):
            m, kk = e["uld_logprobs"].shape
            batch["uld_logprobs"][i, :m, :kk] = e["uld_logprobs"]
    return batch


def collate_prompts(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts ``(B, P)`` for generation (the student continues each prompt)."""
    prompts = [e["input_ids"][: max(e["prompt_len"], 1)] for e in examples]
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p) :], mask[i, n - len(p) :] = p, 1
    return {"input_ids": ids, "attention_mask": mask}


class BatchOrder:
    """Which examples each optimizer step uses: a fresh seeded permutation per pass over the data.

    Position ``p`` of the endless stream is example ``perm(p // n)[p % n]``, so the order depends only
    on ``(seed, n)`` and the step: resuming at step s sees exactly the examples an uninterrupted run would.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def step(self, step: int, global_batch: int) -> list[int]:
        """Example indices of optimizer step ``step`` (0-based): ``global_batch`` of them."""
        start = step * global_batch
        return [self._perm(p // self.n)[p % self.n] for p in range(start, start + global_batch)]

    def position(self, step: int, global_batch: int) -> dict[str, int]:
        """The data position before ``step``, for checkpoints: epoch and offset into it."""
        p = step * global_batch
        return {"epoch": p // self.n, "offset": p % self.n, "examples_seen": p}

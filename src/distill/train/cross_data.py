"""Training examples whose teacher spoke another tokenizer: sparse targets in the student's vocabulary.

Three sources, one result. A store of token ids (``distill generate --teacher DIR``, vLLM, ``distill
serve``) read with the teacher's tokenizer (``--teacher-tokenizer DIR``); a store whose top-k came as
bytes (a hosted API; store format 2, ``topk_kind == "bytes"``); or a local teacher of another
tokenizer (``--teacher DIR``) run on its own tokens of each example's text (`CrossTeacher`). Each
example is the text re-tokenised by the student (`distill.train.examples.text_example`) plus

    ``topk_ids``/``topk_logprobs`` ``(L, K)``: the teacher's top-k projected onto the student's vocabulary
    (`distill.train.cross`), ``kd_mask`` ``(L,)``: aligned positions (KD there, CE only elsewhere), and
    ``uld_logprobs`` ``(L, k)``: the teacher's own top-k, sorted (for ``--cross-tokenizer uld``),

so the loop's sparse-KD objective consumes them unchanged. Everything is computed once, when the
data is loaded (batched through the student's tokenizer), never per step; on-policy steps with a local
teacher of another tokenizer map their fresh samples per step (`CrossTeacher.targets`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.models.token_bytes import TokenBytes, token_bytes
from distill.store.format import topk_kind
from distill.train.cross import Projector, teacher_from_bytes, teacher_from_ids
from distill.train.examples import DataStats, text_example
from distill.train.vocab import vocab_hash


def _name(tok) -> str:
    return str(getattr(tok, "name_or_path", "") or "?")


def _attach(items: list[tuple[dict, list[int], int]], proj: Projector, stats: DataStats) -> None:
    """Put each example's projected targets in its dict (rows of the prompt: no target)."""
    results = proj.run()
    positions = aligned = 0
    for ex, _, h in items:
        r = results[h]
        L, P = len(ex["input_ids"]), ex["prompt_len"]
        n = L - P
        K, k = r.ids.shape[1], r.teacher_sorted.shape[1]
        ids = torch.zeros((L, K), dtype=torch.long)
        lps = torch.full((L, K), -torch.inf)
        mask = torch.zeros(L, dtype=torch.bool)
        uld = torch.full((L, k), -torch.inf)
        ids[P:], lps[P:] = torch.from_numpy(r.ids[:n]), torch.from_numpy(r.logprobs[:n])
        mask[P:], uld[P:] = torch.from_numpy(r.aligned[:n]), torch.from_numpy(r.teacher_sorted[:n])
        ex.update(topk_ids=ids, topk_logprobs=lps, kd_mask=mask, uld_logprobs=uld)
        positions += n
        aligned += int(mask.sum())
    stats.cross["positions"] = stats.cross.get("positions", 0) + positions
    stats.cross["aligned"] = stats.cross.get("aligned", 0) + aligned
    stats.cross["unspelled"] = stats.cross.get("unspelled", 0) + proj.unspelled


def store_examples(
    st, tokenizer, teacher_tb: TokenBytes | None, *, max_length: int, stats: DataStats, top_k: int = 0
) -> list[dict[str, Any]]:
    """Examples of a store made with another tokenizer than the student's, with projected targets.

    ``teacher_tb``: the teacher tokenizer's `TokenBytes` for a store of ids (``None`` for a store of
    bytes). ``top_k``: student tokens kept per position (0: the store's k). Records without top-k or
    with non-finite log-probabilities are skipped and counted in ``stats``."""
    kind = topk_kind(st.manifest)
    if kind == "ids" and teacher_tb is None:
        raise ValueError(
            f"{st.path}: a store of teacher token ids made with another tokenizer; give the teacher's "
            "tokenizer with --teacher-tokenizer DIR"
        )
    proj = Projector(tokenizer, top_k or max(int(st.k or 0), 1))
    items = []
    for rec in st:
        stats.read += 1
        lps = rec.get("topk_logprobs")
        if lps is None or (rec.get("topk_ids") is None and rec.get("topk_bytes") is None):
            stats.skip("no top-k log-probabilities (black-box teacher or top_k 0)")
            continue
        lp = np.asarray(lps, dtype=np.float64)
        if not np.isfinite(lp).all():
            stats.skip("non-finite teacher log-probabilities")
            continue
        if rec.get("topk_bytes") is not None:
            toks = rec.get("completion_token_bytes")
            if toks is None or len(toks) != len(lp):
                stats.skip("token bytes missing or not one per top-k row")
                continue
            side = teacher_from_bytes(toks, rec["topk_bytes"], lp)
        else:
            toks = rec.get("completion_token_ids")
            if toks is None or len(toks) != len(lp):
                stats.skip("token ids missing or not one per top-k row")
                continue
            side = teacher_from_ids(toks, rec["topk_ids"], lp, teacher_tb)
        made = text_example(rec, tokenizer, max_length, stats)
        if made is None:
            continue
        ex, c = made
        items.append((ex, c, proj.add(rec["completion"], side, c)))
    _attach(items, proj, stats)
    for reason, n in getattr(st, "rejected", {}).items():
        stats.read += n
        stats.skipped[reason] = stats.skipped.get(reason, 0) + n
    return [ex for ex, _, _ in items]


def load_cross_store(
    path, tokenizer, spec: dict[str, Any], *, max_length: int, allow_partial: bool = False
) -> tuple[list[dict[str, Any]], DataStats]:
    """`distill.train.examples.load_examples` for a store of another tokenizer's top-k.

    ``spec``: ``{"teacher_bytes": TokenBytes | None, "top_k": int, "method": str}`` (from
    `distill.train.setup.cross_store`). Raises ``ValueError`` when nothing usable is left."""
    from distill import store as store_mod

    spec = dict(spec)
    tb = spec.pop("teacher_bytes", None)
    stats = DataStats(source=str(path))
    st = store_mod.open(Path(path), allow_partial=allow_partial)
    stats.lost = st.lost
    stats.manifest = dict(st.manifest or {})
    stats.capture_temperature = float(stats.manifest.get("capture_temperature") or 1.0)
    stats.cross = {"teacher_tokenizer": (stats.manifest.get("tokenizer") or {}).get("name"), **spec}
    examples = store_examples(
        st, tokenizer, tb, max_length=max_length, stats=stats, top_k=int(spec.get("top_k") or 0)
    )
    stats.used = len(examples)
    stats.has_topk = bool(examples)
    if not examples:
        why = ", ".join(f"{n} {r}" for r, n in sorted(stats.skipped.items())) or "it is empty"
        raise ValueError(f"{path}: no usable training examples ({stats.read} records read; {why})")
    return examples, stats


def cross_store(cfg, tok) -> dict[str, Any] | None:
    """What `load_examples` needs to read a store of another tokenizer's top-k (None: the student's own,
    or a table): the teacher tokenizer's bytes (``--teacher-tokenizer``, checked against the manifest)."""
    from distill.store.format import read_manifest
    from distill.train.examples import is_store

    if not is_store(cfg.data):
        return None
    manifest = read_manifest(Path(cfg.data))
    info = manifest.get("tokenizer") or {}
    theirs = info.get("vocab_hash")
    spec = {"top_k": cfg.cross_top_k, "method": cfg.cross_tokenizer}
    if topk_kind(manifest) == "bytes":
        return spec
    # vLLM publishes no vocabulary: such a store records the server's tokenisation of a probe text instead.
    probe = None if theirs else info.get("probe_hash")
    if probe:
        from distill.models.server import local_probe_ids, probe_hash

        def hashed(t) -> str:
            return probe_hash(local_probe_ids(t))
    else:
        hashed = vocab_hash
    if not (theirs or probe) or hashed(tok) == (theirs or probe):
        return None
    what = f"vocab hash {theirs[:12]}" if theirs else f"probe hash {probe[:12]}"
    if not cfg.teacher_tokenizer:
        raise ValueError(
            f"{cfg.data}: the store's teacher used tokenizer {info.get('name')!r} ({what}), "
            f"not the student's {_name(tok)!r}; to distil its top-k across tokenizers give that tokenizer "
            "with --teacher-tokenizer DIR (or use --mode sft)"
        )
    from distill.models.loading import load_tokenizer
    from distill.models.token_bytes import token_bytes

    t_tok = load_tokenizer(
        cfg.teacher_tokenizer, "teacher tokenizer", trust_remote_code=cfg.trust_remote_code
    )
    if hashed(t_tok) != (theirs or probe):
        raise ValueError(
            f"--teacher-tokenizer {cfg.teacher_tokenizer}: {hashed(t_tok)[:12]} is not the store's "
            f"{what} (tokenizer {info.get('name')!r} in {cfg.data}/manifest.json)"
        )
    return {**spec, "teacher_bytes": token_bytes(t_tok)}


def cross_summary(stats: DataStats, student: str) -> str:
    """One line: the two tokenizers, the method and the share of aligned completion positions."""
    c = stats.cross
    n, a = int(c.get("positions", 0)), int(c.get("aligned", 0))
    share = f"{a / n:.1%}" if n else "n/a"
    extra = f"; {c['unspelled']} records whose tokens do not spell their text" if c.get("unspelled") else ""
    return (
        f"teacher tokenizer {c.get('teacher_tokenizer')!r} is not the student's {student!r}: "
        f"--cross-tokenizer {c.get('method', 'project')}, {share} of {n:,} completion positions aligned "
        f"(KD there, CE only elsewhere){extra}"
    )


class CrossTeacher:
    """A local teacher of another tokenizer: run on its own tokens of each example's text, its top-k
    mapped onto the student's vocabulary (`distill.train.cross`)."""

    def __init__(
        self, model, tokenizer, student_tokenizer, *, k: int = 20, top_k: int = 0, batch_size: int = 16
    ):
        self.model, self.tok, self.student_tok = model, tokenizer, student_tokenizer
        self.tb = token_bytes(tokenizer)
        self.k, self.top_k, self.batch_size = k, top_k or k, batch_size
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None

    def _ids(self, prompt, completion: str) -> tuple[list[int], list[int]]:
        tok = self.tok
        if isinstance(prompt, list):
            text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            p = tok(text, add_special_tokens=False)["input_ids"]
        else:
            p = tok(prompt or "")["input_ids"] if prompt else []
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        return p, tok(completion, add_special_tokens=False)["input_ids"] + eos

    @torch.no_grad()
    def _topk(self, seqs: list[tuple[list[int], list[int]]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """The teacher's top-k ids and log-probabilities at each completion token, ``(n, k)`` each."""
        device = next(self.model.parameters()).device
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        out = []
        for lo in range(0, len(seqs), self.batch_size):
            chunk = seqs[lo : lo + self.batch_size]
            rows = [(p + c)[: self.context] if self.context else p + c for p, c in chunk]
            n = max(len(r) for r in rows)
            ids = torch.full((len(rows), n), pad, dtype=torch.long)
            att = torch.zeros((len(rows), n), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)], att[i, : len(r)] = torch.tensor(r), 1
            logp = torch.log_softmax(
                self.model(input_ids=ids.to(device), attention_mask=att.to(device)).logits.float(), -1
            )
            v, t = logp.topk(min(self.k, logp.shape[-1]), dim=-1)
            for i, (p, c) in enumerate(chunk):
                P = max(len(p), 1)  # logits at P-1 predict the first completion token
                m = min(len(c), len(rows[i]) - len(p))
                out.append((t[i, P - 1 : P - 1 + m].cpu().numpy(), v[i, P - 1 : P - 1 + m].cpu().numpy()))
        return out

    def annotate(
        self, examples: list[dict[str, Any]], stats: DataStats | None = None
    ) -> list[dict[str, Any]]:
        """``examples`` (with ``text``) given projected targets in place; returns them."""
        stats = stats if stats is not None else DataStats(source="on-policy")
        seqs, texts = [], []
        for e in examples:
            prompt, completion = e["text"]
            seqs.append(self._ids(prompt, completion))
            texts.append(completion)
        proj = Projector(self.student_tok, self.top_k)
        items = []
        for e, (_, c), text, (t_ids, t_lps) in zip(examples, seqs, texts, self._topk(seqs)):
            side = teacher_from_ids(c[: len(t_ids)], t_ids, t_lps, self.tb)
            student = e["labels"][e["prompt_len"] :].tolist()
            items.append((e, student, proj.add(text, side, student)))
        _attach(items, proj, stats)
        return examples


__all__ = ["CrossTeacher", "cross_store", "cross_summary", "load_cross_store", "store_examples", "topk_kind"]

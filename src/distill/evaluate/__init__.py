"""Evaluation: the student against its teacher on production inputs.

Owns: `evaluate` and `EvalConfig` (`run.py`), the models behind one `Runner` interface
(`runners.py`), per-model peak memory in a child process (`memprobe.py`), report files
(`report.py`) and the per-answer confidence signals routing uses (`signals.py`).
May import: the shared modules, `distill.models`, `distill.store`, `distill.classifier`.
"""

from distill._compat import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "run": ("evaluate", "EvalConfig", "run_pair", "REFERENCE_COLUMNS"),
    },
)

"""Stage 6, routing: a calibrated threshold that sends uncertain requests to the teacher.

Owns: `Router` (scikit-learn style: parameters in ``__init__``, ``fit`` learns ``threshold_``; saved
as JSON; `router.py`) and fitting it on real models (`fit.py`).
May import: the shared modules, `distill.evaluate` (signals, paired runs), `distill.workload`
(the out-of-distribution scorer).
"""

from distill._compat import lazy_exports

_EXPORTS = {
    "Router": "distill.route.router",
    "SIGNALS": "distill.route.router",
    "routed_outcome": "distill.route.fit",
    "split_indices": "distill.route.fit",
    "calibrate_on_models": "distill.route.fit",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

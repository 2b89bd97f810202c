"""Routing: a calibrated threshold that sends uncertain requests to the teacher.

Owns: `Router` (scikit-learn style: parameters in ``__init__``, ``fit`` learns ``threshold_``; saved
as JSON; `router.py`) and fitting it on real models (`fit.py`).
May import: the shared modules, `distill.evaluate` (signals, paired runs), `distill.workload`
(the out-of-distribution scorer).
"""

from distill._compat import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "router": ("Router", "SIGNALS"),
        "fit": ("routed_outcome", "split_indices", "calibrate_on_models"),
    },
)

"""distill: train a small student model to reproduce a large teacher, and measure what it keeps.

The public names below are imported on first use, so `import distill` (and every `distill`
command, an HTTP-only `distill generate` among them) does not pay for torch until it needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "LOSSES": "distill.losses",
    "hinton_loss": "distill.losses",
    "kd_loss": "distill.losses",
    "SparseTargets": "distill.losses",
    "fused_linear_kd_loss": "distill.losses",
    "calibrate_temperature": "distill.classifier_metrics",
    "compare": "distill.classifier_metrics",
    "distill_classifier": "distill.classifier",
}
__all__ = [
    "LOSSES",
    "SparseTargets",
    "__version__",
    "calibrate_temperature",
    "compare",
    "distill_classifier",
    "fused_linear_kd_loss",
    "hinton_loss",
    "kd_loss",
]

if TYPE_CHECKING:
    from distill.classifier import distill_classifier
    from distill.classifier_metrics import calibrate_temperature, compare
    from distill.losses import LOSSES, SparseTargets, fused_linear_kd_loss, hinton_loss, kd_loss


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'distill' has no attribute {name!r}")

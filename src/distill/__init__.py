"""distill: train a small student model to reproduce a large teacher, and measure what it keeps.

The public names below are imported on first use, so `import distill` (and every `distill`
command, an HTTP-only `distill generate` among them) does not pay for torch until it needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distill import _compat

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "LOSSES": "distill.losses",
    "hinton_loss": "distill.losses",
    "kd_loss": "distill.losses",
    "SparseTargets": "distill.losses",
    "fused_linear_kd_loss": "distill.losses",
    "calibrate_temperature": "distill.classifier.metrics",
    "compare": "distill.classifier.metrics",
    "distill_classifier": "distill.classifier.kd",
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
    from distill.classifier.kd import distill_classifier
    from distill.classifier.metrics import calibrate_temperature, compare
    from distill.losses import LOSSES, SparseTargets, fused_linear_kd_loss, hinton_loss, kd_loss


__getattr__, __dir__ = _compat.lazy_exports(__name__, _EXPORTS)
_compat.install()  # old flat module paths (distill.config, distill.routing, ...) keep working

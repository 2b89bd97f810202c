"""distill: train a small student model to reproduce a large teacher, and measure what it keeps.

The public names below are imported on first use, so `import distill` (and every `distill`
command, an HTTP-only `distill generate` among them) does not pay for torch until it needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distill import _compat

__version__ = "0.1.0"

# submodule -> the public names it defines (imported on first use)
_EXPORTS = {
    "losses": ("LOSSES", "hinton_loss", "kd_loss", "SparseTargets", "fused_linear_kd_loss"),
    "classifier.metrics": ("calibrate_temperature", "compare"),
    "classifier.kd": ("distill_classifier",),
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


__getattr__, __dir__, _ = _compat.lazy_exports(__name__, _EXPORTS)
_compat.install()  # old flat module paths (distill.config, distill.routing, ...) keep working

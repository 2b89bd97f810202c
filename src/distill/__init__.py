"""distill: train a small student model to reproduce a large teacher, and measure what it keeps."""

from distill.classifier import calibrate_temperature, compare, distill_classifier
from distill.losses import LOSSES, hinton_loss

__version__ = "0.1.0"
__all__ = [
    "LOSSES",
    "__version__",
    "calibrate_temperature",
    "compare",
    "distill_classifier",
    "hinton_loss",
]

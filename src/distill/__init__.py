"""distill: train a small student model to reproduce a large teacher, and measure what it keeps."""

from distill.losses import LOSSES, hinton_loss

__version__ = "0.1.0"
__all__ = ["LOSSES", "hinton_loss", "__version__"]

"""Classic soft-label distillation of classifiers (Hinton et al. 2015) and how to measure the result.

Owns: `distill_classifier`, `train_classifier`, MLPs and their safetensors files (`kd.py`);
`calibrate_temperature` and `compare` (`metrics.py`).
May import: the shared modules and `distill.losses`.
"""

from distill._compat import lazy_exports

_KD = (
    "CONFIG_FORMAT",
    "IGNORE_INDEX",
    "MLP",
    "clone",
    "count_parameters",
    "distill_classifier",
    "load_classifier",
    "mlp",
    "predict_logits",
    "save_classifier",
    "train_classifier",
)
_EXPORTS = {
    **{name: "distill.classifier.kd" for name in _KD},
    "calibrate_temperature": "distill.classifier.metrics",
    "compare": "distill.classifier.metrics",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

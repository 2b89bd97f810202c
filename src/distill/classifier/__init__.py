"""Classic soft-label distillation of classifiers (Hinton et al. 2015) and how to measure the result.

Owns: `distill_classifier`, `train_classifier`, MLPs and their safetensors files (`kd.py`);
`calibrate_temperature` and `compare` (`metrics.py`).
May import: the shared modules and `distill.losses`.
"""

from distill._compat import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "kd": (
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
        ),
        "metrics": ("calibrate_temperature", "compare", "expected_calibration_error", "throughput"),
    },
)

"""Training a language-model student: the loop, its config, data, vocabularies, checkpoints.

Owns: `train` (the one training loop, `loop.py`; its setup steps in `setup.py`, the objective resolved
once from the config in `objective.py`, on-policy sampling in `onpolicy.py`; the loss from hidden states with the LM head applied per chunk
in `heads.py`; packing short examples in `packing.py`), `TrainConfig` (`config.py`),
examples from a store or a table (`examples.py`), vocabulary checks (`vocab.py`), atomic checkpoints (`checkpoint.py`),
multi-process helpers over `accelerate` (`distributed.py`) and trackers (`trackers.py`); choosing
settings such as the distillation temperature on validation (`sweep.py`) and independent jobs side by
side in worker processes (`parallel.py`).
May import: the shared modules, `distill.losses`, `distill.models`, `distill.store`.
"""

from distill._compat import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "loop": ("train", "TrainResult", "accumulate_gradients"),
        "config": ("TrainConfig", "load_config", "MODES"),
    },
)

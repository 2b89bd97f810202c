"""Models: teachers and students behind one small Protocol.

Owns: the `Model` Protocol (alias `Teacher`) with `Request`, `Completion` and `GenerationSettings` (`base.py`), a
local `transformers` causal LM (`hf.py`), any OpenAI-compatible HTTP(S) endpoint (`api.py` over the
transport in `http.py`), fingerprints of weights and vocabularies (`identity.py`) and tiny models
built in code for tests and demos (`tiny.py`); `open_model` turns a ``--teacher``/``--student``
spec into one of them (`open.py`).
May import: the shared modules only.
"""

from distill._compat import lazy_exports
from distill.models.base import Completion, GenerationSettings, Model, Request, Teacher

__getattr__, __dir__, _lazy = lazy_exports(
    __name__, {"hf": ("HFTeacher",), "api": ("APITeacher",), "http": ("APIError",)}
)
__all__ = ["Completion", "GenerationSettings", "Model", "Request", "Teacher", *_lazy]

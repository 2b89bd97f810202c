"""Stage 7, serving: a local model behind an OpenAI-compatible API, optionally routing to a teacher.

Owns: the FastAPI app (`app.py`), the OpenAI wire format (`format.py`) and the routing policy with
its metrics (`routing.py`).
May import: everything above it in the pipeline except `distill.cli` and `distill.demos`.
"""

from distill._compat import lazy_exports

_EXPORTS = {
    "create_app": "distill.serve.app",
    "build_app": "distill.serve.app",
    "ServeLimits": "distill.serve.format",
    "RoutingPolicy": "distill.serve.routing",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

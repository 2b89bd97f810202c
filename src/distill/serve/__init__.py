"""Serving: a local model behind an OpenAI-compatible API, optionally routing to a teacher.

Owns: the FastAPI app (`app.py`), the OpenAI wire format (`format.py`) and the routing policy with
its metrics (`routing.py`).
May import: everything above it in the pipeline except `distill.cli` and `distill.demos`.
"""

from distill._compat import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "app": ("create_app", "build_app"),
        "format": ("ServeLimits",),
        "routing": ("RoutingPolicy",),
        "gateway": ("build_gateway",),
        "students": ("StudentPool",),
    },
)

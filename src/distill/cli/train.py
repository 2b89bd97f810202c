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
    # Choosing settings on validation (distill.train.sweep): one student per grid point, the best one named.
    a = parser.add_argument
    a("--sweep", action="append", metavar="NAME=V1,V2", help="train one student per value (repeat for a grid), "
      "e.g. --sweep temperature=1,2,4,8 --sweep alpha=0.5,0.9; each in OUT/NAME=V,...; needs --val")  # fmt: skip
    a("--val", metavar="FILE", help="--sweep: validation rows (prompt, completion) that no point trains on")
    a("--sweep-metric", choices=("eval_ce", "exact_match"), default="eval_ce",
      help="--sweep: validation CE of the completions (lower wins) or exact match of greedy answers (higher wins)")  # fmt: skip
    a(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="--sweep: points trained side by side in N processes",
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from distill.train import train
    from distill.train.config import load_config

    cfg = load_config(args.config, {name: getattr(args, name) for name in FIELD_NAMES})
    console = Console(stderr=True)
    if args.sweep or args.val:
        return _sweep(args, cfg, console)
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


def _sweep(args: argparse.Namespace, cfg, console) -> int:
    from distill import report
    from distill.train.sweep import parse_grid, sweep

    if not args.sweep or not args.val:
        raise ValueError(
            "--sweep and --val go together: a grid of settings and the validation file that chooses"
        )
    result = sweep(cfg, parse_grid(args.sweep), val=args.val, metric=args.sweep_metric, workers=args.workers,
                   console=console)  # fmt: skip
    names = list(result.best.settings)
    rows = [[*p.settings.values(), p.scores["eval_ce"], p.scores["exact_match"], "<- best" if p is result.best else ""]
            for p in result.points]  # fmt: skip
    report.print_table(f"distill train --sweep ({result.metric} on {args.val})",
                       [*names, "val CE", "val exact match", ""], rows, console=console)  # fmt: skip
    console.print(f"best: {result.best.settings} in {result.best.out} (capture temperature "
                  f"{result.capture_temperature:g}); all points in {cfg.out}/sweep.json")  # fmt: skip
    return 0

"""`distill train`: a thin wrapper over `distill.train.train`.

Settings come from ``--config FILE.toml`` and are overridden by the flags given; flags not given
leave the file's values (or the defaults) alone. Works under ``accelerate launch -m distill train``.
"""

from __future__ import annotations

import argparse

from distill.train.config import FIELD_DOCS, MODES


def _help(name: str) -> str:
    return FIELD_DOCS.get(name, name).replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--config", metavar="FILE", help="TOML file of settings (top-level keys or a [train] table)")
    a("--student", metavar="DIR", help=_help("student"))
    a("--data", metavar="STORE_OR_FILE", help=_help("data"))
    a("--out", metavar="DIR", help=_help("out"))
    a("--mode", choices=MODES, help=_help("mode"))
    a("--loss", metavar="NAME", help=_help("loss"))
    a("--temperature", type=float, metavar="X", help=_help("temperature"))
    a("--alpha", type=float, metavar="A", help=_help("alpha"))
    a("--teacher", metavar="DIR", help=_help("teacher"))
    a("--max-steps", type=int, metavar="N", help=_help("max_steps"))
    a("--batch-size", type=int, metavar="B", help=_help("batch_size"))
    a("--grad-accum", type=int, metavar="G", help=_help("grad_accum"))
    a("--lr", type=float, metavar="LR", help=_help("lr"))
    a("--save-every", type=int, metavar="N", help=_help("save_every"))
    a("--resume", action="store_true", default=None, help=_help("resume"))
    a("--max-length", type=int, metavar="N", help=_help("max_length"))
    a("--seed", type=int, help=_help("seed"))
    a("--lora-r", type=int, metavar="R", help=_help("lora_r"))
    a("--lora-alpha", type=float, metavar="A", help=_help("lora_alpha"))
    a("--lora-target-modules", nargs="+", metavar="NAME", help=_help("lora_target_modules"))
    a("--merge-lora", action="store_true", default=None, help=_help("merge_lora"))
    a("--lambda", dest="lmbda", type=float, metavar="L", help=_help("lmbda"))
    a("--beta", type=float, metavar="B", help=_help("beta"))
    a("--max-new-tokens", type=int, metavar="N", help=_help("max_new_tokens"))
    a("--mixed-precision", choices=("no", "bf16", "fp16"), help=_help("mixed_precision"))
    a("--log-with", nargs="+", metavar="TRACKER", help=_help("log_with"))
    a("--no-progress", dest="progress", action="store_false", default=None, help="hide the progress bar")


_FLAGS = (
    "student data out mode loss temperature alpha teacher max_steps batch_size grad_accum lr save_every "
    "resume max_length seed lora_r lora_alpha lora_target_modules merge_lora lmbda beta max_new_tokens "
    "mixed_precision log_with progress"
).split()


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from distill.train import train
    from distill.train.config import load_config

    cfg = load_config(args.config, {k: getattr(args, k) for k in _FLAGS})
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

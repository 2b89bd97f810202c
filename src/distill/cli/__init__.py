"""The `distill` command line.

Each command is a thin wrapper over one library function and lives in its own module here,
named in `COMMANDS`. A command module defines ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only when their command runs, so `distill --help` stays fast and a
command's heavy dependencies (transformers, fastapi) are needed only by that command.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

# command name -> (module under distill.cli, one-line help). A plain dict: no registry, no import side effects.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "run the built-in distillation demo (classifier on digits, --task lm or --task triage)"),
    "generate": ("generate", "send prompts to a teacher and store its answers (resumable)"),
    "serve": ("serve", "serve a local causal LM behind an OpenAI-compatible API"),
    "train": ("train", "train a language-model student (sft, logits, on-policy)"),
    "eval": ("eval", "evaluate a student against its teacher on production inputs"),
    "route": ("route", "fit a confidence router that sends hard requests to the teacher"),
    "coverage": ("coverage", "check that training inputs cover production inputs"),
    "scout": ("scout", "find task families worth distilling in request logs"),
}


def _missing_extra(err: ModuleNotFoundError, command: str | None) -> int:
    from distill.extras import explain

    message = explain(err)
    if message is None:  # not a module of an extra: a real bug, shown as it is
        raise err
    print(f"distill {command}: error: {message}", file=sys.stderr)
    return 2


def _quiet_libraries(progress: bool) -> None:
    """Hide the libraries' own progress bars (transformers' "Loading weights", "Writing model shards";
    huggingface_hub's and tqdm's): the commands draw their own, and ``--no-progress`` means none at all.

    Without ``--no-progress`` a user's explicit ``HF_HUB_DISABLE_PROGRESS_BARS=0`` wins; with it,
    nothing is drawn whatever the environment says. The environment is set before the libraries are
    imported (they read it then) and is inherited by child processes (the memory probe); libraries
    already imported are told directly."""
    if progress:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TQDM_DISABLE"] = "1"
    if sys.modules.get("huggingface_hub") is not None:  # None: imported never (or blocked)
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if sys.modules.get("transformers") is not None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


# A read-only file system, a full disk or quota, no permission: the user's setup, not a bug.
_WRITE_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM})


def _load(name: str):
    module, _ = COMMANDS[name]
    return importlib.import_module(f"distill.cli.{module}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported (all of them for --help)."""
    parser = argparse.ArgumentParser(prog="distill", description="Knowledge distillation toolkit.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command == name:
            _load(name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `distill` console script; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    try:
        parser = build_parser(command)  # imports the command's module
    except ModuleNotFoundError as err:
        return _missing_extra(err, command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _quiet_libraries(not getattr(args, "no_progress", False) and getattr(args, "progress", True) is not False)
    try:
        return int(_load(args.command).run(args) or 0)
    except ModuleNotFoundError as err:  # an optional extra not installed: what to pip install
        return _missing_extra(err, args.command)
    except (ValueError, FileNotFoundError) as err:
        # Bad input is reported as one clear line, not a traceback.
        print(f"distill {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # Output that cannot be written (read-only or full file system): `OutputError` says what and
        # what is intact; any other such OSError still gets one line naming the file.
        from distill.data import OutputError

        if not isinstance(err, OutputError) and err.errno not in _WRITE_ERRNOS:
            raise
        print(f"distill {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distill {args.command}: interrupted", file=sys.stderr)
        return 130

"""Helpers of the hardening tests (issue #11): run a command, read what it left, mount real file systems.

from hardening_helpers import cli, run_hidden, tmpfs, files_containing, small_store
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def cli(argv: Sequence[str], capsys) -> tuple[int, str]:
    """``distill ARGV`` in this process: (exit status, stdout + stderr)."""
    from distill.cli import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def run_hidden(argv: Sequence[str], hide: Sequence[str] = (), env: dict | None = None, timeout: float = 300):
    """``distill ARGV`` in a fresh interpreter where the modules ``hide`` are absent: each is put in
    ``sys.modules`` as None before anything is imported, which is how Python marks a module that
    cannot be imported (``import`` raises ModuleNotFoundError, ``importlib.util.find_spec`` answers
    None), exactly as if the package were not installed. Returns the CompletedProcess (text)."""
    code = (
        "import sys\n"
        f"for name in {list(hide)!r}:\n"
        "    sys.modules[name] = None\n"
        "from distill.cli import main\n"
        f"raise SystemExit(main({[str(a) for a in argv]!r}))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def flat(text: str) -> str:
    """``text`` with every run of whitespace made one space (rich wraps its lines at the terminal width)."""
    return " ".join(text.split())


def one_line_error(text: str, command: str) -> str:
    """The single ``distill COMMAND: error: ...`` line of ``text``; fails when there is none or a traceback."""
    assert "Traceback" not in text, text
    lines = [ln for ln in text.splitlines() if ln.startswith(f"distill {command}: error:")]
    assert len(lines) == 1, text
    return lines[0]


def files_containing(root: str | Path, needle: str) -> list[Path]:
    """Every file under ``root`` whose bytes contain ``needle``."""
    data = needle.encode()
    return [p for p in Path(root).rglob("*") if p.is_file() and data in p.read_bytes()]


def snapshot(root: str | Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``root``."""
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def tmpfs(size: str = "16m", *, skip: bool = True) -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted on a fresh directory (unmounted afterwards).

    Needs the right to mount (root in a container that allows it); without it the test is skipped
    with the reason. (chmod cannot make a directory read-only for root: a mount can.)"""
    where = Path(tempfile.mkdtemp(prefix="distill-tmpfs-"))
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if res.returncode != 0:
        where.rmdir()
        reason = f"cannot mount a tmpfs here ({res.stderr.decode().strip() or res.returncode})"
        if skip:
            pytest.skip(reason)
        raise RuntimeError(reason)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)
        shutil.rmtree(where, ignore_errors=True)


def remount(where: Path, options: str) -> None:
    """``mount -o remount,OPTIONS WHERE`` (e.g. ``ro``, ``rw,size=8m``)."""
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True)


def fill(where: Path, free_pages: int = 0) -> None:
    """Write a filler file until the file system at ``where`` is full (ENOSPC), then give back
    ``free_pages`` pages of 4 KiB (room for a small file such as a manifest, not for a shard)."""
    filler = where / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: a failed write leaves nothing to flush
        for block in (65536, 4096, 512):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * block)
    if free_pages:
        size = filler.stat().st_size
        os.truncate(filler, max(0, (size // 4096 - free_pages) * 4096))


def write_prompts(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"Invoice {i:04d} from Acme"}) + "\n")
    return path


def small_store(
    model_dir: Path, out: Path, prompts: Path, capsys, *, extra: Sequence[str] = ()
) -> tuple[int, str]:
    """``distill generate`` of a local model into ``out``: a shard every 5 answers, 4 new tokens each."""
    argv = ["generate", "--teacher", model_dir, "--prompts", prompts, "--out", out, "--max-new-tokens", 4]
    argv += ["--top-k", 5, "--flush-every", 5, "--batch-size", 5, "--no-progress", *extra]
    return cli(argv, capsys)

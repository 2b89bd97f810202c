"""Issue #11 items 1, 2, 3, 11: what a command may run or reveal when it opens a model or a URL.

Item 2: real model directories whose ``config.json`` (and ``tokenizer_config.json``) name an
``auto_map`` module that writes a marker file when imported; the fixture first proves the module
runs when trusted. Item 3: a real malicious ``pytorch_model.bin`` pickle (writes a marker when
unpickled; proven live in a child process) in a directory with no safetensors. Item 1: a password
in a teacher URL never reaches any file, output or error. Item 11: ``--top-k`` beyond the local
teacher's vocabulary is refused before a store exists.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distill.models.api import APITeacher
from distill.models.loading import load_config
from distill.models.open import open_model
from hardening_helpers import cli, files_containing, flat, one_line_error, write_prompts

EVIL = """
from pathlib import Path
Path({marker!r}).write_text("ran")  # proof that this module was imported (wherever a copy of it runs)
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig):
    model_type = {model_type!r}
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _custom_code_dir(src: Path, dst: Path, model_type: str) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(
        model_type=model_type,
        auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"},
    )
    (dst / "config.json").write_text(json.dumps(cfg))
    tcfg = json.loads((dst / "tokenizer_config.json").read_text())
    tcfg["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (dst / "tokenizer_config.json").write_text(json.dumps(tcfg))
    (dst / "evil.py").write_text(EVIL.format(model_type=model_type, marker=str(dst / "MARKER")))
    return dst


class _Payload:
    """Unpickling this creates ``path``: the shape of a real pickle attack (any callable could run)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_lm_dir):
    root = tmp_path_factory.mktemp("hostile")
    unknown = _custom_code_dir(tiny_lm_dir, root / "custom_arch", "evilnet")
    known = _custom_code_dir(tiny_lm_dir, root / "llama_with_auto_map", "llama")
    # Proof that the fixture is real: trusted, the auto_map module runs and writes its marker.
    load_config(unknown, trust_remote_code=True)
    assert (unknown / "MARKER").read_text() == "ran"
    (unknown / "MARKER").unlink()

    bin_dir = root / "pickle_only"
    shutil.copytree(tiny_lm_dir, bin_dir)
    for f in bin_dir.glob("*.safetensors"):
        f.unlink()
    (bin_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(bin_dir / "MARKER"))))
    live = root / "payload.bin"
    live.write_bytes(pickle.dumps(_Payload(str(root / "LIVE"))))
    code = f"import pickle; pickle.loads(open({str(live)!r}, 'rb').read())"
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True)
    assert (root / "LIVE").exists(), "the pickle payload does not run: the test would prove nothing"
    return {
        "unknown": unknown,
        "known": known,
        "pickle": bin_dir,
        "prompts": write_prompts(root / "p.jsonl", 3),
    }


def _commands(model: Path, other: Path, prompts: Path, tmp: Path) -> dict[str, list]:
    return {
        "train": ["train", "--student", model, "--data", prompts, "--out", tmp / "t", "--max-steps", 1],
        "generate": [
            "generate",
            "--teacher",
            model,
            "--prompts",
            prompts,
            "--out",
            tmp / "g",
            "--no-progress",
        ],
        "eval": ["eval", "--student", model, "--teacher", other, "--inputs", prompts, "--out", tmp / "e"],
        "route": [
            "route",
            "fit",
            "--student",
            model,
            "--teacher",
            other,
            "--inputs",
            prompts,
            "--out",
            tmp / "r.json",
        ],
        "serve": ["serve", model, "--port", 9],
    }


@pytest.mark.parametrize("command", ["train", "generate", "eval", "route", "serve"])
def test_auto_map_code_never_runs_untrusted(command, dirs, tiny_lm_dir, tmp_path, capsys):
    model = dirs["unknown"]
    code, out = cli(_commands(model, tiny_lm_dir, dirs["prompts"], tmp_path)[command], capsys)
    line = one_line_error(out, command)
    assert code == 2
    assert str(model) in line and "--trust-remote-code" in line
    assert not (model / "MARKER").exists(), "the checkpoint's auto_map module was imported"


def test_known_architecture_with_auto_map_loads_transformers_own_class(dirs, tmp_path, capsys):
    """A model_type transformers knows loads its own class; the shipped module still never runs."""
    model = dirs["known"]
    argv = ["generate", "--teacher", model, "--prompts", dirs["prompts"], "--out", tmp_path / "g"]
    code, out = cli([*argv, "--max-new-tokens", 2, "--no-progress"], capsys)
    assert code == 0, out
    assert type(open_model(str(model)).model).__name__ == "LlamaForCausalLM"
    assert not (model / "MARKER").exists()


@pytest.mark.parametrize("command", ["train", "generate", "eval", "route", "serve"])
def test_pickle_weights_refused_before_torch_reads_them(command, dirs, tiny_lm_dir, tmp_path, capsys):
    model = dirs["pickle"]
    code, out = cli(_commands(model, tiny_lm_dir, dirs["prompts"], tmp_path)[command], capsys)
    line = one_line_error(out, command)
    assert code == 2
    assert "pytorch_model.bin" in line and "safetensors only" in line and str(model) in line
    assert not (model / "MARKER").exists(), "the pickle was unpickled"


# --- item 1: credentials in URLs ---------------------------------------------------------------

SECRET = "s3cretPassw0rd"
URL = f"http://alice:{SECRET}@127.0.0.1:1/v1"


@pytest.mark.parametrize("command", ["generate", "generate-replicas", "eval", "route", "serve"])
def test_password_in_url_refused_and_never_shown(command, dirs, tiny_lm_dir, tmp_path, capsys):
    prompts = dirs["prompts"]
    argv = {
        "generate": ["generate", "--teacher", URL, "--prompts", prompts, "--out", tmp_path / "g"],
        "generate-replicas": [
            "generate", "--teacher", "http://127.0.0.1:1/v1", "--teacher", URL, "--prompts", prompts, "--out", tmp_path / "g",
        ],
        "eval": ["eval", "--student", tiny_lm_dir, "--teacher", URL, "--inputs", prompts, "--out", tmp_path / "e"],
        "route": ["route", "fit", "--student", tiny_lm_dir, "--teacher", URL, "--inputs", prompts, "--out", tmp_path / "r.json"],
        "serve": ["serve", tiny_lm_dir, "--router", tmp_path / "router.json", "--fallback", URL],
    }[command]  # fmt: skip
    code, out = cli(argv, capsys)
    line = one_line_error(out, command.split("-")[0])
    assert code == 2
    assert "must not carry credentials" in line and "http://[redacted]@127.0.0.1:1/v1" in line
    assert SECRET not in out and "alice" not in out
    assert files_containing(tmp_path, SECRET) == []
    assert not (tmp_path / "g").exists()  # refused before a store was made


def test_library_refuses_credentials_without_echoing_them():
    for make in (lambda: APITeacher(URL, model="m"), lambda: open_model(URL)):
        with pytest.raises(ValueError) as info:
            make()
        assert SECRET not in str(info.value) and "[redacted]" in str(info.value)


# --- item 11: --top-k beyond the vocabulary ----------------------------------------------------


def test_top_k_beyond_the_vocabulary_refused_before_a_store_exists(dirs, tiny_lm_dir, tmp_path, capsys):
    argv = ["generate", "--teacher", tiny_lm_dir, "--prompts", dirs["prompts"], "--out", tmp_path / "g"]
    code, out = cli([*argv, "--top-k", 1_000_000_000, "--no-progress"], capsys)
    line = one_line_error(out, "generate")
    vocab = json.loads((tiny_lm_dir / "config.json").read_text())["vocab_size"]
    assert (
        code == 2 and "--top-k" in line and "1000000000" in line and f"the {vocab} log-probabilities" in line
    )
    assert not (tmp_path / "g").exists(), "a store locked to that k was made"
    code, out = cli(
        [*argv, "--top-k", vocab, "--max-new-tokens", 1, "--no-progress"], capsys
    )  # the limit is fine
    assert code == 0, flat(out)

"""`distill train`'s flags are derived from TrainConfig: one per field, typed, documented, none missing."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from distill.cli.train import add_arguments
from distill.train.config import FIELD_DOCS, FIELD_NAMES, TrainConfig, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill train")
    add_arguments(p)
    return p


def _config(argv: list[str]) -> TrainConfig:
    args = _parser().parse_args(argv)
    return load_config(args.config, {name: getattr(args, name) for name in FIELD_NAMES})


def test_every_field_has_exactly_one_flag_with_its_docstring_as_help():
    actions = [a for a in _parser()._actions if a.dest in FIELD_NAMES]
    assert sorted(a.dest for a in actions) == sorted(FIELD_NAMES)
    for a in actions:
        assert a.default is None, a.dest  # "not given": the file's value or the default stays
        assert a.help.replace("%%", "%").endswith(FIELD_DOCS[a.dest]), a.dest
    flags = {a.dest: a.option_strings for a in actions}
    # Spellings users already have: the TOML alias for lmbda, --no- for a default-on switch.
    assert flags["lmbda"] == ["--lambda"] and flags["progress"] == ["--no-progress"]
    assert flags["warmup_steps"] == ["--warmup-steps"] and flags["max_grad_norm"] == ["--max-grad-norm"]


def test_every_flag_reaches_the_config():
    base = ["--student", "s", "--data", "d", "--out", "o"]
    cfg = _config([*base, "--mode", "on-policy", "--teacher", "t", "--loss", "tvd", "--temperature", "2.5",
                   "--alpha", "0.25", "--max-steps", "7", "--batch-size", "3", "--grad-accum", "2",
                   "--lr", "0.002", "--weight-decay", "0.01", "--warmup-steps", "4", "--max-grad-norm", "0.5",
                   "--max-length", "64", "--save-every", "3", "--keep-checkpoints", "2", "--resume",
                   "--seed", "9", "--lora-r", "4", "--lora-alpha", "8", "--lora-target-modules", "q_proj",
                   "v_proj", "--merge-lora", "--lambda", "0.75", "--beta", "0.2", "--max-new-tokens", "5",
                   "--sample-temperature", "0.7", "--mixed-precision", "bf16", "--log-with", "tensorboard",
                   "--log-every", "2", "--no-progress"])  # fmt: skip
    given = dict(
        mode="on-policy", teacher="t", loss="tvd", temperature=2.5, alpha=0.25, max_steps=7, batch_size=3,
        grad_accum=2, lr=0.002, weight_decay=0.01, warmup_steps=4, max_grad_norm=0.5, max_length=64,
        save_every=3, keep_checkpoints=2, resume=True, seed=9, lora_r=4, lora_alpha=8.0,
        lora_target_modules=("q_proj", "v_proj"), merge_lora=True, lmbda=0.75, beta=0.2, max_new_tokens=5,
        sample_temperature=0.7, mixed_precision="bf16", log_with=("tensorboard",), log_every=2, progress=False,
    )  # fmt: skip
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in given}
    for name, value in given.items():
        assert getattr(cfg, name) == value and type(getattr(cfg, name)) is type(value), name
        assert value != defaults[name], f"{name}: pick a non-default value so the test can fail"
    # Fields the flags left alone keep their defaults.
    assert _config(base) == TrainConfig(student="s", data="d", out="o")


def test_bad_flag_values_are_refused_by_argparse(capsys):
    for argv in (["--warmup-steps", "x"], ["--mode", "dpo"], ["--mixed-precision", "fp8"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(argv)
        assert argv[0] in capsys.readouterr().err

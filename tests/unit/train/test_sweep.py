"""`distill.train.sweep`: a grid of settings trained on one store and chosen on a validation file."""

from __future__ import annotations

import json

import pytest

from distill.cli import main
from distill.train.config import TrainConfig
from distill.train.sweep import SweepPoint, choose, grid_configs, parse_grid, sweep, validation_scores


@pytest.fixture(scope="module")
def store_and_val(tmp_path_factory, tiny_lm_dir):
    """A real store answered by the tiny teacher (top-5), and validation rows of the same task."""
    from distill.demos.triage_task import make_examples, to_rows
    from distill.models.base import GenerationSettings
    from distill.models.hf import HFTeacher
    from distill.store.generate import generate

    root = tmp_path_factory.mktemp("sweep")
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": e.id, "prompt": e.prompt}) + "\n" for e in make_examples(12, seed=2))
    )
    generate(HFTeacher(tiny_lm_dir), prompts, root / "store", progress=False,
             settings=GenerationSettings(max_new_tokens=3, temperature=0.0, top_logprobs=5))  # fmt: skip
    val = root / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in to_rows(make_examples(6, seed=1))))
    return root / "store", val


def test_parse_grid_converts_types_and_names_bad_specs():
    assert parse_grid(["temperature=1,2,4,8", "alpha=0.5,0.9", "max_steps=3"]) == {
        "temperature": [1.0, 2.0, 4.0, 8.0],
        "alpha": [0.5, 0.9],
        "max_steps": [3],
    }
    assert parse_grid(["lambda=0,1"]) == {"lmbda": [0.0, 1.0]}
    for spec, msg in [
        ("temperature", "NAME=V1,V2"),
        ("temprature=1,2", "'temprature' is not a setting"),
        ("out=a,b", "'out' is not a setting"),
        ("temperature=1,hot", "'hot' is not a valid float"),
        ("max_steps=1.5", "'1.5' is not a valid int"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_grid([spec])
    with pytest.raises(ValueError, match="given twice"):
        parse_grid(["alpha=0.1", "alpha=0.2"])


def test_grid_points_are_validated_before_anything_trains(tmp_path):
    base = TrainConfig(student="s", data="d", out=str(tmp_path), mode="logits")
    points = grid_configs(base, {"temperature": [1.0, 4.0], "alpha": [0.5, 0.9]})
    assert [s for s, _ in points] == [{"temperature": t, "alpha": a} for t in (1.0, 4.0) for a in (0.5, 0.9)]
    assert points[3][1].out == str(tmp_path / "temperature=4.0,alpha=0.9") and points[3][1].temperature == 4.0
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0"):
        grid_configs(base, {"temperature": [1.0, 0.0]})


def test_choose_follows_the_metric_and_breaks_ties_with_the_other():
    pts = [SweepPoint({"t": i}, tmp, {"eval_ce": ce, "exact_match": em}) for i, (tmp, ce, em) in
           enumerate([("a", 0.9, 0.5), ("b", 0.7, 0.5), ("c", 0.8, 0.4)])]  # fmt: skip
    assert choose(pts, "eval_ce").settings == {"t": 1}
    assert choose(pts, "exact_match").settings == {"t": 1}  # 0.5 twice: the lower CE wins
    with pytest.raises(ValueError, match="metric must be one of"):
        choose(pts, "bleu")


def test_sweep_trains_every_point_scores_on_validation_and_records_both_temperatures(
    tmp_path, tiny_student_dir, store_and_val
):
    store, val = store_and_val
    base = TrainConfig(student=str(tiny_student_dir), data=str(store), out=str(tmp_path / "sw"), mode="logits",
                       max_steps=3, batch_size=4, lr=1e-2, progress=False)  # fmt: skip
    result = sweep(base, {"temperature": [1.0, 8.0]}, val=val, metric="eval_ce")
    assert [p.settings for p in result.points] == [{"temperature": 1.0}, {"temperature": 8.0}]
    ces = [p.scores["eval_ce"] for p in result.points]
    assert ces[0] != ces[1]  # the temperature changed what was learnt
    assert result.best.scores["eval_ce"] == min(ces)
    for p in result.points:  # each point's score is the student's own, recomputed the same way
        assert validation_scores(p.out, val) == p.scores
        trained = json.loads(
            sorted((p.out / "checkpoints").glob("step-*"))[-1].joinpath("trainer_state.json").read_text()
        )
        # Both temperatures are recorded with the trained student: the store's capture T and the distillation T.
        assert (
            trained["config"]["temperature"] == p.settings["temperature"]
            and trained["capture_temperature"] == 1.0
        )
    saved = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert saved["capture_temperature"] == 1.0 and saved["best"]["settings"] == result.best.settings
    assert saved["higher_is_better"] is False and len(saved["points"]) == 2
    with pytest.raises(FileNotFoundError, match="no such validation file"):
        sweep(base, {"temperature": [1.0]}, val=tmp_path / "missing.jsonl")


@pytest.mark.slow
def test_cli_sweep_in_two_processes_matches_one(tmp_path, tiny_student_dir, store_and_val, capsys):
    store, val = store_and_val
    args = ["train", "--student", str(tiny_student_dir), "--data", str(store), "--mode", "logits", "--max-steps",
            "2", "--batch-size", "4", "--lr", "1e-2", "--no-progress", "--val", str(val)]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "two"), "--sweep", "temperature=1,4", "--workers", "2"]) == 0
    assert "best:" in capsys.readouterr().err
    two = json.loads((tmp_path / "two" / "sweep.json").read_text())
    assert main([*args, "--out", str(tmp_path / "one"), "--sweep", "temperature=4"]) == 0
    one = json.loads((tmp_path / "one" / "sweep.json").read_text())
    # CPU training is deterministic: a point trained in a worker process scores exactly as in this one.
    assert two["points"][1]["scores"] == one["points"][0]["scores"]
    assert main([*args, "--out", str(tmp_path / "bad"), "--sweep", "temperature=1,0"]) == 2
    assert "temperature must be a finite number > 0, got 0" in capsys.readouterr().err
    assert main(replace_args(args, "--val") + ["--out", str(tmp_path / "bad"), "--sweep", "alpha=0.5"]) == 2
    assert "--sweep and --val go together" in capsys.readouterr().err


def replace_args(args: list[str], flag: str) -> list[str]:
    """``args`` without ``flag`` and its value."""
    i = args.index(flag)
    return args[:i] + args[i + 2 :]

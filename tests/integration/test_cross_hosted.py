"""End to end across tokenizers from a hosted-API-like teacher: soft labels carry what the text cannot.

A teacher that is genuinely unsure (60/40 between " red" and " blue" for each question) is served by
`distill serve`; a real proxy takes the token ids out of its answers, as a hosted API gives none
(only token strings with their bytes and a top-k of strings). `distill generate --top-k 5` keeps the
top-k as bytes (store format 2); a student with another tokenizer trains with ``--mode logits``
(projection onto its vocabulary) and with ``--mode sft``. Greedy text is one-hot (" red" every time),
so only the soft labels can teach the student that " blue" is likely too."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from distill.cli import main
from faultproxy import FaultProxy
from servers import running_server

QUESTIONS = [f"Question {i}: which colour is box {i}?" for i in range(8)]
TEXTS = [q + a for q in QUESTIONS for a in (" red", " blue")] * 20


def _hide_ids(path: str, body: bytes) -> bytes:
    """A hosted API's answer: no token ids anywhere, only strings, bytes and log-probabilities."""
    data = json.loads(body)
    data.pop("prompt_token_ids", None)
    for choice in data.get("choices", []):
        for key in ("token_ids", "prompt_token_ids", "top_token_ids", "top_token_logprobs"):
            choice.pop(key, None)
    return json.dumps(data).encode()


@pytest.fixture(scope="module")
def unsure_teacher(tmp_path_factory):
    """A tiny LM (SentencePiece-style tokenizer) trained on answers sampled 60/40: red / blue."""
    from distill.models.tiny import CHAT_TEMPLATE, save_tiny, tiny_causal_lm, train_metaspace_tokenizer

    root = tmp_path_factory.mktemp("unsure")
    tok = train_metaspace_tokenizer(TEXTS, vocab_size=330, dummy_prefix=False)
    init = save_tiny(tiny_causal_lm(len(tok), n_layer=1, n_embd=32, n_head=2, seed=0), tok, root / "init")
    rng = random.Random(0)
    rows = []
    for _ in range(100):
        for q in QUESTIONS:
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
            rows.append({"prompt": prompt, "completion": " red" if rng.random() < 0.6 else " blue"})
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert tok.chat_template == CHAT_TEMPLATE
    args = ["train", "--student", str(init), "--data", str(root / "rows.jsonl"), "--out", str(root / "teacher"),
            "--mode", "sft", "--max-steps", "300", "--batch-size", "32", "--lr", "3e-3", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    return root / "teacher"


def _p_blue(model_dir, tok_dir=None) -> float:
    """The model's mean probability of " blue" as the answer's first token, over the questions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir or model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    blue = tok(" blue", add_special_tokens=False)["input_ids"][0]
    ps = []
    for q in QUESTIONS:
        text = tok.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            ps.append(torch.softmax(model(input_ids=ids).logits[0, -1], -1)[blue].item())
    return sum(ps) / len(ps)


@pytest.mark.slow  # a `distill serve` subprocess, a teacher and two students trained
def test_soft_labels_from_a_hosted_style_teacher_reach_a_student_of_another_tokenizer(
    tmp_path, unsure_teacher, capsys
):
    from distill.models.tiny import save_tiny, tiny_causal_lm, train_tokenizer
    from distill.store import open as open_store

    p_teacher = _p_blue(unsure_teacher)
    assert 0.25 < p_teacher < 0.55  # unsure, and " red" stays its greedy answer
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": f"q{i}", "messages": [{"role": "user", "content": q}]} for i, q in enumerate(QUESTIONS)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with (
        running_server(unsure_teacher) as url,
        FaultProxy(url.removesuffix("/v1"), rewrite=_hide_ids) as proxy,
    ):
        args = ["generate", "--teacher", proxy.url + "/v1", "--prompts", str(prompts), "--out", str(tmp_path / "store"),
                "--top-k", "5", "--max-new-tokens", "4", "--no-progress"]  # fmt: skip
        assert main(args) == 0
    st = open_store(tmp_path / "store")
    assert st.manifest["topk_kind"] == "bytes"
    recs = list(st)
    assert all(r["completion_token_ids"] is None and r["topk_bytes"] for r in recs)
    assert {r["completion"].split("\n")[0] for r in recs} == {" red"}  # greedy text: one-hot

    s_tok = train_tokenizer(TEXTS, vocab_size=300)  # byte-level BPE: another tokenizer
    assert (
        s_tok.get_vocab()
        != __import__("transformers").AutoTokenizer.from_pretrained(unsure_teacher).get_vocab()
    )
    init = save_tiny(
        tiny_causal_lm(len(s_tok), n_layer=1, n_embd=32, n_head=2, seed=1), s_tok, tmp_path / "init"
    )
    common = ["--student", str(init), "--data", str(tmp_path / "store"), "--max-steps", "120", "--batch-size", "8",
              "--lr", "3e-3", "--no-progress"]  # fmt: skip
    capsys.readouterr()
    assert (
        main(["train", *common, "--out", str(tmp_path / "logits"), "--mode", "logits", "--alpha", "0.9"]) == 0
    )
    err = " ".join(capsys.readouterr().err.split())
    assert "cross-tokenizer" in err and "completion positions aligned" in err
    assert main(["train", *common, "--out", str(tmp_path / "sft"), "--mode", "sft"]) == 0
    p_logits, p_sft = _p_blue(tmp_path / "logits"), _p_blue(tmp_path / "sft")
    print(f"p(blue): teacher {p_teacher:.3f}, logits {p_logits:.3f}, sft {p_sft:.3f}")
    assert p_sft < 0.05  # the text says " red" only
    assert p_logits > 0.15 and p_logits > p_sft + 0.1  # the soft labels moved it toward the teacher's 0.4
    assert math.isfinite(p_logits)

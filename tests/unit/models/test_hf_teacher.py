"""HFTeacher against tiny Llama-style models built in code (nothing downloaded)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import TINY_TEXTS
from distill.models.base import GenerationSettings, Request, Teacher
from distill.models.hf import CAPTURE_TEMPERATURE, HFTeacher, vocab_hash

PROMPTS = [TINY_TEXTS[i][: 4 + 9 * i] for i in range(6)]


def _requests() -> list[Request]:
    reqs = [Request(id=f"p{i}", prompt=p) for i, p in enumerate(PROMPTS)]
    reqs.append(Request(id="chat", messages=({"role": "user", "content": "Invoice 0012 from"},)))
    return reqs


@pytest.fixture(scope="module")
def teacher(tiny_lm_dir) -> HFTeacher:
    return HFTeacher(tiny_lm_dir, batch_size=4)


def test_is_a_teacher_with_identity(teacher, tiny_lm_dir, tiny_tokenizer):
    assert isinstance(teacher, Teacher)
    ident = teacher.identity()
    assert ident["kind"] == "hf"
    assert ident["name"] == tiny_lm_dir.name
    assert ident["tokenizer"]["vocab_hash"] == vocab_hash(tiny_tokenizer)
    assert len(ident["tokenizer"]["vocab_hash"]) == 64
    assert ident["capture_temperature"] == CAPTURE_TEMPERATURE == 1.0
    assert ident["dtype"] == "float32" and ident["eos_token_ids"] == [tiny_tokenizer.eos_token_id]
    json.dumps(ident)  # plain data, storable in a manifest


def test_identity_changes_with_the_weights(tiny_lm_dir, tiny_student_dir, tmp_path, teacher):
    import shutil

    from distill.models.hf import weights_fingerprint

    fp = teacher.identity()["weights_fingerprint"]
    assert fp == weights_fingerprint(shutil.copytree(tiny_lm_dir, tmp_path / "copy"))  # content, not path
    assert fp != weights_fingerprint(tiny_student_dir)
    # One weight changed in place (header untouched): a retrained checkpoint is told apart.
    changed = shutil.copytree(tiny_lm_dir, tmp_path / "changed")
    with open(changed / "model.safetensors", "r+b") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        name = sorted(k for k in header if k != "__metadata__")[len(header) // 2]
        f.seek(8 + header_len + header[name]["data_offsets"][0])
        first = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([first[0] ^ 1]))
    assert weights_fingerprint(changed) != fp
    with pytest.raises(FileNotFoundError, match="safetensors"):
        weights_fingerprint(tmp_path)


def test_vocab_hash_tells_tokenizers_apart(tiny_tokenizer):
    from distill.models.tiny import train_tokenizer

    other = train_tokenizer([t.upper() for t in TINY_TEXTS], vocab_size=400)
    assert vocab_hash(other) != vocab_hash(tiny_tokenizer)
    assert vocab_hash(tiny_tokenizer) == vocab_hash(tiny_tokenizer)


def test_greedy_batched_equals_unbatched(tiny_lm_dir, teacher):
    settings = GenerationSettings(max_new_tokens=10, top_logprobs=4)
    one_by_one = HFTeacher(tiny_lm_dir, batch_size=1)
    batched = teacher.complete(_requests(), settings)
    single = one_by_one.complete(_requests(), settings)
    assert [c.id for c in batched] == [r.id for r in _requests()]  # answered in request order
    assert len({len(c.prompt_token_ids) for c in batched}) > 3  # prompts of different lengths were padded
    for b, s in zip(batched, single):
        assert b.completion_token_ids == s.completion_token_ids
        assert b.text == s.text
        assert b.top_ids == s.top_ids
        for rb, rs in zip(b.top_logprobs, s.top_logprobs):
            assert rb == pytest.approx(rs, abs=1e-4)


def test_greedy_matches_transformers_generate(teacher):
    settings = GenerationSettings(max_new_tokens=8)
    for c in teacher.complete(_requests()[:3], settings):
        ids = torch.tensor([c.prompt_token_ids])
        out = teacher.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0
        )
        assert out[0, ids.shape[1] :].tolist() == c.completion_token_ids
        assert c.finish_reason == "length" and c.usage == {
            "prompt_tokens": ids.shape[1],
            "completion_tokens": 8,
        }


def test_top_logprobs_are_full_vocab_log_softmax_of_the_model(tiny_lm_dir, teacher):
    from transformers import AutoModelForCausalLM

    k = 5
    settings = GenerationSettings(max_new_tokens=6, top_logprobs=k)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    for c in teacher.complete(_requests()[2:5], settings):
        full = torch.tensor([c.prompt_token_ids + c.completion_token_ids])
        with torch.no_grad():
            logits = model(input_ids=full).logits[0].double()
        n = len(c.prompt_token_ids)
        expected = torch.log_softmax(logits[n - 1 : -1], dim=-1)  # row j predicted completion token j
        assert len(c.top_ids) == len(c.completion_token_ids)
        for j, tok in enumerate(c.completion_token_ids):
            want_v, want_i = expected[j].topk(k)
            assert c.top_ids[j] == want_i.tolist()
            assert c.top_logprobs[j] == pytest.approx(want_v.tolist(), abs=1e-4)
            assert c.top_ids[j][0] == tok  # greedy picks the most probable token
            assert math.fsum(math.exp(v) for v in c.top_logprobs[j]) <= 1.0 + 1e-6


def test_score_matches_generation(teacher):
    settings = GenerationSettings(max_new_tokens=6, top_logprobs=3)
    c = teacher.complete(_requests()[:1], settings)[0]
    s = teacher.score(c.prompt_token_ids, c.completion_token_ids, 3)
    assert s.top_ids == c.top_ids
    for a, b in zip(s.top_logprobs, c.top_logprobs):
        assert a == pytest.approx(b, abs=1e-4)
    assert s.token_logprobs == pytest.approx([row[0] for row in c.top_logprobs], abs=1e-4)
    # A forced token that is not the argmax gets its own (lower) log-probability.
    forced = [c.top_ids[0][2]]
    s2 = teacher.score(c.prompt_token_ids, forced, 3)
    assert s2.token_logprobs[0] == pytest.approx(c.top_logprobs[0][2], abs=1e-4)
    with pytest.raises(ValueError, match="prompt_ids"):
        teacher.score([], forced, 3)


def test_sampling_is_seeded_and_batch_independent(tiny_lm_dir, teacher):
    settings = GenerationSettings(max_new_tokens=10, temperature=1.3, top_p=0.95, seed=7)
    a = [c.completion_token_ids for c in teacher.complete(_requests(), settings)]
    b = [c.completion_token_ids for c in HFTeacher(tiny_lm_dir, batch_size=1).complete(_requests(), settings)]
    assert a == b
    greedy = [
        c.completion_token_ids for c in teacher.complete(_requests(), GenerationSettings(max_new_tokens=10))
    ]
    other_seed = GenerationSettings(max_new_tokens=10, temperature=1.3, top_p=0.95, seed=8)
    c = [x.completion_token_ids for x in teacher.complete(_requests(), other_seed)]
    assert a != greedy and a != c


def test_stops_at_end_of_sequence(tmp_path, tiny_lm_dir, tiny_tokenizer, teacher):
    """A checkpoint whose generation_config names an extra EOS id (as Llama 3 does) stops there."""
    from distill.models.tiny import save_tiny, tiny_causal_lm

    first = teacher.complete(_requests()[:1], GenerationSettings(max_new_tokens=8, top_logprobs=2))[0]
    stop_tok = first.completion_token_ids[3]
    model = tiny_causal_lm(len(tiny_tokenizer), n_layer=2, n_embd=64, n_head=4, seed=0)  # same weights
    model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, stop_tok]
    stopper = HFTeacher(save_tiny(model, tiny_tokenizer, tmp_path / "stopper"))
    c = stopper.complete(_requests()[:1], GenerationSettings(max_new_tokens=8, top_logprobs=2))[0]
    cut = first.completion_token_ids.index(stop_tok) + 1
    assert c.finish_reason == "stop"
    assert c.completion_token_ids == first.completion_token_ids[:cut]  # the EOS token is kept as an id...
    assert c.text == tiny_tokenizer.decode(c.completion_token_ids[:-1])  # ...but not in the text
    assert len(c.top_ids) == cut and c.usage["completion_tokens"] == cut


def test_chat_uses_the_chat_template(teacher, tiny_tokenizer):
    req = _requests()[-1]
    c = teacher.complete([req], GenerationSettings(max_new_tokens=2))[0]
    text = tiny_tokenizer.apply_chat_template(list(req.messages), tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|assistant|>")
    assert c.prompt_token_ids == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_bad_input_is_refused_before_work(tmp_path, teacher, tiny_lm_dir):
    with pytest.raises(FileNotFoundError, match="nope"):
        HFTeacher(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"not a saved model \(no config.json\)"):
        HFTeacher(tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        HFTeacher(tiny_lm_dir, batch_size=0)
    with pytest.raises(ValueError, match="dtype"):
        HFTeacher(tiny_lm_dir, dtype="float77")
    long = Request(id="long", prompt="Invoice " * 300)
    with pytest.raises(ValueError, match="'long'.*context length 256"):
        teacher.complete([_requests()[0], long], GenerationSettings(max_new_tokens=4))
    with pytest.raises(ValueError, match="top_logprobs"):
        teacher.complete(_requests()[:1], GenerationSettings(max_new_tokens=1, top_logprobs=10_000))


def test_chat_without_template_is_refused(tmp_path, tiny_tokenizer):
    from distill.models.tiny import save_tiny, tiny_causal_lm

    model = tiny_causal_lm(len(tiny_tokenizer), n_layer=1, n_embd=32, n_head=2)
    d = save_tiny(model, tiny_tokenizer, tmp_path / "plain")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    for extra in d.glob("chat_template.*"):
        extra.unlink()
    plain = HFTeacher(d)
    with pytest.raises(ValueError, match="no chat template"):
        plain.complete([_requests()[-1]], GenerationSettings(max_new_tokens=1))


def test_generate_gives_each_chosen_tokens_logprob(teacher):
    settings = GenerationSettings(max_new_tokens=6, temperature=1.5, seed=1, top_logprobs=1)
    for g in teacher.generate(_requests()[:3], settings):
        c = g.completion
        s = teacher.score(c.prompt_token_ids, c.completion_token_ids, 1)
        assert g.token_logprobs == pytest.approx(s.token_logprobs, abs=1e-4)
        assert all(lp <= top[0] + 1e-6 for lp, top in zip(g.token_logprobs, c.top_logprobs))


def test_token_bytes_reassemble_the_utf8_text(tiny_lm_dir, teacher):
    tok = teacher.tokenizer
    text = "Invoice é € 0012 – ok"
    ids = tok(text)["input_ids"]
    assert b"".join(teacher.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert teacher.token_bytes(tok.eos_token_id) == b"<eos>"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_on_token_reports_each_token_as_it_is_decoded(teacher, temperature):
    """`generate(on_token=...)` reports every generated token, in order, with exactly the ids and
    log-probabilities of the result; the text pieces add up to the answer (a trailing incomplete
    UTF-8 character is only in the final text)."""
    from distill.models.streaming import IncrementalText

    settings = GenerationSettings(max_new_tokens=12, temperature=temperature, top_logprobs=3, seed=5)
    seen = []
    gens = teacher.generate(_requests(), settings, on_token=seen.append)  # batch_size 4: two batches
    for i, g in enumerate(gens):
        mine = [t for t in seen if t.index == i]
        c = g.completion
        assert [t.token_id for t in mine] == c.completion_token_ids
        assert [t.logprob for t in mine] == g.token_logprobs
        assert [t.top_ids for t in mine] == c.top_ids and [t.top_logprobs for t in mine] == c.top_logprobs
        text = "".join(t.text for t in mine)
        assert c.text.startswith(text) and set(c.text[len(text) :]) <= {"\ufffd"}
    # A SentencePiece-like decode: a leading space is dropped; token 4 + 5 are one UTF-8 character.
    pieces = {1: "\u2581Hello".encode(), 2: "\u2581w".encode(), 3: b"orld", 4: b"\xe2\x82", 5: b"\xac"}

    def decode(ids):
        text = b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")
        return text.replace("\u2581", " ").removeprefix(" ")

    inc = IncrementalText(decode)
    out = [inc.push(i) for i in (1, 2, 3, 4, 5)]
    assert out == ["Hello", " w", "orld", "", "\u20ac"] and "".join(out) == decode([1, 2, 3, 4, 5])

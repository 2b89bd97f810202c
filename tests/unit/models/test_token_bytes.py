"""Token -> bytes tables of real and locally trained tokenizers; the converted mistral_common tokenizers
against their reference implementations."""

from __future__ import annotations

import random

import pytest

from distill.models.token_bytes import token_bytes

WORDS = ["Invoice", "total", "€12.50", "  two  spaces", "über", "naïve", "日本語のテキスト", "1234567",
         "3.14159", "\n\nnew line", "tab\there", "emoji 😀 ok", "   lead", " x", "ÿ", "Ω≈ç√", "a" * 30,
         "don't", "URGENT: I was charged twice!!", "<s> literal", "[INST]", "\u00a0nbsp", "–dash—",
         "Ölfeld", "x²", "2024-03-07", "$1,234.56", "snake_case_name", "CamelCaseWord", "#hashtag"]  # fmt: skip


def _strings(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))) for _ in range(n)]


def test_sentencepiece_v1_matches_sentencepiece(sp_v1_tokenizer):
    spm = pytest.importorskip("sentencepiece")
    from distill.models.mistral_tokenizers import SP_V1_FILE, data_dir

    ref = spm.SentencePieceProcessor(model_file=str(data_dir() / SP_V1_FILE))
    assert len(sp_v1_tokenizer) == ref.get_piece_size() == 32000
    bad = [
        s for s in _strings() if sp_v1_tokenizer(s, add_special_tokens=False)["input_ids"] != ref.encode(s)
    ]
    assert bad == []


def test_tekken_matches_tekkenizer(tekken_tokenizer):
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    from distill.models.mistral_tokenizers import TEKKEN_FILE, data_dir

    ref = Tekkenizer.from_file(str(data_dir() / TEKKEN_FILE))
    assert len(tekken_tokenizer) == ref.n_words == 131072
    enc = tekken_tokenizer
    bad = [
        s
        for s in _strings()
        if enc(s, add_special_tokens=False)["input_ids"] != ref.encode(s, bos=False, eos=False)
    ]
    assert bad == []
    assert [enc.convert_ids_to_tokens(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]


@pytest.mark.parametrize(
    "name", ["tiny_tokenizer", "metaspace_tokenizer", "sp_v1_tokenizer", "tekken_tokenizer"]
)
def test_tokens_spell_the_text(name, request):
    """The bytes of a text's tokens are the text's UTF-8 bytes (after a dummy-prefix space where the
    tokenizer adds one), for every kind: byte-level, Metaspace with byte fallback, SentencePiece, Tekken."""
    tok = request.getfixturevalue(name)
    tb = token_bytes(tok)
    assert len(tb) == len(tok)
    for s in _strings(150, seed=1):
        ids = tok(s, add_special_tokens=False)["input_ids"]
        spelled = b"".join(tb.table[i] for i in ids)
        want = s.encode("utf-8")
        if "<unk>" in tok.convert_ids_to_tokens(ids):
            continue  # a character the tiny byte-level tokenizer never saw and cannot spell
        assert spelled in (want, b" " + want) if tb.dummy_prefix else spelled == want, s


def test_byte_fallback_euro_and_specials(metaspace_tokenizer, sp_v1_tokenizer, tekken_tokenizer):
    for tok in (metaspace_tokenizer, sp_v1_tokenizer):
        tb = token_bytes(tok)
        assert tb.kind == "metaspace" and tb.dummy_prefix
        pieces = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "€".encode()]
        assert [tb.table[i] for i in pieces] == [b"\xe2", b"\x82", b"\xac"]
        assert tb.table[tok.eos_token_id] == b"" and tb.special[tok.eos_token_id]
        # "▁" and its byte-fallback twin "<0x20>" both spell a space: lookups give the piece, not the byte
        assert tb.by_bytes[b" "] == tok.convert_tokens_to_ids("▁")
    tb = token_bytes(tekken_tokenizer)
    assert tb.kind == "byte_level" and not tb.dummy_prefix
    assert tb.table[tekken_tokenizer.convert_tokens_to_ids("Ġthe")] == b" the"
    assert all(tb.table[i] == b"" for i in range(1000))  # Tekken's 1,000 special tokens


def test_wordpiece_is_refused():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    wp = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    )
    with pytest.raises(ValueError, match="WordPiece"):
        token_bytes(wp)

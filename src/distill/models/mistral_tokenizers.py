"""Real production tokenizers that ship offline, as `transformers` fast tokenizers.

The PyPI package ``mistral_common`` carries Mistral's SentencePiece v1 model (32,000 pieces,
Llama-2 style ``▁`` and byte fallback) and Tekken (tiktoken-style byte-level BPE, 131,072 entries)
in ``mistral_common/data/``. `transformers` cannot open either directly here, so both are converted
into `tokenizers` models; tests check them token for token against the reference implementations
(`sentencepiece.SentencePieceProcessor`, ``mistral_common``'s ``Tekkenizer``). Used by the
cross-tokenizer tests and benchmarks as real mismatched pairs; needs ``pip install distill[dev]``.
"""

from __future__ import annotations

import base64
import json
from functools import lru_cache
from pathlib import Path

TEKKEN_FILE = "tekken_240911.json"
SP_V1_FILE = "tokenizer.model.v1"


def data_dir() -> Path:
    """``mistral_common/data`` of the installed package."""
    try:
        import mistral_common
    except ImportError:
        raise ImportError("the real tokenizers need mistral_common: pip install 'distill[dev]'") from None
    return Path(mistral_common.__file__).parent / "data"


@lru_cache(maxsize=2)
def sentencepiece_v1():
    """SentencePiece v1 (32,000 pieces) as a `PreTrainedTokenizerFast`; bos ``<s>``, eos ``</s>``, unk ``<unk>``.

    Encodes like ``SentencePieceProcessor.encode`` (no BOS is added by ``tokenizer(text)``: the
    converted model has no post-processor, so ids are the pieces of the text only)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    path = data_dir() / SP_V1_FILE
    proto = SentencePieceExtractor(str(path)).proto
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    tok = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        split_special_tokens=True,  # as the reference: "<s>" typed in a text is text, not the control token
    )
    fast.name_or_path = "mistral-sentencepiece-v1"
    return fast


@lru_cache(maxsize=2)
def tekken():
    """Tekken (131,072 entries: 1,000 special tokens, then byte-level BPE ranks) as a `PreTrainedTokenizerFast`.

    Token ids equal ``Tekkenizer``'s: rank r is id ``1000 + r``; specials ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ...
    """
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    raw = json.loads((data_dir() / TEKKEN_FILE).read_text(encoding="utf-8"))
    cfg = raw["config"]
    n_special = int(cfg["default_num_special_tokens"])
    n_ranks = int(cfg["default_vocab_size"]) - n_special
    ranks = {base64.b64decode(e["token_bytes"]): int(e["rank"]) for e in raw["vocab"][:n_ranks]}
    enc = bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(enc[c] for c in b)

    vocab = {s(b): r + n_special for b, r in ranks.items()}
    merges = []
    for b, r in ranks.items():
        # tiktoken ranks are merge priorities: a token is made from the split of lowest-ranked pieces
        local = [
            (ranks[b[:i]], ranks[b[i:]], b[:i], b[i:])
            for i in range(1, len(b))
            if b[:i] in ranks and b[i:] in ranks
        ]
        if local:
            local.sort()
            merges += [(r, s(lft), s(rgt)) for _, _, lft, rgt in local]
    merges.sort(key=lambda m: m[0])
    tok = Tokenizer(BPE(vocab, [(a, b) for _, a, b in merges], fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(cfg["pattern"]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = [t["token_str"] for t in raw.get("special_tokens", [])][:n_special]
    if not specials:  # older files list none: Tekkenizer's defaults, then fillers
        specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
                    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                    "[TOOL_CONTENT]"]  # fmt: skip
        specials += [f"<SPECIAL_{i}>" for i in range(len(specials), n_special)]
    # Specials take ids 0..n_special-1 below the BPE ranks: written into the serialised tokenizer, since
    # `add_tokens` would give them the next free ids instead.
    tok_json = json.loads(tok.to_str())
    tok_json["added_tokens"] = [
        {"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, name in enumerate(specials)
    ]  # fmt: skip
    tok_json["model"]["vocab"].update({name: i for i, name in enumerate(specials)})
    tok = Tokenizer.from_str(json.dumps(tok_json))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        split_special_tokens=True,
    )
    fast.name_or_path = "mistral-tekken"
    return fast


__all__ = ["data_dir", "sentencepiece_v1", "tekken"]

"""Tiny causal language models and tokenizers built in code, for tests and the built-in demos.

Nothing is downloaded: the tokenizer is trained locally with `tokenizers` on the texts given,
the model is a randomly initialised Llama-style `transformers` model of a few layers.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

# A minimal chat template so `apply_chat_template` (and /v1/chat/completions) works on tiny models.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``texts``; returns a `PreTrainedTokenizerFast`.

    ``vocab_size`` includes the special tokens and the 256 byte symbols, so it must be > 262.
    pad = ``<pad>`` (id 0), eos = bos = ``<eos>`` (id 1).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be > {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<eos>",
        unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def train_metaspace_tokenizer(texts: Iterable[str], vocab_size: int = 600, *, dummy_prefix: bool = True):
    """A SentencePiece-style BPE tokenizer trained on ``texts``: ``▁`` for spaces, a dummy-prefix space,
    and byte-fallback pieces ``<0x00>``..``<0xFF>`` for characters it has no piece for (Llama 2 style).

    ``dummy_prefix=False``: no space is prepended to the text (and none stripped when decoding), so a
    completion that starts with a space keeps it (SentencePiece's ``add_dummy_prefix: false``).

    ``vocab_size`` includes the special tokens (ids 0-5, as `train_tokenizer`) and the 256 byte pieces
    (ids 6-261). Returns a `PreTrainedTokenizerFast`; pad ``<pad>``, eos = bos ``<eos>``.
    """
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    n_special = len(SPECIAL_TOKENS)
    if vocab_size <= 256 + n_special + 1:
        raise ValueError(f"vocab_size must be > {256 + n_special + 1}, got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    scheme = "always" if dummy_prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=True)
    strip = [decoders.Strip(" ", 1, 0)] if dummy_prefix else []
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 256, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    # The byte pieces go right after the specials; trained pieces move up by 256 (merges name pieces, not ids).
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    moved = {p: (i if i < n_special else i + 256) for p, i in vocab.items()}
    moved.update({f"<0x{b:02X}>": n_special + b for b in range(256)})
    spec["model"]["vocab"] = moved
    tok = Tokenizer.from_str(json.dumps(spec))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<eos>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_causal_lm(
    vocab_size: int,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_positions: int = 256,
    seed: int = 0,
):
    """A randomly initialised Llama-style causal LM (``LlamaForCausalLM``) of the given size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=n_embd,
        intermediate_size=4 * n_embd,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_head,
        max_position_embeddings=n_positions,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_tiny(model, tokenizer, path: str | Path) -> Path:
    """Save model (safetensors) and tokenizer with ``save_pretrained``; returns the directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

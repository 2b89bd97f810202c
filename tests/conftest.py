"""Shared fixtures: tiny models built in code, saved to temporary directories (nothing downloaded)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models run faster on one thread than two on a shared 2-core machine (measured: quick demo 17 s vs 268 s
# under load). Set before torch is imported so subprocesses started by tests inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after the environment above)

torch.set_num_threads(1)

# A narrow, repetitive text domain: enough structure for a 2-layer model to learn something quickly.
TINY_TEXTS = [
    f"Invoice {i:04d} from Acme {['GmbH', 'Ltd', 'Inc'][i % 3]}: total {i * 3.5:.2f} EUR, due 2024-{i % 12 + 1:02d}-{i % 28 + 1:02d}."
    for i in range(300)
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from distill.models.tiny import train_tokenizer

    return train_tokenizer(TINY_TEXTS, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, tiny_tokenizer):
    """A saved 2-layer Llama-style causal LM (random weights) with its tokenizer: a teacher or student."""
    from distill.models.tiny import save_tiny, tiny_causal_lm

    model = tiny_causal_lm(len(tiny_tokenizer), n_layer=2, n_embd=64, n_head=4, seed=0)
    return save_tiny(model, tiny_tokenizer, tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory, tiny_tokenizer):
    """A smaller saved causal LM sharing ``tiny_lm_dir``'s tokenizer."""
    from distill.models.tiny import save_tiny, tiny_causal_lm

    model = tiny_causal_lm(len(tiny_tokenizer), n_layer=1, n_embd=32, n_head=2, seed=1)
    return save_tiny(model, tiny_tokenizer, tmp_path_factory.mktemp("tiny_student"))


@pytest.fixture(scope="session")
def tiny_lm_server(tiny_lm_dir):
    """A plain `distill serve` of ``tiny_lm_dir`` on 127.0.0.1 (no API key): its ``.../v1`` base URL.

    One for the whole test session: starting a server costs ~10 s, and tests that need their own
    settings (a key, limits, a router) start their own with `servers.running_server`."""
    from servers import running_server

    with running_server(tiny_lm_dir) as url:
        yield url


@pytest.fixture(scope="session")
def tiny_lm_model_id(tiny_lm_server) -> str:
    """The model id ``tiny_lm_server`` reports at ``/v1/models``."""
    import httpx

    return httpx.get(tiny_lm_server + "/models").json()["data"][0]["id"]


# Real tokenizers that ship offline in mistral_common (SentencePiece v1, Tekken), converted to fast
# tokenizers (distill.models.mistral_tokenizers); tests/unit/models/test_token_bytes.py checks them
# token for token against the reference implementations.
@pytest.fixture(scope="session")
def sp_v1_tokenizer():
    pytest.importorskip("mistral_common")
    from distill.models.mistral_tokenizers import sentencepiece_v1

    return sentencepiece_v1()


@pytest.fixture(scope="session")
def tekken_tokenizer():
    pytest.importorskip("mistral_common")
    from distill.models.mistral_tokenizers import tekken

    return tekken()


@pytest.fixture(scope="session")
def metaspace_tokenizer():
    """A SentencePiece-style BPE (``▁``, dummy prefix, byte fallback) trained on the tiny texts."""
    from distill.models.tiny import train_metaspace_tokenizer

    return train_metaspace_tokenizer(TINY_TEXTS, vocab_size=450)

"""`HFTeacher`: a local `transformers` causal LM as a teacher.

Decoding is a small explicit loop (not ``model.generate``) so that exactly the settings in
`GenerationSettings` apply (no repetition penalty or top-k filter inherited from a checkpoint's
``generation_config.json``), every step's raw logits are at hand for the top-k log-probabilities,
and sampling is seeded per request, which makes results independent of how requests are batched.

Top-k log-probabilities are ``log_softmax`` over the FULL vocabulary of the model's unmodified
logits, i.e. at temperature 1 whatever the sampling temperature: the *capture temperature* is 1.0
(`CAPTURE_TEMPERATURE`). A consumer that wants the teacher at temperature T rescales them.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.models.base import Completion, GenerationSettings, Request
from distill.models.identity import text_hash, vocab_hash, weights_fingerprint
from distill.models.streaming import row_reporter
from distill.models.token_bytes import _byte_decoder

__all__ = ["CAPTURE_TEMPERATURE", "Generation", "HFTeacher", "Score", "vocab_hash", "weights_fingerprint"]

CAPTURE_TEMPERATURE = 1.0
"""Temperature at which `HFTeacher` computes top-k log-probabilities (the raw model distribution)."""


@dataclass
class Score:
    """Teacher-forced log-probabilities of given completion tokens (see `HFTeacher.score`).

    Lists have one row per completion token; row j is the distribution that predicted token j.
    """

    token_logprobs: list[float]
    """log p(completion_ids[j] | prompt, completion_ids[:j]) at temperature 1, shape (n,)."""
    top_ids: list[list[int]]
    """Top-k token ids at each position, shape (n, k), most probable first."""
    top_logprobs: list[list[float]]
    """Their log-probabilities, shape (n, k)."""


@dataclass
class Generation:
    """A `Completion` plus the log-probability of each generated token (what `distill serve` needs).

    ``token_logprobs[j]`` is log p(completion_token_ids[j]) at temperature 1, also when a sampled
    token is outside the top-k."""

    completion: Completion
    token_logprobs: list[float]


def _sample_seed(seed: int, request_id: str) -> int:
    # Per-request seed: a request's sample does not depend on which batch it landed in.
    digest = hashlib.sha256(f"{seed}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


_BYTE_DECODER = _byte_decoder()


class HFTeacher:
    """A local causal LM (a ``save_pretrained`` directory) that answers `Request`s.

    ``device``: a torch device string ("cpu", "cuda", "cuda:1"). ``dtype``: None (float32 on CPU,
    the checkpoint's own dtype elsewhere), a torch dtype, or its name ("bfloat16"). ``batch_size``:
    requests decoded together (left-padded). ``trust_remote_code``: run code shipped with the
    checkpoint; off unless asked. Weights are loaded from safetensors only.
    Thread-safe: model calls are serialised by a lock.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "cpu",
        dtype: Any = None,
        batch_size: int = 8,
        trust_remote_code: bool = False,
    ) -> None:
        import torch

        from distill.models.loading import check_model_dir, load_causal_lm, load_tokenizer

        path = check_model_dir(model_dir, "model")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if dtype is None:
            dtype = torch.float32 if str(device).startswith("cpu") else "auto"
        elif isinstance(dtype, str) and dtype != "auto":
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(f"dtype must be a torch dtype name such as 'bfloat16', got {dtype!r}")
            dtype = getattr(torch, dtype)
        self.model_dir = path
        self.trust_remote_code = bool(trust_remote_code)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.tokenizer = load_tokenizer(path, "model", trust_remote_code=trust_remote_code)
        self.model = load_causal_lm(path, "model", dtype=dtype, trust_remote_code=trust_remote_code)
        self.model.to(self.device)
        self.model.eval()
        self._lock = threading.Lock()
        # The Rust tokenizer must not be re-configured from two threads at once ("Already borrowed").
        self._tok_lock = threading.Lock()
        # transformers 5.x renamed the KV-cache argument past_key_values -> cache; accept either.
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._eos_ids = self._collect_eos_ids()
        pad = self.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else min(self._eos_ids, default=0)
        self._max_positions = getattr(self.model.config, "max_position_embeddings", None)
        # Heads are often padded past the tokenizer (131,072 rows for a 512-token tokenizer, or Qwen's
        # 151,936 vs 152,064): those slots hold no token, so they are never generated nor put in a top-k.
        self._n_real = min(len(self.tokenizer), int(self.model.config.vocab_size))
        self._special_ids = set(self.tokenizer.all_special_ids)
        self._byte_level = "ByteLevel" in self._decoder_spec()
        self._bytes_cache: dict[int, bytes] = {}
        self._identity = {
            "kind": "hf",
            "name": path.resolve().name,
            "model_type": getattr(self.model.config, "model_type", None),
            "dtype": str(self.model.dtype).removeprefix("torch."),  # bf16 and fp32 answers differ
            "tokenizer": {"name": path.resolve().name, "vocab_hash": vocab_hash(self.tokenizer)},
            "weights_fingerprint": weights_fingerprint(path),
            "chat_template_hash": text_hash(getattr(self.tokenizer, "chat_template", None)),
            "eos_token_ids": sorted(self._eos_ids),
            "capture_temperature": CAPTURE_TEMPERATURE,
        }

    def __repr__(self) -> str:
        return (
            f"HFTeacher({str(self.model_dir)!r}, device={str(self.device)!r}, batch_size={self.batch_size})"
        )

    def _collect_eos_ids(self) -> set[int]:
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if gen_eos is not None:
            ids.update(int(i) for i in ([gen_eos] if isinstance(gen_eos, int) else gen_eos))
        return ids

    def _decoder_spec(self) -> str:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return ""
        return json.dumps(json.loads(backend.to_str()).get("decoder"))

    # --- public API -------------------------------------------------------------------------

    @property
    def max_top_logprobs(self) -> int:
        """Most top log-probabilities per token this teacher can return: its real vocabulary (tokenizer entries)
        (`distill.store.generate.generate` checks ``top_logprobs`` against it before any request)."""
        return self._n_real

    def identity(self) -> dict[str, Any]:
        """Who answers, as plain JSON data: ``{"kind": "hf", "name", "model_type", "dtype", "tokenizer": {"name",
        "vocab_hash"}, "weights_fingerprint", "chat_template_hash", "eos_token_ids", "capture_temperature"}``.

        ``name`` is the model directory's name. The fingerprint and hashes change when the weights,
        chat template or stop tokens change, so a record made by an older model is never reused."""
        return json.loads(json.dumps(self._identity))

    def encode(self, request: Request) -> list[int]:
        """Prompt token ids of ``request``: plain text tokenised as is, chats through the chat template."""
        if request.messages is not None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(
                    f"request {request.id!r} is a chat, but the tokenizer in {str(self.model_dir)!r} has no chat template"
                )
            try:
                with self._tok_lock:
                    text = self.tokenizer.apply_chat_template(
                        [dict(m) for m in request.messages], tokenize=False, add_generation_prompt=True
                    )
            except Exception as err:  # jinja2.TemplateError, e.g. "roles must alternate"
                raise ValueError(
                    f"request {request.id!r}: the chat template refused the messages: {err}"
                ) from None
            with self._tok_lock:
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            with self._tok_lock:
                ids = self.tokenizer(request.prompt)["input_ids"]
        if not ids:
            if self.tokenizer.bos_token_id is None:
                raise ValueError(
                    f"request {request.id!r}: the prompt is empty and the tokenizer has no BOS token"
                )
            ids = [int(self.tokenizer.bos_token_id)]
        return [int(i) for i in ids]

    def check_length(self, request_id: str, n_prompt: int, max_new_tokens: int) -> None:
        """Raise ValueError when prompt + ``max_new_tokens`` exceeds the model's context length."""
        if self._max_positions is not None and n_prompt + max_new_tokens > self._max_positions:
            raise ValueError(
                f"request {request_id!r}: {n_prompt} prompt tokens + max_new_tokens {max_new_tokens} "
                f"exceed the model's context length {self._max_positions}"
            )

    @property
    def max_context(self) -> int | None:
        """The model's context length in tokens (prompt + completion), when its config says."""
        return self._max_positions

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token ``token_id`` stands for (may be part of a UTF-8 character); special tokens as their text."""
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        with self._tok_lock:
            tok = self.tokenizer.convert_ids_to_tokens(int(token_id))
        if tok is None:
            raw = b""
        elif token_id in self._special_ids:
            raw = tok.encode("utf-8")
        elif self._byte_level and all(ch in _BYTE_DECODER for ch in tok):
            raw = bytes(_BYTE_DECODER[ch] for ch in tok)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok):  # sentencepiece byte fallback
            raw = bytes([int(tok[3:5], 16)])
        else:
            raw = tok.replace("\u2581", " ").encode("utf-8")  # sentencepiece marks spaces with U+2581
        self._bytes_cache[token_id] = raw
        return raw

    def complete(self, requests: Sequence[Request], settings: GenerationSettings) -> list[Completion]:
        """Answer ``requests`` in order (see `generate`)."""
        return [g.completion for g in self.generate(requests, settings)]

    def generate(
        self, requests: Sequence[Request], settings: GenerationSettings, on_token: Callable | None = None
    ) -> list[Generation]:
        """Answer ``requests`` in order, with each generated token's log-probability. All prompts are tokenised and length-checked before any decoding.

        Requests are decoded ``batch_size`` at a time (similar lengths together, left-padded);
        in float32, greedy results do not depend on the batching (log-probabilities agree to ~1e-6).
        In bfloat16/float16 the rounding depends on the batch shape, so a near-tie can break
        differently: load in float32 when runs must match exactly. Generation stops at an end-of-sequence token
        (kept as the last completion token id, with its log-probabilities; not in ``text``) or after
        ``settings.max_new_tokens`` tokens.

        ``on_token``: called from this thread after each decoding step with a
        `distill.models.streaming.Token` for every request still decoding (its text piece, id and
        log-probabilities), so a server can stream the answer as it is decoded.
        """
        vocab = self._n_real
        if settings.top_logprobs > vocab:
            raise ValueError(
                f"top_logprobs must be <= the vocabulary size {vocab}, got {settings.top_logprobs}"
            )
        encoded = [self.encode(r) for r in requests]
        for r, ids in zip(requests, encoded):
            self.check_length(r.id, len(ids), settings.max_new_tokens)
        # Longest first, so each batch holds prompts of similar length (less padding).
        order = sorted(range(len(requests)), key=lambda i: -len(encoded[i]))
        results: list[Generation | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            report = on_token and row_reporter(on_token, chunk, self._decode_text, self._eos_ids)
            outs = self._decode(
                [encoded[i] for i in chunk], [requests[i].id for i in chunk], settings, report
            )
            for i, (tokens, tok_lps, top_ids, top_lps, stopped) in zip(chunk, outs):
                c = self._completion(requests[i].id, encoded[i], tokens, top_ids, top_lps, stopped, settings)
                results[i] = Generation(c, tok_lps)
        return [c for c in results if c is not None]

    def score(self, prompt_ids: Sequence[int], completion_ids: Sequence[int], k: int) -> Score:
        """Teacher-forced log-probabilities of ``completion_ids`` after ``prompt_ids`` (temperature 1).

        Returns each given token's log-probability and the top-``k`` ids/log-probabilities at each
        of its positions. ``prompt_ids`` must be non-empty; ``k`` in [0, vocabulary size].
        """
        import torch

        if not prompt_ids:
            raise ValueError("score: prompt_ids must hold at least one token")
        if not completion_ids:
            return Score([], [], [])
        n_prompt = len(prompt_ids)
        ids = torch.tensor([list(prompt_ids) + list(completion_ids)], dtype=torch.long, device=self.device)
        vocab = self._n_real
        if not 0 <= int(k) <= vocab:
            raise ValueError(f"score: k must be in [0, {vocab}], got {k!r}")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"score: token ids must be in [0, {vocab}), got one outside")
        self.check_length("score", n_prompt, len(completion_ids))
        with self._lock, torch.inference_mode():
            logits = self.model(input_ids=ids, use_cache=False).logits[0, n_prompt - 1 : -1, :vocab].float()
            logp = torch.log_softmax(logits, dim=-1)  # (n, V): position j predicts completion token j
            target = ids[0, n_prompt:]
            token_lp = logp.gather(1, target[:, None])[:, 0]
            top_v, top_i = logp.topk(int(k), dim=-1) if k else (logp[:, :0], target[:, None][:, :0])
        return Score(token_lp.tolist(), top_i.tolist(), top_v.tolist())

    # --- decoding ---------------------------------------------------------------------------

    def _decode(self, prompts: list[list[int]], ids: list[str], settings: GenerationSettings, report=None):
        """Decode one batch. Returns per row (tokens, token_logprobs, top_ids, top_logprobs, stopped_at_eos);
        ``report(row, token_id, logprob, top_ids, top_logprobs)`` after each row's step, when given."""
        import torch

        B, L = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((B, L), self._pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for b, p in enumerate(prompts):  # left padding: every row's last prompt token is at column L-1
            input_ids[b, L - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[b, L - len(p) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        # Positions count real tokens only, so a padded row sees the same positions as unpadded.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        k = settings.top_logprobs
        sampling = settings.temperature > 0
        gens = []
        if sampling:
            for rid in ids:
                g = torch.Generator(device=self.device)
                g.manual_seed(_sample_seed(settings.seed, rid))
                gens.append(g)
        tokens: list[list[int]] = [[] for _ in range(B)]
        tok_lps: list[list[float]] = [[] for _ in range(B)]
        top_ids: list[list[list[int]]] = [[] for _ in range(B)]
        top_lps: list[list[list[float]]] = [[] for _ in range(B)]
        done = [False] * B
        stopped = [False] * B
        cache = None
        step_ids, step_pos = input_ids, positions
        with self._lock, torch.inference_mode():
            for _ in range(settings.max_new_tokens):
                out = self.model(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=step_pos,
                    use_cache=True,
                    **{self._cache_kw: cache},
                )
                cache = getattr(out, self._cache_kw, None)
                if cache is None:
                    cache = out.past_key_values
                logits = out.logits[:, -1, : self._n_real].float()  # (B, V) raw logits, real tokens only
                logp = torch.log_softmax(logits, dim=-1)  # capture temperature 1, full vocabulary
                if sampling:
                    nxt = self._sample(logits, settings, gens)
                else:
                    nxt = logits.argmax(dim=-1)
                if k:
                    tv, ti = logp.topk(k, dim=-1)
                    tv_l, ti_l = tv.tolist(), ti.tolist()
                nxt_l = nxt.tolist()
                chosen_l = logp.gather(1, nxt[:, None])[:, 0].tolist()
                for b in range(B):
                    if done[b]:
                        continue
                    tokens[b].append(nxt_l[b])
                    tok_lps[b].append(chosen_l[b])
                    if k:
                        top_ids[b].append(ti_l[b])
                        top_lps[b].append(tv_l[b])
                    if report is not None:
                        report(b, nxt_l[b], chosen_l[b], ti_l[b] if k else None, tv_l[b] if k else None)
                    if nxt_l[b] in self._eos_ids:
                        done[b] = stopped[b] = True
                if all(done):
                    break
                # Finished rows keep decoding a pad token (ignored) so the batch stays rectangular.
                fill = torch.tensor(
                    [self._pad_id if d else t for d, t in zip(done, nxt_l)], device=self.device
                )
                step_ids = fill[:, None]
                step_pos = step_pos[:, -1:] + 1
                mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=self.device)], dim=1)
        return list(zip(tokens, tok_lps, top_ids, top_lps, stopped))

    @staticmethod
    def _sample(logits, settings: GenerationSettings, gens):
        import torch

        probs = torch.softmax(logits / settings.temperature, dim=-1)
        if settings.top_p < 1.0:
            # Nucleus: keep the most probable tokens until their mass reaches top_p (at least one).
            sp, si = probs.sort(dim=-1, descending=True)
            keep = (sp.cumsum(-1) - sp) < settings.top_p
            sp = sp * keep
            probs = torch.zeros_like(probs).scatter(-1, si, sp)
        return torch.stack([torch.multinomial(probs[b], 1, generator=g)[0] for b, g in enumerate(gens)])

    def _decode_text(self, ids: list[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _completion(self, rid, prompt, tokens, top_ids, top_lps, stopped, settings) -> Completion:
        text_ids = tokens[:-1] if stopped else tokens
        return Completion(
            id=rid,
            text=self._decode_text(text_ids),
            finish_reason="stop" if stopped else "length",
            prompt_token_ids=list(prompt),
            completion_token_ids=list(tokens),
            top_ids=top_ids if settings.top_logprobs else None,
            top_logprobs=top_lps if settings.top_logprobs else None,
            usage={"prompt_tokens": len(prompt), "completion_tokens": len(tokens)},
        )

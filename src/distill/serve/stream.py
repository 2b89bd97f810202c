"""Streaming a local model's answer while it is decoded: `distill serve` with ``stream: true``
(without a router, whose decision needs the whole answer) sends one server-sent event per
decoded token, so the first token arrives after one decoding step, not after the whole answer.

Each event carries the text the token adds (``delta.content`` / ``text``), its log-probability
entry when asked for, and distill's ``token_ids`` / ``top_token_ids`` for it; the last event of
a choice carries ``finish_reason`` and ``prompt_token_ids``. Concatenated, the events give exactly
the non-streamed answer: text, token ids and log-probabilities. Two things are held back until
they are certain: text that could be the start of a ``stop`` string (the answer is cut before a
stop string, as without streaming), and the bytes of an incomplete UTF-8 character.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable

from starlette.responses import StreamingResponse

from distill.models.base import Completion
from distill.models.hf import Generation
from distill.models.http import APIError
from distill.models.streaming import Token
from distill.serve.format import apply_stop, chat_choice, completion_choice, usage_of

log = logging.getLogger("distill.serve")


class TokenSink:
    """Receives `Token`s from the decoding thread and queues them on the server's event loop."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Token] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self.started = False
        """True once a token arrived: the request can no longer be retried on its own."""

    def __call__(self, token: Token) -> None:
        self.started = True
        self._loop.call_soon_threadsafe(self.queue.put_nowait, token)


class _Choice:
    """One choice's stream state: what was received, what was sent."""

    def __init__(self, index: int, chat: bool, k: int | None, stops: list[str], token_bytes) -> None:
        self.index, self.chat, self.k, self.stops, self.token_bytes = index, chat, k, stops, token_bytes
        self.text = self.sent = ""
        self.raw = b""
        self.n_sent = 0  # tokens whose entries were sent
        self.cut: int | None = None  # tokens kept when a stop string completed (apply_stop's rule)
        self.offset = 0  # characters of the sent tokens' texts (completions' text_offset)
        self.first = True

    def push(self, toks: list[Token]) -> dict | None:
        """One event for ``toks`` (this choice's tokens that arrived since the last event)."""
        sent = []
        for tok in toks:
            self.text += tok.text
            if self.cut is None:
                sent.append(tok)
                if self.stops:  # the token that completes a stop string is the last one kept
                    self.raw += self.token_bytes(tok.token_id)
                    if any(x in self.raw.decode("utf-8", errors="replace") for x in self.stops):
                        self.cut = self.n_sent + len(sent)
        safe = self.text
        if self.stops:
            hits = [safe.find(x) for x in self.stops if x in safe]
            hold = max(len(x) for x in self.stops) - 1  # could be the start of a stop string
            safe = safe[: min(hits)] if hits else safe[: max(len(safe) - hold, len(self.sent))]
        return self._chunk(safe[len(self.sent) :], sent)

    def finish(self, g: Generation) -> list[dict]:
        """The rest of the choice from its final generation (after ``stop`` cuts), then its end."""
        c = g.completion
        if c.text.startswith(self.sent):
            rest = c.text[len(self.sent) :]
        else:  # not seen with the tokenizers tested; the streamed text cannot be taken back
            log.warning("streamed text of choice %d diverged from the final text", self.index)
            rest = ""
        ids = (c.completion_token_ids or [])[self.n_sent :]
        tops = (c.top_ids or [])[self.n_sent :], (c.top_logprobs or [])[self.n_sent :]
        toks = [
            Token(self.index, t, "", lp, tops[0][j] if tops[0] else None, tops[1][j] if tops[1] else None)
            for j, (t, lp) in enumerate(zip(ids, g.token_logprobs[self.n_sent :]))
        ]
        out = [x for x in [self._chunk(rest, toks)] if x is not None]
        end = {"index": self.index, "logprobs": None, "finish_reason": c.finish_reason}
        end |= {"delta": {}} if self.chat else {"text": ""}
        end["prompt_token_ids"] = c.prompt_token_ids
        return [*out, end]

    def _chunk(self, piece: str, toks: list[Token]) -> dict | None:
        if not piece and not toks and not (self.first and self.chat):
            return None
        self.sent += piece
        self.n_sent += len(toks)
        tops = self.k is not None and all(t.top_ids is not None for t in toks)
        c = Completion(
            id="",
            text=piece,
            finish_reason="",
            completion_token_ids=[t.token_id for t in toks],
            top_ids=[t.top_ids for t in toks] if tops else None,
            top_logprobs=[t.top_logprobs for t in toks] if tops else None,
        )
        g = Generation(c, [t.logprob for t in toks])
        build = chat_choice if self.chat else completion_choice
        choice = build(self.index, g, self.token_bytes, self.k)
        choice.pop("prompt_token_ids", None)
        if self.chat:
            del choice["message"]
            choice["delta"] = {"role": "assistant", "content": piece} if self.first else {"content": piece}
        elif choice["logprobs"] is not None:
            offsets = choice["logprobs"]["text_offset"]
            choice["logprobs"]["text_offset"] = [self.offset + o for o in offsets]
            self.offset += sum(len(t) for t in choice["logprobs"]["tokens"])
        choice["finish_reason"] = None
        self.first = False
        return choice


async def _next(queue: asyncio.Queue, task: asyncio.Future) -> Token | None:
    """The next token, or None once ``task`` (the generation) is done and every token was taken."""
    if not queue.empty() or task.done():
        return queue.get_nowait() if not queue.empty() else None
    getter = asyncio.ensure_future(queue.get())
    await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    # The decoding thread queues every token before its result arrives: any left are already here.
    return queue.get_nowait() if not queue.empty() else None


async def stream_answer(
    run: Callable[[TokenSink], asyncio.Future],
    *,
    n_choices: int,
    n: int,
    chat: bool,
    model_id: str,
    k: int | None,
    stops: list[str],
    include_usage: bool,
    token_bytes: Callable[[int], bytes],
) -> StreamingResponse:
    """Start ``run(sink)`` (the generation, reporting to ``sink``) and stream its tokens.

    Waits for the first token (or the end) before answering, so a request the model refuses
    (prompt too long, ...) still gets its 400 instead of a stream; an error after the first token
    ends the stream with an ``{"error": ...}`` event."""
    sink = TokenSink()
    task = asyncio.ensure_future(run(sink))
    first = await _next(sink.queue, task)
    if first is None:
        task.result()  # raises the request's APIError
    prefix, obj = ("chatcmpl", "chat.completion.chunk") if chat else ("cmpl", "text_completion")
    head = {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": obj,
        "created": int(time.time()),
        "model": model_id,
    }
    if include_usage:
        head["usage"] = None

    def event(data: dict) -> str:
        return f"data: {json.dumps(data, allow_nan=False)}\n\n"

    async def events():
        choices = [_Choice(i, chat, k, stops, token_bytes) for i in range(n_choices)]
        tok = first
        try:
            while tok is not None:
                # Tokens that queued up while the last event went out leave together (one event
                # per choice): when sending lags behind decoding, it costs fewer events, not delay.
                arrived = [tok]
                while not sink.queue.empty():
                    arrived.append(sink.queue.get_nowait())
                for index in dict.fromkeys(t.index for t in arrived):
                    if (chunk := choices[index].push([t for t in arrived if t.index == index])) is not None:
                        yield event({**head, "choices": [chunk]})
                tok = await _next(sink.queue, task)
            gens = [apply_stop(g, stops, token_bytes) for g in task.result()]
        except APIError as err:
            yield event(err.body())
            yield "data: [DONE]\n\n"
            return
        finally:
            task.cancel()  # the client went away: the batcher then skips this request's answer
        for choice, g in zip(choices, gens, strict=True):
            for chunk in choice.finish(g):
                yield event({**head, "choices": [chunk]})
        if include_usage:
            yield event({**head, "choices": [], "usage": usage_of(gens, n)})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")

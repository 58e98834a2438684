"""One HTTP generation (`Job`: its n × prompts engine requests) → OpenAI JSON or SSE chunks.

A client that goes away (disconnect, cancelled stream) aborts every engine request of its job.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from loraplex.scheduler.engine import RequestOutput
from loraplex.server.auth import Tenant
from loraplex.server.errors import classify, error_body

logger = logging.getLogger(__name__)
_DISCONNECT_POLL_S = 0.5


@dataclass(slots=True)
class Choice:
    index: int
    num_prompt_tokens: int
    text: str = ""
    num_tokens: int = 0
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    error: Exception | None = None
    finished: bool = False


@dataclass(slots=True, eq=False)
class Job:
    state: object  # ServerState (not imported: it imports us)
    kind: str
    """`text` (completions) or `chat`."""
    id: str
    model: str
    created: int
    tenant: Tenant
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    choices: dict[str, Choice] = field(default_factory=dict)
    echo_texts: list[str | None] | None = None
    num_logprobs: int | None = None
    include_usage: bool = False
    num_prompts: int = 1
    n: int = 1
    holds_slot: bool = False

    @property
    def is_done(self) -> bool:
        return all(c.finished for c in self.choices.values())

    def close(self) -> None:
        """Abort what is unfinished and give the tenant's concurrency slot back (once)."""
        for rid, choice in self.choices.items():
            if not choice.finished:
                self.state.bridge.abort(rid)
                choice.finished, choice.finish_reason = True, "abort"
        if self.holds_slot:
            self.holds_slot = False
            self.state.limiter.release(self.tenant)

    def apply(self, out: RequestOutput) -> tuple[Choice, list[dict]]:
        """Fold one engine output into its choice; returns the choice and its new logprobs."""
        choice = self.choices[out.request_id]
        new_logprobs = out.logprobs[len(choice.logprobs):]
        choice.logprobs.extend(new_logprobs)
        choice.text += out.new_text
        choice.num_tokens = len(out.token_ids)
        if out.finished:
            choice.finished = True
            choice.finish_reason = "length" if out.finish_reason == "length" else "stop"
            if out.error is not None or out.finish_reason in ("error", "abort", "deadline"):
                choice.error = out.error or RuntimeError("the request was aborted")
        return choice, new_logprobs

    def usage(self) -> dict:
        by_index = sorted(self.choices.values(), key=lambda c: c.index)
        prompt = sum(c.num_prompt_tokens for c in by_index if c.index % self.n == 0)
        completion = sum(c.num_tokens for c in by_index)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    # ---- logprobs in OpenAI's two shapes -------------------------------------------------
    def _token_text(self, token_id: int) -> str:
        return self.state.tokenizer.decode([token_id], skip_special_tokens=False) \
            if self.state.tokenizer else str(token_id)

    def logprobs_json(self, entries: list[dict], text_offset: int = 0) -> dict | None:
        if self.num_logprobs is None:
            return None
        tokens = [self._token_text(e["id"]) for e in entries]
        if self.kind == "chat":
            return {"content": [
                {"token": tok, "logprob": e["logprob"], "bytes": list(tok.encode()),
                 "top_logprobs": [{"token": (t := self._token_text(i)), "logprob": lp,
                                   "bytes": list(t.encode())} for i, lp in e["top"]]}
                for tok, e in zip(tokens, entries)]}
        offsets, at = [], text_offset
        for tok in tokens:
            offsets.append(at)
            at += len(tok)
        return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{self._token_text(i): lp for i, lp in e["top"]}
                                 for e in entries],
                "text_offset": offsets}


async def _next(job: Job, request: Request | None) -> RequestOutput:
    while True:
        try:
            return await asyncio.wait_for(job.outputs.get(), _DISCONNECT_POLL_S)
        except TimeoutError:
            if request is not None and await request.is_disconnected():
                raise asyncio.CancelledError("client disconnected") from None


def _raise_error(job: Job) -> None:
    for choice in job.choices.values():
        if choice.error is not None:
            raise choice.error


async def collect(job: Job, request: Request) -> dict:
    """Wait for every choice; the whole OpenAI response body."""
    try:
        while not job.is_done:
            out = await _next(job, request)
            choice, _ = job.apply(out)
            if choice.error is not None:
                _raise_error(job)
    finally:
        job.close()
    choices = []
    for choice in sorted(job.choices.values(), key=lambda c: c.index):
        if job.kind == "chat":
            choices.append({"index": choice.index, "finish_reason": choice.finish_reason,
                            "message": {"role": "assistant", "content": choice.text},
                            "logprobs": job.logprobs_json(choice.logprobs)})
        else:
            echo = (job.echo_texts or [None] * job.num_prompts)[choice.index // job.n] or ""
            choices.append({"index": choice.index, "text": echo + choice.text,
                            "finish_reason": choice.finish_reason,
                            "logprobs": job.logprobs_json(choice.logprobs)})
    return {"id": job.id, "object": "chat.completion" if job.kind == "chat" else
            "text_completion", "created": job.created, "model": job.model,
            "choices": choices, "usage": job.usage()}


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def _chunk(job: Job, choice: dict) -> dict:
    body = {"id": job.id, "object": "chat.completion.chunk" if job.kind == "chat" else
            "text_completion", "created": job.created, "model": job.model, "choices": [choice]}
    if job.include_usage:
        body["usage"] = None
    return body


def _opening_chunks(job: Job) -> list[dict]:
    chunks = []
    for choice in sorted(job.choices.values(), key=lambda c: c.index):
        if job.kind == "chat":
            chunks.append(_chunk(job, {"index": choice.index, "logprobs": None,
                                       "finish_reason": None,
                                       "delta": {"role": "assistant", "content": ""}}))
        elif job.echo_texts and job.echo_texts[choice.index // job.n]:
            chunks.append(_chunk(job, {"index": choice.index, "logprobs": None,
                                       "finish_reason": None,
                                       "text": job.echo_texts[choice.index // job.n]}))
    return chunks


async def stream_events(job: Job) -> AsyncIterator[str]:
    """SSE: OpenAI chunks as tokens come, the usage chunk if asked, then `[DONE]`."""
    try:
        for chunk in _opening_chunks(job):
            yield _sse(chunk)
        while not job.is_done:
            out = await job.outputs.get()
            offset = len(job.choices[out.request_id].text)
            choice, new_logprobs = job.apply(out)
            if choice.error is not None:
                status, kind = classify(choice.error)
                logger.warning("request %s failed mid-stream: %s", job.id, choice.error)
                yield _sse(error_body(str(choice.error), kind, code=status))
                break
            finish = choice.finish_reason if choice.finished else None
            if not out.new_text and not new_logprobs and finish is None:
                continue
            logprobs = job.logprobs_json(new_logprobs, offset) if new_logprobs else None
            if job.kind == "chat":
                delta = {"content": out.new_text} if out.new_text else {}
                yield _sse(_chunk(job, {"index": choice.index, "delta": delta,
                                        "logprobs": logprobs, "finish_reason": finish}))
            else:
                yield _sse(_chunk(job, {"index": choice.index, "text": out.new_text,
                                        "logprobs": logprobs, "finish_reason": finish}))
        if job.include_usage and job.is_done:
            yield _sse({"id": job.id, "object": "chat.completion.chunk" if job.kind == "chat"
                        else "text_completion", "created": job.created, "model": job.model,
                        "choices": [], "usage": job.usage()})
        yield _sse("[DONE]")
    finally:
        job.close()

"""`/v1/completions`, `/v1/chat/completions`, `/v1/models`: body → engine requests → OpenAI JSON
or SSE. Framing lives in `streaming`; the engine is reached only through the bridge."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from loraplex.server.auth import Tenant
from loraplex.server.errors import BadRequestError
from loraplex.server.protocol import ChatCompletionRequest, CompletionRequest
from loraplex.server.state import ServerState, get_state, get_tenant
from loraplex.server.streaming import Choice, Job, collect, stream_events

router = APIRouter()
DEFAULT_MAX_TOKENS = 16


def _prompts(state: ServerState, prompt: object) -> tuple[list[list[int]], list[str | None]]:
    """Token ids and (for echo) text of each prompt of a completions body."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise BadRequestError("prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    ids, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            ids.append(state.require_tokenizer().encode(p))
            texts.append(p)
        else:
            ids.append(list(p))
            texts.append(None)
        if not ids[-1]:
            raise BadRequestError("prompt must not be empty", param="prompt")
    return ids, texts


async def _start(state: ServerState, tenant: Tenant, body: CompletionRequest
                 | ChatCompletionRequest, prompts: list[list[int]], max_tokens: int,
                 num_logprobs: int | None, kind: str) -> Job:
    state.check_accepting()
    adapter = await state.resolve_model(tenant, body.model)
    job = Job(state=state, kind=kind, id=state.new_id("cmpl" if kind == "text" else "chatcmpl"),
              model=body.model, created=int(time.time()), tenant=tenant)
    state.limiter.acquire(tenant)
    job.holds_slot = True
    try:
        for p, ids in enumerate(prompts):
            for j in range(body.n):
                index = p * body.n + j
                params = body.sampling_params(max_tokens, j, num_logprobs)
                rid = f"{job.id}-{index}"
                await state.bridge.submit(ids, params, adapter, rid, tenant.name, job.outputs,
                                          body.ttft_deadline_s)
                job.choices[rid] = Choice(index=index, num_prompt_tokens=len(ids))
    except BaseException:
        job.close()
        raise
    return job


async def _respond(job: Job, stream: bool, request: Request
                   ) -> JSONResponse | StreamingResponse:
    if stream:
        return StreamingResponse(stream_events(job), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})
    return JSONResponse(await collect(job, request))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request,
                      state: ServerState = Depends(get_state),
                      tenant: Tenant = Depends(get_tenant)):
    if body.echo and body.logprobs is not None:
        raise BadRequestError("echo together with logprobs is not supported", param="echo")
    if body.suffix or (body.best_of not in (None, 1, body.n)):
        raise BadRequestError("suffix and best_of are not supported", param="suffix")
    prompts, texts = _prompts(state, body.prompt)
    job = await _start(state, tenant, body, prompts, body.max_tokens or DEFAULT_MAX_TOKENS,
                       body.logprobs, "text")
    job.echo_texts = texts if body.echo else None
    job.num_logprobs = body.logprobs
    job.include_usage = body.include_usage()
    job.num_prompts, job.n = len(prompts), body.n
    return await _respond(job, body.stream, request)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           state: ServerState = Depends(get_state),
                           tenant: Tenant = Depends(get_tenant)):
    tokenizer = state.require_tokenizer()
    if not tokenizer.has_chat_template:
        raise BadRequestError("this model's tokenizer has no chat template; use /v1/completions")
    try:
        ids = await asyncio.to_thread(tokenizer.apply_chat_template, body.template_messages())
    except Exception as exc:  # a template may refuse a message order
        raise BadRequestError(f"chat template failed: {exc}", param="messages") from None
    num_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = (body.max_completion_tokens or body.max_tokens
                  or state.default_max_tokens(len(ids)))
    job = await _start(state, tenant, body, [ids], max_tokens, num_logprobs, "chat")
    job.num_logprobs = num_logprobs
    job.include_usage = body.include_usage()
    job.num_prompts, job.n = 1, body.n
    return await _respond(job, body.stream, request)


@router.get("/v1/models")
async def models(state: ServerState = Depends(get_state), tenant: Tenant = Depends(get_tenant)):
    base = {"id": state.model_name, "object": "model", "created": state.created,
            "owned_by": "loraplex", "root": state.model_name, "parent": None}
    cards = [base] + [
        {"id": e.name, "object": "model", "created": state.created,
         "owned_by": e.owner or "loraplex", "root": e.name, "parent": state.model_name}
        for e in state.catalog.visible(tenant)]
    return {"object": "list", "data": cards}

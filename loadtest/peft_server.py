"""Baseline (a): the model and adapters served with `peft` the usual way, behind the same
OpenAI routes: one PeftModel, one request at a time, `set_adapter` per request.

    python -m loraplex.loadtest.peft_server --model DIR --adapter-dir DIR --port P
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import inspect
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from loraplex.model.tokenizer import IncrementalDetokenizer, Tokenizer
from loraplex.model.weights import resolve_model_dir
from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger("loraplex.peft_server")
DEMO_NAME = "SmolLM2-135M-Instruct"


class PeftServerError(Exception):
    """A request the baseline refuses; carries its HTTP status and OpenAI error type."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


class GenerationError(PeftServerError):
    """The model failed mid-generation (e.g. a bad adapter file); the server lives on."""

    def __init__(self, message: str):
        super().__init__(message, 500, "server_error")


class CompletionBody(BaseModel):
    """The part of OpenAI's completions body the baseline honours (the rest is refused)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    seed: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    ignore_eos: bool = False


class PeftBackend:
    """One `PeftModel`; adapters loaded on first use (LRU-bounded), one generation at a time."""

    def __init__(self, model_dir: Path, adapters: dict[str, Path], device: str = "cpu",
                 dtype: torch.dtype = torch.float32, max_loaded_adapters: int = 64):
        from transformers import AutoModelForCausalLM

        self.device = torch.device(device)
        self.base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(
            self.device).eval()
        self.tokenizer = Tokenizer(model_dir)
        self.adapters = adapters
        self.max_loaded_adapters = max_loaded_adapters
        self.peft = None
        self.loaded: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.num_loads = 0
        # transformers 5.x renamed `past_key_values` to `cache` (the old name warns).
        params = inspect.signature(type(self.base).forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def _activate(self, adapter: str | None) -> torch.nn.Module:
        """The module to call with `adapter` active (loading it if need be)."""
        if adapter is None:
            return self.base if self.peft is None else self.peft
        if adapter not in self.loaded:
            path = str(self.adapters[adapter])
            if self.peft is None:
                from peft import PeftModel
                self.peft = PeftModel.from_pretrained(self.base, path, adapter_name=adapter,
                                                      low_cpu_mem_usage=True)
                self.peft.eval()
            else:
                # low_cpu_mem_usage: no random init of weights about to be overwritten
                self.peft.load_adapter(path, adapter_name=adapter, low_cpu_mem_usage=True)
            self.num_loads += 1
            self.loaded[adapter] = None
        self.loaded.move_to_end(adapter)
        self.peft.set_adapter(adapter)
        while len(self.loaded) > self.max_loaded_adapters:
            self.peft.delete_adapter(self.loaded.popitem(last=False)[0])
        return self.peft

    def generate(self, ids: list[int], adapter: str | None, body: CompletionBody,
                 emit: Callable[[int], None], cancel: threading.Event) -> str:
        """Greedy or sampled tokens, one forward each over the KV cache; `emit` gets each id.
        Returns the finish reason."""
        model = self._activate(adapter)
        disabled = self.peft.disable_adapter() if adapter is None and self.peft else nullcontext()
        gen = torch.Generator(self.device)
        gen.manual_seed(body.seed if body.seed is not None else int(time.time_ns()) % 2**63)
        eos = set(self.tokenizer.eos_token_ids)
        with torch.inference_mode(), disabled:
            out = model(input_ids=torch.tensor([ids], device=self.device), use_cache=True,
                        logits_to_keep=1)
            for step in range(body.max_tokens):
                if cancel.is_set():
                    return "abort"
                token = self._pick(out.logits[0, -1].float(), body.temperature, gen)
                emit(token)
                if token in eos and not body.ignore_eos:
                    return "stop"
                if step + 1 < body.max_tokens:
                    cache = out.cache if hasattr(out, "cache") else out.past_key_values
                    out = model(input_ids=torch.tensor([[token]], device=self.device),
                                use_cache=True, **{self._cache_arg: cache})
        return "length"

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> int:
        if temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=gen))


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": status}}, status_code=status)


def _prompt_ids(backend: PeftBackend, prompt: object) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = backend.tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        ids = list(prompt)
    else:
        raise PeftServerError("one prompt per request (a string or token ids)", param="prompt")
    if not ids:
        raise PeftServerError("prompt must not be empty", param="prompt")
    return ids


class _Generation:
    """One request's run on the worker thread; tokens arrive on an asyncio queue."""

    def __init__(self, backend: PeftBackend, ids: list[int], adapter: str | None,
                 body: CompletionBody):
        self.backend, self.ids, self.adapter, self.body = backend, ids, adapter, body
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.num_tokens = 0

    def start(self, lock: asyncio.Lock) -> None:
        """Run on a thread (the caller holds `lock`; released when the thread ends)."""
        loop = asyncio.get_running_loop()

        def put(item: tuple) -> None:
            loop.call_soon_threadsafe(self.queue.put_nowait, item)

        def work() -> None:
            try:
                reason = self.backend.generate(self.ids, self.adapter, self.body,
                                               lambda t: put(("token", t)), self.cancel)
                put(("done", reason))
            except Exception as exc:  # a bad adapter file must not kill the server
                logger.exception("generation failed")
                put(("error", exc))

        future = loop.run_in_executor(None, work)
        future.add_done_callback(lambda _: lock.release())

    async def pieces(self) -> AsyncIterator[tuple[str, str | None]]:
        """(new text, finish reason or None) as tokens come; raises what the thread raised."""
        detok = IncrementalDetokenizer(self.backend.tokenizer, self.ids)
        try:
            while True:
                kind, value = await self.queue.get()
                if kind == "token":
                    self.num_tokens += 1
                    yield detok.push(value), None
                elif kind == "done":
                    yield "", "length" if value == "length" else "stop"
                    return
                else:
                    raise GenerationError(f"{type(value).__name__}: {value}") from value
        finally:
            self.cancel.set()


def create_app(backend: PeftBackend, model_name: str) -> FastAPI:
    app = FastAPI(title="peft baseline")
    lock = asyncio.Lock()
    created = int(time.time())

    @app.exception_handler(PeftServerError)
    async def _refused(request: Request, exc: PeftServerError) -> JSONResponse:
        return _error(exc.status, str(exc), exc.kind, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, str(exc.errors()[:1]), "invalid_request_error")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(f"peft_adapter_loads_total {backend.num_loads}\n"
                                 f"peft_loaded_adapters {len(backend.loaded)}\n")

    @app.get("/v1/models")
    async def models() -> dict:
        cards = [{"id": model_name, "object": "model", "created": created,
                  "owned_by": "peft-baseline", "root": model_name, "parent": None}]
        cards += [{"id": n, "object": "model", "created": created, "owned_by": "peft-baseline",
                   "root": n, "parent": model_name} for n in sorted(backend.adapters)]
        return {"object": "list", "data": cards}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionBody) -> JSONResponse | StreamingResponse:
        if body.model != model_name and body.model not in backend.adapters:
            raise PeftServerError(f"the model `{body.model}` does not exist", 404,
                                  "not_found_error", "model")
        if body.n != 1 or body.stop:
            raise PeftServerError("the peft baseline takes n = 1 and no stop strings")
        ids = _prompt_ids(backend, body.prompt)
        gen = _Generation(backend, ids, None if body.model == model_name else body.model, body)
        await lock.acquire()  # one request at a time, in arrival order (asyncio.Lock is FIFO)
        try:
            gen.start(lock)
        except BaseException:
            lock.release()
            raise
        meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
                "created": int(time.time()), "model": body.model}
        if body.stream:
            return StreamingResponse(_sse(gen, meta), media_type="text/event-stream")
        text, reason = "", None
        async for piece, finish in gen.pieces():
            text, reason = text + piece, finish or reason
        return JSONResponse({**meta, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                  "finish_reason": reason}],
                             "usage": _usage(len(ids), gen.num_tokens)})

    return app


def _usage(num_prompt: int, num_completion: int) -> dict:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion}


async def _sse(gen: _Generation, meta: dict) -> AsyncIterator[str]:
    def chunk(text: str, finish: str | None) -> str:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**meta, 'choices': [choice]})}\n\n"

    try:
        async for piece, finish in gen.pieces():
            if piece or finish:
                yield chunk(piece, finish)
    except GenerationError as exc:
        yield f"data: {json.dumps({'error': {'message': str(exc), 'type': exc.kind}})}\n\n"
        return
    if (gen.body.stream_options or {}).get("include_usage"):
        usage = _usage(len(gen.ids), gen.num_tokens)
        yield f"data: {json.dumps({**meta, 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


def find_adapters(dirs: list[Path], named: list[tuple[str, str]]) -> dict[str, Path]:
    """Every PEFT folder directly under each of `dirs` (by folder name), plus NAME=DIR pairs."""
    found = {p.name: p for d in dirs for p in sorted(Path(d).iterdir())
             if (p / "adapter_config.json").exists()}
    found.update({name: Path(path) for name, path in named})
    return found


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: the demo model)")
    p.add_argument("--adapter-dir", action="append", type=Path, default=[])
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--max-loaded-adapters", type=int, default=64,
                   help="adapters kept in the PeftModel at once (least recently used deleted)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    model_dir = resolve_model_dir(args.model)
    named = [tuple(a.split("=", 1)) for a in args.adapter]
    adapters = find_adapters(args.adapter_dir, named)
    backend = PeftBackend(model_dir, adapters, args.device, getattr(torch, args.dtype),
                          args.max_loaded_adapters)
    name = args.served_model_name or (DEMO_NAME if args.model is None else model_dir.name)
    logger.info("peft baseline: %s with %d adapters on http://%s:%d", name, len(adapters),
                args.host, args.port)
    uvicorn.run(create_app(backend, name), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

"""The only place async meets the engine thread: commands in, per-request output queues out.

The engine is single-threaded; every call on it runs on the bridge's thread, between steps.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from loraplex.model.sampler import SamplingParams
from loraplex.scheduler.engine import Engine, RequestOutput

logger = logging.getLogger(__name__)
T = TypeVar("T")
METRICS_INTERVAL_S = 0.05
"""Engine snapshots for metrics at most this often while busy (a snapshot walks the queues)."""


class EngineStepError(RuntimeError):
    """A step of the engine failed; the requests in flight were ended with this error."""


@dataclass(slots=True)
class RequestStream:
    """One engine request's outputs, as they come, on the event loop."""

    request_id: str
    adapter: str | None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival_s: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    last_token_s: float | None = None
    finished: bool = False

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            out: RequestOutput = await self.queue.get()
            self.finished = out.finished
            yield out


class EngineBridge:
    """Runs the engine loop on its own thread; async callers submit, stream and abort."""

    def __init__(self, engine: Engine, metrics: object | None = None,
                 idle_wait_s: float = 0.05):
        self.engine = engine
        self.metrics = metrics
        self.idle_wait_s = idle_wait_s
        self.draining = False
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # touched on the engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._metrics_at = 0.0
        self.on_idle: list[Callable[[Engine], None]] = []
        """Callbacks run on the engine thread when it has nothing to do (housekeeping)."""

    # ---- life cycle ----------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        self._commands.put(lambda: None)
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.engine.close()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ---- calls from the event loop -------------------------------------------------------
    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run `fn(engine)` on the engine thread between steps; its result or exception."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def settle(result: object, exc: BaseException | None) -> None:
            if future.cancelled():
                return
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)

        def command() -> None:
            try:
                result = fn(self.engine)
            except Exception as exc:
                loop.call_soon_threadsafe(settle, None, exc)
            else:
                loop.call_soon_threadsafe(settle, result, None)

        self._commands.put(command)
        return await future

    async def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None,
                     request_id: str, tenant: str = "",
                     outputs: asyncio.Queue | None = None,
                     deadline_s: float | None = None) -> RequestStream:
        """Add a request; raises the engine's validation error, else returns its stream.

        Several requests may share one `outputs` queue (the n choices of one HTTP request).
        """
        stream = RequestStream(request_id, adapter)
        if outputs is not None:
            stream.queue = outputs

        def add(engine: Engine) -> None:
            engine.add_request(prompt_ids, params, adapter, request_id, tenant,
                               deadline_s=deadline_s)
            self._streams[request_id] = stream

        await self.call(add)
        return stream

    def abort(self, request_id: str) -> None:
        """Free the request's sequence at once (from any thread); no output follows."""
        self._commands.put(lambda: self._abort(request_id))

    def _abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self.engine.abort(request_id)
            logger.info("request %s aborted", request_id)

    # ---- the engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while not self._stopping.is_set():
            busy = engine.has_unfinished()
            self._drain_commands(block=not busy)
            if not engine.has_unfinished():
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # a bug or a device fault: end what is in flight, go on
                logger.exception("engine step failed; ending %d requests", len(self._streams))
                self._fail_all(EngineStepError(f"engine step failed: {exc}"))
                continue
            for out in outputs:
                self._deliver(out)
            if self.metrics is not None and \
                    time.monotonic() - self._metrics_at >= METRICS_INTERVAL_S:
                self._update_metrics()

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=self.idle_wait_s) if block \
                else self._commands.get_nowait()
        except queue.Empty:
            if block:
                self._idle()
            return
        while True:
            command()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _idle(self) -> None:
        for callback in self.on_idle:
            try:
                callback(self.engine)
            except Exception:
                logger.exception("idle callback failed")
        if self.metrics is not None:
            self._update_metrics()

    def _update_metrics(self) -> None:
        self._metrics_at = time.monotonic()
        self.metrics.update(self.engine.stats())

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self._streams):
            out = self.engine.abort(request_id)
            if out is not None:
                out.error, out.finish_reason = error, "error"
                self._deliver(out)
            else:
                self._streams.pop(request_id, None)

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return  # aborted by its client
        now = time.monotonic()
        if out.new_token_ids:
            if stream.first_token_s is None:
                stream.first_token_s = now
            elif self.metrics is not None:
                per_token = (now - stream.last_token_s) / len(out.new_token_ids)
                for _ in out.new_token_ids:
                    self.metrics.observe_tpot(per_token)
            stream.last_token_s = now
        if out.finished:
            del self._streams[out.request_id]
            if self.metrics is not None:
                ttft = None if stream.first_token_s is None else \
                    stream.first_token_s - stream.arrival_s
                self.metrics.observe_request(stream.adapter, out.num_prompt_tokens,
                                             len(out.token_ids), ttft, now - stream.arrival_s,
                                             out.finish_reason or "error")
        assert self._loop is not None, "bridge used before start()"
        self._loop.call_soon_threadsafe(stream.queue.put_nowait, out)

"""InflightBatcher: a background thread that runs the Scheduler; the Triton model hosts it.

On a multi-rank engine rank 0 runs the batcher and every other rank `follow`s it: before each step
rank 0 broadcasts the requests that joined and the ones cancelled since the last, so every rank's
scheduler holds the same batch and steps with it (the tokens come from the sampling rank).
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
from typing import Callable, Iterator

from trtbuild.errors import TrtbuildError
from trtbuild.runtime.request import Request
from trtbuild.runtime.sampling import SamplingConfig
from trtbuild.runtime.scheduler import Scheduler

_DONE = object()
log = logging.getLogger(__name__)


class RequestHandle:
    """A submitted request: stream its tokens, wait for its result, or cancel it."""

    def __init__(self, request: Request, cancel=None):
        self.request = request
        self._events: queue.Queue = queue.Queue()
        self._finished = threading.Event()
        self._cancel = cancel or (lambda: request.finish("cancelled"))

    def stream(self) -> Iterator[list[int]]:
        """New token ids of each step, until the request is finished."""
        while True:
            item = self._events.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def result(self, timeout: float | None = None) -> list[int]:
        if not self._finished.wait(timeout):
            raise TimeoutError("request still running")
        if self.request.finish_reason == "error":
            raise TrtbuildError("the engine failed while running this request (see the server log)")
        return list(self.request.output_ids)

    def cancel(self) -> None:
        self._cancel()

    @property
    def finish_reason(self) -> str | None:
        return self.request.finish_reason


class InflightBatcher:
    def __init__(self, runner):
        if not runner.shared_cache:
            raise TrtbuildError(f"{runner.engine_dir}: in-flight batching needs the attention plugin's shared KV "
                                "buffer; rebuild with --gpt_attention_plugin auto")
        if runner.world is not None and not runner.world.is_leader:
            raise TrtbuildError("on a multi-rank engine rank 0 runs the batcher; the other ranks call follow(runner)")
        self.runner = runner
        if runner.world is not None:  # the followers schedule as rank 0 does (see follow)
            runner.world.broadcast_idle(runner.scheduling)
        self._scheduler = Scheduler(runner)
        self._incoming: queue.Queue = queue.Queue()
        # multi-rank: requests by id, cancellations applied between steps on every rank alike
        self._ids: dict[int, Request] = {}
        self._next_id = 0
        self._cancels: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="trtbuild-batcher", daemon=True)
        self._thread.start()
        if runner.world is not None:  # a rank 0 that exits without shutdown() still lets its followers go
            atexit.register(self.shutdown)

    def submit(self, input_ids: list[int], sampling: SamplingConfig, lora_task_id: int = -1,
               listener: Callable[[list[int] | None], None] | None = None) -> RequestHandle:
        """Queue a request; it joins the running batch at the next step. Bad requests raise here.
        `listener` (called from the batcher's thread) gets each step's new token ids, then None once
        the request is done: what an asyncio server bridges to its event loop."""
        self.runner.check_request(list(input_ids), sampling.max_new_tokens)
        if self.runner.lora is not None:
            self.runner.lora.check_task_id(lora_task_id)
        elif lora_task_id != -1:
            raise TrtbuildError(f"lora task id {lora_task_id} given, but the engine has no lora plugin")
        request = Request(list(input_ids), sampling, lora_task_id)
        cancel = None
        if self.runner.world is not None:  # cancelled on every rank at the same step
            request_id, self._next_id = self._next_id, self._next_id + 1
            request.request_id = request_id
            cancel = lambda: (self._cancels.put(request_id), self._wake.set())  # noqa: E731
        handle = RequestHandle(request, cancel)

        def tokens(r: Request, toks: list[int]) -> None:
            handle._events.put(list(toks))
            if listener is not None:
                listener(list(toks))

        def done(r: Request) -> None:
            handle._finished.set()
            handle._events.put(_DONE)
            if listener is not None:
                listener(None)

        request.on_tokens, request.on_done = tokens, done
        self._incoming.put(request)
        self._wake.set()
        return handle

    def _loop(self) -> None:
        world = self.runner.world
        while not self._stop:
            added = []
            while not self._incoming.empty():
                added.append(self._incoming.get())
            cancelled = []
            while not self._cancels.empty():
                cancelled.append(self._cancels.get())
            if world is not None and (added or cancelled or self._scheduler.has_work()):
                world.broadcast_idle(([(r.request_id, r.prompt_ids, r.sampling, r.lora_task_id) for r in added],
                                      cancelled))
            for r in added:
                self._scheduler.add(r)
                if world is not None:
                    self._ids[r.request_id] = r
            for request_id in cancelled:
                if request_id in self._ids:
                    self._ids[request_id].finish("cancelled")
            if not self._scheduler.has_work():
                self._ids.clear()
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            self._scheduler = _step(self._scheduler, self.runner)

    @property
    def waiting(self) -> int:
        """Requests queued for a place in the batch."""
        return self._incoming.qsize() + len(self._scheduler.waiting)

    def shutdown(self) -> None:
        if self._stop:
            return
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        if self.runner.world is not None:
            self.runner.world.broadcast_idle(None)  # the followers return


def _step(scheduler: Scheduler, runner) -> Scheduler:
    """One scheduler step; when it fails, every request in flight ends with an error and a new
    scheduler keeps serving (every rank alike: they ran the same step)."""
    try:
        scheduler.step()
        return scheduler
    except Exception:
        log.exception("engine step failed; the requests in flight are ended with an error")
        for r in list(scheduler.active) + list(scheduler.waiting):
            r.finish("error")
            if r.on_done:
                r.on_done(r)
        return Scheduler(runner)


def follow(runner, leader_alive: Callable[[], bool] | None = None) -> None:
    """A rank other than 0 of a multi-rank engine: mirror rank 0's InflightBatcher step for step
    (the same requests join and are cancelled before the same step) until it shuts down; waiting
    for the next request costs no CPU. `leader_alive`: see RankWorld.broadcast_idle."""
    runner.scheduling = runner.world.broadcast_idle(None, leader_alive)  # rank 0's SchedulerConfig
    scheduler, requests = Scheduler(runner), {}
    while True:
        events = runner.world.broadcast_idle(None, leader_alive)
        if events is None:
            return
        added, cancelled = events
        for request_id, prompt_ids, sampling, lora_task_id in added:
            requests[request_id] = Request(prompt_ids, sampling, lora_task_id)
            scheduler.add(requests[request_id])
        for request_id in cancelled:
            if request_id in requests:
                requests[request_id].finish("cancelled")
        if scheduler.has_work():
            scheduler = _step(scheduler, runner)
        if not scheduler.has_work():
            requests.clear()

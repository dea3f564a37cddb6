"""InflightBatcher: a background thread that runs the Scheduler; the Triton model hosts it."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Iterator

from trtbuild.errors import TrtbuildError
from trtbuild.runtime.request import Request
from trtbuild.runtime.sampling import SamplingConfig
from trtbuild.runtime.scheduler import Scheduler

_DONE = object()
log = logging.getLogger(__name__)


class RequestHandle:
    """A submitted request: stream its tokens, wait for its result, or cancel it."""

    def __init__(self, request: Request):
        self.request = request
        self._events: queue.Queue = queue.Queue()
        self._finished = threading.Event()

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
        self.request.finish("cancelled")

    @property
    def finish_reason(self) -> str | None:
        return self.request.finish_reason


class InflightBatcher:
    def __init__(self, runner):
        if not runner.shared_cache:
            raise TrtbuildError(f"{runner.engine_dir}: in-flight batching needs the attention plugin's shared KV "
                                "buffer; rebuild with --gpt_attention_plugin auto")
        self.runner = runner
        self._scheduler = Scheduler(runner)
        self._incoming: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="trtbuild-batcher", daemon=True)
        self._thread.start()

    def submit(self, input_ids: list[int], sampling: SamplingConfig, lora_task_id: int = -1) -> RequestHandle:
        """Queue a request; it joins the running batch at the next step. Bad requests raise here."""
        self.runner.check_request(list(input_ids), sampling.max_new_tokens)
        if self.runner.lora is not None:
            self.runner.lora.check_task_id(lora_task_id)
        elif lora_task_id != -1:
            raise TrtbuildError(f"lora task id {lora_task_id} given, but the engine has no lora plugin")
        request = Request(list(input_ids), sampling, lora_task_id)
        handle = RequestHandle(request)
        request.on_tokens = lambda r, toks: handle._events.put(list(toks))

        def done(r: Request) -> None:
            handle._finished.set()
            handle._events.put(_DONE)

        request.on_done = done
        self._incoming.put(request)
        self._wake.set()
        return handle

    def _loop(self) -> None:
        while not self._stop:
            while not self._incoming.empty():
                self._scheduler.add(self._incoming.get())
            if not self._scheduler.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self._scheduler.step()
            except Exception:  # fail every request in flight, keep serving
                log.exception("engine step failed; the requests in flight are ended with an error")
                for r in list(self._scheduler.active) + list(self._scheduler.waiting):
                    r.finish("error")
                    if r.on_done:
                        r.on_done(r)
                self._scheduler = Scheduler(self.runner)

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

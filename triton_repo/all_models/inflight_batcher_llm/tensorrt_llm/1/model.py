"""tensorrt_llm: trtbuild.runtime's InflightBatcher behind Triton's Python backend.

Each request is submitted to the batcher (which admits and retires requests between decoder
steps) and served by its own thread. Decoupled mode streams one response per step when
`streaming` is true (then an empty final response), or sends one response; a client that goes
away (`is_cancelled()`) cancels its request, which frees its batch slot. Non-decoupled mode
(plain HTTP /infer works) submits the whole Triton batch, then answers each request once.

Inputs and outputs follow tensorrtllm_backend's tensorrt_llm model (see config.pbtxt);
output_ids [batch, 1, len] holds the generated tokens only unless exclude_input_in_output=false
(streaming: the new tokens of each step). A bad request gets an error response; the model and
the server stay up.
"""

import json
import threading
import time
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

from trtbuild.serving import GuardedSender, from_word_list_format, model_parameter, read_engine_config

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _error_response(msg):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    err = pb_utils.TritonError(msg, code) if code is not None else pb_utils.TritonError(msg)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


def _cancelled_response():
    code = getattr(pb_utils.TritonError, "CANCELLED", None)
    err = (pb_utils.TritonError("request cancelled", code) if code is not None
           else pb_utils.TritonError("request cancelled"))
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


def _get(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def _row_scalar(arr, i, cast, default):
    """Row i's value of a [batch, 1] input (a single value is used for every row)."""
    if arr is None or arr.size == 0:
        return default
    flat = arr.reshape(-1) if arr.ndim <= 1 else arr.reshape(arr.shape[0], -1)[:, 0]
    return cast(flat[min(i, len(flat) - 1)])


class _Job:
    """One Triton request: its rows (prompt, sampling, lora), mode, and the batcher handles."""

    def __init__(self, sender, rows, streaming, exclude_input, pad_id, request_id=""):
        self.sender = sender
        self.request_id = request_id
        self.rows = rows
        self.streaming = streaming
        self.exclude_input = exclude_input
        self.pad_id = pad_id
        self.handles = []
        self.cancelled = False
        self.generated = 0


class TritonPythonModel:
    def initialize(self, args):
        from trtbuild.runtime import InflightBatcher, ModelRunner, SamplingConfig
        from trtbuild.cli.scheduling_args import args_from_parameters, runner_options, scheduling_from_args

        self.SamplingConfig = SamplingConfig
        cfg = json.loads(args["model_config"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(cfg)
        engine_dir = model_parameter(cfg, "engine_dir")
        num_threads = model_parameter(cfg, "num_threads")
        self.default_max_tokens = int(model_parameter(cfg, "default_max_tokens", 64))
        pc = read_engine_config(engine_dir).get("pretrained_config", {})
        eos = pc.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        self.default_end_id = eos if isinstance(eos, int) else None
        pad = pc.get("pad_token_id")
        self.default_pad_id = pad if isinstance(pad, int) else self.default_end_id
        t0 = time.monotonic()
        # a multi-rank engine: this model is its rank 0 and starts the other ranks itself, each following
        # its in-flight batcher (TensorRT-LLM's orchestrator mode; trtbuild.runtime.world.spawn_world)
        flags = args_from_parameters({key: model_parameter(cfg, key) for key in cfg.get("parameters", {})})
        self.runner = ModelRunner.from_dir(engine_dir, num_threads=int(num_threads) if num_threads else None,
                                           spawn_ranks=True, **runner_options(flags))
        self.runner.scheduling = scheduling_from_args(flags, self.runner, int(num_threads) if num_threads else None)
        self.batcher = InflightBatcher(self.runner)
        pb_utils.Logger.log_info(f"tensorrt_llm: loaded {engine_dir} in {time.monotonic() - t0:.1f} s "
                                 f"(decoupled={self.decoupled})")
        self._jobs = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch_cancellations, daemon=True,
                                         name="trtbuild-cancel-monitor")
        self._monitor.start()

    # ------------------------------------------------------------------ request parsing
    def _parse(self, request):
        ids = _get(request, "input_ids")
        if ids is None:
            raise ValueError("input_ids is required")
        if ids.ndim == 1:
            ids = ids[None]
        batch = ids.shape[0]
        lengths = _get(request, "input_lengths")
        out_len = _get(request, "request_output_len")
        end_id = _get(request, "end_id")
        pad_id = _get(request, "pad_id")
        temperature = _get(request, "temperature")
        top_k = _get(request, "runtime_top_k")
        top_p = _get(request, "runtime_top_p")
        rep = _get(request, "repetition_penalty")
        presence = _get(request, "presence_penalty")
        frequency = _get(request, "frequency_penalty")
        seed = _get(request, "random_seed")
        lora = _get(request, "lora_task_id")
        streaming = _get(request, "streaming")
        exclude = _get(request, "exclude_input_in_output")
        stop = _get(request, "stop_words_list")
        bad = _get(request, "bad_words_list")
        stop_rows = from_word_list_format(stop) if stop is not None else [[]] * batch
        bad_rows = from_word_list_format(bad) if bad is not None else [[]] * batch
        streaming = bool(streaming.reshape(-1)[0]) if streaming is not None and streaming.size else False
        exclude = bool(exclude.reshape(-1)[0]) if exclude is not None and exclude.size else True
        if streaming and not self.decoupled:
            raise ValueError("streaming needs the decoupled tensorrt_llm model: make the "
                             "repository with trtbuild-triton-repo --decoupled")
        if streaming and batch != 1:
            raise ValueError(f"streaming requests must have batch size 1; got {batch}")
        rows = []
        for i in range(batch):
            n = _row_scalar(lengths, i, int, ids.shape[1])
            if not 0 < n <= ids.shape[1]:
                raise ValueError(f"input_lengths {n} of row {i} is not within 1..{ids.shape[1]}")
            k = _row_scalar(top_k, i, int, None)
            p = _row_scalar(top_p, i, float, None)
            if k is None and p is None:
                k, p = 1, 0.0
            else:
                k = 0 if k is None else k
                p = 0.0 if p is None else p
                if k == 0 and p == 0.0:  # TensorRT-LLM: top_k 0 and top_p 0 mean greedy
                    k = 1
            end = _row_scalar(end_id, i, int, self.default_end_id)
            pad = _row_scalar(pad_id, i, int, self.default_pad_id)
            sampling = self.SamplingConfig(
                max_new_tokens=_row_scalar(out_len, i, int, self.default_max_tokens),
                end_id=None if end is None or end < 0 else end,
                pad_id=None if pad is None or pad < 0 else pad,
                temperature=_row_scalar(temperature, i, float, 1.0),
                top_k=k, top_p=p,
                repetition_penalty=_row_scalar(rep, i, float, 1.0),
                presence_penalty=_row_scalar(presence, i, float, 0.0),
                frequency_penalty=_row_scalar(frequency, i, float, 0.0),
                random_seed=_row_scalar(seed, i, int, None),
                stop_words=stop_rows[min(i, len(stop_rows) - 1)],
                bad_words=bad_rows[min(i, len(bad_rows) - 1)],
            )
            lora_id = _row_scalar(lora, i, int, -1)
            rows.append(([int(t) for t in ids[i, :n]], sampling, lora_id))
        pad_out = self.default_pad_id if self.default_pad_id is not None else 0
        return rows, streaming, exclude, pad_out

    def _submit(self, job):
        for prompt, sampling, lora_id in job.rows:
            job.handles.append(self.batcher.submit(prompt, sampling, lora_task_id=lora_id))

    # ------------------------------------------------------------------ responses
    @staticmethod
    def _tokens_response(rows_tokens, pad_id):
        width = max(1, max(len(t) for t in rows_tokens))
        out = np.full((len(rows_tokens), 1, width), pad_id, dtype=np.int32)
        for i, toks in enumerate(rows_tokens):
            out[i, 0, :len(toks)] = toks
        lens = np.array([[len(t)] for t in rows_tokens], dtype=np.int32)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("output_ids", out), pb_utils.Tensor("sequence_length", lens)])

    def _collect(self, job, is_cancelled):
        """Run every handle to the end (checking for cancellation per step); the final tokens."""
        results = []
        for (prompt, _, _), handle in zip(job.rows, job.handles):
            for _ in handle.stream():
                if is_cancelled():
                    job.cancelled = True
                    for h in job.handles:
                        h.cancel()
            toks = list(handle.result())
            job.generated += len(toks)
            results.append(toks if job.exclude_input else prompt + toks)
        return results

    def _serve_decoupled(self, job):
        sender = job.sender
        try:
            try:
                self._submit(job)
            except Exception as e:
                for h in job.handles:
                    h.cancel()
                sender.send(_error_response(f"tensorrt_llm: {e}"), flags=FINAL)
                return
            with self._lock:
                self._jobs.add(job)
            if job.streaming:
                handle = job.handles[0]
                sent = 0
                for new_ids in handle.stream():
                    if job.cancelled or sender.is_cancelled():
                        job.cancelled = True
                        handle.cancel()
                        break
                    if new_ids:
                        sender.send(self._tokens_response([list(new_ids)], job.pad_id))
                        sent += len(new_ids)
                if job.cancelled:
                    self._log_cancel(job, sent)
                else:
                    handle.result(timeout=60)  # raises if the engine failed on this request
                sender.send(flags=FINAL)
            else:
                results = self._collect(job, lambda: job.cancelled or sender.is_cancelled())
                if job.cancelled:
                    self._log_cancel(job, job.generated)
                    sender.send(_cancelled_response(), flags=FINAL)
                else:
                    sender.send(self._tokens_response(results, job.pad_id), flags=FINAL)
        except Exception as e:
            pb_utils.Logger.log_error(f"tensorrt_llm: {traceback.format_exc()}")
            for h in job.handles:
                h.cancel()
            try:
                sender.send(_error_response(f"tensorrt_llm: {e}"), flags=FINAL)
            except Exception:
                pass  # the client is gone, or the final flag was already sent
        finally:
            with self._lock:
                self._jobs.discard(job)

    @staticmethod
    def _log_cancel(job, tokens):
        asked = sum(sampling.max_new_tokens for _, sampling, _ in job.rows)
        pb_utils.Logger.log_info(f"tensorrt_llm: request cancelled by the client after {tokens} of "
                                 f"{asked} tokens; its batch slot is free")

    def _watch_cancellations(self):
        """A request still queued in the batcher yields no steps: poll its client here too."""
        while not self._stop.wait(0.2):
            with self._lock:
                jobs = list(self._jobs)
            for job in jobs:
                try:
                    if not job.cancelled and job.sender is not None and job.sender.is_cancelled():
                        job.cancelled = True
                        for h in job.handles:
                            h.cancel()
                except Exception:
                    pass

    @staticmethod
    def _is_stop(request):
        stop = _get(request, "stop")
        return bool(stop is not None and stop.size and stop.reshape(-1)[0])

    def _stop_request(self, request_id):
        """Cancel the running request(s) with this request id (TensorRT-LLM's `stop` input)."""
        with self._lock:
            jobs = [j for j in self._jobs if request_id and j.request_id == request_id]
        for job in jobs:
            job.cancelled = True
            for h in job.handles:
                h.cancel()
        if not jobs:
            pb_utils.Logger.log_info(f"tensorrt_llm: stop for request id {request_id!r}: no such "
                                     f"request running")

    # ------------------------------------------------------------------ Triton entry points
    def execute(self, requests):
        if self.decoupled:
            for request in requests:
                sender = GuardedSender(request.get_response_sender(), FINAL)
                if self._is_stop(request):
                    self._stop_request(request.request_id())
                    sender.send(flags=FINAL)
                    continue
                try:
                    rows, streaming, exclude, pad = self._parse(request)
                except Exception as e:
                    sender.send(_error_response(f"tensorrt_llm: {e}"), flags=FINAL)
                    continue
                job = _Job(sender, rows, streaming, exclude, pad, request.request_id())
                threading.Thread(target=self._serve_decoupled, args=(job,), daemon=True,
                                 name="trtbuild-request").start()
            return None

        # Non-decoupled: submit the whole batch first so that it runs in flight together.
        jobs, responses = [], [None] * len(requests)
        for n, request in enumerate(requests):
            job = None
            if self._is_stop(request):
                responses[n] = _error_response("tensorrt_llm: stop requests need the decoupled "
                                               "model (trtbuild-triton-repo --decoupled)")
                continue
            try:
                rows, streaming, exclude, pad = self._parse(request)
                job = _Job(None, rows, streaming, exclude, pad)
                self._submit(job)
                jobs.append((n, request, job))
            except Exception as e:
                responses[n] = _error_response(f"tensorrt_llm: {e}")
                if job is not None:
                    for h in job.handles:
                        h.cancel()
        for n, request, job in jobs:
            try:
                check = getattr(request, "is_cancelled", lambda: False)
                results = self._collect(job, check)
                responses[n] = (_cancelled_response() if job.cancelled
                                else self._tokens_response(results, job.pad_id))
            except Exception as e:
                pb_utils.Logger.log_error(f"tensorrt_llm: {traceback.format_exc()}")
                responses[n] = _error_response(f"tensorrt_llm: {e}")
        return responses

    def finalize(self):
        self._stop.set()
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            for h in job.handles:
                h.cancel()
        self.batcher.shutdown()
        if self.runner.world is not None:
            self.runner.world.close()

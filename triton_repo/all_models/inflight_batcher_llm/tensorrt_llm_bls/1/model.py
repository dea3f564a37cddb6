"""tensorrt_llm_bls: the ensemble's chain in one Python model (Business Logic Scripting).

Calls `preprocessing`, then `tensorrt_llm` (as a decoupled BLS request when this repository is
decoupled), and detokenizes itself: streamed text is emitted incrementally from all the tokens
so far, so a character split across tokens is never sent as U+FFFD. Same inputs and output as
`ensemble`. A client that goes away cancels the inner tensorrt_llm request: Triton 2.51 cannot
cancel a BLS request, so this model sends tensorrt_llm a `stop` request with the same request id
(TensorRT-LLM's convention), which frees the batch slot.

One request at a time per instance, in `execute`'s thread, as tensorrtllm_backend's BLS model
does; concurrency comes from the instance count (trtbuild-triton-repo --bls_instance_count,
default the engine's max_batch_size). The stub of Triton 2.51 (python_backend r24.10) is not safe
for BLS streams from several Python threads of one process:
- deadlock: ResponseIterator.__next__ wakes holding the iterator's mutex and then waits for the
  GIL, the stub's receiving thread holds the iterator map's mutex waiting for that iterator's
  mutex, and a thread starting another decoupled `exec()` holds the GIL waiting for the map's
  mutex (all three seen in gdb; every stream of the stub then hangs);
- heap corruption: a finished iterator is dropped from the stub's map by its stub-to-server
  thread, which holds no GIL; if Python let go of the iterator first, ~ResponseIterator runs
  there and its ~PbTensor frees numpy arrays without the GIL (seen in gdb on that thread), which
  breaks CPython's allocator while other threads run Python: "malloc(): unaligned fastbin chunk
  detected", a SIGSEGV in pymalloc, and "Stub process 'tensorrt_llm_bls_0_0' is not healthy".
So every inner stream is read to its final response (never abandoned: an unfinished iterator
stays in the stub's map for good), and a finished iterator is kept (`_retired`) until a later
`is_cancelled()` round trip, which the stub sends through the same queue after the map's
cleanup, has come back: then our reference is the last one and the iterator dies here, with the
GIL. tests/serving/test_triton_soak.py crashed this way with the threaded model of before in its first
300 streams.

The final flag of a request whose client went away goes out a little late (GuardedSender's
cancelled_final_delay, 0.25 s, which holds this instance that long): Triton 2.51's gRPC frontend
crashes on a final response that comes in while it tears down a stream whose connection closed.
"""

import json
import traceback
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from trtbuild.serving import GuardedSender, IncrementalDetokenizer, model_parameter
from trtbuild.tokenizer import load_tokenizer

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

PREPROCESS_INPUTS = ("text_input", "max_tokens", "bad_words", "stop_words", "end_id", "pad_id")
PREPROCESS_OUTPUTS = {  # preprocessing output → tensorrt_llm input
    "input_ids": "input_ids", "input_lengths": "input_lengths",
    "request_output_len": "request_output_len", "bad_words_list": "bad_words_list",
    "stop_words_list": "stop_words_list", "out_end_id": "end_id", "out_pad_id": "pad_id",
}
PASSTHROUGH = {  # our input → tensorrt_llm input
    "top_k": "runtime_top_k", "top_p": "runtime_top_p", "temperature": "temperature",
    "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "random_seed": "random_seed",
    "lora_task_id": "lora_task_id", "stream": "streaming",
    "exclude_input_in_output": "exclude_input_in_output",
}


class _ModelError(Exception):
    pass


def _error_response(msg):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    err = pb_utils.TritonError(msg, code) if code is not None else pb_utils.TritonError(msg)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


def _flag(request, name, default):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None or not t.as_numpy().size:
        return default
    return bool(t.as_numpy().reshape(-1)[0])


def _check(response, model):
    if response.has_error():
        raise _ModelError(response.error().message())
    return response


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(cfg)
        self.tokenizer = load_tokenizer(model_parameter(cfg, "tokenizer_dir"))
        self._retired = []  # finished BLS response iterators, until a round trip has come back

    def _decode(self, ids):
        return self.tokenizer.decode([int(t) for t in ids], skip_special_tokens=True)

    def _text(self, texts):
        arr = np.array([[t.encode("utf-8")] for t in texts], dtype=object)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("text_output", arr)])

    def _llm_request(self, request, request_id):
        """(the tensorrt_llm request, whether our client streams, whether the inner request
        streams). A single-row request always streams from tensorrt_llm (unless it wants the
        prompt in the output), so that a client that goes away is seen at the next token."""
        inputs = []
        for name in PREPROCESS_INPUTS:
            t = pb_utils.get_input_tensor_by_name(request, name)
            if t is not None:
                inputs.append(pb_utils.Tensor(name, t.as_numpy()))
        pre = _check(pb_utils.InferenceRequest(
            model_name="preprocessing", inputs=inputs,
            requested_output_names=list(PREPROCESS_OUTPUTS)).exec(), "preprocessing")
        llm_inputs = [pb_utils.Tensor(dst, pb_utils.get_output_tensor_by_name(pre, src).as_numpy())
                      for src, dst in PREPROCESS_OUTPUTS.items()]
        for src, dst in PASSTHROUGH.items():
            t = pb_utils.get_input_tensor_by_name(request, src)
            if t is not None and src != "stream":
                llm_inputs.append(pb_utils.Tensor(dst, t.as_numpy()))
        streaming = _flag(request, "stream", False)
        rows = pb_utils.get_output_tensor_by_name(pre, "input_ids").as_numpy().shape[0]
        inner = streaming or (self.decoupled and rows == 1
                              and _flag(request, "exclude_input_in_output", True))
        llm_inputs.append(pb_utils.Tensor("streaming", np.full((rows, 1), inner, dtype=bool)))
        return pb_utils.InferenceRequest(
            model_name="tensorrt_llm", inputs=llm_inputs, request_id=request_id,
            requested_output_names=["output_ids", "sequence_length"]), streaming, inner

    @staticmethod
    def _ids(response):
        ids = pb_utils.get_output_tensor_by_name(response, "output_ids").as_numpy()
        lens = pb_utils.get_output_tensor_by_name(response, "sequence_length").as_numpy()
        ids = ids.reshape(ids.shape[0], -1, ids.shape[-1])[:, 0, :]
        lens = lens.reshape(lens.shape[0], -1)[:, 0]
        return [ids[b, :int(lens[b])].tolist() for b in range(ids.shape[0])]

    # ------------------------------------------------------------------ decoupled BLS streams
    def _client_gone(self, sender):
        """Poll the client. A poll that went to the server and back (the client is still there)
        is the barrier after which the iterators retired before it can be let go."""
        if sender.asked_and_live():
            self._retired.clear()
            return False
        return sender.is_cancelled()

    def _retire(self, responses):
        """Keep a finished iterator until the next round trip (see the module docstring)."""
        self._retired.append(responses)
        if len(self._retired) > 64:  # never reached in practice: each request polls
            pb_utils.Logger.log_warn(f"tensorrt_llm_bls: {len(self._retired)} finished BLS "
                                     f"iterators are waiting for a round trip to the server")

    def _stop(self, request_id):
        """Cancel our tensorrt_llm request: Triton 2.51 cannot cancel a BLS request, so send
        TensorRT-LLM's `stop` request with the same request id. Never raises: the caller goes
        on reading its inner stream to the end, which the stop only makes come sooner."""
        try:
            stop = pb_utils.InferenceRequest(
                model_name="tensorrt_llm", request_id=request_id,
                inputs=[pb_utils.Tensor("input_ids", np.zeros((1, 1), dtype=np.int32)),
                        pb_utils.Tensor("stop", np.ones((1, 1), dtype=bool))],
                requested_output_names=["output_ids", "sequence_length"])
            responses = stop.exec(decoupled=True)
        except Exception:
            pb_utils.Logger.log_warn(f"tensorrt_llm_bls: could not stop {request_id}: "
                                     f"{traceback.format_exc()}")
            return
        for _ in responses:
            pass
        self._retire(responses)

    def _serve_stream(self, request, sender):
        """One decoupled request, start to end: stream (or collect) the inner request's tokens
        as text, stopping the inner request if our client goes away."""
        request_id = f"trtbuild-bls-{uuid.uuid4().hex}"
        try:
            llm_request, streaming, inner_streaming = self._llm_request(request, request_id)
            responses = llm_request.exec(decoupled=True)
        except Exception as e:
            if not isinstance(e, _ModelError):
                pb_utils.Logger.log_error(f"tensorrt_llm_bls: {traceback.format_exc()}")
            self._finish(sender, error=f"tensorrt_llm_bls: {e}")
            return
        detok = IncrementalDetokenizer(self._decode)
        rows, error, cancelled, stopped = None, None, False, False
        response = None
        for response in responses:  # always to the final response: see the module docstring
            if stopped or error is not None:
                continue
            try:
                if response.has_error():
                    error = f"tensorrt_llm_bls: {response.error().message()}"
                    continue
                if pb_utils.get_output_tensor_by_name(response, "output_ids") is None:
                    continue  # the empty final response
                if self._client_gone(sender):
                    cancelled = stopped = True
                    self._stop(request_id)
                    continue
                new = self._ids(response)
                if streaming:
                    delta = detok.add(new[0])
                    if delta:
                        sender.send(self._text([delta]))
                elif inner_streaming:
                    rows = [(rows or [[]])[0] + new[0]]
                else:
                    rows = new
            except Exception as e:  # e.g. a send failed because the client has just gone
                if sender.is_cancelled():
                    cancelled = True
                else:
                    pb_utils.Logger.log_error(f"tensorrt_llm_bls: {traceback.format_exc()}")
                    error = f"tensorrt_llm_bls: {e}"
                stopped = True
                self._stop(request_id)
        del response
        self._retire(responses)
        del responses
        self._client_gone(sender)  # the barrier for this request's iterators
        tail = texts = None
        if error is None and not cancelled:
            try:
                if streaming:
                    tail = detok.add([], final=True)
                else:
                    texts = [self._decode(r) for r in (rows or [[]])]
            except Exception as e:
                pb_utils.Logger.log_error(f"tensorrt_llm_bls: {traceback.format_exc()}")
                error = f"tensorrt_llm_bls: {e}"
        self._finish(sender, error=None if cancelled else error, tail=tail, texts=texts)

    def _finish(self, sender, error=None, tail=None, texts=None):
        """Send the last response(s) of a decoupled request: an error, the rest of a stream
        (`tail`), the whole text (`texts`) or only the final flag. Never raises: a client that
        went away gets nothing, and nothing is logged for it."""
        try:
            if sender.is_cancelled():
                sender.send(flags=FINAL)
            elif error is not None:
                sender.send(_error_response(error), flags=FINAL)
            elif texts is not None:
                sender.send(self._text(texts), flags=FINAL)
            else:
                if tail:
                    sender.send(self._text([tail]))
                sender.send(flags=FINAL)
        except Exception:
            if not sender.is_cancelled():
                pb_utils.Logger.log_error(f"tensorrt_llm_bls: {traceback.format_exc()}")
            if not sender.closed:
                try:
                    sender.send(flags=FINAL)
                except Exception:
                    pass

    def _serve_one(self, request):
        """Non-decoupled: one response."""
        try:
            llm_request, _, _ = self._llm_request(request, "")
            rows = self._ids(_check(llm_request.exec(), "tensorrt_llm"))
            return self._text([self._decode(r) for r in rows])
        except Exception as e:
            if not isinstance(e, _ModelError):
                pb_utils.Logger.log_error(f"tensorrt_llm_bls: {traceback.format_exc()}")
            return _error_response(f"tensorrt_llm_bls: {e}")

    def execute(self, requests):
        if not self.decoupled:
            return [self._serve_one(r) for r in requests]
        for request in requests:  # one at a time: see the module docstring
            sender = GuardedSender(request.get_response_sender(), FINAL)
            try:
                self._serve_stream(request, sender)
            except Exception as e:  # a bug of ours: this client still gets its final response
                pb_utils.Logger.log_error(f"tensorrt_llm_bls: {traceback.format_exc()}")
                if not sender.closed:
                    self._finish(sender, error=f"tensorrt_llm_bls: {e}")
        return None

    def finalize(self):
        self._retired.clear()

"""tensorrt_llm_bls: the ensemble's chain in one Python model (Business Logic Scripting).

Calls `preprocessing`, then `tensorrt_llm` (as a decoupled BLS request when this repository is
decoupled), and detokenizes itself: streamed text is emitted incrementally from all the tokens
so far, so a character split across tokens is never sent as U+FFFD. Same inputs and output as
`ensemble`. A client that goes away cancels the inner tensorrt_llm request: Triton 2.51 cannot
cancel a BLS request, so this model sends tensorrt_llm a `stop` request with the same request id
(TensorRT-LLM's convention), which frees the batch slot.
"""

import json
import threading
import traceback
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from trtbuild.serving import GuardedSender, IncrementalDetokenizer, load_tokenizer, model_parameter

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

PREPROCESS_INPUTS = ("text_input", "max_tokens", "bad_words", "stop_words", "end_id", "pad_id")
PREPROCESS_OUTPUTS = {  # preprocessing output → tensorrt_llm input
    "input_ids": "input_ids", "input_lengths": "input_lengths",
    "request_output_len": "request_output_len", "bad_words_list": "bad_words_list",
    "stop_words_list": "stop_words_list", "out_end_id": "end_id", "out_pad_id": "pad_id",
}
PASSTHROUGH = {  # our input → tensorrt_llm input
    "top_k": "runtime_top_k", "top_p": "runtime_top_p", "temperature": "temperature",
    "repetition_penalty": "repetition_penalty", "random_seed": "random_seed",
    "lora_task_id": "lora_task_id", "stream": "streaming",
    "exclude_input_in_output": "exclude_input_in_output",
}


class _ModelError(Exception):
    pass


def _error_response(msg):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    err = pb_utils.TritonError(msg, code) if code is not None else pb_utils.TritonError(msg)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


def _check(response, model):
    if response.has_error():
        raise _ModelError(response.error().message())
    return response


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(cfg)
        self.tokenizer = load_tokenizer(model_parameter(cfg, "tokenizer_dir"))

    def _decode(self, ids):
        return self.tokenizer.decode([int(t) for t in ids], skip_special_tokens=True)

    def _text(self, texts):
        arr = np.array([[t.encode("utf-8")] for t in texts], dtype=object)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("text_output", arr)])

    def _llm_request(self, request, request_id):
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
            if t is not None:
                llm_inputs.append(pb_utils.Tensor(dst, t.as_numpy()))
        stream = pb_utils.get_input_tensor_by_name(request, "stream")
        streaming = bool(stream is not None and stream.as_numpy().size and stream.as_numpy().reshape(-1)[0])
        return pb_utils.InferenceRequest(
            model_name="tensorrt_llm", inputs=llm_inputs, request_id=request_id,
            requested_output_names=["output_ids", "sequence_length"]), streaming

    @staticmethod
    def _stop(request_id):
        """Cancel our tensorrt_llm request: Triton 2.51 cannot cancel a BLS request, so send
        TensorRT-LLM's `stop` request with the same request id."""
        stop = pb_utils.InferenceRequest(
            model_name="tensorrt_llm", request_id=request_id,
            inputs=[pb_utils.Tensor("input_ids", np.zeros((1, 1), dtype=np.int32)),
                    pb_utils.Tensor("stop", np.ones((1, 1), dtype=bool))],
            requested_output_names=["output_ids", "sequence_length"])
        for _ in stop.exec(decoupled=True):
            pass

    def _watch(self, sender, request_id, done):
        """Poll the client while the request runs; on cancellation stop the inner request."""
        while not done.wait(0.2):
            try:
                if sender.is_cancelled():
                    self._stop(request_id)
                    return
            except Exception:
                pb_utils.Logger.log_warn(f"tensorrt_llm_bls: {traceback.format_exc()}")
                return

    @staticmethod
    def _ids(response):
        ids = pb_utils.get_output_tensor_by_name(response, "output_ids").as_numpy()
        lens = pb_utils.get_output_tensor_by_name(response, "sequence_length").as_numpy()
        ids = ids.reshape(ids.shape[0], -1, ids.shape[-1])[:, 0, :]
        lens = lens.reshape(lens.shape[0], -1)[:, 0]
        return [ids[b, :int(lens[b])].tolist() for b in range(ids.shape[0])]

    def _serve(self, request, sender):
        request_id = f"trtbuild-bls-{uuid.uuid4().hex}"
        done = threading.Event()
        try:
            llm_request, streaming = self._llm_request(request, request_id)
            if not self.decoupled:
                rows = self._ids(_check(llm_request.exec(), "tensorrt_llm"))
                return self._text([self._decode(r) for r in rows])
            threading.Thread(target=self._watch, args=(sender, request_id, done), daemon=True,
                             name="trtbuild-bls-watch").start()
            detok = IncrementalDetokenizer(self._decode)
            rows = None
            cancelled = False
            for response in llm_request.exec(decoupled=True):
                if response.has_error() and sender.is_cancelled():
                    cancelled = True
                    break
                _check(response, "tensorrt_llm")
                if pb_utils.get_output_tensor_by_name(response, "output_ids") is None:
                    continue  # the empty final response
                if sender.is_cancelled():
                    cancelled = True
                    continue  # drain: the watcher has stopped the inner request
                new = self._ids(response)
                if streaming:
                    delta = detok.add(new[0])
                    if delta:
                        sender.send(self._text([delta]))
                else:
                    rows = new
            if cancelled:
                sender.send(flags=FINAL)
            elif streaming:
                tail = detok.add([], final=True)
                if tail:
                    sender.send(self._text([tail]))
                sender.send(flags=FINAL)
            else:
                sender.send(self._text([self._decode(r) for r in (rows or [[]])]), flags=FINAL)
        except Exception as e:
            if not isinstance(e, _ModelError):
                pb_utils.Logger.log_error(f"tensorrt_llm_bls: {traceback.format_exc()}")
            response = _error_response(f"tensorrt_llm_bls: {e}")
            if not self.decoupled:
                return response
            try:
                sender.send(response, flags=FINAL)
            except Exception:
                pass
        finally:
            done.set()
        return None

    def execute(self, requests):
        if not self.decoupled:
            return [self._serve(r, None) for r in requests]
        for request in requests:
            sender = GuardedSender(request.get_response_sender(), FINAL)
            threading.Thread(target=self._serve, args=(request, sender),
                             daemon=True, name="trtbuild-bls").start()
        return None

"""preprocessing: text → token ids for tensorrt_llm (tensorrtllm_backend's preprocessing shape).

Inputs (batch rows): text_input BYTES [1]; optional max_tokens INT32 [1], stop_words / bad_words
BYTES [n] (each element one word, tokenized without special tokens), end_id / pad_id INT32 [1].
Outputs: input_ids INT32 [L] (padded to the longest row), input_lengths, request_output_len,
stop_words_list / bad_words_list INT32 [2, W] (TensorRT-LLM's word-list format), out_end_id,
out_pad_id (-1 = none). A bad request gets an error response; the others in the batch go on.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from trtbuild.serving import model_parameter, read_engine_config, special_token_ids, to_word_list_format
from trtbuild.tokenizer import load_tokenizer


def _error(msg):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    err = pb_utils.TritonError(msg, code) if code is not None else pb_utils.TritonError(msg)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


def _optional(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def _strings(arr):
    return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in arr.reshape(-1)]


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        self.tokenizer_dir = model_parameter(cfg, "tokenizer_dir")
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        engine_dir = model_parameter(cfg, "engine_dir")
        engine_cfg = read_engine_config(engine_dir) if engine_dir else None
        ids = special_token_ids(self.tokenizer_dir, self.tokenizer, engine_cfg)
        self.end_id = ids["eos"] if ids["eos"] is not None else -1
        self.pad_id = ids["pad"] if ids["pad"] is not None else self.end_id
        self.max_input_len = int(model_parameter(cfg, "max_input_len", 0) or 0)
        self.default_max_tokens = int(model_parameter(cfg, "default_max_tokens", 64))
        self.add_special_tokens = model_parameter(cfg, "add_special_tokens", "true").lower() == "true"

    def _encode_words(self, arr, batch):
        rows = []
        for i in range(batch):
            words = [] if arr is None else _strings(arr[i] if arr.ndim > 1 else arr)
            rows.append([self.tokenizer.encode(w, add_special_tokens=False).ids for w in words if w])
        return to_word_list_format(rows)

    def _one(self, request):
        text = _optional(request, "text_input")
        if text is None:
            raise ValueError("text_input is required")
        batch = text.shape[0]
        texts = [_strings(text[i])[0] if text[i].size else "" for i in range(batch)]
        encoded = [self.tokenizer.encode(t, add_special_tokens=self.add_special_tokens).ids
                   for t in texts]
        for i, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"text_input row {i} is empty after tokenization")
            if self.max_input_len and len(ids) > self.max_input_len:
                raise ValueError(
                    f"the prompt has {len(ids)} tokens but the engine's max_input_len is "
                    f"{self.max_input_len}: shorten it or rebuild the engine with "
                    f"trt-build --max_input_len")
        width = max(len(ids) for ids in encoded)
        input_ids = np.full((batch, width), max(self.pad_id, 0), dtype=np.int32)
        for i, ids in enumerate(encoded):
            input_ids[i, :len(ids)] = ids
        lengths = np.array([[len(ids)] for ids in encoded], dtype=np.int32)

        max_tokens = _optional(request, "max_tokens")
        if max_tokens is None:
            out_len = np.full((batch, 1), self.default_max_tokens, dtype=np.int32)
        else:
            out_len = max_tokens.reshape(batch, -1)[:, :1].astype(np.int32)
            if (out_len < 1).any():
                raise ValueError(f"max_tokens must be at least 1; got {out_len.reshape(-1).tolist()}")

        end_id = _optional(request, "end_id")
        pad_id = _optional(request, "pad_id")
        end = (np.full((batch, 1), self.end_id, dtype=np.int32) if end_id is None
               else end_id.reshape(batch, -1)[:, :1].astype(np.int32))
        pad = (np.full((batch, 1), self.pad_id, dtype=np.int32) if pad_id is None
               else pad_id.reshape(batch, -1)[:, :1].astype(np.int32))
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("input_ids", input_ids),
            pb_utils.Tensor("input_lengths", lengths),
            pb_utils.Tensor("request_output_len", out_len),
            pb_utils.Tensor("bad_words_list", self._encode_words(_optional(request, "bad_words"), batch)),
            pb_utils.Tensor("stop_words_list", self._encode_words(_optional(request, "stop_words"), batch)),
            pb_utils.Tensor("out_end_id", end),
            pb_utils.Tensor("out_pad_id", pad),
        ])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except Exception as e:  # a bad request must not take the model down
                responses.append(_error(f"preprocessing: {e}"))
        return responses

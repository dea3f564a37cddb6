"""postprocessing: output_ids [batch, beam, len] + sequence_length [batch, beam] → text_output
BYTES [batch, beam] (tensorrtllm_backend's postprocessing shape).

In a streaming ensemble each response carries only the new tokens, and each is decoded alone
(as tensorrtllm_backend does): a character split across two tokens shows as U+FFFD. The
tensorrt_llm_bls model decodes incrementally instead.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from trtbuild.serving import model_parameter
from trtbuild.tokenizer import load_tokenizer


def _error(msg):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    err = pb_utils.TritonError(msg, code) if code is not None else pb_utils.TritonError(msg)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        self.tokenizer = load_tokenizer(model_parameter(cfg, "tokenizer_dir"))
        self.skip_special_tokens = (
            model_parameter(cfg, "skip_special_tokens", "true").lower() == "true")

    def _one(self, request):
        ids = pb_utils.get_input_tensor_by_name(request, "output_ids").as_numpy()
        lens_t = pb_utils.get_input_tensor_by_name(request, "sequence_length")
        if ids.ndim == 2:  # [batch, len]: one beam
            ids = ids[:, None, :]
        lens = (np.full(ids.shape[:2], ids.shape[2], dtype=np.int64) if lens_t is None
                else lens_t.as_numpy().reshape(ids.shape[:2]))
        texts = np.empty(ids.shape[:2], dtype=object)
        for b in range(ids.shape[0]):
            for k in range(ids.shape[1]):
                row = ids[b, k, :max(0, int(lens[b, k]))].tolist()
                texts[b, k] = self.tokenizer.decode(
                    row, skip_special_tokens=self.skip_special_tokens).encode("utf-8")
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("text_output", texts)])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except Exception as e:
                responses.append(_error(f"postprocessing: {e}"))
        return responses

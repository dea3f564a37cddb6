#!/usr/bin/env python3
"""Text in, text out over gRPC: send a prompt to the `ensemble` (or `tensorrt_llm_bls`) model.

    python triton_repo/client/end_to_end_grpc_client.py -u 127.0.0.1:8001 -p "The capital of France is" -o 16
    python triton_repo/client/end_to_end_grpc_client.py -p "Tell me a story" -o 64 --streaming

Flags follow tensorrtllm_backend's client. Streaming prints each piece as it arrives; errors
(over-long prompt, bad values) are printed and exit with code 1. Needs tritonclient[grpc]
(installed in the triton venv by trtbuild-install-triton, scripts/install_triton.sh in a checkout).
"""

from __future__ import annotations

import argparse
import queue
import sys
import time

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype


def tensor(name, array):
    t = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    t.set_data_from_numpy(array)
    return t


def build_inputs(args) -> list:
    inputs = [tensor("text_input", np.array([[args.prompt]], dtype=object)),
              tensor("max_tokens", np.array([[args.output_len]], dtype=np.int32)),
              tensor("stream", np.array([[args.streaming]], dtype=bool))]
    if args.stop_words:
        inputs.append(tensor("stop_words", np.array([args.stop_words], dtype=object)))
    if args.bad_words:
        inputs.append(tensor("bad_words", np.array([args.bad_words], dtype=object)))
    optional = [("end_id", args.end_id, np.int32), ("pad_id", args.pad_id, np.int32),
                ("top_k", args.top_k, np.int32), ("top_p", args.top_p, np.float32),
                ("temperature", args.temperature, np.float32),
                ("repetition_penalty", args.repetition_penalty, np.float32),
                ("random_seed", args.random_seed, np.uint64),
                ("lora_task_id", args.lora_task_id, np.uint64)]
    for name, value, dtype in optional:
        if value is not None:
            inputs.append(tensor(name, np.array([[value]], dtype=dtype)))
    if args.include_input_in_output:
        inputs.append(tensor("exclude_input_in_output", np.array([[False]], dtype=bool)))
    return inputs


def generate(args, out=sys.stdout) -> str:
    """Send one request; returns the whole text (streamed pieces are written to `out` as they come)."""
    client = grpcclient.InferenceServerClient(args.url, verbose=args.verbose)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)),
                        stream_timeout=args.stream_timeout)
    pieces = []
    try:
        client.async_stream_infer(args.model_name, build_inputs(args), request_id=args.request_id,
                                  enable_empty_final_response=True)
        deadline = time.monotonic() + args.stream_timeout if args.stream_timeout else None
        while True:
            timeout = None if deadline is None else max(0.1, deadline - time.monotonic())
            try:
                result, error = results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no response within {args.stream_timeout} s") from None
            if error is not None:
                raise error
            response = result.get_response()
            if any(o.name == "text_output" for o in response.outputs):
                piece = result.as_numpy("text_output").reshape(-1)[0]
                piece = piece.decode("utf-8") if isinstance(piece, bytes) else str(piece)
                pieces.append(piece)
                if args.streaming:
                    out.write(piece)
                    out.flush()
            final = response.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    text = "".join(pieces)
    if args.streaming:
        out.write("\n")
    else:
        out.write(text + "\n")
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-u", "--url", default="127.0.0.1:8001", help="gRPC address (default 127.0.0.1:8001)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("-t", "--stream-timeout", "--stream_timeout", dest="stream_timeout", type=float,
                   default=300.0, help="seconds to wait for the whole answer")
    p.add_argument("-p", "--prompt", "--text", dest="prompt", required=True)
    p.add_argument("-S", "--streaming", action="store_true", help="one response per generated step")
    p.add_argument("-o", "--output-len", "--output_len", dest="output_len", type=int, default=32,
                   help="max new tokens")
    p.add_argument("--model-name", "--model_name", dest="model_name", default="ensemble",
                   help="ensemble (default) or tensorrt_llm_bls")
    p.add_argument("--request-id", "--request_id", dest="request_id", default="")
    p.add_argument("--stop-words", "--stop_words", dest="stop_words", nargs="+", default=[])
    p.add_argument("--bad-words", "--bad_words", dest="bad_words", nargs="+", default=[])
    p.add_argument("--end-id", "--end_id", dest="end_id", type=int, default=None)
    p.add_argument("--pad-id", "--pad_id", dest="pad_id", type=int, default=None)
    p.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=None)
    p.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--repetition-penalty", "--repetition_penalty", dest="repetition_penalty",
                   type=float, default=None)
    p.add_argument("--random-seed", "--random_seed", dest="random_seed", type=int, default=None)
    p.add_argument("--lora-task-id", "--lora_task_id", dest="lora_task_id", type=int, default=None)
    p.add_argument("--include-input-in-output", action="store_true",
                   help="return the prompt too (exclude_input_in_output=false)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        generate(args)
    except (InferenceServerException, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

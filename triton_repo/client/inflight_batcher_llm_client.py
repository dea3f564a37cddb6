#!/usr/bin/env python3
"""Token ids in, token ids out over gRPC: talk to the `tensorrt_llm` model directly.

    python triton_repo/client/inflight_batcher_llm_client.py --input-ids 1,2,3 --request-output-len 16
    python triton_repo/client/inflight_batcher_llm_client.py --tokenizer-dir ENGINE/tokenizer \
        --text "The capital of France is" --request-output-len 16 --streaming
    ... --streaming --stop-after-ms 200    # cancel mid-stream (the batch slot is freed)

Flags follow tensorrtllm_backend's client. With --tokenizer-dir the prompt is tokenized here
(tokenizers library) and the output decoded. Prints the output ids (one line, comma-separated)
and, with a tokenizer, the text. Exit code 1 on an error response.
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


def build_inputs(args, ids: list[int]) -> list:
    inputs = [tensor("input_ids", np.array([ids], dtype=np.int32)),
              tensor("input_lengths", np.array([[len(ids)]], dtype=np.int32)),
              tensor("request_output_len", np.array([[args.request_output_len]], dtype=np.int32)),
              tensor("streaming", np.array([[args.streaming]], dtype=bool))]
    optional = [("end_id", args.end_id, np.int32), ("pad_id", args.pad_id, np.int32),
                ("runtime_top_k", args.top_k, np.int32), ("runtime_top_p", args.top_p, np.float32),
                ("temperature", args.temperature, np.float32),
                ("repetition_penalty", args.repetition_penalty, np.float32),
                ("random_seed", args.random_seed, np.uint64),
                ("lora_task_id", args.lora_task_id, np.uint64)]
    for name, value, dtype in optional:
        if value is not None:
            inputs.append(tensor(name, np.array([[value]], dtype=dtype)))
    return inputs


def run(args, ids: list[int], on_tokens=None) -> tuple[list[int], bool]:
    """Send one request; returns (output ids, cancelled). `on_tokens(list)` sees each response."""
    client = grpcclient.InferenceServerClient(args.url, verbose=args.verbose)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    output: list[int] = []
    cancelled = False
    start = time.monotonic()
    try:
        client.async_stream_infer(args.model_name, build_inputs(args, ids),
                                  request_id=args.request_id, enable_empty_final_response=True)
        while True:
            if args.stop_after_ms is not None:
                left = args.stop_after_ms / 1000 - (time.monotonic() - start)
                if left <= 0:
                    cancelled = True
                    break
                timeout = left
            else:
                timeout = args.timeout
            try:
                result, error = results.get(timeout=timeout)
            except queue.Empty:
                if args.stop_after_ms is not None:
                    continue
                raise TimeoutError(f"no response within {args.timeout} s") from None
            if error is not None:
                raise error
            response = result.get_response()
            if any(o.name == "output_ids" for o in response.outputs):
                out = result.as_numpy("output_ids")
                lens = result.as_numpy("sequence_length")
                new = out.reshape(-1, out.shape[-1])[0, :int(lens.reshape(-1)[0])].tolist()
                output.extend(new)
                if on_tokens is not None:
                    on_tokens(new)
            final = response.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
    finally:
        # cancel_requests=True: the server sees the client go away and frees the request's slot.
        client.stop_stream(cancel_requests=cancelled)
        client.close()
    return output, cancelled


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-u", "--url", default="127.0.0.1:8001")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--model-name", "--model_name", dest="model_name", default="tensorrt_llm")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input-ids", "--input_ids", dest="input_ids",
                     help="comma-separated prompt token ids")
    src.add_argument("--text", help="prompt text (needs --tokenizer-dir)")
    p.add_argument("--tokenizer-dir", "--tokenizer_dir", dest="tokenizer_dir",
                   help="dir with tokenizer.json (e.g. ENGINE/tokenizer)")
    p.add_argument("--request-output-len", "--request_output_len", dest="request_output_len",
                   type=int, default=16)
    p.add_argument("--streaming", action="store_true")
    p.add_argument("--stop-after-ms", "--stop_after_ms", dest="stop_after_ms", type=float,
                   default=None, help="cancel the request after this many milliseconds")
    p.add_argument("--request-id", "--request_id", dest="request_id", default="")
    p.add_argument("--end-id", "--end_id", dest="end_id", type=int, default=None)
    p.add_argument("--pad-id", "--pad_id", dest="pad_id", type=int, default=None)
    p.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=None)
    p.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--repetition-penalty", "--repetition_penalty", dest="repetition_penalty",
                   type=float, default=None)
    p.add_argument("--random-seed", "--random_seed", dest="random_seed", type=int, default=None)
    p.add_argument("--lora-task-id", "--lora_task_id", dest="lora_task_id", type=int, default=None)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait per response")
    args = p.parse_args(argv)
    if args.text is not None and not args.tokenizer_dir:
        p.error("--text needs --tokenizer-dir")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    tokenizer = None
    if args.tokenizer_dir:
        from pathlib import Path

        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(Path(args.tokenizer_dir) / "tokenizer.json"))
    if args.text is not None:
        ids = tokenizer.encode(args.text).ids
    else:
        try:
            ids = [int(t) for t in args.input_ids.split(",") if t.strip()]
        except ValueError:
            print(f"error: --input-ids {args.input_ids!r} must be comma-separated integers",
                  file=sys.stderr)
            return 2
    try:
        output, cancelled = run(args, ids)
    except (InferenceServerException, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(",".join(str(t) for t in output))
    if tokenizer is not None:
        print(tokenizer.decode(output))
    if cancelled:
        print(f"cancelled after {len(output)} tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Soak a served repository: many streams (gRPC, or HTTP generate_stream) at a bounded
concurrency, some of them dropped by the client mid-way (what tests/serving/test_triton_soak.py runs).

    python triton_repo/client/stream_soak_client.py -u 127.0.0.1:8001 --requests 300 \
        --concurrency 8 --drop_fraction 0.33 [--model tensorrt_llm_bls] [--max_tokens 32] \
        [--prompt "The capital of France is" ...]
    python triton_repo/client/stream_soak_client.py -u 127.0.0.1:8001 --http_url 127.0.0.1:8000 \
        --plan plan.json --results results.jsonl

Every request is a stream of its own (one tritonclient gRPC client: start_stream,
async_stream_infer with an empty final response). A dropped request stops after `drop_after`
responses (0: right after sending) and goes away: `cancel` stops the stream with
cancel_requests=True (what tritonclient does for a caller that gives up), `close` closes the
gRPC channel (the connection goes away). A request with "protocol": "http" is a generate_stream
of its own (server-sent events) on --http_url; dropping it closes its connection. The others
are read to their final response.

A plan is a JSON list of requests: {"model": "tensorrt_llm_bls" | "ensemble" (text in, text out;
"text") or "tensorrt_llm" ("input_ids"), "max_tokens", optional "end_id", "drop_after" (null:
read to the end), optional "drop_after_seconds" (drop then, if still running), "drop" ("cancel"
or "close"), optional "protocol" ("grpc", the default, or "http")}. --results writes one JSON
line per request, in plan order: {"i", "model", "text" or "ids", "responses", "final",
"dropped", "error", "ttft", "seconds"}. Prints a summary; exit code 1 if a request that was not
dropped failed or did not finish.
"""

from __future__ import annotations

import argparse
import http.client
import json
import queue
import random
import socket
import sys
import threading
import time

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

from generate_stream import next_event, open_generate_stream  # beside this file (stdlib only)

TEXT_MODELS = ("tensorrt_llm_bls", "ensemble")


def tensor(name, array):
    t = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    t.set_data_from_numpy(array)
    return t


def build_inputs(req: dict) -> list:
    if req["model"] in TEXT_MODELS:
        inputs = [tensor("text_input", np.array([[req["text"]]], dtype=object)),
                  tensor("max_tokens", np.array([[req["max_tokens"]]], dtype=np.int32)),
                  tensor("stream", np.array([[True]], dtype=bool))]
    else:
        ids = req["input_ids"]
        inputs = [tensor("input_ids", np.array([ids], dtype=np.int32)),
                  tensor("input_lengths", np.array([[len(ids)]], dtype=np.int32)),
                  tensor("request_output_len", np.array([[req["max_tokens"]]], dtype=np.int32)),
                  tensor("streaming", np.array([[True]], dtype=bool))]
    if req.get("end_id") is not None:
        inputs.append(tensor("end_id", np.array([[req["end_id"]]], dtype=np.int32)))
    return inputs


def http_body(req: dict) -> dict:
    """The generate_stream JSON body of a plan request."""
    if req["model"] in TEXT_MODELS:
        body = {"text_input": req["text"], "max_tokens": req["max_tokens"], "stream": True}
    else:
        body = {"input_ids": req["input_ids"], "request_output_len": req["max_tokens"],
                "streaming": True}
    if req.get("end_id") is not None:
        body["end_id"] = req["end_id"]
    return body


class Drop:
    """When the client drops a request: after `drop_after` responses (None: never) or
    `drop_after_seconds` after `start` (if it is still running then)."""

    def __init__(self, req: dict, start: float):
        self.after = req.get("drop_after")
        seconds = req.get("drop_after_seconds")
        self.at = None if seconds is None else start + seconds

    def deadline_passed(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at

    def due(self, responses: int) -> bool:
        return (self.after is not None and responses >= self.after) or self.deadline_passed()

    def wait(self, timeout: float) -> float:
        """How long to wait for the next response: `timeout`, or less to drop in time."""
        return timeout if self.at is None else max(0.01, min(timeout, self.at - time.monotonic()))


def new_record(i: int, req: dict) -> dict:
    return {"i": i, "model": req["model"], "responses": 0, "final": False, "dropped": False,
            "error": None, "ttft": None, "seconds": None}


def count_response(result: dict, start: float) -> None:
    result["responses"] += 1
    if result["ttft"] is None:
        result["ttft"] = round(time.monotonic() - start, 4)


def read_responses(result: dict, drop: Drop, timeout: float, receive, handle) -> None:
    """Hand each response that `receive(wait)` returns to `handle` until it says the stream is
    done (True) or the request is dropped; `receive` raises TimeoutError when none came within
    `wait` seconds (an error unless the drop deadline came first)."""
    while True:
        if drop.due(result["responses"]):
            result["dropped"] = True
            return
        try:
            response = receive(drop.wait(timeout))
        except TimeoutError:
            if drop.deadline_passed():
                continue  # dropped at the top of the loop
            result["error"] = f"no response within {timeout} s"
            return
        if handle(response):
            return


def finish_record(result: dict, req: dict, pieces: list, start: float) -> dict:
    result["seconds"] = round(time.monotonic() - start, 4)
    if req["model"] in TEXT_MODELS:
        result["text"] = "".join(pieces)
    else:
        result["ids"] = pieces
    return result


def run_one_http(url: str, i: int, req: dict, timeout: float) -> dict:
    """One request as an HTTP generate_stream (server-sent events); a drop closes the
    connection (both drop kinds: HTTP has no other way to give up)."""
    result = new_record(i, req)
    pieces: list = []
    host, port = url.rsplit(":", 1)
    start = time.monotonic()
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)

    def receive(wait: float):
        conn.sock.settimeout(wait)
        return next_event(resp)  # socket.timeout is TimeoutError

    def handle(event) -> bool:
        if event is None:  # the server ended the stream: its final response was sent
            result["final"] = resp.status == 200 and result["error"] is None
            if resp.status != 200 and result["error"] is None:
                result["error"] = f"HTTP {resp.status}"
            return True
        if "error" in event:
            result["error"] = event["error"]
            return False
        if "text_output" in event:
            pieces.append(event["text_output"])
        elif "output_ids" in event:
            ids = np.asarray(event["output_ids"]).reshape(-1)
            n = int(np.asarray(event["sequence_length"]).reshape(-1)[0])
            pieces.extend(int(t) for t in ids[:n])
        count_response(result, start)
        return False

    try:
        resp = open_generate_stream(conn, req["model"], http_body(req))
        read_responses(result, Drop(req, start), timeout, receive, handle)
    except Exception as e:  # noqa: BLE001 - reported in the record
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        if conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)  # the connection goes away under the stream
            except OSError:
                pass
        conn.close()
    return finish_record(result, req, pieces, start)


def run_one(url: str, i: int, req: dict, timeout: float) -> dict:
    """One request on a gRPC stream of its own; its result record."""
    result = new_record(i, req)
    pieces: list = []
    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    start = time.monotonic()

    def receive(wait: float):
        try:
            return responses.get(timeout=wait)
        except queue.Empty:
            raise TimeoutError from None

    def handle(item) -> bool:
        r, error = item
        if error is not None:
            result["error"] = str(error)
            return True
        response = r.get_response()
        names = {o.name for o in response.outputs}
        if "text_output" in names:
            pieces.append(r.as_numpy("text_output").reshape(-1)[0].decode("utf-8"))
        elif "output_ids" in names:
            ids = r.as_numpy("output_ids")
            n = int(r.as_numpy("sequence_length").reshape(-1)[0])
            pieces.extend(int(t) for t in ids.reshape(-1, ids.shape[-1])[0, :n])
        if names:
            count_response(result, start)
        final = response.parameters.get("triton_final_response")
        if final is not None and final.bool_param:
            result["final"] = True
            return True
        return False

    try:
        client.async_stream_infer(req["model"], build_inputs(req), request_id=f"soak-{i}",
                                  enable_empty_final_response=True)
        read_responses(result, Drop(req, start), timeout, receive, handle)
    except Exception as e:  # noqa: BLE001 - reported in the record
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        if result["dropped"] and req.get("drop", "cancel") == "close":
            client._channel.close()  # the connection goes away under the stream
        client.stop_stream(cancel_requests=result["dropped"] or not result["final"])
        client.close()
    return finish_record(result, req, pieces, start)


def run_plan(url: str, plan: list, concurrency: int, timeout: float,
             http_url: str | None = None) -> list:
    """Every request of the plan, at most `concurrency` at a time; the records in plan order.
    Requests with "protocol": "http" go to `http_url`."""
    results: list = [None] * len(plan)
    todo: queue.Queue = queue.Queue()
    for i in range(len(plan)):
        todo.put(i)

    def worker():
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            if plan[i].get("protocol", "grpc") == "http":
                results[i] = run_one_http(http_url, i, plan[i], timeout)
            else:
                results[i] = run_one(url, i, plan[i], timeout)

    threads = [threading.Thread(target=worker, name=f"soak-{n}") for n in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def make_plan(args) -> list:
    rng = random.Random(args.seed)
    plan = []
    for i in range(args.requests):
        req = {"model": args.model, "text": args.prompt[i % len(args.prompt)],
               "max_tokens": args.max_tokens, "drop_after": None}
        if rng.random() < args.drop_fraction:
            req["drop_after"] = rng.randint(0, 4)
            req["drop"] = rng.choice(["cancel", "close"])
        plan.append(req)
    return plan


def summary(results: list, seconds: float) -> str:
    dropped = [r for r in results if r["dropped"]]
    kept = [r for r in results if not r["dropped"]]
    failed = [r for r in kept if r["error"] or not r["final"]]
    ttfts = sorted(r["ttft"] for r in kept if r["ttft"] is not None)
    p50 = ttfts[len(ttfts) // 2] if ttfts else float("nan")
    p99 = ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))] if ttfts else float("nan")
    return (f"{len(results)} requests in {seconds:.1f} s: {len(kept) - len(failed)} finished, "
            f"{len(dropped)} dropped, {len(failed)} failed; time to first response p50 "
            f"{p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-u", "--url", default="127.0.0.1:8001", help="the server's gRPC address")
    p.add_argument("--http_url", default="127.0.0.1:8000",
                   help="the server's HTTP address (requests with \"protocol\": \"http\")")
    p.add_argument("--plan", help="a JSON list of requests (see above) instead of the flags below")
    p.add_argument("--requests", type=int, default=300, help="how many requests")
    p.add_argument("--model", default="tensorrt_llm_bls", choices=TEXT_MODELS,
                   help="text model the generated plan talks to")
    p.add_argument("--prompt", nargs="+", default=["The capital of France is", "Once upon a time"],
                   help="prompts, used in turn")
    p.add_argument("--max_tokens", type=int, default=32, help="tokens to ask for per request")
    p.add_argument("--drop_fraction", type=float, default=0.33,
                   help="share of requests the client drops after 0 to 4 responses")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated plan")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait per response")
    p.add_argument("--results", help="write one JSON line per request here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plan:
        with open(args.plan) as f:
            plan = json.load(f)
    else:
        plan = make_plan(args)
    t0 = time.monotonic()
    results = run_plan(args.url, plan, args.concurrency, args.timeout, args.http_url)
    seconds = time.monotonic() - t0
    if args.results:
        with open(args.results, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    print(summary(results, seconds))
    failed = [r for r in results if not r["dropped"] and (r["error"] or not r["final"])]
    for r in failed[:5]:
        print(f"request {r['i']} ({r['model']}): {r['error'] or 'no final response'}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

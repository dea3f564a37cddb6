"""Triton's HTTP generate_stream (server-sent events) with the standard library only, so that
clients in the triton venv (stream_soak_client.py) and in the project venv
(benchmarks/bench_triton.py) read the stream the same way:

    conn = http.client.HTTPConnection(host, port, timeout=60)
    resp = open_generate_stream(conn, "ensemble", {"text_input": "Hi", "max_tokens": 8, "stream": True})
    while (event := next_event(resp)) is not None:
        ...  # {"text_output": ...} or {"output_ids": ..., "sequence_length": ...} or {"error": ...}
"""

from __future__ import annotations

import http.client
import json
from typing import Optional


def open_generate_stream(conn: http.client.HTTPConnection, model: str,
                         body: dict) -> http.client.HTTPResponse:
    """POST `body` to `model`'s generate_stream on `conn`; the response, its events unread."""
    conn.request("POST", f"/v2/models/{model}/generate_stream", body=json.dumps(body),
                 headers={"Content-Type": "application/json"})
    return conn.getresponse()


def next_event(resp: http.client.HTTPResponse) -> Optional[dict]:
    """The next event of a generate_stream response (the JSON of its `data:` line), None when
    the server has ended the stream (after its final response). A socket timeout propagates."""
    while True:
        line = resp.readline()
        if not line:
            return None
        line = line.decode().strip()
        if line.startswith("data:"):
            return json.loads(line[5:])

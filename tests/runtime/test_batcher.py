"""The in-flight batcher's error path: a step that fails ends every request in flight with an error,
those being admitted included, and the batcher keeps serving."""

from __future__ import annotations

import pytest

from trtbuild.engine import BuildConfig
from trtbuild.errors import TrtbuildError
from trtbuild.runtime import InflightBatcher, SamplingConfig


def test_a_failed_prefill_ends_its_requests_and_serving_goes_on(tiny_models, engines, monkeypatch):
    runner = engines.runner(tiny_models["llama"], BuildConfig(max_batch_size=4, max_input_len=32, max_seq_len=64))
    want = runner.generate([[5, 6, 7]], SamplingConfig(max_new_tokens=4, end_id=-1)).output_ids[0]
    real_prefill = runner.prefill

    def failing_prefill(*args, **kwargs):
        raise RuntimeError("engine failure")

    monkeypatch.setattr(runner, "prefill", failing_prefill)
    batcher = InflightBatcher(runner)
    try:
        handle = batcher.submit([5, 6, 7], SamplingConfig(max_new_tokens=4, end_id=-1))
        with pytest.raises(TrtbuildError, match="the engine failed"):
            handle.result(timeout=30)  # it was being admitted: not lost, ended with an error
        monkeypatch.setattr(runner, "prefill", real_prefill)
        assert batcher.submit([5, 6, 7], SamplingConfig(max_new_tokens=4, end_id=-1)).result(timeout=30) == want
    finally:
        batcher.shutdown()

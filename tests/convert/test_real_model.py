"""The default real model (SmolLM2-135M-Instruct, fetched by the project): convert → build → run vs transformers."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from trtbuild.runtime import SamplingConfig

from conftest import REPO

pytestmark = pytest.mark.slow

TEXTS = ["The capital of France is", "Once upon a time, in a small village by the sea,",
         "def fibonacci(n):", "Photosynthesis is the process"]


@pytest.fixture(scope="module")
def setup(real_model_dir, engines):
    import transformers

    torch.set_num_threads(2)
    runners = engines.runners_in_both_forms(real_model_dir, num_threads=2, max_batch_size=4, max_input_len=256,
                                            max_seq_len=512)
    hf = transformers.AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    prompts = [runners["auto"].tokenizer.encode(t).ids for t in TEXTS]
    return runners, hf, prompts


def test_logits_match_transformers(setup):
    runners, hf, prompts = setup
    for attention, runner in runners.items():
        scores = runner.score(prompts)
        for i, p in enumerate(prompts):
            with torch.no_grad():
                ref = hf(torch.tensor([p])).logits[0].numpy()
            err = np.abs(scores[i, :len(p)] - ref).max()
            assert err < 1e-3, f"attention={attention} prompt {i}: max |Δlogit| {err}"


def test_greedy_32_tokens_match_generate_batch_and_single(setup):
    runners, hf, prompts = setup
    sampling = SamplingConfig(max_new_tokens=32, end_id=2)  # <|im_end|>, where generate() stops too
    batch = {a: r.generate(prompts, sampling).output_ids for a, r in runners.items()}
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, eos_token_id=2,
                              pad_token_id=2)[0, len(p):].tolist()
        ref = ref[:ref.index(2)] if 2 in ref else ref
        assert batch["auto"][i] == ref, f"prompt {i}: fused batch != transformers"
        assert batch["disable"][i] == ref, f"prompt {i}: standard batch != transformers"
        assert runners["auto"].generate([p], sampling).output_ids[0] == ref


def test_run_py_prints_tensorrt_llm_format(setup):
    runners, _, _ = setup
    out = subprocess.run([sys.executable, "examples/run.py", "--engine_dir", str(runners["auto"].engine_dir),
                          "--input_text", "The capital of France is", "--max_output_len", "8"],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert 'Input [Text 0]: "The capital of France is"' in out
    assert 'Output [Text 0 Beam 0]: " Paris' in out

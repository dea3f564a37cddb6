"""The reference decoder over checkpoint tensors equals transformers' logits."""

import pytest
import torch

torch.set_num_threads(1)

from trtbuild.quantization.reference_model import ReferenceModel  # noqa: E402
from trtbuild.checkpoint import linear_names  # noqa: E402

from tiny_models import tiny_gpt2, tiny_llama  # noqa: E402


def _compare(model, weights, config, T=40):
    ids = torch.randint(0, config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits.float()
    got = ReferenceModel(weights, config)(ids)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("llama3", [True, False])
def test_llama_matches_transformers(llama3):
    _compare(*tiny_llama(llama3_rope=llama3, tie=not llama3))


def test_qwen2_qkv_bias_matches_transformers():
    _compare(*tiny_llama(qkv_bias=True, llama3_rope=False, heads=4, kv_heads=1))


def test_gpt2_matches_transformers():
    _compare(*tiny_gpt2())


def test_hooks_capture_every_linear_and_kv():
    _, w, cfg = tiny_llama()
    seen, kv = {}, {}
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    ReferenceModel(w, cfg)(ids, linear_hook=lambda n, x: seen.setdefault(n, x.shape),
                           kv_hook=lambda i, k, v: kv.setdefault(i, (k.shape, v.shape)))
    assert sorted(seen) == sorted(linear_names(cfg))
    assert seen["transformer.layers.1.mlp.proj"] == (1, 12, cfg.intermediate_size)
    assert kv[0] == ((1, cfg.num_key_value_heads, 12, cfg.head_size),) * 2

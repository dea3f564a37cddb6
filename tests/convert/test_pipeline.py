"""The user's workflow on tiny models of every architecture: convert → build → run → compare with transformers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from trtbuild.builder import build_engine
from trtbuild.convert.converter import convert_checkpoint
from trtbuild.engine import BuildConfig
from trtbuild.runtime import ModelRunner, SamplingConfig
from trtbuild.tensor_file import read_tensors

from conftest import TINY_ARCHS, make_tiny_model

torch.set_num_threads(1)

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22], [100], [300, 301, 302, 303, 304]]
NEW_TOKENS = 32
LIMITS = dict(max_batch_size=4, max_input_len=64, max_seq_len=128)


@pytest.fixture(scope="module")
def models(tiny_models, engines):
    """arch → (hf model, fused runner, standard runner)."""
    import transformers

    out = {}
    for arch in TINY_ARCHS:
        runners = engines.runners_in_both_forms(tiny_models[arch], **LIMITS)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
        out[arch] = (hf, runners["auto"], runners["disable"])
    return out


def hf_logits(hf, prompt):
    with torch.no_grad():
        return hf(torch.tensor([prompt])).logits[0].numpy()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_logits_match_transformers(models, arch):
    hf, fused, standard = models[arch]
    fused_scores, standard_scores = fused.score(PROMPTS), standard.score(PROMPTS)
    for i, p in enumerate(PROMPTS):
        ref = hf_logits(hf, p)
        np.testing.assert_allclose(fused_scores[i, :len(p)], ref, atol=1e-3, rtol=0)
        np.testing.assert_allclose(standard_scores[i, :len(p)], ref, atol=1e-3, rtol=0)
        # last-token logits as generation sees them
        last = fused.prefill([p])[0, 0]
        np.testing.assert_allclose(last, ref[-1], atol=1e-3, rtol=0)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_greedy_matches_generate_and_batch_matches_singles(models, arch):
    hf, fused, standard = models[arch]
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS)
    batch_fused = fused.generate(PROMPTS, sampling).output_ids
    batch_standard = standard.generate(PROMPTS, sampling).output_ids
    for i, p in enumerate(PROMPTS):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              do_sample=False, pad_token_id=0)[0, len(p):].tolist()
        single = fused.generate([p], sampling).output_ids[0]
        assert batch_fused[i] == ref, f"{arch} prompt {i}: batch != transformers"
        assert single == ref, f"{arch} prompt {i}: single != transformers"
        assert batch_standard[i] == ref, f"{arch} prompt {i}: attention plugin off != on"


def test_end_id_and_stop_words_end_rows_independently(models):
    _, fused, _ = models["llama"]
    free = fused.generate(PROMPTS, SamplingConfig(max_new_tokens=12)).output_ids
    end_id = free[0][3]  # the 4th token of row 0 becomes the end id
    out = fused.generate(PROMPTS, SamplingConfig(max_new_tokens=12, end_id=end_id))
    assert out.output_ids[0] == free[0][:free[0].index(end_id)]
    assert out.finish_reasons[0] == "end_id"
    stop = free[1][4:6]
    out = fused.generate(PROMPTS, SamplingConfig(max_new_tokens=12, stop_words=[stop]))
    assert out.output_ids[1][-2:] == stop and out.finish_reasons[1] == "stop_words"
    # rows that did not stop are unaffected by others leaving the batch
    for i in (2, 3):
        if stop not in [free[i][j:j + 2] for j in range(len(free[i]) - 1)]:
            assert out.output_ids[i] == free[i]


def test_sampling_is_reproducible_and_varies_with_seed(models):
    _, fused, _ = models["llama"]

    def run(seed):
        s = SamplingConfig(max_new_tokens=16, temperature=1.5, top_k=50, top_p=0.95, random_seed=seed,
                           repetition_penalty=1.1)
        return fused.generate(PROMPTS[:2], s).output_ids

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_streaming_callback_sees_every_token(models):
    _, fused, _ = models["qwen2"]
    seen: dict[int, list[int]] = {}
    out = fused.generate(PROMPTS, SamplingConfig(max_new_tokens=8),
                         streaming_callback=lambda i, ids: seen.setdefault(i, []).extend(ids))
    assert [seen[i] for i in range(len(PROMPTS))] == out.output_ids


def test_plugin_forms_have_the_expected_ops(models):
    import onnx

    from conftest import op_types

    _, fused, standard = models["llama"]
    fused_ops = op_types(onnx.load(str(fused.engine_dir / "rank0.engine"), load_external_data=False).graph)
    standard_ops = op_types(onnx.load(str(standard.engine_dir / "rank0.engine"), load_external_data=False).graph)
    assert "GroupQueryAttention" in fused_ops and "Attention" not in fused_ops
    assert "Attention" in standard_ops and "GroupQueryAttention" not in standard_ops
    assert "RotaryEmbedding" in standard_ops


def save_bin_shards(state: dict, out, shards: int) -> None:
    """pytorch_model-0000k-of-0000n.bin + index, as older transformers wrote them (5.x only writes safetensors)."""
    out.mkdir(parents=True)
    names = list(state)
    weight_map = {}
    for k in range(shards):
        fname = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n].clone() for n in names[k::shards]}
        torch.save(part, out / fname)
        weight_map.update({n: fname for n in part})
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_safetensors_and_bin_convert_to_the_same_checkpoint(tmp_path):
    import transformers

    src = make_tiny_model("qwen2", tmp_path / "single")
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    save_bin_shards(model.state_dict(), tmp_path / "bin", shards=3)
    shutil.copy(src / "config.json", tmp_path / "bin" / "config.json")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert any((tmp_path / "bin").glob("pytorch_model-*.bin"))
    ref = None
    for name in ("single", "sharded", "bin"):
        d = tmp_path / name
        for f in ("tokenizer.json", "tokenizer_config.json"):
            if not (d / f).exists():
                shutil.copy(src / f, d / f)
        convert_checkpoint(d, tmp_path / f"ckpt_{name}", progress=False)
        tensors = {k: np.array(v) for k, v in read_tensors(tmp_path / f"ckpt_{name}" / "rank0.safetensors").items()}
        if ref is None:
            ref = tensors
        assert tensors.keys() == ref.keys()
        for k in ref:
            np.testing.assert_array_equal(tensors[k], ref[k], err_msg=f"{name}: {k}")


def test_transformers4_config_fields_give_the_same_checkpoint_config(tiny_models, engines, tmp_path):
    d = tmp_path / "v4"
    shutil.copytree(tiny_models["llama3"], d)
    cfg = json.loads((d / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = {**rope, "type": rope["rope_type"]}
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    (d / "config.json").write_text(json.dumps(cfg))
    convert_checkpoint(d, tmp_path / "c4", progress=False)
    c5 = json.loads((engines.checkpoint(tiny_models["llama3"]) / "config.json").read_text())
    c4 = json.loads((tmp_path / "c4" / "config.json").read_text())
    for c in (c4, c5):
        c.pop("producer")
    assert c4 == c5
    assert c4["rotary_scaling"]["type"] == "llama3" and c4["rotary_base"] == 500000.0


def test_half_precision_checkpoints_build_and_run(tiny_models, engines):
    for dtype in ("float16", "bfloat16"):
        cfg = json.loads((engines.checkpoint(tiny_models["llama"], dtype) / "config.json").read_text())
        assert cfg["dtype"] == dtype
        runner = engines.runner(tiny_models["llama"], BuildConfig(**LIMITS), dtype)
        out = runner.generate(PROMPTS[:2], SamplingConfig(max_new_tokens=4)).output_ids
        assert all(len(o) == 4 for o in out)


def test_the_kv_cache_grows_with_the_longest_row_and_keeps_every_row(tiny_models, tmp_path, monkeypatch):
    """The shared cache starts at 256 positions a row (not max_seq_len: memory follows the requests)
    and doubles as a row needs more, while other rows are cached and rows retire and move."""
    from trtbuild.runtime.kv_cache import SharedKVCache

    hf_dir = tmp_path / "hf"  # the tiny llama with room for 1024 positions (rotary: no learned table)
    shutil.copytree(tiny_models["llama"], hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    convert_checkpoint(hf_dir, tmp_path / "ckpt", progress=False)
    build_engine(tmp_path / "ckpt", tmp_path / "engine", BuildConfig(max_batch_size=3, max_input_len=320,
                                                                     max_seq_len=1024), progress=False)
    runner = ModelRunner.from_dir(tmp_path / "engine", num_threads=1)
    assert runner.kv_cache.capacity == SharedKVCache.MIN_CAPACITY
    runner.generate([[7, 8, 9]], SamplingConfig(max_new_tokens=4))
    assert runner.kv_cache.capacity == SharedKVCache.MIN_CAPACITY  # a short request does not grow it

    import transformers

    from trtbuild.runtime.request import Request

    requests, seen = [], {}  # every request made; id(request) → the logits each of its tokens came from
    real_init, real_sample = Request.__init__, Request.sample

    def init(r, *args, **kwargs):
        real_init(r, *args, **kwargs)
        requests.append(r)

    def sample(r, logits):
        seen.setdefault(id(r), []).append(logits.copy())
        return real_sample(r, logits)

    monkeypatch.setattr(Request, "__init__", init)
    monkeypatch.setattr(Request, "sample", sample)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 200, n).tolist() for n in (240, 30, 300)]
    new_tokens = [40, 12, 250]  # row 0 crosses 256 mid-decode, row 1 retires early, row 2 crosses 512
    out = runner.generate(prompts, [SamplingConfig(max_new_tokens=n) for n in new_tokens]).output_ids
    assert runner.kv_cache.capacity == 1024 >= 300 + 250
    for i, (p, n, r) in enumerate(zip(prompts, new_tokens, requests)):
        assert len(out[i]) == n
        with torch.no_grad():  # the logits of every step, the whole sequence in one forward pass
            ref = hf(torch.tensor([p + out[i][:-1]])).logits[0, len(p) - 1:].numpy()
        np.testing.assert_allclose(np.stack(seen[id(r)]), ref, atol=1e-3, rtol=0,
                                   err_msg=f"row {i}: the logits differ from transformers after the cache grew")

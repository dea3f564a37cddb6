"""PEFT LoRA adapters: loading (.safetensors and .bin), merging (== PeftModel.merge_and_unload),
stacking for the runtime path, and every bad input the user can bring."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from trtbuild.checkpoint import expected_shapes
from trtbuild.convert.converter import read_hf_weights
from trtbuild.convert.hf_config import pretrained_config_from_hf
from trtbuild.convert.lora import (ADAPTER_BIN, ADAPTER_CONFIG, ADAPTER_SAFETENSORS, LoraAdapter, lora_layout,
                                   load_lora_adapter, make_peft_adapter, merge_lora, stack_lora_adapters,
                                   union_target_modules)
from trtbuild.convert.weight_map import rows_for
from trtbuild.errors import TrtbuildError

torch.set_num_threads(1)
# PEFT and transformers warn about tied embeddings and Conv1D's fan_in_fan_out: both are tested here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


# ---------------------------------------------------------------------------------------------
# helpers


def hf_state_to_checkpoint(sd: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """An HF state dict under checkpoint names (through the converter's table), lm_head included."""
    out = {}
    for row in rows_for(config, set(expected_shapes(config)) | {"lm_head.weight"}):
        parts = [sd[s].t() if row.transpose else sd[s] for s in row.sources]
        out[row.checkpoint] = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
    return out


def peft_merged(model_dir: Path, adapter_dirs: list[Path]) -> dict[str, torch.Tensor]:
    """What PEFT gives: base + adapters, merge_and_unload(), as checkpoint tensors."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    names = [f"a{k}" for k in range(len(adapter_dirs))]
    pm = PeftModel.from_pretrained(base, str(adapter_dirs[0]), adapter_name=names[0])
    for name, d in zip(names[1:], adapter_dirs[1:]):
        pm.load_adapter(str(d), adapter_name=name)
    merged = pm.merge_and_unload(adapter_names=names)
    sd = merged.state_dict()
    config = pretrained_config_from_hf(model_dir, "float32")
    ref = hf_state_to_checkpoint(sd, config)
    if merged.lm_head.weight is merged.get_input_embeddings().weight:
        ref.pop("lm_head.weight")
    return ref


def assert_same_weights(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert set(ours) == set(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype, k
        torch.testing.assert_close(ours[k], ref[k], atol=atol, rtol=1e-5, msg=k)


def base_of(model_dir: Path, dtype: str = "float32"):
    config = pretrained_config_from_hf(model_dir, dtype)
    return config, read_hf_weights(model_dir, config, progress=False)


@pytest.fixture(scope="module")
def models(tiny_models) -> dict[str, Path]:
    return tiny_models


# ---------------------------------------------------------------------------------------------
# merged == PeftModel.merge_and_unload()

MERGE_CASES = {
    # tied llama: lm_head replaced → untied; rank/alpha patterns; GQA 4/2
    "llama-st-lmhead-patterns": ("llama", dict(modules_to_save=["lm_head"], rank_pattern={"q_proj": 2},
                                               alpha_pattern={"layers.1.self_attn.v_proj": 3.0})),
    "llama-bin-embed": ("llama", dict(safe_serialization=False, modules_to_save=["embed_tokens"], r=8)),
    # PEFT keeps lm_head tied to the replaced embedding
    "llama-tying": ("llama", dict(modules_to_save=["lm_head"], ensure_weight_tying=True)),
    "qwen2-st-rslora": ("qwen2", dict(use_rslora=True, lora_alpha=16)),
    "qwen2-bin-subset": ("qwen2", dict(safe_serialization=False, target_modules=["q_proj", "v_proj", "down_proj"])),
    "mistral-untied-lmhead": ("mistral", dict(modules_to_save=["lm_head"], r=2, lora_alpha=4)),
    "gpt2-st-wte": ("gpt2", dict(modules_to_save=["wte"])),
    "gpt2-bin": ("gpt2", dict(safe_serialization=False, r=2, lora_alpha=32, target_modules=["c_attn", "c_fc"])),
}


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_equals_peft(models, tmp_path, case):
    arch, kw = MERGE_CASES[case]
    adir = make_peft_adapter(models[arch], tmp_path / "adapter", **kw)
    want_file = ADAPTER_BIN if kw.get("safe_serialization") is False else ADAPTER_SAFETENSORS
    assert (adir / want_file).is_file()
    config, weights = base_of(models[arch])
    adapter = load_lora_adapter(adir, config)
    assert adapter.weights_file == want_file
    merged, new_config = merge_lora(weights, config, [adapter])
    ref = peft_merged(models[arch], [adir])
    assert_same_weights(merged, ref)
    # the merge changed the targeted tensors (B is non-zero), nothing else, and left the input alone
    changed = {k for k in weights if not torch.equal(weights[k], merged[k])}
    assert changed and all(".attention." in k or ".mlp." in k or k in adapter.modules_to_save for k in changed)
    assert all(torch.equal(v, read_hf_weights(models[arch], config, progress=False)[k]) for k, v in weights.items())
    untie = config.tie_word_embeddings and bool(adapter.modules_to_save) and not kw.get("ensure_weight_tying")
    assert new_config.tie_word_embeddings == (config.tie_word_embeddings and not untie)
    assert ("lm_head.weight" in merged) == (not new_config.tie_word_embeddings)
    assert set(merged) == set(expected_shapes(new_config))


def test_gpt2_fan_in_fan_out(models, tmp_path):
    """GPT-2's Conv1D stores [in, out]; PEFT's A/B are still [r, in]/[out, r], the delta lands
    transposed in the HF weight and as B @ A in the checkpoint's [out, in] qkv."""
    adir = make_peft_adapter(models["gpt2"], tmp_path / "a", r=4)
    assert json.loads((adir / ADAPTER_CONFIG).read_text())["fan_in_fan_out"] is True
    config, weights = base_of(models["gpt2"])
    adapter = load_lora_adapter(adir, config)
    assert adapter.target_modules == ["attn_qkv", "attn_dense", "mlp_h_to_4h", "mlp_4h_to_h"]
    qkv = adapter.layers[1]["attn_qkv"]
    assert qkv.a.shape == (4, 64) and qkv.b.shape == (3 * 64, 4) and qkv.scale == 2.0
    fc = adapter.layers[0]["mlp_h_to_4h"]
    assert fc.a.shape == (4, 64) and fc.b.shape == (256, 4)
    # fan_in_fan_out=False in the file changes nothing (PEFT forces True on Conv1D)
    cfg = json.loads((adir / ADAPTER_CONFIG).read_text())
    cfg["fan_in_fan_out"] = False
    (adir / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    merged, _ = merge_lora(weights, config, [load_lora_adapter(adir, config)])
    assert_same_weights(merged, peft_merged(models["gpt2"], [adir]))


def test_two_adapters_merge_add_up(models, tmp_path):
    a = make_peft_adapter(models["llama"], tmp_path / "a", r=4, seed=1)
    b = make_peft_adapter(models["llama"], tmp_path / "b", r=2, seed=2, safe_serialization=False,
                          target_modules=["k_proj", "up_proj"])
    config, weights = base_of(models["llama"])
    merged, _ = merge_lora(weights, config, [load_lora_adapter(a, config), load_lora_adapter(b, config)])
    assert_same_weights(merged, peft_merged(models["llama"], [a, b]))


def test_rslora_scale(models, tmp_path):
    adir = make_peft_adapter(models["qwen2"], tmp_path / "a", r=4, lora_alpha=6, use_rslora=True)
    config, _ = base_of(models["qwen2"])
    lm = load_lora_adapter(adir, config).layers[0]["attn_k"]
    assert lm.scale == pytest.approx(6 / 2.0)
    from safetensors.torch import load_file

    raw = load_file(str(adir / ADAPTER_SAFETENSORS))
    b = raw["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"]
    torch.testing.assert_close(lm.b, b * 3.0)


def test_rank_and_alpha_pattern(models, tmp_path):
    adir = make_peft_adapter(models["llama"], tmp_path / "a", r=4, lora_alpha=8, rank_pattern={"q_proj": 2},
                             alpha_pattern={"layers.1.self_attn.v_proj": 3.0})
    config, _ = base_of(models["llama"])
    ad = load_lora_adapter(adir, config)
    assert ad.layers[0]["attn_q"].rank == 2 and ad.layers[0]["attn_q"].scale == 4.0
    assert ad.layers[0]["attn_v"].scale == 2.0 and ad.layers[1]["attn_v"].scale == 0.75
    assert ad.max_rank == 4


def test_peft_key_variants(models, tmp_path):
    """`.default` adapter names in keys, keys without `base_model.model.`, and older PEFT's
    `modules_to_save.default` names all read the same."""
    from safetensors.torch import load_file, save_file

    adir = make_peft_adapter(models["llama"], tmp_path / "a", modules_to_save=["lm_head"])
    config, weights = base_of(models["llama"])
    want, _ = merge_lora(weights, config, [load_lora_adapter(adir, config)])
    sd = load_file(str(adir / ADAPTER_SAFETENSORS))
    for variant in ("default", "noprefix"):
        renamed = {}
        for k, v in sd.items():
            if variant == "default":
                k = re.sub(r"\.lora_([AB])\.weight$", r".lora_\1.default.weight", k)
                k = k.replace("lm_head.weight", "lm_head.modules_to_save.default.weight")
            else:
                k = k.removeprefix("base_model.model.")
            renamed[k] = v
        vdir = tmp_path / variant
        vdir.mkdir()
        shutil.copy(adir / ADAPTER_CONFIG, vdir)
        save_file(renamed, str(vdir / ADAPTER_SAFETENSORS))
        got, _ = merge_lora(weights, config, [load_lora_adapter(vdir, config)])
        assert_same_weights(got, want, atol=0)


def test_bf16_and_fp16_adapters_convert(models, tmp_path):
    config, weights = base_of(models["llama"])
    ref_dir = make_peft_adapter(models["llama"], tmp_path / "f32", seed=3)
    for dt, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        adir = make_peft_adapter(models["llama"], tmp_path / name, seed=3, dtype=dt,
                                 safe_serialization=(name == "bf16"))
        ad = load_lora_adapter(adir, config)  # fp32 target
        lm = ad.layers[0]["attn_q"]
        assert lm.a.dtype == torch.float32 and lm.b.dtype == torch.float32
        merged, _ = merge_lora(weights, config, [ad])
        assert all(t.dtype == torch.float32 for t in merged.values())
        # same adapter as the fp32 one, up to the adapter's own rounding
        ref, _ = merge_lora(weights, config, [load_lora_adapter(ref_dir, config)])
        for k in ref:
            torch.testing.assert_close(merged[k], ref[k], atol=2e-2, rtol=2e-2)
        assert_same_weights(merged, peft_merged(models["llama"], [adir]), atol=1e-5)
    # and into an fp16 checkpoint
    c16, w16 = base_of(models["llama"], "float16")
    ad16 = load_lora_adapter(tmp_path / "bf16", c16, dtype=torch.float16)
    assert ad16.layers[1]["mlp_gate"].b.dtype == torch.float16
    m16, _ = merge_lora(w16, c16, [ad16])
    assert m16["transformer.layers.0.attention.qkv.weight"].dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# stacking for the runtime path


def test_stack_equals_merge_per_adapter(models, tmp_path):
    """Adapter k of the stack adds exactly what merging adapter k alone adds, for every linear:
    q, k and v keep their own A (block-diagonal B over the q/k/v rows), ranks below max are padded."""
    config, weights = base_of(models["llama"])
    dirs = [make_peft_adapter(models["llama"], tmp_path / "a", r=4, seed=1, rank_pattern={"k_proj": 2}),
            make_peft_adapter(models["llama"], tmp_path / "b", r=2, seed=2, safe_serialization=False,
                              target_modules=["q_proj", "v_proj", "down_proj"])]
    adapters = [load_lora_adapter(d, config) for d in dirs]
    targets = union_target_modules(adapters)
    assert targets == ["attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_gate", "mlp_4h_to_h"]
    max_rank = 4
    stacked = stack_lora_adapters(adapters, config, max_rank, targets)
    layout = lora_layout(config, targets, max_rank)
    assert layout["attention.qkv"].rank == 3 * max_rank and layout["mlp.proj"].rank == max_rank
    H, qkv_out = config.hidden_size, config.q_dim + 2 * config.kv_dim
    assert stacked["transformer.layers.1.attention.qkv.lora_A"].shape == (2, 12, H)
    assert stacked["transformer.layers.1.attention.qkv.lora_B"].shape == (2, qkv_out, 12)
    assert stacked["transformer.layers.0.mlp.proj.lora_A"].shape == (2, 4, config.intermediate_size)
    assert len(stacked) == 2 * len(layout) * config.num_hidden_layers
    for k, ad in enumerate(adapters):
        merged, _ = merge_lora(weights, config, [ad])
        for name, arr in stacked.items():
            if not name.endswith(".lora_A"):
                continue
            linear = name.removesuffix(".lora_A")
            a, b = arr[k], stacked[linear + ".lora_B"][k]
            w = weights[linear + ".weight"].numpy()
            np.testing.assert_allclose(w + b @ a, merged[linear + ".weight"].numpy(), atol=1e-6)
    # adapter b targets only q and v: its k rows and k slot are zero, so is its mlp.fc
    b_qkv = stacked["transformer.layers.0.attention.qkv.lora_B"][1]
    q, kv = config.q_dim, config.kv_dim
    assert not b_qkv[q:q + kv].any() and b_qkv[:q].any() and b_qkv[q + kv:].any()
    assert not stacked["transformer.layers.0.mlp.fc.lora_A"][1].any()
    # rank-2 k of adapter a: padded rank rows are zero
    a_qkv = stacked["transformer.layers.0.attention.qkv.lora_A"][0]
    assert a_qkv[4:6].any() and not a_qkv[6:8].any()


def test_stack_runtime_sum_matches_merged_linear(models, tmp_path):
    """y = x W^T + (x A[t]^T) B[t]^T per row, as the network computes it, on GPT-2's fused c_attn."""
    config, weights = base_of(models["gpt2"])
    ad = load_lora_adapter(make_peft_adapter(models["gpt2"], tmp_path / "a", r=3), config)
    stacked = stack_lora_adapters([ad], config, 8, ["attn_qkv", "attn_dense", "mlp_h_to_4h", "mlp_4h_to_h"],
                                  dtype=np.float32)
    merged, _ = merge_lora(weights, config, [ad])
    x = np.random.default_rng(0).standard_normal((5, config.hidden_size)).astype(np.float32)
    name = "transformer.layers.1.attention.qkv"
    w = weights[name + ".weight"].numpy()
    a, b = stacked[name + ".lora_A"][0], stacked[name + ".lora_B"][0]
    np.testing.assert_allclose(x @ w.T + (x @ a.T) @ b.T, x @ merged[name + ".weight"].numpy().T, atol=1e-5)
    assert stacked[name + ".lora_A"].dtype == np.float32


def test_stack_no_adapters(models):
    config, _ = base_of(models["llama"])
    stacked = stack_lora_adapters([], config, 4, ["attn_q", "attn_v"])
    assert set(stacked) == {f"transformer.layers.{i}.attention.qkv.lora_{x}" for i in range(2) for x in "AB"}
    assert stacked["transformer.layers.0.attention.qkv.lora_A"].shape == (0, 8, 64)


# ---------------------------------------------------------------------------------------------
# bad input: one clear TrtbuildError each


@pytest.fixture(scope="module")
def llama_adapter(models, module_tmp) -> Path:
    return make_peft_adapter(models["llama"], module_tmp / "llama", r=4)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_both_weight_files(models, llama_adapter, tmp_path):
    d = _copy(llama_adapter, tmp_path / "both")
    from safetensors.torch import load_file

    torch.save(load_file(str(d / ADAPTER_SAFETENSORS)), str(d / ADAPTER_BIN))
    config, _ = base_of(models["llama"])
    with pytest.raises(TrtbuildError, match=rf"{d}.*both {ADAPTER_SAFETENSORS} and {ADAPTER_BIN}"):
        load_lora_adapter(d, config)


def test_neither_weight_file(models, llama_adapter, tmp_path):
    d = _copy(llama_adapter, tmp_path / "neither")
    (d / ADAPTER_SAFETENSORS).unlink()
    config, _ = base_of(models["llama"])
    with pytest.raises(TrtbuildError, match=rf"{d} has neither"):
        load_lora_adapter(d, config)


def test_missing_adapter_config(models, llama_adapter, tmp_path):
    d = _copy(llama_adapter, tmp_path / "noconfig")
    (d / ADAPTER_CONFIG).unlink()
    config, _ = base_of(models["llama"])
    with pytest.raises(TrtbuildError, match=rf"{d} has no {ADAPTER_CONFIG}"):
        load_lora_adapter(d, config)
    with pytest.raises(TrtbuildError, match="is not a directory"):
        load_lora_adapter(tmp_path / "nowhere", config)


def test_adapter_for_another_base_model(models, llama_adapter):
    """A Llama adapter on llama3 (q_dim 128, 1 KV head): the message names the tensor and both shapes."""
    config, _ = base_of(models["llama3"])
    with pytest.raises(TrtbuildError, match=r"lora_A\.weight has shape \[4, 128\], the base model needs \[4, 96\] "
                                            r"for mlp_4h_to_h .*intermediate 96.*another base model"):
        load_lora_adapter(llama_adapter, config)
    with pytest.raises(TrtbuildError, match=r"c_attn|not a LoRA target|another architecture"):
        load_lora_adapter(llama_adapter, base_of(models["gpt2"])[0])


def test_fewer_layers_and_rank_mismatch(models, llama_adapter, tmp_path):
    import dataclasses

    config, _ = base_of(models["llama"])
    with pytest.raises(TrtbuildError, match=r"layer 1, the base model has 1 layers"):
        load_lora_adapter(llama_adapter, dataclasses.replace(config, num_hidden_layers=1))
    d = _copy(llama_adapter, tmp_path / "r")
    cfg = json.loads((d / ADAPTER_CONFIG).read_text())
    cfg["r"] = 8
    (d / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(TrtbuildError, match=r"has rank 4 but adapter_config.json says r=8"):
        load_lora_adapter(d, config)


def test_unsupported_adapter_kinds(models, llama_adapter, tmp_path):
    config, _ = base_of(models["llama"])
    d = _copy(llama_adapter, tmp_path / "dora")
    cfg = json.loads((d / ADAPTER_CONFIG).read_text())
    (d / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(TrtbuildError, match="DoRA"):
        load_lora_adapter(d, config)
    (d / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(TrtbuildError, match="peft_type 'IA3'"):
        load_lora_adapter(d, config)
    (d / ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(TrtbuildError, match="not valid JSON"):
        load_lora_adapter(d, config)


def test_rank_above_max_rank(models, llama_adapter):
    config, _ = base_of(models["llama"])
    ad = load_lora_adapter(llama_adapter, config)
    with pytest.raises(TrtbuildError, match=r"rank 4 .* above --max_lora_rank 2: rebuild with --max_lora_rank 4"):
        stack_lora_adapters([ad], config, 2, union_target_modules([ad]))


def test_target_module_not_in_engine(models, llama_adapter):
    config, _ = base_of(models["llama"])
    ad = load_lora_adapter(llama_adapter, config)
    with pytest.raises(TrtbuildError, match=r"targets attn_k .*not built for \(--lora_target_modules attn_q attn_v\)"):
        stack_lora_adapters([ad], config, 8, ["attn_q", "attn_v"])
    with pytest.raises(TrtbuildError, match="unknown"):
        stack_lora_adapters([ad], config, 8, ["attn_q", "q_proj"])
    gpt2_config, _ = base_of(models["gpt2"])
    with pytest.raises(TrtbuildError, match="no gated MLP"):
        stack_lora_adapters([], gpt2_config, 8, ["mlp_gate"])


def test_modules_to_save_cannot_be_stacked(models, tmp_path):
    config, _ = base_of(models["llama"])
    ad = load_lora_adapter(make_peft_adapter(models["llama"], tmp_path / "a", modules_to_save=["lm_head"]), config)
    with pytest.raises(TrtbuildError, match=r"replaces lm_head.weight \(modules_to_save\).*--hf_lora_dir"):
        stack_lora_adapters([ad], config, 8, union_target_modules([ad]))


def test_merge_refuses_conflicting_modules_to_save_and_quantized(models, tmp_path):
    import dataclasses

    config, weights = base_of(models["llama"])
    a, b = (load_lora_adapter(make_peft_adapter(models["llama"], tmp_path / n, modules_to_save=["lm_head"], seed=s),
                              config) for n, s in (("a", 1), ("b", 2)))
    with pytest.raises(TrtbuildError, match="both replace lm_head.weight"):
        merge_lora(weights, config, [a, b])
    q = dataclasses.replace(config, quantization=dataclasses.replace(config.quantization, quant_algo="W8A16"))
    with pytest.raises(TrtbuildError, match="before quantization"):
        merge_lora(weights, q, [a])


def test_adapter_dataclass(models, llama_adapter):
    config, _ = base_of(models["llama"])
    ad = load_lora_adapter(llama_adapter, config)
    assert isinstance(ad, LoraAdapter) and sorted(ad.layers) == [0, 1]
    lm = ad.layers[0]["attn_k"]
    assert lm.a.shape == (4, config.hidden_size) and lm.b.shape == (config.kv_dim, 4)
    assert lm.hf_name == "model.layers.0.self_attn.k_proj"
    assert "attn_q" in str(ad)


@pytest.mark.slow
def test_real_model_merge_equals_peft(real_model_dir, tmp_path):
    """SmolLM2-135M (tied, GQA 9/3), a rank-16 adapter on every linear, saved as .bin."""
    adir = make_peft_adapter(real_model_dir, tmp_path / "a", r=16, lora_alpha=32, b_std=0.01,
                             safe_serialization=False)
    config, weights = base_of(real_model_dir)
    ad = load_lora_adapter(adir, config)
    assert ad.max_rank == 16 and len(ad.layers) == config.num_hidden_layers
    merged, new_config = merge_lora(weights, config, [ad])
    assert new_config.tie_word_embeddings
    assert_same_weights(merged, peft_merged(real_model_dir, [adir]), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# adapter_model.bin without torch (trtbuild.lora_adapter.read_torch_state_dict)


def test_torch_free_bin_reader_equals_torch_load(tmp_path):
    from trtbuild.lora_adapter import read_torch_state_dict

    base = torch.randn(6, 5)
    state = {
        "f32": torch.randn(3, 4), "f16": torch.randn(4, 2).half(), "bf16": torch.randn(2, 7).bfloat16(),
        "i64": torch.arange(5), "transposed": base.t(), "slice": base[2:5, 1:4], "shared": base,
        "empty": torch.zeros(0, 3), "param": torch.nn.Parameter(torch.randn(2, 2)), "scalar": torch.tensor(1.5),
    }
    for legacy in (False, True):
        path = tmp_path / f"sd_{legacy}.bin"
        torch.save(state, str(path), _use_new_zipfile_serialization=not legacy)
        got = read_torch_state_dict(path)
        assert set(got) == set(state)
        for k, t in state.items():
            want = t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()
            np.testing.assert_array_equal(np.asarray(got[k], dtype=want.dtype), want, err_msg=k)
            assert got[k].shape == tuple(t.shape), k
        if not legacy:
            assert str(got["bf16"].dtype) == "bfloat16" and got["f16"].dtype == np.float16


def test_torch_free_bin_reader_refuses_code(tmp_path):
    """A pickle that would run code is refused, not run (like torch.load(weights_only=True))."""
    from trtbuild.lora_adapter import read_torch_state_dict

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    path = tmp_path / ADAPTER_BIN
    torch.save({"w": torch.zeros(2), "evil": Evil()}, str(path))
    with pytest.raises(TrtbuildError, match=rf"{path} is not a readable PyTorch state dict of tensors "
                                            r"\(posix.system is not part of a plain state dict"):
        read_torch_state_dict(path)
    assert not marker.exists()
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(TrtbuildError, match="not a readable PyTorch"):
        read_torch_state_dict(path)

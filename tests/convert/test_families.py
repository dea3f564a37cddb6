"""Families added through their modules (trtbuild.models): every quantization recipe on each,
Phi-3's LongRoPE switch, and refusals. Logits, greedy tokens and mixed batches against
transformers are in test_pipeline (TINY_ARCHS), LoRA in test_lora_runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trtbuild.convert.cli import main as convert_main
from trtbuild.engine import BuildConfig, PluginConfig
from trtbuild.models import FAMILIES, SUPPORTED_ARCHITECTURES
from trtbuild.runtime import SamplingConfig

from conftest import TINY_ARCHS

NEW_FAMILIES = ("qwen3", "phi3", "gemma3")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [20, 21, 22, 23, 24], [300, 301, 302, 303, 304, 305, 306]]

# recipe → (convert flags, the largest mean KL(float || recipe) per position allowed on the tiny models:
# measured 2e-6 to 8e-6 for the 8-bit recipes and 3e-4 to 1.1e-3 for int4 on Qwen3 and Phi-3, whose
# random weights give flat distributions; the bounds are 5-15x those). The factory calibrates on
# conftest's calib_file, 4 samples of 64 tokens.
RECIPES = {
    "w8a16": (["--use_weight_only", "--weight_only_precision", "int8"], 1e-4),
    "w4a16_rtn_g32": (["--use_weight_only", "--weight_only_precision", "int4", "--per_group", "--group_size", "32"],
                      5e-3),
    "w4a16_gptq_g32": (["--use_weight_only", "--weight_only_precision", "int4_gptq", "--per_group", "--group_size",
                        "32"], 5e-3),
    "w4a16_awq_g32": (["--use_weight_only", "--weight_only_precision", "int4_awq", "--per_group", "--group_size",
                       "32"], 5e-3),
    "sq_w8a8": (["--smoothquant", "0.5", "--per_channel", "--per_token"], 1e-4),
    "int8_kv": (["--int8_kv_cache"], 1e-4),
}


def limits(attention="auto") -> BuildConfig:
    return BuildConfig(max_batch_size=4, max_input_len=128, max_seq_len=192,
                       plugin_config=PluginConfig(gpt_attention_plugin=attention, norm_plugin=attention))


def mean_kl(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean over positions of KL(softmax(reference) || softmax(other))."""
    p = torch.log_softmax(torch.from_numpy(reference), -1)
    q = torch.log_softmax(torch.from_numpy(other), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("arch", NEW_FAMILIES)
def test_every_recipe_stays_close_to_the_float_engine(arch, recipe, tiny_models, engines):
    flags, bound = RECIPES[recipe]
    quantized = engines.runner(tiny_models[arch], limits(), quant=flags)
    reference = engines.runner(tiny_models[arch], limits()).score(PROMPTS)
    scores = quantized.score(PROMPTS)
    kl = [mean_kl(reference[i, :len(p)], scores[i, :len(p)]) for i, p in enumerate(PROMPTS)]
    assert max(kl) < bound, f"{arch} {recipe}: KL to the float engine {kl}"
    assert max(kl) > 0, f"{arch} {recipe}: nothing was quantized"
    # a batch of mixed lengths gives each row what it gives alone
    out = quantized.generate(PROMPTS, SamplingConfig(max_new_tokens=8)).output_ids
    for i, p in enumerate(PROMPTS):
        assert out[i] == quantized.generate([p], SamplingConfig(max_new_tokens=8)).output_ids[0]


@pytest.mark.parametrize("attention", ["auto", "disable"])
def test_phi3_longrope_switches_past_the_original_length(attention, tiny_models, engines):
    """Past original_max_position_embeddings (64 in the tiny config) transformers takes LongRoPE's
    long factors for the whole forward: a 90-token prompt, and a generation that crosses 64."""
    import transformers

    hf_dir = tiny_models["phi3"]
    runner = engines.runner(hf_dir, limits(attention))
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    long_prompt = [(7 * j + 3) % 500 + 2 for j in range(90)]
    with torch.no_grad():
        ref = hf(torch.tensor([long_prompt])).logits[0].numpy()
        short = hf(torch.tensor([long_prompt[:60]])).logits[0].numpy()
    np.testing.assert_allclose(runner.score([long_prompt])[0], ref, atol=1e-3, rtol=0)
    np.testing.assert_allclose(runner.score([long_prompt[:60]])[0], short, atol=1e-3, rtol=0)
    assert np.abs(ref[:60] - short).max() > 1e-2, "the long factors changed nothing: the test cannot tell"
    prompt = long_prompt[:50]
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                               pad_token_id=0)[0, len(prompt):].tolist()
    assert runner.generate([prompt], SamplingConfig(max_new_tokens=32)).output_ids[0] == expected


def refusal(argv: list[str], capsys) -> str:
    """The one line convert_checkpoint.py prints for a user error (exit code 2)."""
    with pytest.raises(SystemExit) as e:
        convert_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_an_unsupported_architecture_names_the_supported_ones(tiny_models, tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    config = json.loads((tiny_models["llama"] / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "architectures": ["FalconForCausalLM"]}))
    message = refusal(["--model_dir", str(hf_dir), "--output_dir", str(tmp_path / "ckpt")], capsys)
    assert "FalconForCausalLM" in message and all(arch in message for arch in SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("arch,scaling", [
    ("llama", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}),
    ("phi3", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
])
def test_a_rope_scaling_the_family_does_not_know_is_refused_by_name(arch, scaling, tiny_models, tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    config = json.loads((tiny_models[arch] / "config.json").read_text())
    config.pop("rope_scaling", None)
    (hf_dir / "config.json").write_text(json.dumps({**config, "rope_parameters": scaling}))
    message = refusal(["--model_dir", str(hf_dir), "--output_dir", str(tmp_path / "ckpt")], capsys)
    assert f"rope scaling type '{scaling['rope_type']}' is not supported" in message


def test_every_family_lists_its_linears_and_weight_rows(tiny_models):
    """The registry holds each architecture once and every family has a tiny test model; each
    linear and layer tensor of a family's spec is made by a row of its weight table."""
    from trtbuild.convert.hf_config import pretrained_config_from_hf
    from trtbuild.models import family_of

    assert len(SUPPORTED_ARCHITECTURES) == sum(len(f.architectures) for f in FAMILIES)
    configs = [pretrained_config_from_hf(tiny_models[arch], "float32") for arch in TINY_ARCHS]
    assert {family_of(c).name for c in configs} == {f.name for f in FAMILIES}
    for config in configs:
        family = family_of(config)
        rows = {row.checkpoint.format(i=0) for row in family.weight_rows}
        for lin in family.linears(config):
            assert f"transformer.layers.0.{lin.name}.weight" in rows, (family.name, lin.name)
        for name in family.layer_tensors(config):
            assert f"transformer.layers.0.{name}" in rows, (family.name, name)

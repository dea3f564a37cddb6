"""quant_algo is one table (trtbuild.quant_algo): every name a checkpoint may hold builds, the
recipe flags read without torch, and trt-build on a checkpoint that needs no quantizing imports no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trtbuild.builder import build_engine
from trtbuild.checkpoint import QuantConfig, load_config
from trtbuild.engine import BuildConfig
from trtbuild.errors import TrtbuildError
from trtbuild.quant_algo import QUANT_ALGOS, parse_quant_algo
from trtbuild.quantization.recipe import QuantRecipe
from trtbuild.runtime import ModelRunner

from conftest import REPO

LIMITS = dict(max_batch_size=2, max_input_len=16, max_seq_len=32)
PROMPTS = [[5, 6, 7, 8, 9], [20, 21, 22]]


RECIPES = {"fp": [], "int8": ["--use_weight_only"],
           "int4": ["--use_weight_only", "--weight_only_precision", "int4", "--per_group", "--group_size", "32"]}


@pytest.fixture(scope="module")
def checkpoints(tiny_models, engines) -> dict[str, Path]:
    return {name: engines.checkpoint(tiny_models["llama"], quant=flags) for name, flags in RECIPES.items()}


def test_every_recipe_names_a_known_algo_with_its_properties():
    for precision, (bits, method) in {"int8": (8, "rtn"), "int4": (4, "rtn"), "int4_gptq": (4, "gptq"),
                                      "int4_awq": (4, "awq")}.items():
        algo = QuantRecipe(use_weight_only=True, weight_only_precision=precision).algo
        assert QUANT_ALGOS[algo.name] is algo and algo.weight_only and algo.weight_bits == bits and algo.method == method
    for per_channel in (False, True):
        for per_token in (False, True):
            algo = QuantRecipe(smoothquant=0.5, per_channel=per_channel, per_token=per_token).algo
            assert QUANT_ALGOS[algo.name] is algo and algo.smoothquant and not algo.weight_only
            assert (algo.per_channel, algo.per_token, algo.weight_bits) == (per_channel, per_token, 8)
            assert ("PER_TOKEN" in algo.name) == per_token and algo.name.startswith(
                "W8A8_SQ_PER_CHANNEL" if per_channel else "W8A8_SQ_PER_TENSOR")
    assert QuantRecipe().algo is None and QuantRecipe(int8_kv_cache=True).quant_config().kv_cache_quant_algo == "INT8"


def test_unknown_quant_algo_in_a_checkpoint_is_named(checkpoints, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cfg = json.loads((checkpoints["int8"] / "config.json").read_text())
    cfg["quantization"]["quant_algo"] = "W3A16"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TrtbuildError, match=r"config\.json: .*quant_algo 'W3A16' is not one of W8A16, W4A16"):
        load_config(ckpt)
    with pytest.raises(TrtbuildError, match="quant_algo 'W3A16'"):
        parse_quant_algo("W3A16")


@pytest.mark.parametrize("source, relabelled", [("int8", "W8A16_GPTQ"), ("int4", "W4A16_GPTQ"), ("int4", "W4A16_AWQ")])
def test_every_weight_only_name_builds_the_same_engine(tiny_models, engines, checkpoints, tmp_path, source,
                                                      relabelled):
    """The importers write W8A16_GPTQ / W4A16_GPTQ / W4A16_AWQ in the RTN layout: an engine built from a
    checkpoint holding that name computes what its RTN twin computes."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints[source], ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert QUANT_ALGOS[cfg["quantization"]["quant_algo"]].weight_bits == QUANT_ALGOS[relabelled].weight_bits
    cfg["quantization"]["quant_algo"] = relabelled
    (ckpt / "config.json").write_text(json.dumps(cfg))
    build_engine(ckpt, tmp_path / "relabelled", BuildConfig(**LIMITS), progress=False)
    rtn = engines.runner(tiny_models["llama"], BuildConfig(**LIMITS), quant=RECIPES[source]).score(PROMPTS)
    np.testing.assert_array_equal(ModelRunner.from_dir(tmp_path / "relabelled", num_threads=1).score(PROMPTS), rtn)


def test_quant_config_is_made_in_one_place():
    from trtbuild.quant_algo import weight_only_algo

    qc = QuantRecipe(use_weight_only=True, weight_only_precision="int4", per_group=True, group_size=64,
                     has_zero_point=True).quant_config()
    assert qc == QuantConfig.for_algo(weight_only_algo(4, "rtn"), group_size=64, has_zero_point=True)
    assert (qc.quant_algo, qc.per_group, qc.group_size, qc.has_zero_point, qc.exclude_modules) == \
        ("W4A16", True, 64, True, ["lm_head"])
    sq = QuantRecipe(smoothquant=0.5, per_token=True, per_channel=True).quant_config(pre_quant_scale=True)
    assert (sq.group_size, sq.per_group, sq.smoothquant_val, sq.pre_quant_scale) == (-1, False, 0.5, True)


@pytest.mark.parametrize("source", ["fp", "int4"])
def test_trt_build_without_quantizing_imports_no_torch(tiny_models, engines, checkpoints, tmp_path, source):
    """trt-build on a floating-point checkpoint (no quantization flags) or an already quantized one:
    torch is made unimportable, and the engine it builds equals the one built with torch around."""
    engine = tmp_path / "engine"
    script = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now fails
from trtbuild.cli import build
build.main(["--checkpoint_dir", {str(checkpoints[source])!r}, "--output_dir", {str(engine)!r},
            "--max_batch_size", "2", "--max_input_len", "16", "--max_seq_len", "32"])
loaded = [m for m, v in sys.modules.items() if v is not None and (m == "torch" or m.startswith("torch."))]
assert not loaded, loaded
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, timeout=300)
    with_torch = engines.runner(tiny_models["llama"], BuildConfig(**LIMITS), quant=RECIPES[source])
    np.testing.assert_array_equal(ModelRunner.from_dir(engine, num_threads=1).score(PROMPTS),
                                  with_torch.score(PROMPTS))


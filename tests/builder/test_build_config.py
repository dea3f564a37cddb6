"""The build is resolved once into a frozen BuildConfig: the caller's is never changed, the CLI and the
library share one source of defaults, and the lora plugin's options are build fields, not module state."""

from __future__ import annotations

import dataclasses
import json

import pytest

from trtbuild.builder import build_engine
from trtbuild.checkpoint import load_config
from trtbuild.cli import build as build_cli
from trtbuild.engine import BuildConfig, LoraConfig
from trtbuild.runtime import ModelRunner


@pytest.fixture(scope="module")
def ckpt(tiny_models, engines):
    return engines.checkpoint(tiny_models["llama"], quant=["--use_weight_only", "--weight_only_precision", "int4"])


def test_build_does_not_change_the_callers_config(ckpt, tmp_path):
    """build_engine resolves a copy: the BuildConfig passed in is the same after the build, and the
    engine records every default filled (from the library's one source, trtbuild.resolve)."""
    asked = BuildConfig(max_batch_size=2)
    before = repr(asked)
    build_engine(ckpt, tmp_path / "e", asked, progress=False)
    assert repr(asked) == before
    built = ModelRunner.from_dir(tmp_path / "e", num_threads=1).config.build_config
    pos = load_config(ckpt).max_position_embeddings
    assert built.max_seq_len == min(2048, pos) and built.max_input_len == min(1024, built.max_seq_len)
    assert built.max_num_tokens == 2 * built.max_input_len and built.compute_dtype == "float32"
    assert built.plugin_config.gemm_plugin == "float32" and built.plugin_config.gpt_attention_plugin == "float32"
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.max_batch_size = 4


def test_cli_and_library_defaults_are_the_same(ckpt, tmp_path):
    """trt-build with no limit flags records the same build as build_engine(BuildConfig())."""
    build_cli.main(["--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / "cli")])
    build_engine(ckpt, tmp_path / "library", BuildConfig(), progress=False)
    cli, library = (json.loads((tmp_path / d / "config.json").read_text())["build_config"] for d in ("cli", "library"))
    assert cli == library
    assert cli["max_input_len"] == min(1024, cli["max_seq_len"]) and cli["lora_config"]["max_loras"] == 0


def test_lora_form_and_slots_come_from_the_build_config(tiny_models, engines, tmp_path):
    """The lora form is a LoraConfig field (no module constant to patch); max_loras defaults to the
    adapters given + EXTRA_LORA_SLOTS in the library and the CLI alike."""
    from trtbuild.convert.lora import make_peft_adapter
    from trtbuild.engine import EXTRA_LORA_SLOTS

    fp = engines.checkpoint(tiny_models["llama"])
    adapter = make_peft_adapter(tiny_models["llama"], tmp_path / "a", r=4, seed=1)
    limits = dict(max_batch_size=2, max_input_len=16, max_seq_len=32)
    asked = BuildConfig(**limits, lora_config=LoraConfig(lora_dir=(str(adapter),), lora_form="gather"))
    build_engine(fp, tmp_path / "lib", asked, progress=False)
    build_cli.main(["--checkpoint_dir", str(fp), "--output_dir", str(tmp_path / "cli"), "--max_batch_size", "2",
                    "--max_input_len", "16", "--max_seq_len", "32", "--lora_dir", str(adapter)])
    lib = ModelRunner.from_dir(tmp_path / "lib", num_threads=1)
    cli = ModelRunner.from_dir(tmp_path / "cli", num_threads=1)
    assert asked.lora_config.lora_dir == (str(adapter),)  # unchanged
    for runner in (lib, cli):
        lc = runner.config.build_config.lora_config
        assert lc.lora_dir == ("lora/0",) and lc.max_loras == 1 + EXTRA_LORA_SLOTS and lc.max_lora_rank == 4
    manifest = lambda d: json.loads((tmp_path / d / "lora" / "manifest.json").read_text())["form"]  # noqa: E731
    assert (manifest("lib"), manifest("cli")) == ("gather", "masked")

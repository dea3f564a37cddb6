"""Bad input: one clear line naming what is wrong, exit code 2, nothing half-written."""

from __future__ import annotations

import json
import shutil

import pytest

from trtbuild.cli import build as build_cli
from trtbuild.cli import run as run_cli
from trtbuild.convert import cli as convert_cli


def run_main(main, argv, capsys) -> str:
    """Run a command's main; assert exit 2 with exactly one error line; return it."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def ckpt(tiny_models, engines):
    return engines.checkpoint(tiny_models["llama"])


@pytest.fixture(scope="module")
def engine(tiny_models, engines):
    from trtbuild.engine import BuildConfig

    return engines.engine(tiny_models["llama"], BuildConfig(max_batch_size=2, max_input_len=16, max_seq_len=64))


def leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_model_dir_without_config(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    line = run_main(convert_cli.main, ["--model_dir", str(tmp_path / "model"), "--output_dir", str(tmp_path / "o")], capsys)
    assert "config.json" in line and "model" in line
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_lists_the_supported(tiny_models, tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    line = run_main(convert_cli.main, ["--model_dir", str(d), "--output_dir", str(tmp_path / "o")], capsys)
    assert "FalconForCausalLM" in line and "LlamaForCausalLM" in line and "GPT2LMHeadModel" in line


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupt_safetensors_names_the_file(tiny_models, tmp_path, capsys, damage):
    d = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64 + data[64:])
    line = run_main(convert_cli.main, ["--model_dir", str(d), "--output_dir", str(tmp_path / "o")], capsys)
    assert "model.safetensors" in line
    assert not (tmp_path / "o").exists() and not leftovers(tmp_path, "o")


def convert_edited_model(tiny_models, tmp_path, capsys, edit) -> str:
    """Convert a copy of the tiny Llama whose state dict `edit` changed; return the error line."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], d)
    state = load_file(str(d / "model.safetensors"))
    edit(state)
    save_file(state, str(d / "model.safetensors"))
    line = run_main(convert_cli.main, ["--model_dir", str(d), "--output_dir", str(tmp_path / "o")], capsys)
    assert not (tmp_path / "o").exists() and not leftovers(tmp_path, "o")
    return line


def test_missing_tensor_is_named(tiny_models, tmp_path, capsys):
    line = convert_edited_model(tiny_models, tmp_path, capsys,
                                lambda state: state.pop("model.layers.1.mlp.down_proj.weight"))
    assert "model.layers.1.mlp.down_proj.weight" in line


def test_wrongly_shaped_tensor_is_named(tiny_models, tmp_path, capsys):
    import torch

    line = convert_edited_model(tiny_models, tmp_path, capsys,
                                lambda state: state.update({"model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 32)}))
    assert "model.layers.0.self_attn.o_proj.weight" in line and "(64, 32)" in line


def test_damaged_checkpoint_at_build(ckpt, tmp_path, capsys):
    bad = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad)
    f = bad / "rank0.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    line = run_main(build_cli.main, ["--checkpoint_dir", str(bad), "--output_dir", str(tmp_path / "e")], capsys)
    assert "rank0.safetensors" in line and "truncated" in line
    assert not (tmp_path / "e").exists() and not leftovers(tmp_path, "e")


def test_checkpoint_missing_tensor_at_build(ckpt, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad)
    state = load_file(str(bad / "rank0.safetensors"))
    del state["transformer.layers.0.mlp.gate.weight"]
    save_file(state, str(bad / "rank0.safetensors"))
    line = run_main(build_cli.main, ["--checkpoint_dir", str(bad), "--output_dir", str(tmp_path / "e")], capsys)
    assert "transformer.layers.0.mlp.gate.weight" in line


def test_output_dir_exists_needs_force(ckpt, engine, tmp_path, capsys):
    line = run_main(build_cli.main, ["--checkpoint_dir", str(ckpt), "--output_dir", str(engine)], capsys)
    assert "--force" in line and str(engine) in line
    line = run_main(convert_cli.main, ["--model_dir", str(ckpt), "--output_dir", str(ckpt)], capsys)
    assert "--force" in line


def test_build_limits_are_checked(ckpt, tmp_path, capsys):
    line = run_main(build_cli.main, ["--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / "e"),
                                     "--max_seq_len", "100000"], capsys)
    assert "--max_seq_len" in line and "max_position_embeddings" in line


def test_prompt_longer_than_max_input_len(engine, capsys):
    line = run_main(run_cli.main, ["--engine_dir", str(engine), "--input_text", "word " * 40], capsys)
    assert "max_input_len" in line


def test_more_prompts_than_max_batch_size(engine, capsys):
    line = run_main(run_cli.main, ["--engine_dir", str(engine), "--input_text", "a", "b", "c"], capsys)
    assert "max_batch_size" in line


def test_engine_from_another_version(engine, tmp_path, capsys):
    e = tmp_path / "engine"
    shutil.copytree(engine, e)
    cfg = json.loads((e / "config.json").read_text())
    cfg["version"] = "0.0.1"
    (e / "config.json").write_text(json.dumps(cfg))
    line = run_main(run_cli.main, ["--engine_dir", str(e), "--input_text", "hi"], capsys)
    assert "0.0.1" in line and "rebuild" in line


def test_interrupted_build_leaves_nothing(ckpt, tmp_path, monkeypatch):
    from trtbuild.backends import onnxruntime_backend

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnxruntime_backend, "compile_engine", boom)
    with pytest.raises(SystemExit) as e:
        build_cli.main(["--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / "e")])
    assert e.value.code == 130
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_an_existing_engine_atomically(ckpt, engine, tmp_path):
    e = tmp_path / "engine"
    shutil.copytree(engine, e)
    build_cli.main(["--checkpoint_dir", str(ckpt), "--output_dir", str(e), "--force", "--max_batch_size", "3"])
    assert json.loads((e / "config.json").read_text())["build_config"]["max_batch_size"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


@pytest.mark.parametrize("failure", ["missing_header", "compile_error"])
def test_kernels_that_do_not_compile_are_reported_at_build(ckpt, tmp_path, monkeypatch, caplog, failure):
    """trt-build that cannot compile trtbuild's kernels says what failed and that the engine uses onnxruntime's
    ops instead (an install lacking a header, a compiler error), and the engine records that it has no kernels."""
    from trtbuild import kernels

    monkeypatch.setenv(kernels.KERNEL_DIR_ENV, str(tmp_path / "kernels"))  # no library built yet
    if failure == "missing_header":  # what a wheel without ort_op.h did
        sources = tmp_path / "sources"
        shutil.copytree(kernels._HERE, sources, ignore=shutil.ignore_patterns("__pycache__", "ort_op.h"))
        monkeypatch.setattr(kernels, "_HERE", sources)
        expected = f"{sources} lacks ort_op.h"
    else:
        cxx = tmp_path / "g++"
        cxx.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "fake g++ 1.0"; exit 0; }\n'
                       'echo "causal_attention.cc:1: error: out of registers" >&2\nexit 1\n')
        cxx.chmod(0o755)
        monkeypatch.setenv("CXX", str(cxx))
        expected = "error: out of registers"
    with caplog.at_level("WARNING"):
        build_cli.main(["--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / "engine"),
                        "--max_batch_size", "2", "--max_input_len", "16", "--max_seq_len", "64"])
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert expected in warning and "the engine uses onnxruntime's ops instead" in warning, warning
    plugins = json.loads((tmp_path / "engine" / "config.json").read_text())["build_config"]["plugin_config"]
    assert plugins["context_fmha"] is False


def test_sampling_flags_with_top_k_1_say_that_decoding_is_greedy(engine, capsys):
    """--top_k defaults to 1 (greedy, TensorRT-LLM's meaning): --temperature / --top_p alone change nothing, and
    run.py says so in one line on stderr; it says nothing when sampling is on or was not asked for."""
    base = ["--engine_dir", str(engine), "--input_text", "hi", "--max_output_len", "2"]
    run_cli.main([*base, "--temperature", "0.8", "--top_p", "0.9"])
    out, err = capsys.readouterr()
    notes = [line for line in err.splitlines() if "greedy" in line]
    assert len(notes) == 1 and "--temperature and --top_p have no effect" in notes[0], err
    assert "--top_k 0" in notes[0] and "greedy" not in out and 'Output [Text 0 Beam 0]' in out
    run_cli.main([*base, "--top_p", "0.9"])
    assert "--top_p has no effect" in capsys.readouterr().err
    for extra in ([], ["--temperature", "0"], ["--top_k", "0", "--temperature", "0.8"], ["--top_k", "40", "--top_p", "0.9"]):
        run_cli.main([*base, *extra])
        assert "greedy" not in capsys.readouterr().err, extra


@pytest.mark.parametrize("command, shown", [
    (run_cli, ["--top_k TOP_K sample from the k most likely tokens; 1 = greedy", "(default: 1)",
               "--temperature TEMPERATURE", "(default: 1.0)", "--max_output_len MAX_OUTPUT_LEN", "(default: 32)"]),
    (build_cli, ["--max_batch_size MAX_BATCH_SIZE sequences run together, at most (default: 8)",
                 "--group_size GROUP_SIZE inputs per scale with --per_group: 16, 32, 64, 128 or 256",
                 "--context_fmha {enable,disable}", "(default: enable)", "(default: onnxruntime)"]),
    (convert_cli, ["--dtype {float32,float16,bfloat16} default: float32", "--tp_size TP_SIZE", "(default: 1)"]),
])
def test_help_shows_the_defaults(command, shown):
    """--help names each flag's default; switches and flags whose default is "not set" show none."""
    text = " ".join(command.build_parser().format_help().split())
    for s in shown:
        assert s in text, s
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: True)" not in text


def test_lora_task_uids_that_are_not_numbers(engine, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli.main(["--engine_dir", str(engine), "--input_text", "hi", "--lora_task_uids", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--lora_task_uids" in err and "'x'" in err and "Traceback" not in err


def test_tensorrt_backend_names_the_plugin_flag_to_disable(ckpt, tmp_path, capsys):
    line = run_main(build_cli.main, ["--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / "e"),
                                     "--backend", "tensorrt", "--gemm_plugin", "float16"], capsys)
    assert "--gemm_plugin float16" in line and "use --gemm_plugin disable" in line and "{flag}" not in line
    assert not (tmp_path / "e").exists()


def test_prequantized_weights_say_how_to_quantize_instead(tiny_models, tmp_path, capsys):
    """An integer tensor where the model has a float one: the error names it and flags that exist."""
    import torch
    from safetensors.torch import load_file, save_file

    d = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], d)
    weights = load_file(str(d / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    weights[name] = weights[name].to(torch.int8)
    save_file(weights, str(d / "model.safetensors"))
    line = run_main(convert_cli.main, ["--model_dir", str(d), "--output_dir", str(tmp_path / "o")], capsys)
    assert name in line and "--weight_only_precision" in line
    flags = {a for action in convert_cli.build_parser()._actions for a in action.option_strings}
    assert all(word in flags for word in line.replace(",", " ").split() if word.startswith("--")), line
    assert not (tmp_path / "o").exists()

"""Split-context attention: one prompt in the window runs its attention in two causal halves inside
an If branch of the engine; every output (prefill logits, scores, generated tokens, the KV cache it
leaves behind) equals the one-call engine's, at batch 1, for batches (which take the one-call
branch) and with an int8 KV cache."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from trtbuild.builder import build_engine
from trtbuild.cli.build import main as build_main
from trtbuild.convert.cli import main as convert_main
from trtbuild.engine import BuildConfig
from trtbuild.errors import TrtbuildError
from trtbuild.runtime import ModelRunner, SamplingConfig

from conftest import PPL_TEXT, op_types

WINDOW = (8, 40)


@pytest.fixture(scope="module", params=["fp32", "int8_kv"])
def runners(request, tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"split_{request.param}")
    ckpt = tmp / "ckpt"
    flags = []
    if request.param == "int8_kv":
        calib = tmp / "calib.txt"
        calib.write_text(PPL_TEXT.read_text()[:20_000])
        flags = ["--int8_kv_cache", "--calib_dataset", str(calib), "--calib_size", "2", "--calib_max_seq_length", "32"]
    convert_main(["--model_dir", str(tiny_models["llama"]), "--output_dir", str(ckpt), *flags])
    out = {}
    for name, (lo, hi) in (("split", WINDOW), ("one_call", (0, 0))):
        build = BuildConfig(max_batch_size=4, max_input_len=48, max_seq_len=96, context_split_min_len=lo,
                            context_split_max_len=hi)
        build_engine(ckpt, tmp / name, build, progress=False)
        out[name] = ModelRunner.from_dir(tmp / name, num_threads=1)
    return out


def prompt(n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 250, n)]


def test_the_split_engine_has_the_two_branch_if(runners):
    split = onnx.load(str(runners["split"].engine_dir / "rank0.engine"), load_external_data=False).graph
    one_call = onnx.load(str(runners["one_call"].engine_dir / "rank0.engine"), load_external_data=False).graph
    assert "If" in {n.op_type for n in split.node} and "If" not in op_types(one_call)
    assert "GroupQueryAttention" in op_types(split)


@pytest.mark.parametrize("lengths", [[7], [8], [21], [39], [40], [33, 20, 9]])
def test_split_engine_equals_one_call_engine(runners, lengths):
    split, one_call = runners["split"], runners["one_call"]
    prompts = [prompt(n, seed=i) for i, n in enumerate(lengths)]
    np.testing.assert_allclose(split.prefill(prompts), one_call.prefill(prompts), atol=1e-5, rtol=0)
    # the cache the prefill left: decode steps read it
    s, o = split.score(prompts), one_call.score(prompts)
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(s[i, :n], o[i, :n], atol=1e-5, rtol=0)
    sampling = SamplingConfig(max_new_tokens=10)
    assert split.generate(prompts, sampling).output_ids == one_call.generate(prompts, sampling).output_ids


def test_split_window_flags_are_checked(tiny_models, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    convert_main(["--model_dir", str(tiny_models["llama"]), "--output_dir", str(ckpt)])
    with pytest.raises(SystemExit) as exit_info:
        build_main(["--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / "e"),
                    "--context_split_min_len", "64", "--context_split_max_len", "32"])
    assert exit_info.value.code == 2
    assert "--context_split_max_len 32" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    with pytest.raises(TrtbuildError, match="context_split_min_len -1"):  # the same check for API callers
        build_engine(ckpt, tmp_path / "e", BuildConfig(max_input_len=32, max_seq_len=64, context_split_min_len=-1))
    assert not (tmp_path / "e").exists()

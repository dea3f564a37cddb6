"""quantize_checkpoint end to end on tiny random models, the recipe flags, calibration input, bad input."""

import argparse
import dataclasses
import json

import pytest
import torch

torch.set_num_threads(1)

from trtbuild.checkpoint import linear_names  # noqa: E402
from trtbuild.errors import TrtbuildError  # noqa: E402
from trtbuild.quantization.api import (  # noqa: E402
    QuantRecipe, add_quant_args, dequantize_linear, quantize_checkpoint, recipe_from_args)
from trtbuild.quantization.calibration import make_calib_samples, read_calib_texts  # noqa: E402
from trtbuild.quantization.reference_model import ReferenceModel  # noqa: E402

from tiny_models import tiny_gpt2, tiny_llama, tiny_tokenizer  # noqa: E402

WORDS = ("the model reads text and writes numbers while a quiet river runs past old stone bridges "
         "in spring when birds sing over green fields and children count the boats that drift slowly "
         "toward the sea under a pale sky full of clouds").split()


def _texts(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (60,), generator=g).tolist()) for _ in range(n)]


CALIB = _texts(40, 0)
TOK = tiny_tokenizer(CALIB + _texts(10, 1), vocab_size=128)
LLAMA = tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2, inter=128)
LLAMA_MHA = tiny_llama(seed=1, hidden=64, layers=2, heads=4, kv_heads=4, inter=128, llama3_rope=False)
GPT2 = tiny_gpt2()
HELD_OUT = make_calib_samples(_texts(10, 2), TOK, 4, 32)
SMALL = dict(calib_size=8, calib_max_seq_length=32)


def logits_error(model, recipe, **kw):
    _, w, cfg = model
    qw, qcfg = quantize_checkpoint(w, cfg, recipe, calib_texts=CALIB, tokenizer=TOK, progress=False, **kw)
    ref = ReferenceModel(w, cfg)(HELD_OUT)
    got = ReferenceModel(qw, qcfg)(HELD_OUT)
    return ((got - ref).norm() / ref.norm()).item(), qw, qcfg


@pytest.mark.parametrize("precision,bits", [("int8", 8), ("int4", 4)])
def test_rtn_weight_only_layout_and_config(precision, bits):
    r = QuantRecipe(use_weight_only=True, weight_only_precision=precision, per_group=True, group_size=32,
                    has_zero_point=True)
    err, qw, qcfg = logits_error(LLAMA, r)
    assert err < (0.01 if bits == 8 else 0.1), err
    q = qcfg.quantization
    assert (q.quant_algo, q.group_size, q.per_group, q.has_zero_point) == (f"W{bits}A16", 32, True, True)
    for name in linear_names(qcfg):
        assert qw[name + ".weight"].dtype == torch.uint8
        assert qw[name + ".weights_scaling_factor"].shape[1] == qw[name + ".weight"].shape[1] * (8 // bits) // 32
        assert name + ".zero" in qw and name + ".prequant_scaling_factor" not in qw
    assert qw["transformer.ln_f.weight"] is LLAMA[1]["transformer.ln_f.weight"]  # untouched tensors shared
    assert LLAMA[1]["transformer.layers.0.mlp.fc.weight"].dtype == torch.float32  # input not modified


def _int4_errors(model, gs):
    out = {}
    for name in ("int4", "int4_gptq", "int4_awq", "int4_awq_linear"):
        r = QuantRecipe(use_weight_only=True, weight_only_precision=name.removesuffix("_linear"), per_group=gs > 0,
                        group_size=gs if gs > 0 else 128, awq_block_loss=not name.endswith("_linear"), **SMALL)
        out[name], _, _ = logits_error(model, r)
    return out


@pytest.mark.parametrize("gs", [-1, 32])
def test_gptq_and_awq_beat_rtn_on_held_out_logits(gs):
    e = _int4_errors(LLAMA, gs)
    print(f"llama int4 gs {gs}: " + ", ".join(f"{k} {v:.4f}" for k, v in e.items()))
    assert e["int4_gptq"] < e["int4"]
    assert e["int4_awq"] < e["int4"]
    assert e["int4_awq_linear"] < e["int4"]  # --awq_linear_objective


def test_awq_folds_scales_where_it_can():
    r = QuantRecipe(use_weight_only=True, weight_only_precision="int4_awq", per_group=True, group_size=32, **SMALL)
    # MHA llama: qkv/fc/gate into norms, dense into v rows, proj into gate rows → nothing kept
    err, qw, qcfg = logits_error(LLAMA_MHA, r)
    assert err < 0.1, err
    assert not any(k.endswith("prequant_scaling_factor") for k in qw) and not qcfg.quantization.pre_quant_scale
    assert not torch.equal(qw["transformer.layers.0.input_layernorm.weight"],
                           LLAMA_MHA[1]["transformer.layers.0.input_layernorm.weight"])
    # GQA llama: dense keeps its scales; GPT-2: dense (MHA) folds, proj (after gelu) keeps
    _, qw, qcfg = logits_error(LLAMA, r)
    assert sorted(k for k in qw if k.endswith("prequant_scaling_factor")) == [
        f"transformer.layers.{i}.attention.dense.prequant_scaling_factor" for i in range(2)]
    assert qcfg.quantization.pre_quant_scale
    err, qw, _ = logits_error(GPT2, r)
    assert sorted(k for k in qw if k.endswith("prequant_scaling_factor")) == [
        f"transformer.layers.{i}.mlp.proj.prequant_scaling_factor" for i in range(2)]
    assert err < 0.1


@pytest.mark.parametrize("per_channel,per_token,algo", [
    (True, True, "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"), (True, False, "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN"),
    (False, True, "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN"), (False, False, "W8A8_SQ_PER_TENSOR_PLUGIN")])
@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_smoothquant_close_to_float(per_channel, per_token, algo, model):
    m = LLAMA if model == "llama" else GPT2
    r = QuantRecipe(smoothquant=0.5, per_channel=per_channel, per_token=per_token, **SMALL)
    err, qw, qcfg = logits_error(m, r)
    print(f"{model} {algo}: {err:.4f}")
    assert err < 0.03, err
    assert qcfg.quantization.quant_algo == algo and qcfg.quantization.smoothquant_val == 0.5
    p = "transformer.layers.1."
    assert qw[p + "attention.qkv.weight"].dtype == torch.int8
    assert qw[p + "attention.qkv.per_channel_scale"].shape == ((m[2].q_dim + 2 * m[2].kv_dim,) if per_channel else (1,))
    assert qw[p + "mlp.fc.act_scale"].shape == (1,)
    assert p + "attention.qkv.prequant_scaling_factor" not in qw  # folded into input_layernorm
    if m[2].gated_mlp and per_channel:  # folded into mlp.gate's per-channel weight scales
        assert p + "mlp.proj.prequant_scaling_factor" not in qw
    else:
        assert qw[p + "mlp.proj.prequant_scaling_factor"].shape == (m[2].intermediate_size,)
    assert qw[p + "attention.dense.prequant_scaling_factor"].shape == (m[2].q_dim,)
    # folding into the norm keeps the checkpoint dtype
    assert qw[p + "input_layernorm.weight"].dtype == m[1][p + "input_layernorm.weight"].dtype


def test_int8_kv_cache_with_weight_only():
    r = QuantRecipe(use_weight_only=True, weight_only_precision="int8", int8_kv_cache=True, **SMALL)
    err, qw, qcfg = logits_error(LLAMA, r)
    assert err < 0.02, err
    assert qcfg.quantization.kv_cache_quant_algo == "INT8"
    s = qw["transformer.layers.0.attention.kv_cache_scaling_factor"]
    assert s.shape == (2,) and s.dtype == torch.float32 and torch.all(s > 0)
    # scales are max|K| / 127 and max|V| / 127 over the calibration samples (K after rotary)
    _, w, cfg = LLAMA
    amax = {}
    samples = make_calib_samples(CALIB, TOK, 8, 32)
    ReferenceModel(w, cfg)(samples, kv_hook=lambda i, k, v: amax.setdefault(i, (k.abs().max(), v.abs().max())))
    torch.testing.assert_close(s, torch.stack(amax[0]) / 127)


def test_kv_cache_only_and_gptq_with_kv():
    _, qw, qcfg = logits_error(LLAMA, QuantRecipe(int8_kv_cache=True, **SMALL))
    assert qcfg.quantization.quant_algo is None and qcfg.quantization.kv_cache_quant_algo == "INT8"
    assert qw["transformer.layers.0.mlp.fc.weight"].dtype == torch.float32
    r = QuantRecipe(use_weight_only=True, weight_only_precision="int4_gptq", per_group=True, group_size=32,
                    gptq_act_order=True, int8_kv_cache=True, **SMALL)
    err, qw, qcfg = logits_error(LLAMA, r)
    assert "transformer.layers.1.attention.kv_cache_scaling_factor" in qw and err < 0.1


def test_dequantize_linear_round_trip_through_checkpoint():
    r = QuantRecipe(use_weight_only=True, weight_only_precision="int8")
    _, w, cfg = LLAMA
    qw, qcfg = quantize_checkpoint(w, cfg, r, progress=False)
    for name in linear_names(cfg):
        d = dequantize_linear(qw, name, qcfg)
        torch.testing.assert_close(d, w[name + ".weight"], atol=0.01 * float(w[name + ".weight"].abs().max()), rtol=0)


def test_noop_recipe_returns_the_checkpoint():
    _, w, cfg = LLAMA
    qw, qcfg = quantize_checkpoint(w, cfg, QuantRecipe(), progress=False)
    assert qw == w and qcfg is cfg


# -- flags -------------------------------------------------------------------------------------
def _parse(argv):
    return recipe_from_args(add_quant_args(argparse.ArgumentParser()).parse_args(argv))


def test_trtllm_flags_build_the_recipe(tmp_path):
    f = tmp_path / "calib.jsonl"
    f.write_text('{"text": "hello"}\n')
    r = _parse(f"--use_weight_only --weight_only_precision int4_awq --per_group --group_size 64 "
               f"--int8_kv_cache --calib_size 16 --calib_max_seq_length 256 --calib_dataset {f}".split())
    assert (r.method, r.quant_algo, r.effective_group_size, r.int8_kv_cache, r.calib_size, r.calib_dataset) == (
        "awq", "W4A16_AWQ", 64, True, 16, str(f))
    r = _parse(f"--smoothquant 0.8 --per_token --per_channel --calib_dataset {f}".split())
    assert r.quant_algo == "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN" and r.smoothquant == 0.8
    assert _parse(["-sq", "0.5", "--calib_dataset", str(f)]).quant_algo == "W8A8_SQ_PER_TENSOR_PLUGIN"
    assert _parse(["--use_weight_only", "--weight_only_precision", "int4"]).method == "rtn"  # no calibration
    assert _parse([]).is_noop


@pytest.mark.parametrize("argv,match", [
    ("--use_weight_only --weight_only_precision int3", r"--weight_only_precision 'int3' is not one of int8, int4"),
    ("--smoothquant 1.5", r"--smoothquant 1.5: alpha must be in \[0, 1\]"),
    ("--smoothquant -0.1", r"alpha must be in \[0, 1\]"),
    ("--smoothquant nan", r"alpha must be in \[0, 1\]"),
    ("--use_weight_only --smoothquant 0.5", "cannot be combined"),
    ("--use_weight_only --per_group --group_size 48", r"--group_size 48 is not one of"),
    ("--per_channel", "--smoothquant"),
    ("--per_group", "--use_weight_only"),
    ("--use_weight_only --gptq_act_order", "int4_gptq"),
    ("--use_weight_only --weight_only_precision int4 --calib_plain_gram", "int4_gptq or int4_awq"),
    ("--use_weight_only --weight_only_precision int4_gptq --awq_linear_objective", "applies to .* int4_awq"),
    ("--int8_kv_cache --calib_size 0", "--calib_size 0"),
    ("--use_weight_only --weight_only_precision int4_gptq", "--weight_only_precision int4_gptq needs calibration"),
    ("--smoothquant 0.5", "--smoothquant needs calibration text: pass --calib_dataset PATH"),
    ("--int8_kv_cache --calib_dataset /nonexistent/c.txt", r"--calib_dataset /nonexistent/c\.txt: no such file"),
])
def test_bad_flags_are_clear_errors(argv, match):
    with pytest.raises(TrtbuildError, match=match):
        _parse(argv.split())


def test_group_size_larger_than_a_dimension_names_the_tensor():
    _, w, cfg = tiny_llama(hidden=96, heads=4, kv_heads=2, inter=256, layers=1)
    r = QuantRecipe(use_weight_only=True, weight_only_precision="int4", per_group=True, group_size=128)
    with pytest.raises(TrtbuildError, match=r"--group_size 128 is larger than the input dimension 96 of "
                                            r"transformer\.layers\.0\.attention\.qkv\.weight"):
        quantize_checkpoint(w, cfg, r, progress=False)


@pytest.mark.parametrize("method", ["int4", "int4_gptq", "int4_awq"])
def test_group_size_not_dividing_a_dimension_makes_a_partial_last_group(method):
    """in=96 at group 64: groups of 64 and 32, as AutoGPTQ stores them (SmolLM2's 576 at 128 likewise)."""
    from trtbuild.quantization.layout import dequantize_linear

    _, w, cfg = tiny_llama(hidden=96, heads=4, kv_heads=2, inter=256, layers=1)
    r = QuantRecipe(use_weight_only=True, weight_only_precision=method, per_group=True, group_size=64)
    r = dataclasses.replace(r, **SMALL)
    out, qcfg = quantize_checkpoint(w, cfg, r, calib_texts=CALIB, tokenizer=TOK, progress=False)
    name = "transformer.layers.0.attention.qkv"
    assert tuple(out[name + ".weights_scaling_factor"].shape) == (w[name + ".weight"].shape[0], 2)
    wf = dequantize_linear(out, name, qcfg, apply_prequant=True)
    norm = "transformer.layers.0.input_layernorm.weight"
    wf = wf * (out[norm].float() / w[norm].float())  # AWQ folds 1/s into the norm before qkv
    rel = (wf - w[name + ".weight"]).norm() / w[name + ".weight"].norm()
    assert rel < 0.2, f"{method}: relative weight error {rel:.3f}"


@pytest.mark.parametrize("prec", ["int4_gptq", "int4_awq"])
def test_calibrated_recipes_need_calibration_text(prec):
    _, w, cfg = LLAMA
    r = QuantRecipe(use_weight_only=True, weight_only_precision=prec)
    with pytest.raises(TrtbuildError, match=rf"--weight_only_precision {prec} needs calibration text: pass --calib_dataset"):
        quantize_checkpoint(w, cfg, r, progress=False)
    with pytest.raises(TrtbuildError, match="tokenizer"):
        quantize_checkpoint(w, cfg, r, calib_texts=CALIB, progress=False)
    for r2, what in ((QuantRecipe(smoothquant=0.5), "--smoothquant"), (QuantRecipe(int8_kv_cache=True), "--int8_kv_cache")):
        with pytest.raises(TrtbuildError, match=f"{what} needs calibration text"):
            quantize_checkpoint(w, cfg, r2, tokenizer=TOK, progress=False)


def test_already_quantized_checkpoint_is_refused():
    _, w, cfg = LLAMA
    qw, qcfg = quantize_checkpoint(w, cfg, QuantRecipe(use_weight_only=True), progress=False)
    with pytest.raises(TrtbuildError, match="already quantized"):
        quantize_checkpoint(qw, qcfg, QuantRecipe(use_weight_only=True), progress=False)
    with pytest.raises(TrtbuildError, match=r"transformer\.layers\.0\.attention\.qkv\.weight is torch\.uint8"):
        quantize_checkpoint(qw, cfg, QuantRecipe(use_weight_only=True), progress=False)


# -- calibration input ---------------------------------------------------------------------------
def test_calibration_file_formats(tmp_path):
    (tmp_path / "a.txt").write_text("one two\nthree\n")
    assert read_calib_texts(tmp_path / "a.txt") == ["one two\nthree\n"]
    (tmp_path / "b.jsonl").write_text('{"id": "x1", "article": "long article text", "n": 3}\n\n{"id": "x2", "article": "more"}\n')
    assert read_calib_texts(tmp_path / "b.jsonl") == ["long article text", "more"]
    (tmp_path / "c.jsonl").write_text('{"title": "a much longer title", "text": "t1"}\n')
    assert read_calib_texts(tmp_path / "c.jsonl") == ["t1"]
    (tmp_path / "d.json").write_text(json.dumps(["s1", "s2"]))
    assert read_calib_texts(tmp_path / "d.json") == ["s1", "s2"]
    (tmp_path / "e.json").write_text(json.dumps({"text": ["s1", "", "s3"], "label": [1, 2, 3]}))
    assert read_calib_texts(tmp_path / "e.json") == ["s1", "s3"]
    (tmp_path / "f.json").write_text(json.dumps([{"text": "r1"}, {"text": "r2"}]))
    assert read_calib_texts(tmp_path / "f.json") == ["r1", "r2"]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"id": ["a", "b"], "content": ["first doc", "second doc"]}), tmp_path / "g.parquet")
    assert read_calib_texts(tmp_path / "g.parquet") == ["first doc", "second doc"]


@pytest.mark.parametrize("name,content,match", [
    ("missing.txt", None, r"--calib_dataset .*missing\.txt: no such file"),
    ("empty.txt", "  \n\n", r"--calib_dataset .*empty\.txt: holds no text"),
    ("empty.jsonl", "", r"empty\.jsonl: holds no text"),
    ("bad.jsonl", '{"text": "a"}\n{oops\n', r"bad\.jsonl: line 2 is not JSON"),
    ("nums.json", "[1, 2]", r"nums\.json: expected a list of strings or of JSON objects"),
    ("data.csv", "a,b\n", r"data\.csv: unknown format '\.csv'"),
])
def test_bad_calibration_files_name_the_file(tmp_path, name, content, match):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(TrtbuildError, match=match):
        read_calib_texts(tmp_path / name)


def test_quantize_checkpoint_reads_calib_dataset_path(tmp_path):
    _, w, cfg = LLAMA
    (tmp_path / "c.txt").write_text("\n".join(CALIB))
    r = QuantRecipe(int8_kv_cache=True, calib_size=2, calib_max_seq_length=16)
    qw, _ = quantize_checkpoint(w, cfg, r, calib_texts=tmp_path / "c.txt", tokenizer=TOK, progress=False)
    assert "transformer.layers.0.attention.kv_cache_scaling_factor" in qw
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(TrtbuildError, match=r"e\.txt: holds no text"):
        quantize_checkpoint(w, cfg, r, calib_texts=str(tmp_path / "e.txt"), tokenizer=TOK, progress=False)


def test_samples_shape_and_short_text(caplog):
    s = make_calib_samples(CALIB, TOK, 4, 16)
    assert s.shape == (4, 16) and s.dtype == torch.long
    s = make_calib_samples(["the river"], TOK, 4, 64)
    assert s.shape[0] == 1 and s.shape[1] < 64
    with pytest.raises(TrtbuildError, match="vocab_size"):
        make_calib_samples(CALIB, TOK, 2, 16, vocab_size=10)

"""Accuracy gates of every quantization recipe on the default real model (SmolLM2-135M-Instruct).

Calibrate on the first 200k characters of ppl.txt, measure perplexity on three texts
(evaluate.recipes.eval_texts: two Wikipedia slices past the calibration one, scientific abstracts;
8192 tokens each, windows of 512): on every text, W8A16 (either activations) and INT8 KV within 1%
of the fp32 engine, SmoothQuant W8A8 within 3%, GPTQ and AWQ int4 strictly better than RTN int4 per
channel and at group size 128 (group 32 would prove nothing: the model's weights were Q4_1 in
blocks of 32), an int4 lm_head within 15% of the same int4 recipe's with its int8 one; and every
recipe generates fluent greedy text.
"""

from __future__ import annotations

import collections
import shutil

import pytest

from trtbuild.evaluate.recipes import CALIB_CHARS, RECIPES, eval_texts, evaluate_recipe, markdown_table
from trtbuild.runtime import ModelRunner, SamplingConfig
from trtbuild.runtime.chat import apply_chat_template

from conftest import PPL_TEXT

pytestmark = pytest.mark.slow

EVAL_TOKENS = 8192
TEXTS = eval_texts(PPL_TEXT.parent)
MIN_DISTINCT = 0.3
QUESTIONS = ["What is the capital of France?", "Give me three tips for staying healthy.",
             "Explain what a black hole is in two sentences.", "Write a short poem about the sea.",
             "What is photosynthesis?", "How do I make a cup of tea?", "Why is the sky blue?",
             "Name three primary colors."]
# Of the 8 questions, how many may collapse (alone or in a batch): none at fp32; 8-bit recipes
# (within 3% perplexity) collapsed on 0-2 here (SmoothQuant: France, primary colors), int4 recipes
# (+30-127% perplexity) on 1-4 (RTN per channel 4). An engine whose generation path is broken
# collapses on all of them; the perplexity gates above judge the recipes' accuracy.
MAX_COLLAPSED_QUESTIONS = {"fp32": 0, "8-bit": 3, "int4": 5}


def answers(engine_dir) -> dict:
    """The eight questions' greedy answers (token ids and text), in batches and each alone."""
    runner = ModelRunner.from_dir(engine_dir)
    prompts = [runner.tokenizer.encode(apply_chat_template(engine_dir / "tokenizer",
                                                           [{"role": "user", "content": q}])).ids
               for q in QUESTIONS]
    sampling = SamplingConfig(max_new_tokens=48, end_id=2)
    batch = runner.config.build_config.max_batch_size
    batched = [ids for i in range(0, len(prompts), batch)
               for ids in runner.generate(prompts[i:i + batch], sampling).output_ids]
    alone = [runner.generate([p], sampling).output_ids[0] for p in prompts]
    return {where: [(ids, runner.tokenizer.decode(ids)) for ids in got]
            for where, got in (("in a batch", batched), ("alone", alone))}


def measure(ckpt, root, names):
    """Each recipe's engine is built, measured, asked the questions and deleted (one at a time on disk)."""
    calib = root / "calib.txt"
    calib.write_text(PPL_TEXT.read_text()[:CALIB_CHARS])
    out, answered = {}, {}
    for name in names:
        out[name] = evaluate_recipe(name, ckpt, root, TEXTS, calib, EVAL_TOKENS)
        answered[name] = answers(root / name)
        shutil.rmtree(root / name)
    print("\n" + markdown_table(list(out.values())))
    return answered, out


@pytest.fixture(scope="module")
def results(real_model_dir, engines, module_tmp):
    """Every recipe measured once (GPTQ calibrates ~3 min, AWQ ~8 min on one thread). Calibration
    runs on one torch thread whatever the other test modules set: per-channel int4 is so close to
    the edge that float summation order decides GPTQ's fluency (calibrated on 2 threads, ppl 34.06,
    it answers the second question "1. 1. 1. ..."; on one, 34.32, it answers)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return measure(engines.checkpoint(real_model_dir), module_tmp, list(RECIPES))
    finally:
        torch.set_num_threads(threads)


def ppl(results, name, text):
    return results[1][name].perplexity[text.name]


@pytest.mark.parametrize("text", TEXTS, ids=[t.name for t in TEXTS])
def test_int8_recipes_within_1_percent(results, text):
    base = ppl(results, "fp32", text)
    for name in ("w8a16", "w8a16_float_act", "int8_kv"):
        got = ppl(results, name, text)
        assert got <= base * 1.01, f"{name} on {text.name}: {got:.4f} vs fp32 {base:.4f}"


@pytest.mark.parametrize("text", TEXTS, ids=[t.name for t in TEXTS])
def test_smoothquant_within_3_percent(results, text):
    base, got = ppl(results, "fp32", text), ppl(results, "sq_w8a8", text)
    assert got <= base * 1.03, f"sq_w8a8 on {text.name}: {got:.4f} vs fp32 {base:.4f}"


@pytest.mark.parametrize("text", TEXTS, ids=[t.name for t in TEXTS])
def test_int4_lm_head_within_15_percent_of_int8(results, text):
    """--lm_head_precision int4 halves the bytes a decode step reads for lm_head; its cost over the
    same int4 g128 recipe with an int8 lm_head measured +12.2 / +12.8 / +12.5% (Intel Xeon)."""
    base, got = ppl(results, "rtn_int4_g128", text), ppl(results, "rtn_int4_g128_int4_lm_head", text)
    assert base < got <= base * 1.15, f"int4 lm_head on {text.name}: {got:.4f} vs int8 lm_head {base:.4f}"


@pytest.mark.parametrize("text", TEXTS, ids=[t.name for t in TEXTS])
@pytest.mark.parametrize("suffix", ["", "_g128"])
def test_gptq_and_awq_beat_rtn(results, suffix, text):
    rtn = ppl(results, "rtn_int4" + suffix, text)
    for method in ("gptq", "awq"):
        name = f"{method}_int4{suffix}"
        got = ppl(results, name, text)
        assert got < rtn, f"{name} on {text.name}: {got:.4f} not below RTN {rtn:.4f}"


# Per-channel int4 is at the edge of what a 135M model survives (+60-100% perplexity for every
# method): AWQ judging its scales on each linear's output alone collapsed the second answer into
# "1. **1. **..."; judged on the attention's and the MLP's output (AutoAWQ's way) it answers.
def collapse(ids: list[int]) -> str | None:
    """Why an answer is not fluent text (too short, a repeated 4-gram, a few tokens reused), or None."""
    if len(ids) < 5:
        return "too short"
    grams = collections.Counter(tuple(ids[i:i + 4]) for i in range(len(ids) - 3))
    if grams and grams.most_common(1)[0][1] > 3:
        return "repeats itself"
    # A collapse need not repeat a 4-gram ("1. 1. 1. 2. 2. 3. 3. ..."), but it reuses a few tokens:
    # answers that read as text use 0.38-1.0 distinct tokens per token here, collapses 0.06-0.21.
    if len(ids) >= 16 and len(set(ids)) / len(ids) < MIN_DISTINCT:
        return "collapsed onto a few tokens"
    return None


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_generates_fluent_text(results, name):
    """Eight questions, each alone and in batches of four: sixteen greedy answers. MatMulNBits
    computes a batch's rows in tiles whose results differ from a lone row's by ~1e-5; through 30
    layers of int8-quantized activations an int4 engine of this 135M model, at the edge of fluency,
    turns that into logits 1.3 apart and single answers flipped both ways; SmoothQuant's first
    token for France is "L" 0.16 above "The" (its float reference model agrees), then it loops. A
    question collapses if either of its answers does; a recipe fails if more than
    MAX_COLLAPSED_QUESTIONS of its kind do."""
    got = results[0][name]  # answers(): asked while the engine was there
    collapsed = {}
    for i, q in enumerate(QUESTIONS):
        whys = [f"{where}: {why}: {text!r}" for where in ("in a batch", "alone")
                for ids, text in [got[where][i]] if (why := collapse(ids))]
        if whys:
            collapsed[q] = whys
    report = f"{name}: " + "\n".join(f"{q!r} {w}" for q, whys in collapsed.items() for w in whys)
    kind = "fp32" if name == "fp32" else "int4" if "int4" in name else "8-bit"
    assert len(collapsed) <= MAX_COLLAPSED_QUESTIONS[kind], report
    if name == "fp32":
        assert "Paris" in got["in a batch"][0][1]

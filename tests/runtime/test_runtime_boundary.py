"""The runtime's boundary: loading and running an engine dir imports onnxruntime, numpy and
tokenizers, never the build side (onnx, torch, transformers, trtbuild's network writer and
plugins); the names of the engine's inputs and outputs are defined once, in trtbuild.engine_io,
and read from there by both sides; the two KV cache layouts run behind one interface."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trtbuild.engine import BuildConfig, PluginConfig
from trtbuild.errors import TrtbuildError
from trtbuild.runtime import InflightBatcher, ModelRunner, SamplingConfig

from conftest import REPO

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [100, 101, 102, 103, 104]]
NEW_TOKENS = 4
# modules (and their submodules) a process that only runs engines must never import
BUILD_SIDE = ("onnx", "torch", "transformers", "trtbuild.plugins", "trtbuild.network", "trtbuild.onnx_graph",
              "trtbuild.builder", "trtbuild.cpu_forms", "trtbuild.quantization", "trtbuild.convert")


@pytest.fixture(scope="module")
def layouts(tiny_models, engines) -> dict[str, Path]:
    """The tiny llama as: the attention plugin's shared KV buffer with the prompt kernel ("fused"),
    standard attention with the concatenated KV ("standard"), and a W8A8 per-token engine (trtbuild's
    quantize kernels, its u8 x s8 / u8 x u8 forms; calibrated on conftest's calib_file, 4 samples of
    64 tokens, the factory's)."""
    out = {}
    for name, quant, attention in (("fused", [], "auto"), ("standard", [], "disable"),
                                   ("w8a8", ["--smoothquant", "0.5", "--per_channel", "--per_token"], "auto")):
        out[name] = engines.engine(tiny_models["llama"], BuildConfig(
            max_batch_size=4, max_input_len=32, max_seq_len=64,
            plugin_config=PluginConfig(gpt_attention_plugin=attention, norm_plugin=attention)), quant=quant)
    return out


def test_running_engines_imports_nothing_of_the_build_side(layouts, tmp_path):
    """A fresh process loads each engine, generates (the static loop, the in-flight scheduler and the
    batcher's thread), scores and tokenizes; then none of the build side is in sys.modules. Its
    tokens and scores are the ones this process gets."""
    script = f"""
import json, sys
import numpy as np
from trtbuild.runtime import InflightBatcher, ModelRunner, SamplingConfig
results = {{}}
for name, engine_dir in {json.dumps({k: str(v) for k, v in layouts.items()})}.items():
    r = ModelRunner.from_dir(engine_dir, num_threads=1)
    prompts = {PROMPTS!r} + [r.tokenizer.encode("The cat sat on the mat").ids]
    out = r.generate(prompts, SamplingConfig(max_new_tokens={NEW_TOKENS})).output_ids
    batched = None
    if r.shared_cache:
        batcher = InflightBatcher(r)
        handles = [batcher.submit(p, SamplingConfig(max_new_tokens={NEW_TOKENS})) for p in prompts]
        batched = [h.result(timeout=60) for h in handles]
        batcher.shutdown()
    np.save({str(tmp_path)!r} + f"/{{name}}.npy", r.score(prompts))
    results[name] = {{"prompts": prompts, "generated": out, "batched": batched,
                     "text": r.tokenizer.decode(out[-1])}}
print(json.dumps(results))
BUILD_SIDE = {BUILD_SIDE!r}
loaded = sorted(m for m, v in sys.modules.items()
                if v is not None and any(m == b or m.startswith(b + ".") for b in BUILD_SIDE))
assert not loaded, f"running engines imported {{loaded}}"
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=600, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, engine_dir in layouts.items():
        runner = ModelRunner.from_dir(engine_dir, num_threads=1)
        got = results[name]
        assert all(len(o) == NEW_TOKENS for o in got["generated"])
        assert got["generated"] == runner.generate(got["prompts"], SamplingConfig(max_new_tokens=NEW_TOKENS)).output_ids
        if runner.shared_cache:
            assert got["batched"] == got["generated"]
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.npy"), runner.score(got["prompts"]), atol=1e-4, rtol=0)


def test_the_runtime_package_imports_no_build_side_module():
    """What `python -X importtime -c "import trtbuild.runtime ..."` lists: no build-side module."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c",
                           "import trtbuild.runtime, trtbuild.runtime.lora, trtbuild.runtime.cpu_forms, "
                           "trtbuild.runtime.kv_cache, trtbuild.tokenizer, trtbuild.serving"],
                          cwd=REPO, timeout=120, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    bad = sorted(m for m in imported if any(m == b or m.startswith(b + ".") for b in BUILD_SIDE))
    assert not bad, bad


def test_engine_io_names_are_literals_nowhere_else():
    """Every engine input / output name the runtime binds is spelled once, in trtbuild.engine_io:
    the runtime and the network writer import it from there (a name may still be a dim of a shape,
    e.g. attention_mask's ["batch_size", "total_sequence_length"])."""
    import trtbuild.engine_io as io

    names = {v for k, v in vars(io).items() if k.isupper() and isinstance(v, str)} - {
        io.PROBE_DIR, io.U8S8_GEMM_PROBE, io.U8S8_PROBE_INPUT, io.PROBE_QKV, io.LORA_DIR, io.LORA_MANIFEST}
    assert {"input_ids", "position_ids", "logits_positions", "logits", "attention_mask", "seqlens_k",
            "total_sequence_length", "use_context_fmha", "lora_task_ids"} <= names
    files = [*sorted((REPO / "trtbuild" / "runtime").glob("*.py")), REPO / "trtbuild" / "network.py",
             REPO / "plugins" / "attention.py", REPO / "plugins" / "lora.py"]
    for f in files:
        tree = ast.parse(f.read_text())
        dims = {id(e) for node in ast.walk(tree) if isinstance(node, ast.List) for e in node.elts} | {
            id(e) for node in ast.walk(tree) if isinstance(node, ast.IfExp) for e in (node.body, node.orelse)}
        literals = [(node.lineno, node.value) for node in ast.walk(tree)
                    if isinstance(node, ast.Constant) and node.value in names and id(node) not in dims]
        assert not literals, f"{f.relative_to(REPO)}: engine I/O names spelled out (line, name): {literals}"
        if f.parent.name == "runtime":  # at import time (tensorrt_session may use torch.cuda on a GPU, lazily)
            imported = {a.name for node in tree.body if isinstance(node, ast.Import) for a in node.names} | {
                node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
            assert not {m for m in imported if any(m == b or m.startswith(b + ".") for b in BUILD_SIDE)}, f


def test_both_cache_layouts_run_through_one_step(layouts):
    """ModelRunner.step over either layout: a prefill then decode steps, each layout's cache bound by
    the cache itself, give the logits score gives for the whole sequence."""
    for name in ("fused", "standard"):
        runner = ModelRunner.from_dir(layouts[name], num_threads=1)
        prompts = PROMPTS[:2]
        lengths = np.array([len(p) for p in prompts], np.int64)
        cache = runner.kv_cache.for_call()
        assert (cache is runner.kv_cache) == runner.shared_cache
        logits = runner.prefill(prompts, cache=cache)
        seqs = [list(p) for p in prompts]
        for _ in range(3):
            nxt = logits[:, 0].argmax(-1)
            for s, t in zip(seqs, nxt):
                s.append(int(t))
            logits = runner.step(nxt[:, None].astype(np.int64), lengths[:, None].copy(),
                                 np.zeros((len(prompts), 1), np.int64), lengths + 1, cache=cache)
            lengths = lengths + 1
        full = runner.score(seqs)
        for b, s in enumerate(seqs):
            np.testing.assert_allclose(logits[b, 0], full[b, len(s) - 1], atol=1e-4, rtol=0, err_msg=name)


def test_the_batcher_refuses_a_concatenated_cache(layouts):
    with pytest.raises(TrtbuildError, match="shared KV"):
        InflightBatcher(ModelRunner.from_dir(layouts["standard"], num_threads=1))

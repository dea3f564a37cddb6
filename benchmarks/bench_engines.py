#!/usr/bin/env python
"""Decode and prefill speed of trtbuild engines beside the engines a user would run instead.

One run measures, with the same threads and the same prompts:
  - decode tokens/s at batch 1 and batch B (default 8): N new tokens (default 128) forced after a
    P-token prompt (default 32), timed from the call that receives the prompts to the last token;
  - prefill tokens/s: one prompt of L tokens (default 512), time to the first token's logits (each round:
    the engines take turns, 3 prefills each, 0.1 s apart; the best of an engine's 3);
for our engines (the fp32 engine of --model_dir, built and cached if not given, and any
`--engine NAME=DIR`), transformers (fp32, eager attention: the base line), onnxruntime-genai
(fp32 and int4 through its model builder) and llama.cpp through llama-cpp-python (f32, q8_0,
q4_0). Peers that are not installed are skipped with the pip command that installs them.

Engines are loaded once and measured in turns (round r measures every engine, then round r+1),
and the memory read bandwidth is measured in every round too, so that a host whose speed drifts
(shared machines) moves every column alike. Each figure is the median over --repeats rounds.

The roofline of an engine is read bandwidth / bytes of weights read per generated token: every
weight that a token's forward pass reads (the embedding table only when it is also the lm_head).

Every fp32 engine must give the same greedy tokens as transformers for the batch-1 prompt; the
script says so for each, and exits with 3 when one does not.

    python benchmarks/bench_engines.py                       # default model, all peers
    python benchmarks/bench_engines.py --quick --json out.json
    python benchmarks/bench_engines.py --engine int4=/path/to/engine --peers transformers
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

# OpenMP runtimes (torch's, llama.cpp's) spin-wait at every barrier by default; on a 2-core host
# that other jobs share, that makes them 5-10x slower than with passive waiting (measured here:
# transformers 2 vs 12 tok/s). Set before torch or llama_cpp load their OpenMP runtime; an
# OMP_WAIT_POLICY in the environment wins. onnxruntime has its own thread pool (not affected).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from trtbuild.kernels import cpu_description  # noqa: E402

DEFAULT_MODEL = "smollm2-135m-instruct"
ALL_PEERS = ("transformers", "ortgenai", "llamacpp")
ORT_GENAI_VERSION = "0.18.0"
LLAMA_CPP_VERSION = "0.3.36"
INSTALL = {
    "transformers": "pip install transformers torch==2.13.0 (the project's own install has both)",
    "ortgenai": f"pip install onnxruntime-genai=={ORT_GENAI_VERSION} onnx-ir",
    "llamacpp": (f'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python=={LLAMA_CPP_VERSION} '
                 "gguf sentencepiece   # builds from source, ~10 min on 2 cores"),
}
SHARED_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ppl.txt"


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def dir_bytes(path: Path, skip: tuple[str, ...] = ()) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not any(s in f.parts for s in skip))


# ------------------------------------------------------------------------------------------ bandwidth

def read_bandwidth(threads: int, nbytes: int = 1 << 30, passes: int = 3) -> float:
    """Bytes/s of a streaming read of a large float32 array, split across `threads` threads.

    numpy's reductions release the GIL, so the threads read their slices in parallel. Best pass
    of `passes` (the first touches the pages in; the others are what a read can reach now).
    """
    a = _bandwidth_array(nbytes)
    parts = np.array_split(a, threads)
    best = 0.0
    for _ in range(passes):
        barrier = threading.Barrier(threads + 1)

        def work(x):
            barrier.wait()
            np.add.reduce(x)

        ts = [threading.Thread(target=work, args=(p,)) for p in parts]
        for t in ts:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in ts:
            t.join()
        best = max(best, a.nbytes / (time.perf_counter() - start))
    return best


_ARRAY: dict[int, np.ndarray] = {}


def _bandwidth_array(nbytes: int) -> np.ndarray:
    if nbytes not in _ARRAY:
        _ARRAY[nbytes] = np.ones(nbytes // 4, np.float32)
    return _ARRAY[nbytes]


# ------------------------------------------------------------------------------------------ prompts

PREFILLS_PER_ROUND = 3
# Before each timed prefill: the engine measured just before keeps its worker threads spinning for a
# while after its call, and on 2 cores they take a core from the next one (-10..-30% measured).
PREFILL_PAUSE_S = 0.1


def make_prompts(tokenizer_file: Path | None, vocab_size: int, batch: int, prompt_len: int, prefill_len: int,
                 seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """`batch` different prompts of exactly prompt_len tokens and one of prefill_len tokens, cut from
    real text (../shared/data/ppl.txt) when it and a tokenizer are there, else random ids."""
    need = batch * prompt_len + prefill_len
    ids: list[int] = []
    if tokenizer_file is not None and tokenizer_file.is_file() and SHARED_TEXT.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_file))
        text = SHARED_TEXT.read_text(encoding="utf-8", errors="replace")
        start = len(text) // 3  # away from the file's title lines
        while len(ids) < need and start < len(text):
            ids += tok.encode(text[start:start + 20000], add_special_tokens=False).ids
            start += 20000
        ids = [i for i in ids if i < vocab_size]
    if len(ids) < need:
        rng = np.random.default_rng(seed)
        ids = rng.integers(min(16, vocab_size - 1), vocab_size, need).tolist()
    prompts = [ids[i * prompt_len:(i + 1) * prompt_len] for i in range(batch)]
    return prompts, ids[batch * prompt_len:need]


# ------------------------------------------------------------------------------------------ engines

class Engine:
    """One thing to measure. Subclasses load in __init__ and implement generate() and prefill()."""

    kind = "?"
    name = "?"
    precision = "?"
    disk_bytes = 0
    weight_bytes = 0  # read per generated token

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        raise NotImplementedError

    def prefill(self, prompt: list[int]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def onnx_weight_bytes(onnx_path: Path) -> int:
    """Bytes of an ONNX model's initializers that a decode step reads: all but those used only by
    Gather ops (an embedding table is gathered, one row per token, unless it is also the lm_head)."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    graphs = [m.graph]
    while graphs:
        g = graphs.pop()
        for n in g.node:
            for x in n.input:
                consumers.setdefault(x, set()).add(n.op_type)
            for a in n.attribute:
                graphs += [a.g] if a.HasField("g") else []
                graphs += list(a.graphs)
    total = 0
    for init in m.graph.initializer:
        ops = consumers.get(init.name, set())
        if ops and all(op.startswith("Gather") for op in ops):
            continue
        ext = {e.key: e.value for e in init.external_data}
        if "length" in ext:
            total += int(ext["length"])
        elif init.raw_data:
            total += len(init.raw_data)
        else:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
            total += int(np.prod(init.dims, dtype=np.int64)) * itemsize
    return total


class TrtbuildEngine(Engine):
    kind = "trtbuild"

    def __init__(self, name: str, engine_dir: Path, threads: int):
        from trtbuild.engine import load_engine_config
        from trtbuild.runtime import ModelRunner, SamplingConfig

        self._sampling = SamplingConfig
        self.engine_dir = engine_dir
        config = load_engine_config(engine_dir)
        pc = config.pretrained_config
        q = pc.quantization
        parts = [q.quant_algo] if q.quant_algo else [config.build_config.compute_dtype.replace("float", "fp")]
        if q.kv_cache_quant_algo:
            parts.append(f"{q.kv_cache_quant_algo} KV")
        self.name, self.precision = name, " + ".join(parts)
        self.fp32 = not q.quant_algo and not q.kv_cache_quant_algo and config.build_config.compute_dtype == "float32"
        self.runner = ModelRunner.from_dir(engine_dir, num_threads=threads)
        self.max_batch_size = config.build_config.max_batch_size
        self.max_input_len = config.build_config.max_input_len
        self.max_seq_len = config.build_config.max_seq_len
        self.vocab_size = pc.vocab_size
        self.disk_bytes = dir_bytes(engine_dir, skip=("tokenizer",))
        self.weight_bytes = onnx_weight_bytes(engine_dir / "rank0.engine")

    def generate(self, prompts, new_tokens):
        out = self.runner.generate(prompts, self._sampling(max_new_tokens=new_tokens, end_id=None))
        return out.output_ids

    def prefill(self, prompt):
        self.runner.prefill([prompt])


class TransformersEngine(Engine):
    kind = "transformers"

    def __init__(self, model_dir: Path, threads: int):
        import torch
        import transformers as tf

        torch.set_num_threads(threads)
        self.torch = torch
        self.name, self.precision = f"transformers {tf.__version__} (eager)", "fp32"
        self.fp32 = True
        self.model = tf.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                             attn_implementation="eager").eval()
        gc_ = self.model.generation_config
        gc_.eos_token_id = None  # greedy argmax for every step, as the other engines do
        gc_.pad_token_id = gc_.pad_token_id if gc_.pad_token_id is not None else 0
        self.disk_bytes = sum(f.stat().st_size for f in model_dir.iterdir()
                              if f.suffix in (".safetensors", ".bin") and f.is_file())
        emb, out = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        tied = out is not None and out.weight.data_ptr() == emb.weight.data_ptr()
        seen, total = set(), 0
        for _, p in self.model.named_parameters(remove_duplicate=False):
            if p.data_ptr() in seen or (p is emb.weight and not tied):
                continue
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
        self.weight_bytes = total

    def generate(self, prompts, new_tokens):
        t = self.torch
        ids = t.tensor(prompts, dtype=t.long)
        with t.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=t.ones_like(ids), do_sample=False,
                                      max_new_tokens=new_tokens)
        return out[:, ids.shape[1]:].tolist()

    def prefill(self, prompt):
        t = self.torch
        with t.inference_mode():
            self.model(input_ids=t.tensor([prompt]), use_cache=True, logits_to_keep=1)


def peers_dir(cache_dir: Path) -> Path:
    d = cache_dir / "peers"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _run_logged(cmd: list[str], logfile: Path, cwd: Path | None = None) -> None:
    log(f"running {' '.join(cmd)}  (log: {logfile})")
    with open(logfile, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd)
    if r.returncode != 0:
        tail = logfile.read_text(errors="replace").splitlines()[-5:]
        raise RuntimeError(f"{cmd[0]} ... failed (exit {r.returncode}); see {logfile}:\n  " + "\n  ".join(tail))


def build_ortgenai_model(model_dir: Path, precision: str, cache_dir: Path) -> Path:
    """onnxruntime-genai's model builder output for model_dir, cached (built atomically)."""
    import shutil

    out = peers_dir(cache_dir) / f"ortgenai-{model_dir.name}-{precision}"
    if (out / "genai_config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _run_logged([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(tmp),
                 "-p", precision, "-e", "cpu", "-c", str(peers_dir(cache_dir) / "ortgenai-cache")],
                peers_dir(cache_dir) / f"ortgenai_build_{model_dir.name}_{precision}.log",
                cwd=peers_dir(cache_dir))  # not the checkout: its quantization/ would shadow the builder's
    tmp.rename(out)
    return out


class OrtGenaiEngine(Engine):
    kind = "ortgenai"

    def __init__(self, model_dir: Path, precision: str, threads: int, cache_dir: Path):
        import onnxruntime_genai as og

        self.og = og
        path = build_ortgenai_model(model_dir, precision, cache_dir)
        self.name, self.precision = f"onnxruntime-genai {og.__version__}", precision
        self.fp32 = precision == "fp32"
        config = og.Config(str(path))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        onnx_files = [f for f in path.iterdir() if ".onnx" in f.name]
        self.disk_bytes = sum(f.stat().st_size for f in onnx_files)
        self.weight_bytes = sum(onnx_weight_bytes(f) for f in onnx_files if f.name.endswith(".onnx"))

    def _generator(self, batch: int, max_length: int, min_length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, min_length=min_length, batch_size=batch, do_sample=False)
        return self.og.Generator(self.model, params)

    def generate(self, prompts, new_tokens):
        plen = len(prompts[0])
        total = plen + new_tokens
        gen = self._generator(len(prompts), total, total)  # min_length forces every token
        gen.append_tokens(np.array(prompts, dtype=np.int32))
        while not gen.is_done():
            gen.generate_next_token()
        return [list(map(int, gen.get_sequence(i)[plen:total])) for i in range(len(prompts))]

    def prefill(self, prompt):
        gen = self._generator(1, len(prompt) + 1, 0)
        gen.append_tokens(np.array([prompt], dtype=np.int32))
        del gen


def _llama_sdist_dir(cache_dir: Path) -> Path:
    """llama-cpp-python's sdist (for vendor/llama.cpp/convert_hf_to_gguf.py), downloaded once."""
    import tarfile

    root = peers_dir(cache_dir) / "sdist"
    src = root / f"llama_cpp_python-{LLAMA_CPP_VERSION}"
    if (src / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
        return src
    root.mkdir(parents=True, exist_ok=True)
    tgz = root / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
    if not tgz.is_file():
        _run_logged([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                     f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", str(root)], root / "download.log")
    with tarfile.open(tgz) as t:
        t.extractall(root, filter="data")
    return src


# convert_hf_to_gguf.py, except that a tokenizer whose pre-tokenizer it does not know (the default
# model's tokenizer on a random Qwen2-shaped model) gets the default one instead of an error: the
# benchmark feeds token ids, never text, so the pre-tokenizer changes nothing it measures.
GGUF_CONVERT = """
import runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, script.rsplit("/", 1)[0])
from conversion import base
known = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "default"
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
runpy.run_path(script, run_name="__main__")
"""


def build_gguf(model_dir: Path, precision: str, cache_dir: Path, threads: int) -> Path:
    """GGUF of model_dir at f32 / q8_0 (convert_hf_to_gguf.py) or q4_0 (llama_model_quantize of f32)."""
    out = peers_dir(cache_dir) / f"{model_dir.name}-{precision}.gguf"
    if out.is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    if precision in ("f32", "q8_0"):
        script = _llama_sdist_dir(cache_dir) / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
        wrapper = peers_dir(cache_dir) / "convert_hf_to_gguf_ids.py"
        wrapper.write_text(GGUF_CONVERT)
        _run_logged([sys.executable, str(wrapper), str(script), str(model_dir), "--outtype", precision,
                     "--outfile", str(tmp)],
                    peers_dir(cache_dir) / f"gguf_{model_dir.name}_{precision}.log", cwd=script.parent)
    elif precision == "q4_0":
        import llama_cpp

        src = build_gguf(model_dir, "f32", cache_dir, threads)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.nthread = threads
        log(f"quantizing {src.name} to q4_0")
        if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
            raise RuntimeError(f"llama_model_quantize {src} -> q4_0 failed")
    else:
        raise ValueError(precision)
    tmp.rename(out)
    return out


class LlamaCppEngine(Engine):
    """llama.cpp through llama-cpp-python's C API: one context holding `max_batch` sequences, greedy
    argmax over each row's logits (the same work our runtime's greedy sampler does)."""

    kind = "llamacpp"

    def __init__(self, model_dir: Path, precision: str, threads: int, cache_dir: Path, max_batch: int,
                 max_tokens_per_seq: int, prefill_len: int):
        import ctypes

        import gguf
        import llama_cpp as L

        self.L, self.ctypes = L, ctypes
        path = build_gguf(model_dir, precision, cache_dir, threads)
        self.name, self.precision = f"llama.cpp (llama-cpp-python {L.__version__})", precision
        self.fp32 = precision == "f32"
        reader = gguf.GGUFReader(str(path))
        sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
        tied = "output.weight" not in sizes
        self.weight_bytes = sum(n for k, n in sizes.items() if k != "token_embd.weight" or tied)
        self.disk_bytes = path.stat().st_size
        del reader
        L.llama_log_set(_quiet_llama_log(L), ctypes.c_void_p(0))
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        per_seq = max(max_tokens_per_seq, prefill_len + 1)
        cp.n_seq_max = max_batch
        cp.n_ctx = per_seq * max_batch
        cp.n_batch = max(prefill_len, max_batch * max_tokens_per_seq)
        cp.n_ubatch = 512
        cp.n_threads = threads
        cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(cp.n_batch, 0, 1)

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """rows of (token, position, sequence, wants logits)."""
        b = self.batch
        for i, (tok, pos, seq, want) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
            b.seq_id[i][0] = seq
        b.n_tokens = len(rows)
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, i: int) -> int:
        ptr = self.L.llama_get_logits_ith(self.ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    def _clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def generate(self, prompts, new_tokens):
        self._clear()
        plen = len(prompts[0])
        rows = [(t, p, s, p == plen - 1) for s, pr in enumerate(prompts) for p, t in enumerate(pr)]
        self._decode(rows)
        outs = [[self._argmax((s + 1) * plen - 1)] for s in range(len(prompts))]
        for step in range(1, new_tokens):
            self._decode([(o[-1], plen + step - 1, s, True) for s, o in enumerate(outs)])
            for s, o in enumerate(outs):
                o.append(self._argmax(s))
        return outs

    def prefill(self, prompt):
        self._clear()
        for start in range(0, len(prompt), self.batch_capacity):
            chunk = prompt[start:start + self.batch_capacity]
            self._decode([(t, start + p, 0, start + p == len(prompt) - 1) for p, t in enumerate(chunk)])
        self._argmax(-1)

    @property
    def batch_capacity(self) -> int:
        return self.L.llama_n_batch(self.ctx)

    def close(self):
        L = self.L
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)


_LOG_CB = None


def _quiet_llama_log(L):
    global _LOG_CB
    if _LOG_CB is None:
        _LOG_CB = L.llama_log_callback(lambda level, text, user_data: None)
    return _LOG_CB


# ------------------------------------------------------------------------------------------ our fp32 engine

def ensure_fp32_engine(model_dir: Path, cache_dir: Path, max_batch: int, max_input_len: int) -> Path:
    """The fp32 engine of model_dir, built with the library (and cached) when missing or stale."""
    from trtbuild.errors import TrtbuildError

    root = cache_dir / "bench"
    engine_dir = root / f"{model_dir.name}-fp32-engine"
    try:
        from trtbuild.engine import load_engine_config

        bc = load_engine_config(engine_dir).build_config
        if bc.max_batch_size >= max_batch and bc.max_input_len >= max_input_len:
            return engine_dir
    except (TrtbuildError, FileNotFoundError, OSError):
        pass
    from trtbuild.builder import build_engine
    from trtbuild.convert.converter import convert_checkpoint
    from trtbuild.engine import BuildConfig

    ckpt = root / f"{model_dir.name}-fp32-ckpt"
    log(f"building the fp32 engine of {model_dir} into {engine_dir}")
    convert_checkpoint(model_dir, ckpt, "float32", force=True)
    build_engine(ckpt, engine_dir, BuildConfig(max_batch_size=max_batch, max_input_len=max_input_len,
                                               max_seq_len=max(2 * max_input_len, 256)), force=True)
    return engine_dir


# ------------------------------------------------------------------------------------------ measuring

def timed(fn, *a) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*a)
    return time.perf_counter() - start, out


def fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", type=Path, help="HF model dir (default: trtbuild-fetch-model's "
                   f"{DEFAULT_MODEL}); the source of every peer's model and of the default fp32 engine")
    p.add_argument("--engine", action="append", default=[], metavar="NAME=DIR",
                   help="another trtbuild engine dir to measure (repeatable), e.g. a quantized recipe")
    p.add_argument("--no_default_engine", action="store_true",
                   help="do not build/measure the fp32 engine of --model_dir (it is built with the library and "
                        "cached under --cache_dir/bench otherwise)")
    p.add_argument("--peers", default=",".join(ALL_PEERS),
                   help=f"comma-separated subset of {','.join(ALL_PEERS)}, or 'none' (default: all)")
    p.add_argument("--ortgenai_precisions", default="fp32,int4")
    p.add_argument("--llamacpp_precisions", default="f32,q8_0,q4_0")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=None, help="default 128 (16 with --quick)")
    p.add_argument("--prefill_len", type=int, default=None, help="default 512 (64 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="rounds; figures are medians (default 3, 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="fewer tokens and rounds: a smoke run, not a measurement")
    p.add_argument("--cache_dir", type=Path, default=Path.home() / ".cache" / "trtbuild",
                   help="where built engines and peers' models are cached (bench/, peers/)")
    p.add_argument("--bandwidth_mb", type=int, default=None, help="array size for the read-bandwidth test "
                   "(default 1024, 64 with --quick)")
    p.add_argument("--json", type=Path, help="also write every figure here")
    p.add_argument("--no_memory", action="store_true",
                   help="skip the peak-memory phase (each engine loaded alone in a child process)")
    p.add_argument("--peak_rss_of", type=int, help=argparse.SUPPRESS)  # the child of that phase
    a = p.parse_args(argv)
    a.new_tokens = a.new_tokens or (16 if a.quick else 128)
    a.prefill_len = a.prefill_len or (64 if a.quick else 512)
    a.repeats = a.repeats or (1 if a.quick else 3)
    a.bandwidth_mb = a.bandwidth_mb or (64 if a.quick else 1024)
    peers = [] if a.peers.strip() in ("", "none") else [x.strip() for x in a.peers.split(",")]
    bad = [x for x in peers if x not in ALL_PEERS]
    if bad:
        p.error(f"--peers: unknown {bad}; choose from {','.join(ALL_PEERS)} or none")
    a.peer_list = peers
    return a


def engine_specs(a) -> list[tuple[str, str, object]]:
    """(label, kind, make) of every engine this run measures, in table order; `make()` loads it."""
    specs: list[tuple[str, str, object]] = []
    model_dir = a.model_dir
    if model_dir is None and (a.peer_list or not a.no_default_engine):
        from trtbuild.fetch import fetch_model

        model_dir = fetch_model(DEFAULT_MODEL)
    a.model_dir = model_dir
    max_len = max(a.prompt_len + a.new_tokens, a.prefill_len)
    if not a.no_default_engine:
        fp32_dir = ensure_fp32_engine(model_dir, a.cache_dir, a.batch, max(1024, max_len))
        specs.append(("trtbuild fp32", "trtbuild", lambda: TrtbuildEngine("trtbuild", fp32_dir, a.threads)))
    for spec in a.engine:
        name, sep, d = spec.partition("=")
        if not sep:
            name, d = Path(spec).name, spec
        specs.append((f"trtbuild {name}", "trtbuild",
                      lambda name=name, d=d: TrtbuildEngine(f"trtbuild {name}", Path(d).expanduser(), a.threads)))
    if "transformers" in a.peer_list:
        specs.append(("transformers fp32", "transformers", lambda: TransformersEngine(model_dir, a.threads)))
    if "ortgenai" in a.peer_list:
        for prec in filter(None, a.ortgenai_precisions.split(",")):
            specs.append((f"onnxruntime-genai {prec}", "ortgenai",
                          lambda prec=prec: OrtGenaiEngine(model_dir, prec, a.threads, a.cache_dir)))
    if "llamacpp" in a.peer_list:
        for prec in filter(None, a.llamacpp_precisions.split(",")):
            specs.append((f"llama.cpp {prec}", "llamacpp", lambda prec=prec: LlamaCppEngine(
                model_dir, prec, a.threads, a.cache_dir, a.batch, a.prompt_len + a.new_tokens, a.prefill_len)))
    return specs


def load_engine(a, label: str, kind: str, make) -> tuple[Engine | None, str | None]:
    """Load one engine: (engine, None), or (None, why it was skipped). trtbuild engines must fit the run."""
    if kind == "trtbuild":
        e = make()
        if e.max_batch_size < a.batch or e.max_input_len < a.prefill_len or e.max_seq_len < a.prompt_len + a.new_tokens:
            raise SystemExit(f"{e.engine_dir}: built for max_batch_size {e.max_batch_size}, max_input_len "
                             f"{e.max_input_len}, max_seq_len {e.max_seq_len}; this run needs {a.batch}, "
                             f"{a.prefill_len}, {a.prompt_len + a.new_tokens}: rebuild it or lower --batch/"
                             "--prefill_len/--new_tokens")
        return e, None
    try:  # a peer that is not installed, cannot build or cannot load is reported, not fatal
        engine = make()
        log(f"loaded {label}")
        return engine, None
    except ImportError as e:
        return None, f"{label}: skipped, not installed ({e.name or e}); install with: {INSTALL[kind]}"
    except Exception as e:
        return None, f"{label}: skipped, {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def load_engines(a) -> tuple[list[Engine], list[str]]:
    engines: list[Engine] = []
    skipped: list[str] = []
    for index, (label, kind, make) in enumerate(engine_specs(a)):
        engine, why = load_engine(a, label, kind, make)
        if engine is None:
            skipped.append(why)
            continue
        engine.spec_index = index  # its number in engine_specs, for the peak-memory child
        engines.append(engine)
    return engines, skipped


# ------------------------------------------------------------------------------------- peak memory

def peak_rss_of_this_process_mb() -> float:
    """This process's peak resident set: VmHWM, which belongs to the process image. Not ru_maxrss:
    Linux carries that across fork and exec, so a child of a 7 GB benchmark reported 7 GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_child(a) -> int:
    """In a child process: load engine number a.peak_rss_of alone, run a prefill and a short decode
    at batch 1 and at batch B, and print the process's peak resident set."""
    label, kind, make = engine_specs(a)[a.peak_rss_of]
    engine, why = load_engine(a, label, kind, make)
    if engine is None:
        print(json.dumps({"skipped": why}))
        return 0
    vocab = json.loads((a.model_dir / "config.json").read_text())["vocab_size"]
    prompts, long_prompt = make_prompts(a.model_dir / "tokenizer.json", vocab, a.batch, a.prompt_len, a.prefill_len)
    engine.prefill(long_prompt)
    engine.generate(prompts[:1], 8)
    engine.generate(prompts, 8)
    print(json.dumps({"peak_rss_mb": peak_rss_of_this_process_mb()}))
    return 0


def peak_rss(argv: list[str], spec_indices: list[int]) -> list[float | None]:
    """Each engine's peak resident memory in MB, measured alone in a fresh process (one process
    holding every engine cannot say which one needs what)."""
    out: list[float | None] = []
    for i in spec_indices:
        result = subprocess.run([sys.executable, __file__, *argv, "--peak_rss_of", str(i)],
                                capture_output=True, text=True)
        lines = result.stdout.strip().splitlines()
        report = json.loads(lines[-1]) if result.returncode == 0 and lines else {}
        out.append(report.get("peak_rss_mb"))
        if result.returncode != 0:
            log(f"peak memory of engine {i}: child failed: {result.stderr.strip().splitlines()[-1:]}")
    return out


# precision classes for "the best peer at the same precision"
PRECISION_CLASS = {"fp32": "fp32", "f32": "fp32", "int4": "int4", "q4_0": "int4", "W4A16": "int4",
                   "q8_0": "int8", "W8A16": "int8"}


def precision_class(precision: str) -> str | None:
    """fp32 / int4 / int8 for a table row's precision (W8A8 recipes count as int8)."""
    head = precision.split(" ")[0]
    return PRECISION_CLASS.get(head) or ("int8" if head.startswith("W8A8") else None)


def target_lines(rows: list[dict], batch: int) -> list[str]:
    """The speed issue's targets, each as measured in this run against the best peer in it."""
    peers = [r for r in rows if r["kind"] != "trtbuild"]
    ours = [r for r in rows if r["kind"] == "trtbuild"]
    lines: list[str] = []

    def check(what: str, got: float | None, want: float | None, factor: float, more_is_better: bool = True):
        if got is None or want is None:
            lines.append(f"{what}: not measured in this run")
            return
        ok = got >= factor * want if more_is_better else got <= factor * want
        lines.append(f"{what}: {got:.1f} vs {want:.1f} = {got / want:.2f}× (target {'≥' if more_is_better else '≤'} "
                     f"{factor:g}×) {'✓' if ok else '✗'}")

    def best(rs, key, cls=None, lowest=False):
        vals = [r[key] for r in rs if r.get(key) is not None and (cls is None or precision_class(r["precision"]) == cls)]
        return (min(vals) if lowest else max(vals)) if vals else None

    check("int4 decode b1, our best vs the best peer int4", best(ours, "decode_b1", "int4"),
          best(peers, "decode_b1", "int4"), 1.3)
    check("fp32 decode b1 vs the best peer fp32", best(ours, "decode_b1", "fp32"), best(peers, "decode_b1", "fp32"), 1.0)
    check("fp32 prefill vs the best peer prefill", best(ours, "prefill", "fp32"), best(peers, "prefill"), 1.0)
    w8a8 = best([r for r in ours if r["precision"].startswith("W8A8")], "prefill")
    check("W8A8 prefill vs the best peer prefill", w8a8, best(peers, "prefill"), 1.5)
    for r in ours:
        check(f"{r['engine']} decode b{batch} vs b1", r["decode_bN"], r["decode_b1"], 4.0)
    for cls in ("fp32", "int4", "int8"):
        check(f"{cls} peak RSS MB, our lowest vs the lowest peer's", best(ours, "peak_rss_mb", cls, lowest=True),
              best(peers, "peak_rss_mb", cls, lowest=True), 1.0, more_is_better=False)
    return lines


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.peak_rss_of is not None:
        return peak_rss_child(a)
    engines, skipped = load_engines(a)
    for line in skipped:
        log(line)
    if not engines:
        print("nothing to measure")
        return 2
    vocab = next((e.vocab_size for e in engines if isinstance(e, TrtbuildEngine)), None)
    tok_file = None
    for e in engines:
        if isinstance(e, TrtbuildEngine) and (e.engine_dir / "tokenizer" / "tokenizer.json").is_file():
            tok_file = e.engine_dir / "tokenizer" / "tokenizer.json"
    if tok_file is None and a.model_dir is not None:
        tok_file = a.model_dir / "tokenizer.json"
    if vocab is None:
        vocab = json.loads((a.model_dir / "config.json").read_text())["vocab_size"]
    prompts, long_prompt = make_prompts(tok_file, vocab, a.batch, a.prompt_len, a.prefill_len)

    log(f"warming up {len(engines)} engines")
    for e in engines:
        e.generate(prompts[:1], 2)
        e.generate(prompts, 2)
        e.prefill(long_prompt)

    figures: dict[int, dict[str, list[float]]] = {i: {"b1": [], "bN": [], "prefill": []} for i in range(len(engines))}
    tokens: dict[int, list[int]] = {}
    bandwidths: list[float] = []
    for r in range(a.repeats):
        bw = read_bandwidth(a.threads, a.bandwidth_mb << 20)
        bandwidths.append(bw)
        log(f"round {r + 1}/{a.repeats}: read bandwidth {bw / 1e9:.1f} GB/s")
        # Each round starts at the next engine, and each engine makes a few untimed tokens first: the
        # first call after another engine (or after the bandwidth pass) pays for caches and TLB the
        # others filled; measured, the engine that always went first lost up to ~20% of its b1 figure.
        for i in [(r + j) % len(engines) for j in range(len(engines))]:
            e = engines[i]
            time.sleep(0.3)  # let the previous engine's worker threads go idle
            e.generate(prompts[:1], 4)
            t, out = timed(e.generate, prompts[:1], a.new_tokens)
            assert len(out[0]) == a.new_tokens, f"{e.name} made {len(out[0])} tokens, not {a.new_tokens}"
            figures[i]["b1"].append(a.new_tokens / t)
            tokens.setdefault(i, out[0])
            t, out = timed(e.generate, prompts, a.new_tokens)
            assert all(len(o) == a.new_tokens for o in out), f"{e.name} made fewer tokens than asked"
            figures[i]["bN"].append(a.batch * a.new_tokens / t)
        # A prefill is short (~0.5 s) and one alone is mostly noise: the engines take turns (so a
        # drifting host hits them alike), a pause before each call, the best of three per engine.
        prefill_times: dict[int, list[float]] = {i: [] for i in range(len(engines))}
        for _ in range(PREFILLS_PER_ROUND):
            for i, e in enumerate(engines):
                time.sleep(PREFILL_PAUSE_S)
                prefill_times[i].append(timed(e.prefill, long_prompt)[0])
        for i, e in enumerate(engines):
            figures[i]["prefill"].append(len(long_prompt) / min(prefill_times[i]))
            log(f"  {e.name} {e.precision}: b1 {figures[i]['b1'][-1]:.1f}, b{a.batch} {figures[i]['bN'][-1]:.1f}, "
                f"prefill {figures[i]['prefill'][-1]:.1f} tok/s")
    bandwidth = statistics.median(bandwidths)

    base = next((i for i, e in enumerate(engines) if e.kind == "transformers"), None)
    med = {i: {k: statistics.median(v) for k, v in f.items()} for i, f in figures.items()}
    rows = []
    for i, e in enumerate(engines):
        m = med[i]
        roof = bandwidth / e.weight_bytes if e.weight_bytes else None
        ratios = None
        if base is not None:
            ratios = {k: m[k] / med[base][k] for k in m}
        same = None
        if base is not None and i != base:
            ref, got = tokens[base], tokens[i]
            same = next((k for k, (x, y) in enumerate(zip(ref, got)) if x != y), None)
        rows.append(dict(engine=e.name, kind=e.kind, precision=e.precision, fp32=getattr(e, "fp32", False),
                         mb=e.disk_bytes / 1e6, weight_mb_per_token=e.weight_bytes / 1e6,
                         decode_b1=m["b1"], decode_bN=m["bN"], prefill=m["prefill"],
                         runs=figures[i], vs_transformers=ratios, roofline=roof,
                         pct_roofline_b1=(m["b1"] / roof * 100) if roof else None,
                         first_token_differing_from_transformers=same, greedy_tokens=tokens[i]))

    for e in engines:
        e.close()
    gc.collect()
    if not a.no_memory:
        log("peak memory: each engine alone in a child process")
        for row, mb in zip(rows, peak_rss(argv, [e.spec_index for e in engines])):
            row["peak_rss_mb"] = mb

    b = a.batch
    print(f"\n{cpu_description()}, {a.threads} threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')}; read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s (median of {len(bandwidths)} rounds, best pass of each); "
          f"decode: {a.new_tokens} new tokens after a {a.prompt_len}-token prompt; prefill: {len(long_prompt)} "
          f"tokens; median of {a.repeats} round(s)\n")
    print(f"| engine | precision | MB | decode b1 tok/s | decode b{b} tok/s | prefill tok/s | peak RSS MB | "
          f"vs transformers (b1 / b{b} / prefill) | roofline tok/s | b1 % of roofline |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        r = row["vs_transformers"]
        ratio = "–" if r is None else f"{r['b1']:.2f}× / {r['bN']:.2f}× / {r['prefill']:.2f}×"
        print(f"| {row['engine']} | {row['precision']} | {row['mb']:.0f} | {fmt(row['decode_b1'])} | "
              f"{fmt(row['decode_bN'])} | {fmt(row['prefill'])} | {fmt(row.get('peak_rss_mb'), 0)} | {ratio} | "
              f"{fmt(row['roofline'], 0)} | {fmt(row['pct_roofline_b1'], 0)}% |")
    for line in skipped:
        print(f"- {line}")

    status = 0
    print()
    if base is None:
        print("greedy tokens: not checked (transformers not measured)")
    for row in rows:
        if row["kind"] == "transformers" or base is None:
            continue
        k = row["first_token_differing_from_transformers"]
        verdict = f"same {a.new_tokens} greedy tokens as transformers" if k is None else \
            f"DIFFERS from transformers from generated token {k}"
        if row["fp32"]:
            print(f"check {row['engine']} {row['precision']}: {verdict}")
            status = 3 if k is not None else status
        else:
            print(f"info  {row['engine']} {row['precision']}: {verdict} (not fp32: not required)")
    print(f"\ntargets ({cpu_description()}):")
    for line in target_lines(rows, b):
        print(f"  {line}")

    if a.json:
        a.json.write_text(json.dumps(dict(
            machine=dict(processor=cpu_description(), threads=a.threads,
                         omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), bandwidth_gbs=bandwidth / 1e9,
                         bandwidth_rounds_gbs=[x / 1e9 for x in bandwidths]),
            settings=dict(batch=b, prompt_len=a.prompt_len, new_tokens=a.new_tokens, prefill_len=len(long_prompt),
                          repeats=a.repeats, model_dir=str(a.model_dir) if a.model_dir else None),
            rows=rows, skipped=skipped), indent=1))
        log(f"wrote {a.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())

"""ModelRunner: load an engine dir and run prefill / decode steps, generation and scoring.

Imports onnxruntime, numpy and tokenizers only: an engine runs without torch or transformers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from trtbuild.checkpoint import TOKENIZER_DIR
from trtbuild.engine import EngineConfig, load_engine_config
from trtbuild.engine_io import USE_PROMPT_KERNEL
from trtbuild.errors import TrtbuildError
from trtbuild.runtime.cpu_forms import CpuForms
from trtbuild.runtime.kv_cache import ConcatKVCache, SharedKVCache
from trtbuild.runtime.request import Request
from trtbuild.runtime.sampling import SamplingConfig

log = logging.getLogger(__name__)


@dataclass
class GenerationOutput:
    output_ids: list[list[int]]  # generated tokens per prompt (prompt and end_id excluded)
    finish_reasons: list[str]
    prompt_lengths: list[int]


def load_tokenizer(path: str | Path):
    """A `tokenizers.Tokenizer` from a dir holding tokenizer.json (or the file itself)."""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise TrtbuildError(f"{file} not found: pass --tokenizer_dir with a tokenizer.json")
    return Tokenizer.from_file(str(file))


class ModelRunner:
    """Runs one engine (rank 0) with a preallocated KV cache."""

    def __init__(self, engine_dir: Path, config: EngineConfig, session: ort.InferenceSession, tokenizer=None,
                 forms: CpuForms | None = None):
        self.engine_dir = engine_dir
        self.config = config
        self.session = session
        self.tokenizer = tokenizer
        self.forms = forms  # what the engine runs as on this CPU (trtbuild.runtime.cpu_forms)
        # prompt attention engines: which branch prompts into an empty cache take (default: the kernel's)
        inputs = {i.name for i in session.get_inputs()} if hasattr(session, "get_inputs") else set()
        self.prompt_kernel = None if USE_PROMPT_KERNEL not in inputs else \
            np.array(forms.prompt_kernel if forms is not None and forms.prompt_kernel is not None else True)
        pc, bc = config.pretrained_config, config.build_config
        self.shared_cache = config.kv_cache_layout == "shared_buffer"
        self.cache_dtype = np.int8 if pc.quantization.kv_cache_quant_algo == "INT8" else np.dtype(bc.compute_dtype)
        self.vocab_size = pc.vocab_size
        self.lora = None  # LoraManager, attached when the engine has a lora plugin
        self.kv_cache = (SharedKVCache(pc.num_hidden_layers, bc.max_batch_size, pc.num_key_value_heads,
                                       bc.max_seq_len, pc.head_size, self.cache_dtype)
                         if self.shared_cache else None)

    @classmethod
    def from_dir(cls, engine_dir: str | Path, num_threads: int | None = None,
                 tokenizer_dir: str | Path | None = None, rank: int = 0, int8_gemm: str = "auto",
                 prompt_attention: str = "auto") -> "ModelRunner":
        """Load an engine dir: checks its version, opens rank{rank}.engine and its tokenizer.

        The forms of its ops that are exact and fastest on this CPU are picked by probe
        (trtbuild.runtime.cpu_forms); `int8_gemm` ("u8s8" / "u8u8") and `prompt_attention`
        ("kernel" / "gqa") force one instead of "auto"."""
        engine_dir = Path(engine_dir)
        config = load_engine_config(engine_dir)
        backend = config.build_config.backend
        engine_path = engine_dir / f"rank{rank}.engine"
        if not engine_path.is_file():
            raise TrtbuildError(f"{engine_path} not found: the engine dir is incomplete; rebuild it with trt-build")
        if backend == "tensorrt":  # on an NVIDIA GPU, with the same _step feeds as the standard onnxruntime form
            from trtbuild.runtime.tensorrt_session import TensorRTStepSession

            session = TensorRTStepSession.open(engine_dir, engine_path, config)  # one clear line without a GPU
            tok_dir = Path(tokenizer_dir) if tokenizer_dir else engine_dir / TOKENIZER_DIR
            tokenizer = load_tokenizer(tok_dir) if (tok_dir / "tokenizer.json").is_file() or tokenizer_dir else None
            return cls(engine_dir, config, session, tokenizer)  # type: ignore[arg-type]
        from trtbuild.backends.onnxruntime_backend import default_num_threads, open_session
        from trtbuild.kernels import KernelUnavailable
        from trtbuild.runtime.cpu_forms import choose_forms

        bc = config.build_config
        try:
            forms = choose_forms(engine_dir, engine_path, bc.u8u8_form, bc.plugin_config.context_fmha,
                                 num_threads or default_num_threads(), bc.max_input_len, bc.max_seq_len, int8_gemm, prompt_attention)
            session = open_session(forms.engine_path, num_threads, kernels=bc.plugin_config.uses_kernels)
        except KernelUnavailable as e:
            raise TrtbuildError(f"{engine_path} runs trtbuild's own kernels (built with --context_fmha / "
                                f"--smooth_quant_plugins), which cannot be built on this machine: {e}. Rebuild the "
                                "engine with --context_fmha disable --smooth_quant_plugins disable") from None
        except TrtbuildError:
            raise
        except Exception as e:  # onnxruntime raises its own types for damaged files
            raise TrtbuildError(f"{engine_path} could not be loaded ({str(e).splitlines()[0]}); rebuild it") from None
        log.info("%s runs as %s (int8 GEMMs: %s, prompt attention: %s)", engine_path, forms.engine_path.name,
                 forms.int8_gemm or "none", {True: "trtbuild's kernel", False: "GroupQueryAttention",
                                             None: "as decode"}[forms.prompt_kernel])
        tok_dir = Path(tokenizer_dir) if tokenizer_dir else engine_dir / TOKENIZER_DIR
        tokenizer = load_tokenizer(tok_dir) if (tok_dir / "tokenizer.json").is_file() or tokenizer_dir else None
        runner = cls(engine_dir, config, session, tokenizer, forms)
        if config.build_config.plugin_config.lora_plugin:
            from trtbuild.runtime.lora import LoraManager

            runner.lora = LoraManager.from_engine_dir(engine_dir, config)
        return runner

    def add_lora(self, lora_dir: str | Path) -> int:
        """Load a PEFT adapter dir into a free LoRA slot of this engine (no rebuild); returns its task id."""
        if self.lora is None:
            raise TrtbuildError(f"{self.engine_dir} was built without --lora_plugin: it cannot run LoRA adapters")
        return self.lora.add(lora_dir)

    # ---- limits -----------------------------------------------------------------------------
    @property
    def max_batch_size(self) -> int:
        return self.config.build_config.max_batch_size

    def check_request(self, prompt_ids: list[int], max_new_tokens: int, index: int = 0) -> None:
        bc = self.config.build_config
        if not prompt_ids:
            raise TrtbuildError(f"prompt {index} is empty")
        if len(prompt_ids) > bc.max_input_len:
            raise TrtbuildError(f"prompt {index} has {len(prompt_ids)} tokens, above the engine's max_input_len "
                                f"{bc.max_input_len}; shorten it or rebuild with a larger --max_input_len")
        if len(prompt_ids) + max_new_tokens > bc.max_seq_len:
            raise TrtbuildError(f"prompt {index} ({len(prompt_ids)} tokens) + {max_new_tokens} new tokens exceeds "
                                f"the engine's max_seq_len {bc.max_seq_len}; lower --max_output_len or rebuild "
                                "with a larger --max_seq_len")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise TrtbuildError(f"prompt {index} has token ids outside the vocabulary (0..{self.vocab_size - 1}): {bad[:5]}")

    # ---- one engine step --------------------------------------------------------------------
    def _step(self, input_ids: np.ndarray, position_ids: np.ndarray, logits_positions: np.ndarray,
              lengths_after: np.ndarray, slot_start: int = 0, cache: ConcatKVCache | None = None,
              attention_mask: np.ndarray | None = None, lora_task_ids: np.ndarray | None = None) -> np.ndarray:
        """Run the engine once over rows [slot_start, slot_start + B); returns logits [B, K, vocab].

        lengths_after[b]: tokens in row b's cache after this step.
        """
        batch = input_ids.shape[0]
        io = (self.kv_cache.binding(self.session, slot_start, batch, int(lengths_after.max())) if self.shared_cache
              else self.session.io_binding())
        io.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        io.bind_cpu_input("logits_positions", np.ascontiguousarray(logits_positions, dtype=np.int64))
        logits = np.empty((batch, logits_positions.shape[1], self.vocab_size), np.float32)
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        if self.lora is not None:
            self.lora.bind(io, lora_task_ids if lora_task_ids is not None else np.full(batch, -1, np.int64))
        if self.prompt_kernel is not None:
            io.bind_cpu_input(USE_PROMPT_KERNEL, self.prompt_kernel)
        if self.shared_cache:
            io.bind_cpu_input("seqlens_k", (lengths_after - 1).astype(np.int32))
            io.bind_cpu_input("total_sequence_length", np.array(int(lengths_after.max()), np.int32))
            self.session.run_with_iobinding(io)
        else:
            io.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
            cache.bind(io)
            self.session.run_with_iobinding(io)
            cache.update(io)
        return logits

    def prefill(self, prompts: list[list[int]], slot_start: int = 0, all_logits: bool = False,
                cache: ConcatKVCache | None = None, lora_task_ids: np.ndarray | None = None) -> np.ndarray:
        """Right-padded prompts in one batch; logits of each row's last token [B, 1, V]
        (or of every position [B, S, V] when all_logits)."""
        lengths = np.array([len(p) for p in prompts], np.int64)
        seq = int(lengths.max())
        ids = np.zeros((len(prompts), seq), np.int64)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = p
        positions = np.broadcast_to(np.arange(seq, dtype=np.int64), ids.shape)
        picks = positions if all_logits else (lengths - 1)[:, None]
        mask = (positions < lengths[:, None]).astype(np.int64)
        return self._step(ids, positions, picks, lengths, slot_start, cache, mask, lora_task_ids)

    # ---- generation -------------------------------------------------------------------------
    def generate(self, batch_input_ids: list[list[int]], sampling: SamplingConfig | list[SamplingConfig],
                 lora_task_ids: list[int] | None = None,
                 streaming_callback: Callable[[int, list[int]], None] | None = None) -> GenerationOutput:
        """Generate for a batch of prompts in one batch (prefill together, decode together)."""
        if len(batch_input_ids) > self.max_batch_size:
            raise TrtbuildError(f"{len(batch_input_ids)} prompts exceed the engine's max_batch_size "
                                f"{self.max_batch_size}; pass fewer or rebuild with a larger --max_batch_size")
        samplings = sampling if isinstance(sampling, list) else [sampling] * len(batch_input_ids)
        task_ids = list(lora_task_ids) if lora_task_ids is not None else [-1] * len(batch_input_ids)
        if len(task_ids) != len(batch_input_ids):
            raise TrtbuildError(f"{len(task_ids)} lora task ids for {len(batch_input_ids)} prompts")
        requests = []
        for i, (p, s) in enumerate(zip(batch_input_ids, samplings)):
            self.check_request(list(p), s.max_new_tokens, i)
            if self.lora is not None:
                self.lora.check_task_id(task_ids[i])
            elif task_ids[i] != -1:
                raise TrtbuildError(f"lora task id {task_ids[i]} given, but {self.engine_dir} has no lora plugin")
            on_tokens = (lambda r, toks, i=i: streaming_callback(i, toks)) if streaming_callback else None
            requests.append(Request(list(p), s, task_ids[i], on_tokens))
        if self.shared_cache:
            from trtbuild.runtime.scheduler import Scheduler

            scheduler = Scheduler(self)
            for r in requests:
                scheduler.add(r)
            while scheduler.has_work():
                scheduler.step()
        else:
            self._generate_static(requests)
        return GenerationOutput([r.output_ids for r in requests], [r.finish_reason for r in requests],
                                [len(r.prompt_ids) for r in requests])

    def _generate_static(self, requests: list[Request]) -> None:
        """Standard-attention engines: one prefill, then decode the whole batch until all finish."""
        pc = self.config.pretrained_config
        batch = len(requests)
        cache = ConcatKVCache(pc.num_hidden_layers, batch, pc.num_key_value_heads, pc.head_size, self.cache_dtype)
        task_ids = np.array([r.lora_task_id for r in requests], np.int64)
        prompts = [r.prompt_ids for r in requests]
        logits = self.prefill(prompts, cache=cache, lora_task_ids=task_ids)
        lengths = np.array([len(p) for p in prompts], np.int64)
        seq = int(lengths.max())
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
        while True:
            for r, row in zip(requests, logits):
                r.accept(row[0])
            if all(r.done for r in requests):
                return
            last = [r.output_ids[-1] if r.output_ids else 0 for r in requests]
            ids = np.array(last, np.int64)[:, None]
            positions = lengths[:, None].copy()
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            lengths = lengths + 1
            logits = self._step(ids, positions, np.zeros((batch, 1), np.int64), lengths, cache=cache,
                                attention_mask=mask, lora_task_ids=task_ids)

    # ---- scoring ----------------------------------------------------------------------------
    def score(self, batch_input_ids: list[list[int]], lora_task_ids: list[int] | None = None) -> np.ndarray:
        """Logits at every position [B, S, vocab] (rows right-padded to the longest), for perplexity."""
        if len(batch_input_ids) > self.max_batch_size:
            raise TrtbuildError(f"{len(batch_input_ids)} sequences exceed max_batch_size {self.max_batch_size}")
        for i, p in enumerate(batch_input_ids):
            self.check_request(list(p), 0, i)
        task_ids = np.array(lora_task_ids if lora_task_ids is not None else [-1] * len(batch_input_ids), np.int64)
        cache = None
        if not self.shared_cache:
            pc = self.config.pretrained_config
            cache = ConcatKVCache(pc.num_hidden_layers, len(batch_input_ids), pc.num_key_value_heads,
                                  pc.head_size, self.cache_dtype)
        return self.prefill([list(p) for p in batch_input_ids], all_logits=True, cache=cache,
                            lora_task_ids=task_ids)

"""ModelRunner: load an engine dir and run prefill / decode steps, generation and scoring.

Imports onnxruntime, numpy and tokenizers only: an engine runs without torch, transformers, onnx or
the network writer (the engine's input and output names come from trtbuild.engine_io).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnxruntime as ort

from trtbuild.checkpoint import TOKENIZER_DIR
from trtbuild.engine import BUILD_ID_KEY, EngineConfig, load_engine_config
from trtbuild.engine_io import (INPUT_IDS, LOGITS, LOGITS_POSITIONS, MPI_HANDLES, PIPELINE_SENT, POSITION_IDS,
                                USE_PROMPT_KERNEL)
from trtbuild.errors import TrtbuildError
from trtbuild.runtime.cpu_forms import CpuForms
from trtbuild.runtime.kv_cache import KVCache, kv_cache_for
from trtbuild.runtime.request import Request
from trtbuild.runtime.sampling import SamplingConfig
from trtbuild.runtime.world import RankWorld
from trtbuild.tokenizer import TOKENIZER_FILE, load_tokenizer  # load_tokenizer: importable from here too

log = logging.getLogger(__name__)


@dataclass
class GenerationOutput:
    output_ids: list[list[int]]  # generated tokens per prompt (prompt and end_id excluded)
    finish_reasons: list[str]
    prompt_lengths: list[int]


def _engine_tokenizer(engine_dir: Path, tokenizer_dir: str | Path | None) -> Callable[[], Any] | None:
    """What loads the tokenizer given (tokenizer_dir, required) or the engine dir's own (None if it
    has none)."""
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else engine_dir / TOKENIZER_DIR
    return (lambda: load_tokenizer(tok_dir)) if (tok_dir / TOKENIZER_FILE).is_file() or tokenizer_dir else None


class ModelRunner:
    """Runs one engine (rank 0) with a preallocated KV cache."""

    def __init__(self, engine_dir: Path, config: EngineConfig, session: ort.InferenceSession, tokenizer=None,
                 forms: CpuForms | None = None, world: RankWorld | None = None,
                 tokenizer_loader: Callable[[], Any] | None = None):
        self.engine_dir = engine_dir
        self.config = config
        self.session = session
        # the tokenizer, or what loads it on first use: SmolLM2's holds 36 MB, which a caller that
        # feeds token ids (the Triton tensorrt_llm model, a benchmark) never needs
        self._tokenizer, self._tokenizer_loader = tokenizer, tokenizer_loader
        self._tokenizer_lock = threading.Lock()
        self.forms = forms  # what the engine runs as on this CPU (trtbuild.runtime.cpu_forms)
        self.world = world  # a multi-rank engine: this process's rank among them (trtbuild.runtime.world)
        self._sent = np.zeros(1, np.float32)  # a pipeline stage before the last: its output in place of logits
        # prompt attention engines: which branch prompts into an empty cache take (default: the kernel's)
        inputs = {i.name for i in session.get_inputs()} if hasattr(session, "get_inputs") else set()
        self.prompt_kernel = None if USE_PROMPT_KERNEL not in inputs else \
            np.array(forms.prompt_kernel if forms is not None and forms.prompt_kernel is not None else True)
        # shared buffer (attention plugin): requests join and leave a running batch (trtbuild.runtime.scheduler);
        # concatenated (standard attention): a batch runs from prefill to its last token together
        self.shared_cache = config.kv_cache_layout == "shared_buffer"
        self.kv_cache = kv_cache_for(config, world.rank if world else 0)  # the shared buffer, or an empty cache each call copies (for_call)
        self.vocab_size = config.pretrained_config.vocab_size
        self.lora = None  # LoraManager, attached when the engine has a lora plugin
        self.adapter_task_ids: list[int] = []  # the task ids of from_dir's lora_dirs
        self.scheduling = None  # SchedulerConfig of its in-flight batches (None: the defaults)

    @property
    def tokenizer(self):
        """The engine's tokenizer (tokenizers.Tokenizer), loaded on first use; None without one."""
        if self._tokenizer is None and self._tokenizer_loader is not None:
            with self._tokenizer_lock:
                if self._tokenizer is None:
                    self._tokenizer = self._tokenizer_loader()
        return self._tokenizer

    @classmethod
    def from_dir(cls, engine_dir: str | Path, num_threads: int | None = None,
                 tokenizer_dir: str | Path | None = None, rank: int = 0, int8_gemm: str = "auto",
                 prompt_attention: str = "auto", spawn_ranks: bool = False,
                 lora_dirs: Sequence[str | Path] = (), spinning: bool = True) -> "ModelRunner":
        """Load an engine dir: checks its version, opens rank{rank}.engine and its tokenizer.

        The forms of its ops that are exact and fastest on this CPU are picked by probe
        (trtbuild.runtime.cpu_forms); `int8_gemm` ("u8s8" / "u8u8") and `prompt_attention`
        ("kernel" / "gqa") force one instead of "auto". An engine of several ranks opens this
        process's rank among those mpiexec started (trtbuild.runtime.world; `rank` is ignored), or
        with `spawn_ranks` (a server) starts the other ranks itself as followers of its batcher.
        `lora_dirs`: PEFT adapter dirs loaded on every rank; their task ids are `adapter_task_ids`.
        `spinning` False: onnxruntime's threads do not spin between kernels (one-rank engines; for a
        target and its draft engine, which take turns)."""
        engine_dir = Path(engine_dir)
        config = load_engine_config(engine_dir)
        lora_dirs = [Path(d).resolve() for d in lora_dirs]
        if config.pretrained_config.mapping.world_size == 1:
            runner = cls._open(engine_dir, config, rank, num_threads, tokenizer_dir, int8_gemm, prompt_attention,
                               spinning=spinning)
            runner.add_loras(lora_dirs)
            return runner
        from trtbuild.runtime.world import join_world, launched_by_mpiexec, spawn_world

        mapping = config.pretrained_config.mapping
        if spawn_ranks and not launched_by_mpiexec():  # the followers load the same adapters
            world = spawn_world(engine_dir, mapping.world_size, mapping.tp_size, [str(d) for d in lora_dirs])
        else:
            world = join_world(engine_dir, mapping.world_size, mapping.tp_size)
        return cls.open_in_world(engine_dir, config, world, num_threads, tokenizer_dir, int8_gemm, prompt_attention,
                                 lora_dirs)

    @classmethod
    def open_in_world(cls, engine_dir: Path, config: EngineConfig, world: RankWorld, num_threads: int | None = None,
                      tokenizer_dir: str | Path | None = None, int8_gemm: str = "auto",
                      prompt_attention: str = "auto", lora_dirs: Sequence[str | Path] = ()) -> "ModelRunner":
        """This rank's engine of a multi-rank engine dir (and its share of `lora_dirs`): every rank
        opens its own, then all learn whether every rank could, so that none waits in a collective
        for a rank that failed."""
        from trtbuild.runtime.world import agree, threads_per_rank

        try:
            runner = cls._open(engine_dir, config, world.rank, num_threads or threads_per_rank(world), tokenizer_dir,
                               int8_gemm, prompt_attention, world)
            runner.check_build_id()
            runner.add_loras(lora_dirs)
        except TrtbuildError as e:
            agree(world, e)
            raise
        agree(world, None)
        return runner

    @classmethod
    def _open(cls, engine_dir: Path, config: EngineConfig, rank: int, num_threads: int | None,
              tokenizer_dir: str | Path | None, int8_gemm: str, prompt_attention: str,
              world: RankWorld | None = None, spinning: bool = True) -> "ModelRunner":
        """rank{rank}.engine of engine_dir with its forms for this CPU, its tokenizer and adapters."""
        backend = config.build_config.backend
        engine_path = engine_dir / f"rank{rank}.engine"
        if not engine_path.is_file():
            raise TrtbuildError(f"{engine_path} not found: the engine dir is incomplete; rebuild it with trt-build")
        if backend == "tensorrt":  # on an NVIDIA GPU, with the same step feeds as the standard onnxruntime form
            from trtbuild.runtime.tensorrt_session import TensorRTStepSession

            session = TensorRTStepSession.open(engine_dir, engine_path, config)  # one clear line without a GPU
            return cls(engine_dir, config, session,  # type: ignore[arg-type]
                       tokenizer_loader=_engine_tokenizer(engine_dir, tokenizer_dir))
        from trtbuild.backends.onnxruntime_backend import default_num_threads, open_session
        from trtbuild.kernels import KernelUnavailable
        from trtbuild.runtime.cpu_forms import choose_forms

        bc = config.build_config
        try:
            forms = choose_forms(engine_dir, engine_path, bc.u8u8_form, bc.plugin_config.context_fmha,
                                 num_threads or default_num_threads(), bc.max_input_len, bc.max_seq_len, int8_gemm, prompt_attention)
            session = open_session(forms.engine_path, num_threads, spinning=spinning,
                                   kernels=bc.plugin_config.uses_kernels or world is not None)
        except KernelUnavailable as e:
            raise TrtbuildError(f"{engine_path} runs trtbuild's own kernels (built with --context_fmha / "
                                f"--smooth_quant_plugins / --lm_head_plugin / --weight_only_quant_matmul_plugin), which "
                                f"cannot be built on this machine: {e}. Rebuild the engine with --context_fmha disable "
                                "--smooth_quant_plugins disable --lm_head_plugin disable "
                                "--weight_only_quant_matmul_plugin disable") from None
        except TrtbuildError:
            raise
        except Exception as e:  # onnxruntime raises its own types for damaged files
            raise TrtbuildError(f"{engine_path} could not be loaded ({str(e).splitlines()[0]}); rebuild it") from None
        log.info("%s runs as %s (int8 GEMMs: %s, prompt attention: %s)", engine_path, forms.engine_path.name,
                 forms.int8_gemm or "none", {True: "trtbuild's kernel", False: "GroupQueryAttention",
                                             None: "as decode"}[forms.prompt_kernel])
        runner = cls(engine_dir, config, session, None, forms, world, _engine_tokenizer(engine_dir, tokenizer_dir))
        if config.build_config.plugin_config.lora_plugin:
            from trtbuild.runtime.lora import LoraManager

            runner.lora = LoraManager.from_engine_dir(engine_dir, config, rank)
        return runner

    def check_build_id(self) -> None:
        """This rank's engine comes from the build config.json describes (engines whose build wrote
        no id are not checked)."""
        want = self.config.built_by.get("build_id")
        got = self.session.get_modelmeta().custom_metadata_map.get(BUILD_ID_KEY)
        if want and got and want != got:
            path = self.forms.engine_path if self.forms else self.engine_dir
            raise TrtbuildError(f"{path} comes from another build than {self.engine_dir / 'config.json'} "
                                f"(build id {got}, expected {want}): copy the whole engine dir of one trt-build")

    def add_lora(self, lora_dir: str | Path) -> int:
        """Load a PEFT adapter dir into a free LoRA slot of this engine (no rebuild); returns its task id."""
        if self.lora is None:
            raise TrtbuildError(f"{self.engine_dir} was built without --lora_plugin: it cannot run LoRA adapters")
        return self.lora.add(lora_dir)

    def add_loras(self, lora_dirs: Sequence[str | Path]) -> None:
        """add_lora each of lora_dirs, in order; their task ids become `adapter_task_ids`."""
        self.adapter_task_ids = [self.add_lora(d) for d in lora_dirs]

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
    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, logits_positions: np.ndarray,
             lengths_after: np.ndarray, slot_start: int = 0, cache: KVCache | None = None,
             lora_task_ids: np.ndarray | None = None) -> np.ndarray:
        """Run the engine once, a prefill or a decode step, over KV cache rows [slot_start, slot_start + B).

        input_ids, position_ids [B, S] int64: the step's tokens, right-padded, and their positions.
        logits_positions [B, K] int64: which of the S positions' logits to return.
        lengths_after [B]: the tokens in each row's cache after this step (a row's real tokens of the
        step are its first lengths_after[b] - cached ones; the rest is padding).
        cache: the KV cache the step reads and extends (default: the runner's, `kv_cache.for_call()`:
        the shared buffer, or a new concatenated cache, i.e. a step over an empty cache).
        lora_task_ids [B]: each row's adapter (-1, the default: the base model).
        Returns logits [B, K, vocab] float32 (None on a pipeline stage before the last).
        """
        batch = input_ids.shape[0]
        cache = cache if cache is not None else self.kv_cache.for_call()
        io = cache.bind(self.session, slot_start, lengths_after, input_ids.shape[1])
        io.bind_cpu_input(INPUT_IDS, np.ascontiguousarray(input_ids, dtype=np.int64))
        io.bind_cpu_input(POSITION_IDS, np.ascontiguousarray(position_ids, dtype=np.int64))
        io.bind_cpu_input(LOGITS_POSITIONS, np.ascontiguousarray(logits_positions, dtype=np.int64))
        if self.world is not None and not self.world.has_logits:  # a pipeline stage before the last
            logits = None
            io.bind_output(PIPELINE_SENT, "cpu", 0, np.float32, [1], self._sent.ctypes.data)
        else:
            logits = np.empty((batch, logits_positions.shape[1], self.vocab_size), np.float32)
            io.bind_output(LOGITS, "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        if self.lora is not None:
            self.lora.bind(io, lora_task_ids if lora_task_ids is not None else np.full(batch, -1, np.int64))
        if self.prompt_kernel is not None:
            io.bind_cpu_input(USE_PROMPT_KERNEL, self.prompt_kernel)
        if self.world is not None:
            io.bind_cpu_input(MPI_HANDLES, self.world.handles)
        self.session.run_with_iobinding(io)
        cache.after_run(io)
        return logits

    def prefill(self, prompts: list[list[int]], slot_start: int = 0, all_logits: bool = False,
                cache: KVCache | None = None, lora_task_ids: np.ndarray | None = None) -> np.ndarray:
        """Right-padded prompts in one batch (a step into an empty cache, see `step`); logits of each
        row's last token [B, 1, V] (or of every position [B, S, V] when all_logits)."""
        lengths = np.array([len(p) for p in prompts], np.int64)
        seq = int(lengths.max())
        ids = np.zeros((len(prompts), seq), np.int64)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = p
        positions = np.broadcast_to(np.arange(seq, dtype=np.int64), ids.shape)
        picks = positions if all_logits else (lengths - 1)[:, None]
        return self.step(ids, positions, picks, lengths, slot_start, cache, lora_task_ids)

    def extend(self, tokens: list[int], slot: int, cached: int, all_logits: bool = False,
               lora_task_id: int = -1) -> np.ndarray:
        """Feed one row's next tokens after the `cached` ones its slot of the shared KV buffer holds
        (a prefill when cached is 0, a chunk of a prompt, a reused prefix's rest, or a token and its
        drafts); logits [1, K, V] of the last token (or of every fed token when all_logits)."""
        n = len(tokens)
        positions = np.arange(cached, cached + n, dtype=np.int64)[None]
        picks = np.arange(n, dtype=np.int64)[None] if all_logits else np.array([[n - 1]], np.int64)
        return self.step(np.asarray(tokens, np.int64)[None], positions, picks, np.array([cached + n], np.int64),
                         slot_start=slot, lora_task_ids=np.array([lora_task_id], np.int64))

    def accept(self, requests: list[Request], logits: np.ndarray, drafts: list[list[int]] | None = None) -> None:
        """Each request's next token from its row of logits [B, K, V]; with `drafts` (the tokens fed
        after each row's last one, whose logits are rows 1..), further tokens while each pick equals
        the draft it checks. On a multi-rank engine the first rank of the last stage samples and
        every rank takes its tokens."""
        drafts = drafts if drafts is not None else [[] for _ in requests]

        def picks(r: Request, rows: np.ndarray, draft: list[int]) -> list:
            taken = []
            for k in range(len(draft) + 1):
                taken.append(r.sample(rows[k]))
                r.take(taken[-1])
                if r.done or k == len(draft) or r.output_ids[-1] != draft[k]:
                    break
            return taken

        if self.world is None:
            for r, rows, draft in zip(requests, logits, drafts):
                picks(r, rows, draft)
            return
        sampler = self.world.sampler
        if self.world.rank == sampler:
            self.world.broadcast([picks(r, rows, d) for r, rows, d in zip(requests, logits, drafts)], root=sampler)
            return
        for r, taken in zip(requests, self.world.broadcast(None, root=sampler)):
            for sampled in taken:
                r.take(sampled)

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
        batch = len(requests)
        cache = self.kv_cache.for_call()
        task_ids = np.array([r.lora_task_id for r in requests], np.int64)
        prompts = [r.prompt_ids for r in requests]
        logits = self.prefill(prompts, cache=cache, lora_task_ids=task_ids)
        lengths = np.array([len(p) for p in prompts], np.int64)
        while True:
            self.accept(requests, logits)
            if all(r.done for r in requests):
                return
            last = [r.output_ids[-1] if r.output_ids else 0 for r in requests]
            ids = np.array(last, np.int64)[:, None]
            positions = lengths[:, None].copy()
            lengths = lengths + 1
            logits = self.step(ids, positions, np.zeros((batch, 1), np.int64), lengths, cache=cache,
                               lora_task_ids=task_ids)

    # ---- scoring ----------------------------------------------------------------------------
    def score(self, batch_input_ids: list[list[int]], lora_task_ids: list[int] | None = None) -> np.ndarray:
        """Logits at every position [B, S, vocab] (rows right-padded to the longest), for perplexity
        (on every rank of a multi-rank engine)."""
        if len(batch_input_ids) > self.max_batch_size:
            raise TrtbuildError(f"{len(batch_input_ids)} sequences exceed max_batch_size {self.max_batch_size}")
        for i, p in enumerate(batch_input_ids):
            self.check_request(list(p), 0, i)
        task_ids = np.array(lora_task_ids if lora_task_ids is not None else [-1] * len(batch_input_ids), np.int64)
        logits = self.prefill([list(p) for p in batch_input_ids], all_logits=True, lora_task_ids=task_ids)
        if self.world is not None and self.world.sampler != 0:  # pipeline stages: the last one has them
            shape = (len(batch_input_ids), max(len(p) for p in batch_input_ids), self.vocab_size)
            logits = self.world.broadcast_array(logits, shape, self.world.sampler)
        return logits

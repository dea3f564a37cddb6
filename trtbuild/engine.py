"""The engine dir: config.json {version, pretrained_config, build_config} + rank{N}.engine."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtbuild.checkpoint import PretrainedConfig
from trtbuild.errors import TrtbuildError
from trtbuild.fsutil import read_json, write_json
from trtbuild.version import ENGINE_FORMAT_VERSION, __version__

PLUGIN_CHOICES = ("auto", "disable", "float32", "float16", "bfloat16")


# The metadata key of a rank's engine holding its build's id (config.json's built_by["build_id"]):
# the ranks of a multi-rank engine must come from one build.
BUILD_ID_KEY = "trtbuild_build_id"


@dataclass(frozen=True)
class PluginConfig:
    """TensorRT-LLM's plugin flags; in a built engine each holds a dtype or None (disabled)."""

    gemm_plugin: str | None = "auto"
    gpt_attention_plugin: str | None = "auto"
    norm_plugin: str | None = "auto"
    lora_plugin: str | None = None  # None: "auto" when the build has adapters
    # attention plugin: prompts into an empty cache run trtbuild's CausalPromptAttention kernel
    # (trtbuild.kernels), which computes only the causal half of the scores. True in a built
    # engine only if it uses it: the runtime then registers the kernel library.
    context_fmha: bool = True
    # gemm plugin, SmoothQuant W8A8 per token: trtbuild's PerTokenQuantize and SwiGLUQuantize ops
    # (trtbuild.kernels) quantize activations in one pass each (TensorRT-LLM's quantize_per_token
    # plugin). True in a built engine only if it uses them.
    smooth_quant_plugins: bool = True
    # gemm plugin, a tied float32 lm_head: trtbuild's LmHead op (trtbuild.kernels) reads the embedding
    # table where it lies, where onnxruntime's Gemm holds a packed copy of it (the vocabulary table
    # twice in memory). trtbuild's own: TensorRT-LLM has no such flag. True in a built engine only if
    # it uses it.
    lm_head_plugin: bool = True
    # gemm plugin, weight-only engines (and an int8 lm_head) with int8 activations: trtbuild's
    # WeightOnlyQuantMatMul (trtbuild.kernels; TensorRT-LLM's weight_only_quant_matmul and
    # weight_only_groupwise_quant_matmul plugins) computes what MatMulNBits does, decoding the weights
    # once for every row of a step. True in a built engine only if it uses it.
    weight_only_quant_matmul_plugin: bool = True

    @property
    def uses_kernels(self) -> bool:
        """The engine has trtbuild's own ops: the runtime registers trtbuild.kernels' library."""
        return bool(self.context_fmha or self.smooth_quant_plugins or self.lm_head_plugin
                    or self.weight_only_quant_matmul_plugin)


@dataclass(frozen=True)
class LoraConfig:
    """The lora plugin's adapters and capacity. Asked for: the adapter dirs, 0 / () meaning "from the
    adapters"; in a built engine: every value filled, lora_dir as stored there (lora/{i})."""

    lora_dir: tuple[str, ...] = ()
    max_lora_rank: int = 0  # 0: the largest rank among the adapters
    lora_target_modules: tuple[str, ...] = ()  # (): every module the adapters have
    max_loras: int = 0  # adapter slots; 0: the adapters given + EXTRA_LORA_SLOTS (room for add_lora)
    lora_form: str = "masked"  # engine_io.LORA_FORMS (trtbuild.plugins.lora); "gather" is the per-row reference

    def __post_init__(self) -> None:  # lists from JSON or callers become tuples: the config stays frozen
        object.__setattr__(self, "lora_dir", tuple(str(d) for d in self.lora_dir))
        object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))


EXTRA_LORA_SLOTS = 4
DEFAULT_MAX_DRAFT_LEN = 4
SPECULATIVE_MODES = ("prompt_lookup", "draft_tokens_external")
LM_HEAD_PRECISIONS = ("int8", "int4")


@dataclass(frozen=True)
class BuildConfig:
    """trt-build's flags, and the defaults of each (the CLI reads them from here). None means "from
    the model" until the build resolves it (trtbuild.resolve): an engine's build_config has every
    field filled."""

    max_batch_size: int = 8
    max_input_len: int | None = None  # None: min(1024, max_seq_len)
    max_seq_len: int | None = None  # None: min(2048, max_position_embeddings), at least max_input_len
    max_num_tokens: int | None = None  # None: max_batch_size x max_input_len
    plugin_config: PluginConfig = field(default_factory=PluginConfig)
    lora_config: LoraConfig = field(default_factory=LoraConfig)
    backend: str = "onnxruntime"
    compute_dtype: str | None = None  # set by the build: float32 on onnxruntime, the checkpoint's (or float16) on tensorrt
    trt_compute_capabilities: tuple[str, ...] | None = None  # tensorrt: the GPU targets (None: the default set)
    quantize_lm_head: bool = True  # int8 lm_head (and embedding table) in engines with quantized linears
    # that quantized lm_head's weights: "int8" or "int4" (blocks of 32 along the hidden size: half the
    # bytes a decode step reads for it, the largest single weight; the embedding table stays int8)
    lm_head_precision: str = "int8"
    # weight-only engines (W8A16, W4A16*): "int8" multiplies the int8/int4 weights by activations
    # quantized to int8 per block of 32 (or of the weights' group) with onnxruntime's fast kernel
    # (MatMulNBits accuracy_level 4); "float" by float activations (accuracy_level 0: exactly
    # A16, ~8x slower decode than fp32 on CPU). See plugins/quant_gemm.py.
    weight_only_activations: str = "int8"
    # attention plugin without context_fmha: one prompt of context_split_min_len <= tokens <
    # context_split_max_len into an empty cache attends in two halves, skipping a quarter of the
    # causal score matrix (0: never).
    # The window is where onnxruntime 1.32's GroupQueryAttention gains from it on CPU: its cost for
    # the second half over a past of 384+ tokens grows faster than the work (2 threads, SmolLM2
    # shapes: -17% attention time at 128-512 tokens, -7% at 640, +4% at 1024).
    context_split_min_len: int = 128
    context_split_max_len: int = 768
    # Set by the build: the engine dir also holds rank{N}.u8u8.engine, its W8A8 GEMMs in the form
    # that is exact on CPUs without VNNI (trtbuild.cpu_forms); the runtime picks one by probe.
    u8u8_form: bool = False
    # speculative decoding the runtime does by default (TensorRT-LLM's flags): "prompt_lookup" or
    # "draft_tokens_external" (then the draft engine is given at run time), with max_draft_len drafts
    speculative_decoding_mode: str | None = None
    max_draft_len: int = 0  # 0: DEFAULT_MAX_DRAFT_LEN when a mode is set

    def __post_init__(self) -> None:
        if self.trt_compute_capabilities is not None:
            object.__setattr__(self, "trt_compute_capabilities", tuple(self.trt_compute_capabilities))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BuildConfig":
        d = dict(d)
        d["plugin_config"] = PluginConfig(**d.get("plugin_config", {}))
        d["lora_config"] = LoraConfig(**d.get("lora_config", {}))
        return cls(**d)


@dataclass
class EngineConfig:
    pretrained_config: PretrainedConfig
    build_config: BuildConfig
    version: str = __version__
    format_version: int = ENGINE_FORMAT_VERSION
    built_by: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def kv_cache_layout(self) -> str:
        """'shared_buffer' (fused attention: fixed [B, KV, max_seq_len, D]) or 'concat' (growing)."""
        return "shared_buffer" if self.build_config.plugin_config.gpt_attention_plugin else "concat"


def save_engine_config(config: EngineConfig, engine_dir: Path) -> None:
    write_json(engine_dir / "config.json", config.to_dict())


def load_engine_config(engine_dir: str | Path) -> EngineConfig:
    """Read an engine dir's config.json; a mismatched version says what to rebuild."""
    path = Path(engine_dir) / "config.json"
    raw = read_json(path, "--engine_dir must be a dir written by trt-build")
    version = raw.get("version")
    if raw.get("format_version") != ENGINE_FORMAT_VERSION or version != __version__:
        raise TrtbuildError(
            f"{engine_dir} was built by trtbuild {version} (engine format {raw.get('format_version')}); this is "
            f"trtbuild {__version__} (format {ENGINE_FORMAT_VERSION}): rebuild it with trt-build --checkpoint_dir ... "
            f"--output_dir {engine_dir} --force")
    try:
        return EngineConfig(pretrained_config=PretrainedConfig.from_dict(raw["pretrained_config"], str(path)),
                            build_config=BuildConfig.from_dict(raw["build_config"]),
                            version=version, format_version=raw["format_version"], built_by=raw.get("built_by", {}))
    except (KeyError, TypeError) as e:
        raise TrtbuildError(f"{path} is not a valid engine config ({e}); rebuild the engine") from None

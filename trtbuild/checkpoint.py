"""The checkpoint format: TensorRT-LLM's layout (config.json + rank{N}.safetensors + tokenizer/).

Tensor names (per layer i, prefix `transformer.layers.{i}.`), linear weights stored [out, in]:
  transformer.vocab_embedding.weight        [vocab, hidden]
  transformer.position_embedding.weight     [max_pos, hidden]          (learned positions, GPT-2)
  .input_layernorm.weight / .bias           [hidden]                   (bias for layer_norm only)
  .attention.qkv.weight / .bias             [(heads + 2*kv_heads)*head_size, hidden]
  .attention.dense.weight / .bias           [hidden, heads*head_size]
  .post_layernorm.weight / .bias            [hidden]
  .mlp.fc.weight / .bias                    [inter, hidden]   (gate_proj; GPT-2's c_fc)
  .mlp.gate.weight                          [inter, hidden]   (up_proj; gated MLPs only)
  .mlp.proj.weight / .bias                  [hidden, inter]   (down_proj; GPT-2's c_proj)
  transformer.ln_f.weight / .bias           [hidden]
  lm_head.weight                            [vocab, hidden]   (absent when tie_word_embeddings)
A family may add per-layer tensors (Qwen3's .attention.q_norm / .k_norm [head_size]); the
family modules in trtbuild.models say which (`expected_shapes`).
Quantized linears add tensors beside `.weight` (see trtbuild.quantization).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtbuild.errors import TrtbuildError
from trtbuild.fsutil import read_json, write_json
from trtbuild.quant_algo import KV_CACHE_QUANT_ALGOS, QuantAlgo, parse_quant_algo
from trtbuild.version import CHECKPOINT_FORMAT_VERSION, __version__

CONFIG_NAME = "config.json"
TOKENIZER_DIR = "tokenizer"

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


@dataclass
class Mapping:
    """How the model is split over ranks. tp_size/pp_size are 1 today; the layout is per-rank."""

    world_size: int = 1
    tp_size: int = 1
    pp_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size != self.tp_size * self.pp_size:
            raise TrtbuildError(
                f"mapping: world_size {self.world_size} != tp_size {self.tp_size} * pp_size {self.pp_size}")


@dataclass
class QuantConfig:
    """TensorRT-LLM's `quantization` block. quant_algo None means floating point."""

    quant_algo: str | None = None  # W8A16, W4A16, W4A16_GPTQ, W4A16_AWQ, W8A8_SQ_*, ...
    kv_cache_quant_algo: str | None = None  # INT8
    group_size: int = 128  # used when per_group; -1 / 0 means per-channel
    has_zero_point: bool = False
    pre_quant_scale: bool = False
    exclude_modules: list[str] | None = None
    smoothquant_val: float | None = None
    per_group: bool = False

    def __post_init__(self) -> None:
        parse_quant_algo(self.quant_algo)  # an unknown name fails where the config is read
        if self.kv_cache_quant_algo not in (None, *KV_CACHE_QUANT_ALGOS):
            raise TrtbuildError(f"quantization.kv_cache_quant_algo {self.kv_cache_quant_algo!r} is not one of "
                                f"{', '.join(KV_CACHE_QUANT_ALGOS)}")

    @classmethod
    def for_algo(cls, algo: QuantAlgo | None, group_size: int = -1, has_zero_point: bool = False,
                 pre_quant_scale: bool = False, smoothquant_val: float | None = None,
                 int8_kv_cache: bool = False) -> "QuantConfig":
        """The quantization block of a checkpoint whose linears hold `algo` (None: floating point);
        group_size <= 0 means one scale per output channel. lm_head stays floating point."""
        per_group = algo is not None and algo.weight_only and group_size > 0
        return cls(quant_algo=algo.name if algo else None, kv_cache_quant_algo="INT8" if int8_kv_cache else None,
                   group_size=group_size if per_group else -1, has_zero_point=bool(algo and has_zero_point),
                   pre_quant_scale=pre_quant_scale, exclude_modules=["lm_head"] if algo else None,
                   smoothquant_val=smoothquant_val if algo and algo.smoothquant else None, per_group=per_group)

    @property
    def algo(self) -> QuantAlgo | None:
        """What quant_algo means (None: floating-point linears)."""
        return parse_quant_algo(self.quant_algo)

    @property
    def is_quantized(self) -> bool:
        return self.quant_algo is not None or self.kv_cache_quant_algo is not None


@dataclass
class PretrainedConfig:
    """The checkpoint's config.json: what the network builder needs, nothing from HF's classes."""

    architecture: str
    dtype: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_size: int
    intermediate_size: int
    hidden_act: str  # silu | gelu_new | gelu | relu ...
    norm_type: str  # rms_norm | layer_norm
    norm_epsilon: float
    position_embedding_type: str  # rope_gpt_neox | learned_absolute
    max_position_embeddings: int
    rotary_base: float = 10000.0
    rotary_scaling: dict[str, Any] | None = None  # {"type": "llama3", "factor": ..., ...}
    rotary_dim: int | None = None  # partial rotary; None = head_size
    attn_bias: bool = False  # bias on qkv
    dense_bias: bool = False  # bias on attention.dense
    mlp_bias: bool = False
    gated_mlp: bool = True  # SwiGLU-style fc (gate) * gate (up)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (attention.q_norm / k_norm)
    embedding_multiplier: float = 1.0  # the token embedding times this (Gemma: sqrt(hidden))
    attention_scale: float | None = None  # softmax scale; None = 1 / sqrt(head_size)
    # per layer "full_attention" or "sliding_attention" (attending to the last sliding_window tokens,
    # RoPE base rotary_base_local); None = every layer full
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    rotary_base_local: float | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    mapping: Mapping = field(default_factory=Mapping)
    quantization: QuantConfig = field(default_factory=QuantConfig)
    format_version: int = CHECKPOINT_FORMAT_VERSION
    trtbuild_version: str = __version__
    producer: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = CONFIG_NAME) -> "PretrainedConfig":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TrtbuildError(f"{source}: unknown checkpoint config fields {unknown}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                         and f.name not in d)
        if missing:
            raise TrtbuildError(f"{source}: missing checkpoint config fields {missing}")
        d["mapping"] = Mapping(**d.get("mapping", {}))
        try:
            d["quantization"] = QuantConfig(**d.get("quantization", {}))
        except TrtbuildError as e:
            raise TrtbuildError(f"{source}: {e}") from None
        return cls(**d)

    def window(self, layer: int) -> int | None:
        """The attention window of layer `layer` (tokens, the current one included), None if full."""
        if self.layer_types and self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_size

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_size


def save_config(config: PretrainedConfig, out_dir: str | os.PathLike) -> None:
    write_json(Path(out_dir) / CONFIG_NAME, config.to_dict())


def load_config(ckpt_dir: str | os.PathLike) -> PretrainedConfig:
    """Read and validate a checkpoint's config.json."""
    path = Path(ckpt_dir) / CONFIG_NAME
    raw = read_json(path, "--checkpoint_dir must be a dir written by convert_checkpoint.py")
    if "format_version" not in raw:
        raise TrtbuildError(f"{path} has no format_version: not a trtbuild checkpoint; re-run convert_checkpoint.py")
    if raw["format_version"] != CHECKPOINT_FORMAT_VERSION:
        raise TrtbuildError(
            f"{path} is checkpoint format {raw['format_version']} (trtbuild {raw.get('trtbuild_version')}); "
            f"this trtbuild {__version__} reads format {CHECKPOINT_FORMAT_VERSION}: re-run convert_checkpoint.py")
    return PretrainedConfig.from_dict(raw, source=str(path))


def expected_shapes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """Name → shape of every floating-point tensor a checkpoint of this config must hold (from the
    config's family, trtbuild.models)."""
    from trtbuild.models.base import expected_shapes as family_shapes

    return family_shapes(config)


def linear_names(config: PretrainedConfig) -> list[str]:
    """The checkpoint prefixes (without `.weight`) of every linear layer that quantization touches."""
    from trtbuild.models.base import linear_names as family_linears

    return family_linears(config)

"""PEFT LoRA adapters: read them, fold them into checkpoint weights, stack them for the runtime path.

An adapter dir is what `PeftModel.save_pretrained` writes: `adapter_config.json` and exactly one of
`adapter_model.safetensors` / `adapter_model.bin`. Both formats are read the same way; neither is
ever converted into the other.

Target modules use TensorRT-LLM's names (`--lora_target_modules`):

  TensorRT-LLM   Llama / Mistral / Qwen2   GPT-2               checkpoint linear (transformer.layers.{i}.)
  attn_qkv       -                         attn.c_attn         attention.qkv  (all rows)
  attn_q         self_attn.q_proj          -                   attention.qkv  rows [0, q_dim)
  attn_k         self_attn.k_proj          -                   attention.qkv  rows [q_dim, q_dim + kv_dim)
  attn_v         self_attn.v_proj          -                   attention.qkv  rows [q_dim + kv_dim, q_dim + 2 kv_dim)
  attn_dense     self_attn.o_proj          attn.c_proj         attention.dense
  mlp_h_to_4h    mlp.gate_proj             mlp.c_fc            mlp.fc
  mlp_gate       mlp.up_proj               -                   mlp.gate
  mlp_4h_to_h    mlp.down_proj             mlp.c_proj          mlp.proj

Every A is [r, in] and every B is [out, r] in the checkpoint's orientation, with the scale
(lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA, per module after rank_pattern/alpha_pattern)
already folded into B, so that delta W = B @ A and y = x @ W^T + (x @ A^T) @ B^T.

`fan_in_fan_out`: PEFT stores lora_A as an nn.Linear(in, r) and lora_B as nn.Linear(r, out) whatever
the base layer is; fan_in_fan_out only says that the *base* weight (GPT-2's Conv1D) is [in, out], so
that PEFT transposes B @ A before adding it. The checkpoint already holds GPT-2's weights as
[out, in], so the delta is B @ A for every layer, and the flag needs no handling beyond reading it
(PEFT itself forces it to True on Conv1D and False on nn.Linear).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from trtbuild.checkpoint import PretrainedConfig, expected_shapes
from trtbuild.errors import TrtbuildError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"

# The order is also the order of the rank slots inside attention.qkv (see `lora_layout`).
LORA_TARGET_MODULES = ("attn_qkv", "attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_gate",
                       "mlp_4h_to_h")

# HF module path inside a layer → TensorRT-LLM module name, per architecture family.
LLAMA_HF_MODULES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_dense", "mlp.gate_proj": "mlp_h_to_4h", "mlp.up_proj": "mlp_gate",
    "mlp.down_proj": "mlp_4h_to_h",
}
GPT2_HF_MODULES = {
    "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_dense", "mlp.c_fc": "mlp_h_to_4h", "mlp.c_proj": "mlp_4h_to_h",
}
# How the layers are named in each family's module tree.
LLAMA_LAYER_PREFIX = "model.layers."
GPT2_LAYER_PREFIX = "transformer.h."

MODULE_TO_LINEAR = {
    "attn_qkv": "attention.qkv", "attn_q": "attention.qkv", "attn_k": "attention.qkv", "attn_v": "attention.qkv",
    "attn_dense": "attention.dense", "mlp_h_to_4h": "mlp.fc", "mlp_gate": "mlp.gate", "mlp_4h_to_h": "mlp.proj",
}

# Settings of adapter_config.json that change what the adapter computes and that we do not implement:
# better a clear refusal than an engine whose output silently differs from PeftModel's.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora) adapters",
    "lora_bias": "adapters with a bias on lora_B (lora_bias)",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "use_qalora": "QALoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
}

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")


def is_gpt2_family(config: PretrainedConfig) -> bool:
    return config.architecture.startswith("GPT2")


def family_modules(config: PretrainedConfig) -> tuple[str, dict[str, str]]:
    """(HF layer prefix, HF module → TensorRT-LLM module) for the config's architecture."""
    if is_gpt2_family(config):
        return GPT2_LAYER_PREFIX, GPT2_HF_MODULES
    return LLAMA_LAYER_PREFIX, LLAMA_HF_MODULES


def module_rows(config: PretrainedConfig, module: str) -> tuple[int, int, int]:
    """(in_features, row_start, row_end) of a TensorRT-LLM target module in its checkpoint linear."""
    c = config
    H, I, q, kv = c.hidden_size, c.intermediate_size, c.q_dim, c.kv_dim
    table = {
        "attn_qkv": (H, 0, q + 2 * kv), "attn_q": (H, 0, q), "attn_k": (H, q, q + kv),
        "attn_v": (H, q + kv, q + 2 * kv), "attn_dense": (q, 0, H), "mlp_h_to_4h": (H, 0, I),
        "mlp_gate": (H, 0, I), "mlp_4h_to_h": (I, 0, H),
    }
    return table[module]


def module_shape(config: PretrainedConfig, module: str) -> tuple[int, int]:
    """(out_features, in_features) of the delta a target module adds."""
    in_f, start, end = module_rows(config, module)
    return end - start, in_f


@dataclass
class LoraModule:
    """One adapted linear: delta W = b @ a, the scale already folded into b."""

    a: torch.Tensor  # [rank, in]
    b: torch.Tensor  # [out, rank], scaled
    rank: int
    scale: float  # what was folded into b (for reports)
    hf_name: str  # the PEFT module path, e.g. model.layers.3.self_attn.q_proj


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter, in checkpoint terms.

    layers[i][module] for TensorRT-LLM module names; modules_to_save maps checkpoint tensor names
    (`transformer.vocab_embedding.weight`, `lm_head.weight`, norms) to full replacement tensors.
    """

    path: Path
    layers: dict[int, dict[str, LoraModule]]
    modules_to_save: dict[str, torch.Tensor] = field(default_factory=dict)
    ensure_weight_tying: bool = False  # PEFT kept a tied lm_head tied to the replaced embedding
    peft_config: dict[str, Any] = field(default_factory=dict)
    weights_file: str = ""

    @property
    def target_modules(self) -> list[str]:
        """The TensorRT-LLM modules this adapter touches, in LORA_TARGET_MODULES order."""
        present = {m for mods in self.layers.values() for m in mods}
        return [m for m in LORA_TARGET_MODULES if m in present]

    @property
    def max_rank(self) -> int:
        return max((lm.rank for mods in self.layers.values() for lm in mods.values()), default=0)

    def modules(self) -> Iterable[tuple[int, str, LoraModule]]:
        for i in sorted(self.layers):
            for m in LORA_TARGET_MODULES:
                if m in self.layers[i]:
                    yield i, m, self.layers[i][m]

    def __str__(self) -> str:
        extra = f", replaces {', '.join(self.modules_to_save)}" if self.modules_to_save else ""
        return (f"LoRA adapter {self.path}: {len(self.layers)} layers, {' '.join(self.target_modules)}, "
                f"max rank {self.max_rank}{extra}")


# ---------------------------------------------------------------------------------------------
# Reading


def _read_adapter_config(d: Path) -> dict[str, Any]:
    if not d.is_dir():
        raise TrtbuildError(f"LoRA dir {d} is not a directory")
    path = d / ADAPTER_CONFIG
    if not path.is_file():
        raise TrtbuildError(f"LoRA dir {d} has no {ADAPTER_CONFIG}: pass a PEFT adapter dir "
                            "(what PeftModel.save_pretrained writes)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrtbuildError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise TrtbuildError(f"{path} is not a JSON object")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise TrtbuildError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported; only LoRA adapters are")
    for key, what in _UNSUPPORTED_OPTIONS.items():
        if cfg.get(key):
            raise TrtbuildError(f"{path}: {what} are not supported ({key}={cfg[key]!r}); "
                                "merge the adapter with PEFT and convert the merged model instead")
    if cfg.get("r") is None or cfg.get("lora_alpha") is None:
        raise TrtbuildError(f"{path}: needs `r` and `lora_alpha`")
    return cfg


def _read_adapter_weights(d: Path) -> tuple[dict[str, torch.Tensor], str]:
    st, pt = d / ADAPTER_SAFETENSORS, d / ADAPTER_BIN
    if st.is_file() and pt.is_file():
        raise TrtbuildError(f"LoRA dir {d} holds both {ADAPTER_SAFETENSORS} and {ADAPTER_BIN}: "
                            "it is unclear which one is the adapter; remove one of them")
    if st.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(st)), st.name
        except Exception as e:  # safetensors raises its own types for corrupt headers
            raise TrtbuildError(f"{st} is not a readable safetensors file ({e})") from None
    if pt.is_file():
        try:
            state = torch.load(str(pt), map_location="cpu", weights_only=True)
        except Exception as e:
            raise TrtbuildError(f"{pt} is not a readable PyTorch checkpoint ({e})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise TrtbuildError(f"{pt} is not a state dict of tensors")
        return state, pt.name
    raise TrtbuildError(f"LoRA dir {d} has neither {ADAPTER_SAFETENSORS} nor {ADAPTER_BIN}")


def _strip_prefix(name: str) -> str:
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key
    that matches the end of the module path, as a regex on whole dotted components."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _modules_to_save_names(config: PretrainedConfig) -> dict[str, tuple[str, bool]]:
    """HF tensor name → (checkpoint name, transpose) for every tensor a modules_to_save entry may
    replace: the architecture table's single-source rows (embeddings, lm_head, norms, GPT-2's linears)."""
    from trtbuild.convert.weight_map import rows_for

    wanted = set(expected_shapes(config)) | {"lm_head.weight"}
    out = {}
    for row in rows_for(config, wanted):
        if len(row.sources) == 1:
            out[row.sources[0]] = (row.checkpoint, row.transpose)
    return out


def _float_tensor(t: torch.Tensor, where: str) -> torch.Tensor:
    if not t.is_floating_point():
        raise TrtbuildError(f"{where} is {t.dtype}, not floating point")
    return t.to(torch.float32)


def load_lora_adapter(adapter_dir: str | Path, config: PretrainedConfig,
                      dtype: torch.dtype = torch.float32) -> LoraAdapter:
    """Read a PEFT LoRA adapter dir for the base model described by `config`.

    Tensors come back in `dtype` (bf16/fp16 adapters are converted; the scale is folded in fp32).
    Every shape is checked against the base config: an adapter trained for another model fails
    with the tensor's name, its shape and the shape the base model needs.
    """
    d = Path(adapter_dir)
    cfg = _read_adapter_config(d)
    state, fname = _read_adapter_weights(d)
    where = f"{d / fname}"
    r_default, alpha_default = int(cfg["r"]), float(cfg["lora_alpha"])
    use_rslora = bool(cfg.get("use_rslora", False))
    layer_prefix, hf_modules = family_modules(config)
    mts_names = _modules_to_save_names(config)
    mts_shapes = {**expected_shapes(config), "lm_head.weight": (config.vocab_size, config.hidden_size)}

    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    modules_to_save: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = _strip_prefix(key)
        m = _LORA_KEY.match(name)
        if m:
            pairs.setdefault(m["module"], {})[m["ab"]] = (key, tensor)
            continue
        if ".lora_embedding_" in name or ".lora_magnitude_vector" in name or ".lora_" in name:
            raise TrtbuildError(f"{where}: tensor {key} is not supported (only lora_A/lora_B of linear layers; "
                                "LoRA on embeddings, DoRA and lora_B biases are not)")
        # modules_to_save: `lm_head.weight`, older PEFT also `lm_head.modules_to_save[.default].weight`
        plain = re.sub(r"\.modules_to_save(\.[^.]+)?(?=\.(weight|bias)$)", "", name)
        if plain not in mts_names:
            raise TrtbuildError(
                f"{where}: tensor {key} is neither a LoRA weight of a supported target module nor a "
                f"modules_to_save tensor this trtbuild can apply (embeddings, lm_head, norms) for "
                f"{config.architecture}; is this an adapter for that architecture?")
        ckpt, transpose = mts_names[plain]
        t = _float_tensor(tensor, f"{where}: {key}")
        t = t.t() if transpose else t
        if tuple(t.shape) != mts_shapes[ckpt]:
            raise TrtbuildError(
                f"{where}: tensor {key} has shape {list(t.shape)}, the base model needs "
                f"{list(mts_shapes[ckpt])} for {ckpt}: the adapter was made for another base model "
                f"(base_model_name_or_path: {cfg.get('base_model_name_or_path')})")
        modules_to_save[ckpt] = t.to(dtype).contiguous()

    layers: dict[int, dict[str, LoraModule]] = {}
    for module_path, ab in sorted(pairs.items()):
        for side in "AB":
            if side not in ab:
                other = next(iter(ab.values()))[0]
                raise TrtbuildError(f"{where}: {other} has no matching lora_{side} tensor; the file is incomplete")
        layer, trt_module = _parse_module_path(module_path, layer_prefix, hf_modules, config, where, ab["A"][0])
        (a_key, a), (b_key, b) = ab["A"], ab["B"]
        a, b = _float_tensor(a, f"{where}: {a_key}"), _float_tensor(b, f"{where}: {b_key}")
        out_f, in_f = module_shape(config, trt_module)
        r = int(_pattern_value(cfg.get("rank_pattern"), module_path, r_default))
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), module_path, alpha_default))
        for key, t, want, rank_dim in ((a_key, a, [r, in_f], 0), (b_key, b, [out_f, r], 1)):
            if list(t.shape) == want:
                continue
            if t.dim() == 2 and t.shape[1 - rank_dim] == want[1 - rank_dim]:
                raise TrtbuildError(
                    f"{where}: tensor {key} has rank {t.shape[rank_dim]} but {ADAPTER_CONFIG} says r={r} for "
                    f"{module_path} (r / rank_pattern): the weights and the config do not belong together")
            raise TrtbuildError(
                f"{where}: tensor {key} has shape {list(t.shape)}, the base model needs {want} for "
                f"{trt_module} ({_dims(config)}): the adapter was made for another base model "
                f"(base_model_name_or_path: {cfg.get('base_model_name_or_path')})")
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        if trt_module in layers.get(layer, {}):
            raise TrtbuildError(f"{where}: two sets of LoRA tensors for {module_path} (several adapter names "
                                "in one file?); save one adapter per dir")
        layers.setdefault(layer, {})[trt_module] = LoraModule(
            a=a.to(dtype).contiguous(), b=(b * scale).to(dtype).contiguous(), rank=r, scale=scale,
            hf_name=module_path)
    if not layers and not modules_to_save:
        raise TrtbuildError(f"{where} holds no LoRA tensors")
    adapter = LoraAdapter(path=d, layers=layers, modules_to_save=modules_to_save,
                          ensure_weight_tying=bool(cfg.get("ensure_weight_tying", False)),
                          peft_config=cfg, weights_file=fname)
    log.info("%s", adapter)
    return adapter


def _dims(config: PretrainedConfig) -> str:
    c = config
    return (f"{c.architecture}: hidden {c.hidden_size}, intermediate {c.intermediate_size}, "
            f"{c.num_attention_heads} heads / {c.num_key_value_heads} KV heads of {c.head_size}")


def _parse_module_path(module_path: str, layer_prefix: str, hf_modules: dict[str, str], config: PretrainedConfig,
                       where: str, key: str) -> tuple[int, str]:
    m = re.match(rf"^(?:.*\.)?{re.escape(layer_prefix.split('.')[-2])}\.(\d+)\.(.+)$", module_path)
    if not m or m[2] not in hf_modules:
        supported = ", ".join(sorted({k.split('.')[-1] for k in hf_modules}))
        raise TrtbuildError(
            f"{where}: tensor {key} adapts {module_path}, which is not a LoRA target this trtbuild supports for "
            f"{config.architecture} ({supported}); is the adapter for another architecture?")
    layer = int(m[1])
    if layer >= config.num_hidden_layers:
        raise TrtbuildError(f"{where}: tensor {key} is for layer {layer}, the base model has "
                            f"{config.num_hidden_layers} layers: the adapter was made for another base model")
    return layer, hf_modules[m[2]]


# ---------------------------------------------------------------------------------------------
# Merging


def merge_lora(weights: dict[str, torch.Tensor], config: PretrainedConfig,
               adapters: Sequence[LoraAdapter]) -> tuple[dict[str, torch.Tensor], PretrainedConfig]:
    """Fold adapters into checkpoint tensors: W += B @ A for each (all adapters add up), and apply
    modules_to_save replacements. Equals `PeftModel.merge_and_unload()`.

    Inputs are not modified. Returns (weights, config); the config changes when a replacement
    breaks tied embeddings (then `lm_head.weight` is written and tie_word_embeddings becomes False).
    Fits `convert_checkpoint(transform=...)` as `lambda w, c: merge_lora(w, c, adapters)`.
    """
    if not adapters:
        return weights, config
    if config.quantization.quant_algo is not None:
        raise TrtbuildError("LoRA adapters must be merged into floating-point weights, before quantization "
                            f"(this checkpoint is {config.quantization.quant_algo}): convert with --hf_lora_dir "
                            "and the quantization flags together")
    out = dict(weights)
    deltas: dict[str, list[tuple[int, int, torch.Tensor]]] = {}
    for adapter in adapters:
        for i, module, lm in adapter.modules():
            _, start, end = module_rows(config, module)
            name = f"transformer.layers.{i}.{MODULE_TO_LINEAR[module]}.weight"
            deltas.setdefault(name, []).append((start, end, lm.b.float() @ lm.a.float()))
    for name, parts in deltas.items():
        if name not in weights:
            raise TrtbuildError(f"LoRA: checkpoint has no tensor {name} to merge into")
        w = weights[name]
        if not w.is_floating_point():
            raise TrtbuildError(f"LoRA: {name} is {w.dtype} (quantized); merge adapters before quantization")
        merged = w.float().clone()
        for start, end, delta in parts:
            if tuple(delta.shape) != (end - start, merged.shape[1]):
                raise TrtbuildError(f"LoRA: delta for {name} rows {start}:{end} is {list(delta.shape)}, "
                                    f"the tensor is {list(w.shape)}")
            merged[start:end] += delta
        out[name] = merged.to(w.dtype)

    replaced: dict[str, tuple[torch.Tensor, LoraAdapter]] = {}
    for adapter in adapters:
        for name, t in adapter.modules_to_save.items():
            if name in replaced:
                raise TrtbuildError(f"LoRA adapters {replaced[name][1].path} and {adapter.path} both replace {name} "
                                    "(modules_to_save); merge at most one of them")
            replaced[name] = (t, adapter)
    emb, head = "transformer.vocab_embedding.weight", "lm_head.weight"
    if config.tie_word_embeddings and (emb in replaced or head in replaced):
        adapter = (replaced.get(emb) or replaced[head])[1]
        if adapter.ensure_weight_tying:
            # PEFT replaced the embedding and kept lm_head tied to the replacement: stay tied.
            t = replaced.pop(emb, None) or replaced.pop(head)
            replaced.pop(head, None)
            out[emb] = t[0].to(_dtype_of(weights, emb)).contiguous()
        else:
            # The replaced module no longer shares its weight with the other one (what merge_and_unload
            # gives): write both and untie.
            log.info("LoRA modules_to_save replaces %s of a tied model: writing a separate lm_head.weight "
                     "(tie_word_embeddings becomes False)", " and ".join(n for n in (emb, head) if n in replaced))
            if head not in replaced:
                out[head] = weights[emb].clone()
            config = dataclasses.replace(config, tie_word_embeddings=False)
    for name, (t, _) in replaced.items():
        out[name] = t.to(_dtype_of(weights, name)).contiguous()
    config = dataclasses.replace(config, producer={
        **config.producer, "lora_merged": [str(a.path) for a in adapters]})
    return out, config


def _dtype_of(weights: dict[str, torch.Tensor], name: str) -> torch.dtype:
    if name in weights:
        return weights[name].dtype
    return weights["transformer.vocab_embedding.weight"].dtype


# ---------------------------------------------------------------------------------------------
# Stacking for the runtime lora path


@dataclass(frozen=True)
class LoraSlot:
    """Where one target module sits in its linear's stacked rank dimension and output rows."""

    module: str
    rank_start: int  # A rows / B columns [rank_start, rank_start + max_rank)
    row_start: int  # output rows of the checkpoint linear [row_start, row_end)
    row_end: int


@dataclass(frozen=True)
class LoraLinearLayout:
    linear: str  # checkpoint linear under transformer.layers.{i}., e.g. "attention.qkv"
    in_features: int
    out_features: int
    rank: int  # stacked rank = len(slots) * max_rank
    slots: tuple[LoraSlot, ...]


def check_target_modules(config: PretrainedConfig, target_modules: Iterable[str]) -> list[str]:
    """Validate `--lora_target_modules`; returns them deduplicated in LORA_TARGET_MODULES order."""
    mods = list(target_modules)
    unknown = [m for m in mods if m not in LORA_TARGET_MODULES]
    if unknown:
        raise TrtbuildError(f"--lora_target_modules {' '.join(unknown)}: unknown; "
                            f"choose from {' '.join(LORA_TARGET_MODULES)}")
    if "mlp_gate" in mods and not config.gated_mlp:
        raise TrtbuildError(f"--lora_target_modules mlp_gate: {config.architecture} has no gated MLP (no mlp.gate)")
    if not mods:
        raise TrtbuildError("--lora_target_modules is empty")
    return [m for m in LORA_TARGET_MODULES if m in mods]


def lora_layout(config: PretrainedConfig, target_modules: Iterable[str], max_rank: int) -> dict[str, LoraLinearLayout]:
    """The stacked low-rank layout of each targeted checkpoint linear.

    One slot of `max_rank` per target module. Linears other than attention.qkv have one module,
    hence one slot. attention.qkv may have several (attn_qkv, attn_q, attn_k, attn_v, in that
    order, those targeted): A_qkv is the slots' A stacked along rank and B_qkv is block-diagonal,
    each slot's B writing only its own rows (q, k or v), so that
        x @ A_qkv^T @ B_qkv^T = [x A_q^T B_q^T | x A_k^T B_k^T | x A_v^T B_v^T]
    i.e. q, k and v keep their own A, and the network does one low-rank product per linear.
    The qkv rank is thus 3 * max_rank when attn_q, attn_k and attn_v are all targeted.
    """
    if max_rank < 1:
        raise TrtbuildError(f"--max_lora_rank {max_rank} must be at least 1")
    layout: dict[str, list[str]] = {}
    for m in check_target_modules(config, target_modules):
        layout.setdefault(MODULE_TO_LINEAR[m], []).append(m)
    out = {}
    for linear, mods in layout.items():
        slots = []
        for k, m in enumerate(mods):
            in_f, start, end = module_rows(config, m)
            slots.append(LoraSlot(m, k * max_rank, start, end))
        in_f = module_rows(config, mods[0])[0]
        out_f = config.q_dim + 2 * config.kv_dim if linear == "attention.qkv" else module_rows(config, mods[0])[2]
        out[linear] = LoraLinearLayout(linear, in_f, out_f, len(mods) * max_rank, tuple(slots))
    return out


def check_adapter_fits(adapter: LoraAdapter, target_modules: Iterable[str], max_rank: int) -> None:
    """What an engine built for `target_modules` and `max_rank` can run: errors name the adapter."""
    targets = set(target_modules)
    if adapter.modules_to_save:
        raise TrtbuildError(
            f"LoRA adapter {adapter.path} replaces {', '.join(adapter.modules_to_save)} (modules_to_save), which "
            "cannot be switched per request: merge it at conversion (convert_checkpoint.py --hf_lora_dir)")
    for i, module, lm in adapter.modules():
        if module not in targets:
            raise TrtbuildError(
                f"LoRA adapter {adapter.path} targets {module} ({lm.hf_name}), which the engine was not built "
                f"for (--lora_target_modules {' '.join(m for m in LORA_TARGET_MODULES if m in targets)})")
        if lm.rank > max_rank:
            raise TrtbuildError(f"LoRA adapter {adapter.path} has rank {lm.rank} at {lm.hf_name}, above "
                                f"--max_lora_rank {max_rank}: rebuild with --max_lora_rank {adapter.max_rank} or more")


def stack_lora_adapters(adapters: Sequence[LoraAdapter], config: PretrainedConfig, max_rank: int,
                        target_modules: Iterable[str], dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Stack adapters for the runtime path, adapter k at index k (the `lora_task_ids` value).

    Returns, per layer i and targeted checkpoint linear L (see `lora_layout`):
      `transformer.layers.{i}.{L}.lora_A`  [n_adapters, rank_L, in]
      `transformer.layers.{i}.{L}.lora_B`  [n_adapters, out, rank_L]   (scale folded in)
    zero-padded: a rank below max_rank, or a module an adapter does not target, contributes 0.
    The network adds (x @ A[t]^T) @ B[t]^T to the linear's output for a row with task id t.
    """
    layout = lora_layout(config, target_modules, max_rank)
    targets = [s.module for lay in layout.values() for s in lay.slots]
    for adapter in adapters:
        check_adapter_fits(adapter, targets, max_rank)
    n = len(adapters)
    out: dict[str, np.ndarray] = {}
    for i in range(config.num_hidden_layers):
        for linear, lay in layout.items():
            a = np.zeros((n, lay.rank, lay.in_features), dtype=dtype)
            b = np.zeros((n, lay.out_features, lay.rank), dtype=dtype)
            for k, adapter in enumerate(adapters):
                for slot in lay.slots:
                    lm = adapter.layers.get(i, {}).get(slot.module)
                    if lm is None:
                        continue
                    r = lm.rank
                    a[k, slot.rank_start:slot.rank_start + r, :] = lm.a.to(torch.float32).numpy()
                    b[k, slot.row_start:slot.row_end, slot.rank_start:slot.rank_start + r] = \
                        lm.b.to(torch.float32).numpy()
            out[f"transformer.layers.{i}.{linear}.lora_A"] = a
            out[f"transformer.layers.{i}.{linear}.lora_B"] = b
    return out


def union_target_modules(adapters: Sequence[LoraAdapter]) -> list[str]:
    """The target modules an engine needs to run all `adapters` (default for --lora_target_modules)."""
    present = {m for a in adapters for m in a.target_modules}
    return [m for m in LORA_TARGET_MODULES if m in present]


# ---------------------------------------------------------------------------------------------
# Making adapters (tests, benchmarks)


def default_hf_target_modules(model_type: str) -> list[str]:
    if model_type == "gpt2":
        return ["c_attn", "c_proj", "c_fc"]
    return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(model_dir: str | Path, out_dir: str | Path, *, r: int = 4, lora_alpha: float = 8,
                      target_modules: Sequence[str] | None = None, modules_to_save: Sequence[str] | None = None,
                      use_rslora: bool = False, rank_pattern: dict[str, int] | None = None,
                      alpha_pattern: dict[str, float] | None = None, safe_serialization: bool = True,
                      dtype: torch.dtype | None = None, seed: int = 0, b_std: float | None = None,
                      ensure_weight_tying: bool = False) -> Path:
    """Write a PEFT LoRA adapter dir for the HF model in `model_dir`, made with peft itself.

    A and B are random (B non-zero, unlike a fresh PEFT adapter); `b_std` sets B's spread
    (default: PEFT's init_lora_weights=False init). modules_to_save copies get noise added so that
    they differ from the base. `dtype` (e.g. torch.bfloat16) is the dtype the adapter is saved in.
    target_modules are HF names (q_proj, c_attn, ...); default: every supported linear.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    gpt2 = model.config.model_type == "gpt2"
    lc = LoraConfig(
        r=r, lora_alpha=lora_alpha, target_modules=list(target_modules or default_hf_target_modules(
            model.config.model_type)),
        modules_to_save=list(modules_to_save) if modules_to_save else None, use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern or {}), alpha_pattern=dict(alpha_pattern or {}),
        fan_in_fan_out=gpt2, init_lora_weights=False, lora_dropout=0.0, ensure_weight_tying=ensure_weight_tying)
    pm = get_peft_model(model, lc)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if b_std is not None and ".lora_B." in name:
                p.normal_(0.0, b_std)
            elif ".modules_to_save." in name:
                p.add_(torch.randn_like(p) * 0.02)
    if dtype is not None:
        pm = pm.to(dtype)
    out = Path(out_dir)
    pm.save_pretrained(str(out), safe_serialization=safe_serialization)
    return out

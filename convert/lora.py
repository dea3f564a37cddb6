"""PEFT LoRA adapters on the convert path: read them as torch tensors, fold them into checkpoint
weights (== PeftModel.merge_and_unload()), and make real PEFT adapters for tests and benchmarks.

Reading, validating and stacking adapters is torch-free and lives in trtbuild.lora_adapter (shared
with trt-build and the runtime, which must not need torch); its names are re-exported here. See
that module for the target-module table, the A/B orientation and how fan_in_fan_out is handled.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import torch

from trtbuild.checkpoint import PretrainedConfig
from trtbuild.errors import TrtbuildError
from trtbuild.models import Family, family_for
from trtbuild.lora_adapter import (  # noqa: F401  (re-exported: the convert-side API)
    ADAPTER_BIN, ADAPTER_CONFIG, ADAPTER_SAFETENSORS, LORA_TARGET_MODULES, MODULE_TO_LINEAR, LoraAdapter,
    LoraLinearLayout, LoraModule, LoraSlot, check_adapter_fits, check_target_modules, lora_layout, module_rows,
    module_shape,
    read_lora_adapter, stack_lora_adapters, union_target_modules)

log = logging.getLogger(__name__)


def load_lora_adapter(adapter_dir: str | Path, config: PretrainedConfig,
                      dtype: torch.dtype = torch.float32) -> LoraAdapter:
    """Read a PEFT LoRA adapter dir for the base model described by `config` (see
    trtbuild.lora_adapter.read_lora_adapter: the same checks, the same messages), with its tensors
    as torch tensors in `dtype` (bf16/fp16 adapters are converted; the scale is folded in fp32).
    """
    adapter = read_lora_adapter(adapter_dir, config, modules_to_save=True)

    def t(a) -> torch.Tensor:
        return torch.from_numpy(a).to(dtype).contiguous()

    adapter.layers = {i: {m: dataclasses.replace(lm, a=t(lm.a), b=t(lm.b)) for m, lm in mods.items()}
                      for i, mods in adapter.layers.items()}
    adapter.modules_to_save = {k: t(v) for k, v in adapter.modules_to_save.items()}
    return adapter


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
# Making adapters (tests, benchmarks)


def default_hf_target_modules(family: Family) -> list[str]:
    """Every HF linear the family can adapt (q_proj, c_attn, ...)."""
    return sorted({module.rsplit(".", 1)[-1] for module in family.hf_lora_modules})


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
    family = family_for(model.config.architectures[0])
    conv1d = any(row.transpose for row in family.weight_rows)  # weights stored [in, out] (GPT-2)
    lc = LoraConfig(
        r=r, lora_alpha=lora_alpha, target_modules=list(target_modules or default_hf_target_modules(family)),
        modules_to_save=list(modules_to_save) if modules_to_save else None, use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern or {}), alpha_pattern=dict(alpha_pattern or {}),
        fan_in_fan_out=conv1d, init_lora_weights=False, lora_dropout=0.0, ensure_weight_tying=ensure_weight_tying)
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

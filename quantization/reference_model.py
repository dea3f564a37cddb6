"""A small torch forward of the decoder straight over checkpoint tensors (no HF model classes).

It is what calibration runs on, and a float reference for quantized checkpoints (linears are
dequantized with `dequantize_linear`; SmoothQuant activation rounding and the INT8 KV cache are
simulated when `simulate_quant` is on).

Hooks see, by checkpoint prefix, the input of every linear (before any prequant_scaling_factor)
and, per layer, the K (after rotary) and V that the KV cache would store:
    linear_hook(prefix: str, x: Tensor[..., in])
    kv_hook(layer: int, k: Tensor[B, kv_heads, T, D], v: Tensor[B, kv_heads, T, D])
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from trtbuild.checkpoint import PretrainedConfig
from trtbuild.errors import TrtbuildError
from trtbuild.models import family_of
from trtbuild.rope import local_rope, longrope_attention_factor, longrope_inv_freq

from .layout import dequantize_linear

LinearHook = Callable[[str, torch.Tensor], None]
KVHook = Callable[[int, torch.Tensor, torch.Tensor], None]


def _act(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name in ("silu", "swish"):
        return F.silu
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    raise TrtbuildError(f"hidden_act {name!r} is not supported by the reference model")


def rope_inv_freq(config: PretrainedConfig) -> torch.Tensor:
    """Rotary inverse frequencies [rot_dim/2], with llama3 / linear scaling from rotary_scaling."""
    rot = config.rotary_dim or config.head_size
    inv = 1.0 / (config.rotary_base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    sc = config.rotary_scaling
    if not sc:
        return inv.float()
    kind = sc.get("rope_type", sc.get("type"))
    if kind in (None, "default"):
        return inv.float()
    factor = float(sc.get("factor", 1.0))
    if kind == "linear":
        return (inv / factor).float()
    if kind == "longrope":  # the short factors: calibration sequences stay within the original length
        return torch.from_numpy(longrope_inv_freq(config, long=False))
    if kind == "llama3":
        low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old = float(sc["original_max_position_embeddings"])
        low_wl, high_wl = old / low, old / high
        wavelen = 2 * math.pi / inv
        out = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        return torch.where(medium, smoothed, out).float()
    raise TrtbuildError(f"rotary_scaling type {kind!r} is not supported (default, linear, llama3)")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class ReferenceModel:
    """Decoder forward over `weights` (checkpoint names) in float32.

    `weights` is held by reference: replacing `weights[prefix + ".weight"]` (e.g. with a
    dequantized float weight during sequential calibration) changes the next forward.
    """

    def __init__(self, weights: dict[str, torch.Tensor], config: PretrainedConfig, simulate_quant: bool = True):
        c = config
        if c.position_embedding_type not in ("rope_gpt_neox", "learned_absolute"):
            raise TrtbuildError(f"position_embedding_type {c.position_embedding_type!r} is not supported")
        if c.norm_type not in ("rms_norm", "layer_norm"):
            raise TrtbuildError(f"norm_type {c.norm_type!r} is not supported")
        self.weights = weights
        self.config = c
        self.family = family_of(c)
        self.simulate_quant = simulate_quant
        self.act = _act(c.hidden_act)
        self._inv_freq = rope_inv_freq(c) if c.position_embedding_type == "rope_gpt_neox" else None
        self._inv_freq_local = rope_inv_freq(local_rope(c)) if c.rotary_base_local is not None else None
        self._rope_cache: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}

    # -- tensors ----------------------------------------------------------------------------
    def _t(self, name: str) -> torch.Tensor:
        t = self.weights.get(name)
        if t is None:
            raise TrtbuildError(f"checkpoint tensor {name} is missing")
        return t.float()

    def _opt(self, name: str) -> Optional[torch.Tensor]:
        t = self.weights.get(name)
        return None if t is None else t.float()

    def linear(self, prefix: str, x: torch.Tensor, hook: Optional[LinearHook] = None) -> torch.Tensor:
        if hook is not None:
            hook(prefix, x)
        w = self.weights.get(prefix + ".weight")
        if w is None:
            raise TrtbuildError(f"checkpoint tensor {prefix}.weight is missing")
        if w.is_floating_point():
            wf = w.float()
            p = self._opt(prefix + ".prequant_scaling_factor")
            if p is not None:
                x = x * p
        else:
            wf = dequantize_linear(self.weights, prefix, self.config, apply_prequant=False)
            p = self._opt(prefix + ".prequant_scaling_factor")
            if p is not None:
                x = x * p
            algo = self.config.quantization.algo
            if self.simulate_quant and algo is not None and algo.smoothquant:
                x = self._fake_quant_act(prefix, x, per_token=algo.per_token)
        y = x @ wf.t()
        b = self._opt(prefix + ".bias")
        return y + b if b is not None else y

    def _fake_quant_act(self, prefix: str, x: torch.Tensor, per_token: bool) -> torch.Tensor:
        if per_token:
            s = (x.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-12)
        else:
            s = self._t(prefix + ".act_scale").reshape(())
        return torch.clamp(torch.round(x / s), -127, 127) * s

    def norm(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        w = self._t(prefix + ".weight")
        eps = self.config.norm_epsilon
        if self.config.norm_type == "rms_norm":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
        return F.layer_norm(x, (x.shape[-1],), w, self._opt(prefix + ".bias"), eps)

    def _rope(self, n: int, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if (n, local) not in self._rope_cache:
            pos = torch.arange(n, dtype=torch.float32)
            inv_freq, scale = (self._inv_freq_local if local else self._inv_freq), 1.0
            sc = self.config.rotary_scaling or {}
            if sc.get("type") == "longrope":
                inv_freq = torch.from_numpy(longrope_inv_freq(self.config, n > sc["original_max_position_embeddings"]))
                scale = longrope_attention_factor(self.config)
            f = torch.outer(pos, inv_freq)
            emb = torch.cat((f, f), dim=-1)
            # one length per form kept, as before (calibration runs one length)
            self._rope_cache = {k: v for k, v in self._rope_cache.items() if k[1] != local}
            self._rope_cache[n, local] = (emb.cos() * scale, emb.sin() * scale)
        return self._rope_cache[n, local]

    def _apply_rope(self, x: torch.Tensor, local: bool = False) -> torch.Tensor:
        cos, sin = self._rope(x.shape[-2], local)
        rot = cos.shape[-1]
        if rot == x.shape[-1]:
            return x * cos + _rotate_half(x) * sin
        xr, xp = x[..., :rot], x[..., rot:]
        return torch.cat((xr * cos + _rotate_half(xr) * sin, xp), dim=-1)

    # -- forward ----------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = F.embedding(input_ids, self._t("transformer.vocab_embedding.weight")) * self.config.embedding_multiplier
        if self.config.position_embedding_type == "learned_absolute":
            pos = torch.arange(input_ids.shape[-1])
            h = h + F.embedding(pos, self._t("transformer.position_embedding.weight"))
        return h

    def attention(self, i: int, x: torch.Tensor, linear_hook: Optional[LinearHook] = None,
                  kv_hook: Optional[KVHook] = None) -> torch.Tensor:
        c = self.config
        p = f"transformer.layers.{i}.attention."
        B, T, _ = x.shape
        nh, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_size
        qkv = self.linear(p + "qkv", x, linear_hook)
        q, k, v = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
        q = q.reshape(B, T, nh, d).transpose(1, 2)
        k = k.reshape(B, T, nkv, d).transpose(1, 2)
        v = v.reshape(B, T, nkv, d).transpose(1, 2)
        if c.qk_norm:  # per head, before RoPE
            q, k = self.norm(p + "q_norm", q), self.norm(p + "k_norm", k)
        window = c.window(i)
        if self._inv_freq is not None:
            local = window is not None and c.rotary_base_local is not None
            q, k = self._apply_rope(q, local), self._apply_rope(k, local)
        if kv_hook is not None:
            kv_hook(i, k, v)
        qc = c.quantization
        if self.simulate_quant and qc.kv_cache_quant_algo == "INT8":
            s = self.weights.get(p + "kv_cache_scaling_factor")
            if s is not None:
                s = s.float()
                k = torch.clamp(torch.round(k / s[0]), -127, 127) * s[0]
                v = torch.clamp(torch.round(v / s[1]), -127, 127) * s[1]
        if nkv != nh:
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
        scale = c.attention_scale if c.attention_scale is not None else 1.0 / math.sqrt(d)
        if window is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:  # query i sees key j iff 0 <= i - j < window
            pos = torch.arange(T)
            seen = (pos[:, None] >= pos[None, :]) & (pos[:, None] - pos[None, :] < window)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=seen, scale=scale)
        o = o.transpose(1, 2).reshape(B, T, nh * d)
        return self.linear(p + "dense", o, linear_hook)

    def mlp(self, i: int, x: torch.Tensor, linear_hook: Optional[LinearHook] = None) -> torch.Tensor:
        p = f"transformer.layers.{i}.mlp."
        h = self.act(self.linear(p + "fc", x, linear_hook))
        if self.config.gated_mlp:
            h = h * self.linear(p + "gate", x, linear_hook)
        return self.linear(p + "proj", h, linear_hook)

    def layer(self, i: int, h: torch.Tensor, linear_hook: Optional[LinearHook] = None,
              kv_hook: Optional[KVHook] = None) -> torch.Tensor:
        """Decoder layer i: the family's block (trtbuild.models) over this model's helpers."""
        return self.family.torch_layer(self, i, h, linear_hook, kv_hook)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm("transformer.ln_f", h)
        name = "transformer.vocab_embedding.weight" if self.config.tie_word_embeddings else "lm_head.weight"
        return h @ self._t(name).t()

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, linear_hook: Optional[LinearHook] = None,
                kv_hook: Optional[KVHook] = None) -> torch.Tensor:
        """input_ids [B, T] (no padding) → logits [B, T, vocab] float32."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        h = self.embed(input_ids)
        for i in range(self.config.num_hidden_layers):
            h = self.layer(i, h, linear_hook, kv_hook)
        return self.head(h)

    __call__ = forward

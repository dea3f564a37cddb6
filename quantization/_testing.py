"""Tiny random models for the quantization tests: HF state dicts hand-mapped to checkpoint tensors.

Private to the tests (needs transformers); the real converter lives in trtbuild.convert.
"""

from __future__ import annotations

import torch

from trtbuild.checkpoint import PretrainedConfig


def tiny_llama(seed: int = 0, *, llama3_rope: bool = True, tie: bool = False, qkv_bias: bool = False,
               hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, inter: int = 128,
               vocab: int = 128):
    """(hf_model, weights, config) for a tiny random Llama (GQA, optional llama3 rope) or Qwen2 (qkv_bias)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if llama3_rope:
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    kw = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv_heads, intermediate_size=inter, max_position_embeddings=256,
              rms_norm_eps=1e-5, tie_word_embeddings=tie, rope_parameters=rope)
    if qkv_bias:
        hf_cfg = Qwen2Config(**kw)
        model = Qwen2ForCausalLM(hf_cfg)
    else:
        hf_cfg = LlamaConfig(**kw)
        model = LlamaForCausalLM(hf_cfg)
    model.eval()
    with torch.no_grad():  # random norms, so that folding scales into them is exercised
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    head = hidden // heads
    w = {"transformer.vocab_embedding.weight": sd["model.embed_tokens.weight"],
         "transformer.ln_f.weight": sd["model.norm.weight"]}
    if not tie:
        w["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(layers):
        h, p = f"model.layers.{i}.", f"transformer.layers.{i}."
        w[p + "input_layernorm.weight"] = sd[h + "input_layernorm.weight"]
        w[p + "post_layernorm.weight"] = sd[h + "post_attention_layernorm.weight"]
        w[p + "attention.qkv.weight"] = torch.cat([sd[h + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        if qkv_bias:
            w[p + "attention.qkv.bias"] = torch.cat([sd[h + f"self_attn.{x}_proj.bias"] for x in "qkv"])
        w[p + "attention.dense.weight"] = sd[h + "self_attn.o_proj.weight"]
        w[p + "mlp.fc.weight"] = sd[h + "mlp.gate_proj.weight"]
        w[p + "mlp.gate.weight"] = sd[h + "mlp.up_proj.weight"]
        w[p + "mlp.proj.weight"] = sd[h + "mlp.down_proj.weight"]
    cfg = PretrainedConfig(
        architecture="Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM", dtype="float32",
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_size=head, intermediate_size=inter, hidden_act="silu",
        norm_type="rms_norm", norm_epsilon=1e-5, position_embedding_type="rope_gpt_neox",
        max_position_embeddings=256, rotary_base=rope["rope_theta"],
        rotary_scaling=rope if llama3_rope else None, attn_bias=qkv_bias, gated_mlp=True,
        tie_word_embeddings=tie)
    return model, w, cfg


def tiny_gpt2(seed: int = 0, *, hidden: int = 64, layers: int = 2, heads: int = 4, vocab: int = 128):
    """(hf_model, weights, config) for a tiny random GPT-2 (Conv1D weights [in, out] transposed)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf_cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256,
                        bos_token_id=0, eos_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".ln_" in n:
                p.copy_((1.0 if n.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    w = {"transformer.vocab_embedding.weight": sd["transformer.wte.weight"],
         "transformer.position_embedding.weight": sd["transformer.wpe.weight"],
         "transformer.ln_f.weight": sd["transformer.ln_f.weight"],
         "transformer.ln_f.bias": sd["transformer.ln_f.bias"]}
    for i in range(layers):
        h, p = f"transformer.h.{i}.", f"transformer.layers.{i}."
        for a, b in (("ln_1", "input_layernorm"), ("ln_2", "post_layernorm")):
            w[p + b + ".weight"] = sd[h + a + ".weight"]
            w[p + b + ".bias"] = sd[h + a + ".bias"]
        for a, b in (("attn.c_attn", "attention.qkv"), ("attn.c_proj", "attention.dense"),
                     ("mlp.c_fc", "mlp.fc"), ("mlp.c_proj", "mlp.proj")):
            w[p + b + ".weight"] = sd[h + a + ".weight"].t().contiguous()
            w[p + b + ".bias"] = sd[h + a + ".bias"]
    cfg = PretrainedConfig(
        architecture="GPT2LMHeadModel", dtype="float32", vocab_size=vocab, hidden_size=hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        head_size=hidden // heads, intermediate_size=4 * hidden, hidden_act="gelu_new",
        norm_type="layer_norm", norm_epsilon=hf_cfg.layer_norm_epsilon,
        position_embedding_type="learned_absolute", max_position_embeddings=256, attn_bias=True,
        dense_bias=True, mlp_bias=True, gated_mlp=False, tie_word_embeddings=True)
    return model, w, cfg


def tiny_tokenizer(texts: list[str], vocab_size: int = 128):
    """A whitespace-split BPE `tokenizers.Tokenizer` trained on texts, with at most vocab_size ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]"], limit_alphabet=vocab_size // 2,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    assert tok.get_vocab_size() <= vocab_size
    return tok

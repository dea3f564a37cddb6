#!/usr/bin/env python
"""A random-weight Hugging Face model dir shaped like a model users run, for speed benchmarks.

Speed does not depend on the weights' values (accuracy is measured on real models elsewhere), so a
model of the size users run can be benchmarked without a model hub: its transformers config, random
weights (transformers' own initialization), and the default model's tokenizer (its ids are valid
in any larger vocabulary; the benchmark only needs the same token ids for every engine).

    python benchmarks/random_model.py qwen2-0.5b            # → ~/.cache/trtbuild/models/random-qwen2-0.5b
    python benchmarks/bench_engines.py --model_dir ~/.cache/trtbuild/models/random-qwen2-0.5b
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

# name → (transformers config class, its arguments)
SHAPES: dict[str, tuple[str, dict]] = {
    # Qwen2-0.5B: 24 layers, hidden 896, 14 query / 2 KV heads, intermediate 4864, vocabulary
    # 151,936, an untied lm_head (as the issue that asked for it measured)
    "qwen2-0.5b": ("Qwen2Config", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151_936, max_position_embeddings=32_768, rope_theta=1_000_000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", torch_dtype="float32",
        bos_token_id=1, eos_token_id=2)),
}
DEFAULT_TOKENIZER_MODEL = "smollm2-135m-instruct"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def make_random_model(shape: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write `shape`'s random model to out_dir (through a temporary dir, renamed at the end)."""
    import torch
    import transformers

    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}: choose one of {', '.join(SHAPES)}")
    if (out_dir / "config.json").exists():
        return out_dir
    config_class, kwargs = SHAPES[shape]
    config = getattr(transformers, config_class)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy2(tokenizer_dir / name, tmp / name)
    tmp.rename(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("--output_dir", type=Path, help="default: ~/.cache/trtbuild/models/random-SHAPE")
    p.add_argument("--tokenizer_dir", type=Path, help="default: the fetched default model")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from trtbuild.fetch import default_cache_dir, fetch_model

    tokenizer_dir = a.tokenizer_dir or fetch_model(DEFAULT_TOKENIZER_MODEL)
    out = a.output_dir or default_cache_dir() / f"random-{a.shape}"
    print(make_random_model(a.shape, out, tokenizer_dir, a.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""HF → checkpoint conversion and LoRA loaders (installed as trtbuild.convert)."""

#!/usr/bin/env python
"""Convert a Hugging Face model dir into a trtbuild checkpoint (TensorRT-LLM's convert_checkpoint.py)."""

from trtbuild.convert.cli import main

if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""ROUGE and perplexity of a trtbuild engine beside its HF model (TensorRT-LLM's examples/summarize.py)."""

from trtbuild.evaluate.summarize import main

if __name__ == "__main__":
    main()

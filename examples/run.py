#!/usr/bin/env python
"""Generate text with a trtbuild engine (TensorRT-LLM's examples/run.py)."""

from trtbuild.cli.run import main

if __name__ == "__main__":
    main()

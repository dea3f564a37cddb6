"""The trtbuild version, written into every artifact and checked when one is loaded."""

__version__ = "0.1.0"

# Bumped whenever the checkpoint layout changes incompatibly.
CHECKPOINT_FORMAT_VERSION = 1
# Bumped whenever the engine dir layout or the engine's inputs/outputs change incompatibly.
ENGINE_FORMAT_VERSION = 5  # 2: probes/, rank{N}.u8u8.engine, the use_context_fmha input; 3: LmHead;
# 4: WeightOnlyQuantMatMul; 5: GenerationAttention (the prompt form's If inside the prompt branch)

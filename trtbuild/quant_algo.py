"""TensorRT-LLM's quant_algo names and what each means, in one table (torch-free).

Every place that needs to know whether a checkpoint's linears are weight-only, how many bits they
hold or whether SmoothQuant scales activations per token reads a `QuantAlgo` from here
(`QuantConfig.algo`), instead of parsing the name.
"""

from __future__ import annotations

from dataclasses import dataclass

from trtbuild.errors import TrtbuildError


@dataclass(frozen=True)
class QuantAlgo:
    """One quant_algo value: how the linears' weights and activations are stored and computed."""

    name: str  # TensorRT-LLM's string, as written in a checkpoint's config.json
    weight_bits: int  # 8 or 4
    method: str  # rtn | gptq | awq | smoothquant: how the integer weights were found
    per_channel: bool = False  # SmoothQuant: one weight scale per output channel (else per tensor)
    per_token: bool = False  # SmoothQuant: dynamic activation scale per token (else one static scale)

    @property
    def weight_only(self) -> bool:
        """W8A16 / W4A16*: integer weights meet floating-point activations."""
        return self.method != "smoothquant"

    @property
    def smoothquant(self) -> bool:
        """W8A8_SQ_*: int8 weights and int8 activations."""
        return self.method == "smoothquant"


def _smoothquant(per_channel: bool, per_token: bool) -> QuantAlgo:
    name = "W8A8_SQ_PER_CHANNEL" if per_channel else "W8A8_SQ_PER_TENSOR"
    name += "_PER_TOKEN_PLUGIN" if per_token else ("_PER_TENSOR_PLUGIN" if per_channel else "_PLUGIN")
    return QuantAlgo(name, 8, "smoothquant", per_channel, per_token)


QUANT_ALGOS: dict[str, QuantAlgo] = {a.name: a for a in (
    QuantAlgo("W8A16", 8, "rtn"),
    QuantAlgo("W4A16", 4, "rtn"),
    QuantAlgo("W4A16_GPTQ", 4, "gptq"),
    QuantAlgo("W8A16_GPTQ", 8, "gptq"),  # imported from 8-bit GPTQ checkpoints
    QuantAlgo("W4A16_AWQ", 4, "awq"),
    *(_smoothquant(c, t) for c in (False, True) for t in (False, True)),
)}

KV_CACHE_QUANT_ALGOS = ("INT8",)


def weight_only_algo(bits: int, method: str) -> QuantAlgo:
    """The weight-only algo of `bits` found by `method` (rtn, gptq, awq)."""
    for algo in QUANT_ALGOS.values():
        if algo.weight_only and algo.weight_bits == bits and algo.method == method:
            return algo
    raise TrtbuildError(f"no weight-only quant_algo holds {bits}-bit weights found by {method}")


def smoothquant_algo(per_channel: bool, per_token: bool) -> QuantAlgo:
    """The SmoothQuant W8A8 algo with per-channel weight and / or per-token activation scales."""
    return QUANT_ALGOS[_smoothquant(per_channel, per_token).name]


def parse_quant_algo(name: str | None, source: str = "quantization.quant_algo") -> QuantAlgo | None:
    """The QuantAlgo named `name` (None: floating point); an unknown name is an error naming `source`."""
    if name is None:
        return None
    algo = QUANT_ALGOS.get(name)
    if algo is None:
        raise TrtbuildError(f"{source}: quant_algo {name!r} is not one of {', '.join(QUANT_ALGOS)}")
    return algo

"""Architecture families, one module each, keyed by the HF `architectures` name (see base.py)."""

from __future__ import annotations

from trtbuild.checkpoint import PretrainedConfig
from trtbuild.errors import TrtbuildError

from . import gemma3, gpt2, llama, phi3, qwen3
from .base import Family

FAMILIES: tuple[Family, ...] = (llama.FAMILY, gpt2.FAMILY, qwen3.FAMILY, phi3.FAMILY, gemma3.FAMILY)
BY_ARCHITECTURE: dict[str, Family] = {arch: f for f in FAMILIES for arch in f.architectures}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(BY_ARCHITECTURE)


def family_for(architecture: str | None, source: str = "config.json") -> Family:
    """The family of an HF `architectures` name; one line naming the supported ones otherwise."""
    family = BY_ARCHITECTURE.get(architecture or "")
    if family is None:
        raise TrtbuildError(f"{source}: architecture {architecture!r} is not supported; supported: "
                            f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return family


def family_of(config: PretrainedConfig) -> Family:
    """The family of a checkpoint or engine config."""
    return family_for(config.architecture, "checkpoint config")

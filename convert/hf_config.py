"""Read a Hugging Face config.json (transformers 4.x or 5.x) into a trtbuild PretrainedConfig,
through the family module of its architecture (trtbuild.models)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trtbuild.checkpoint import PretrainedConfig
from trtbuild.errors import TrtbuildError
from trtbuild.fsutil import read_json
from trtbuild.models import SUPPORTED_ARCHITECTURES, family_for

SUPPORTED_ACTIVATIONS = ("silu", "gelu_new", "gelu_pytorch_tanh", "gelu", "relu")

__all__ = ["SUPPORTED_ARCHITECTURES", "pretrained_config_from_hf", "read_hf_config"]


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    """Load config.json of an HF model dir, with errors that name the file."""
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise TrtbuildError(f"--model_dir {model_dir} is not a directory")
    return read_json(path, "--model_dir must be a Hugging Face model dir with a config.json")


def pretrained_config_from_hf(model_dir: str | Path, dtype: str) -> PretrainedConfig:
    """Translate an HF model dir's config.json into a checkpoint config of the given dtype."""
    hf = read_hf_config(model_dir)
    source = str(Path(model_dir) / "config.json")
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    family = family_for(arch, source)
    try:
        config = family.read_config(hf, arch, dtype, source)
    except KeyError as e:
        raise TrtbuildError(f"{source}: missing field {e.args[0]!r} required for {arch}") from None
    if config.hidden_act not in SUPPORTED_ACTIVATIONS:
        raise TrtbuildError(f"{source}: hidden_act {config.hidden_act!r} is not supported "
                            f"({', '.join(SUPPORTED_ACTIVATIONS)})")
    config.producer = {"name": "trtbuild.convert", "source_model_dir": str(Path(model_dir).resolve()),
                       "source_architecture": arch}
    return config

"""Lazy reading of HF weights: single or sharded safetensors, or pytorch_model*.bin.

Tensors are read one at a time (safetensors are memory-mapped, .bin shards loaded with mmap and
dropped when done), so a model is never held twice in memory during conversion.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from trtbuild.errors import TrtbuildError


class HFWeightReader:
    """name → tensor over every weight file of an HF model dir; `prefix_aliases` tolerates the
    `transformer.`/`model.` prefix being absent (the original GPT-2 files have none)."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self.files = self._weight_files()
        self._where: dict[str, Path] = {}
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        for f in self.files:
            for name in self._names_in(f):
                self._where[name] = f

    def _weight_files(self) -> list[Path]:
        d = self.model_dir
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = d / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise TrtbuildError(f"{index} is not a valid shard index ({e})") from None
                files = sorted({d / f for f in weight_map.values()})
                missing = [str(f) for f in files if not f.is_file()]
                if missing:
                    raise TrtbuildError(f"{index} lists shards that are missing: {', '.join(missing)}")
                return files
        for pattern in ("*.safetensors", "pytorch_model*.bin"):
            files = sorted(p for p in d.glob(pattern) if not p.name.startswith("adapter_"))
            if files:
                return files
        raise TrtbuildError(f"{d} has no weights (model.safetensors, model-*.safetensors or pytorch_model*.bin)")

    def _names_in(self, f: Path) -> list[str]:
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as h:
                    return list(h.keys())
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise TrtbuildError(f"{f} is not a readable safetensors file ({e}); re-download or re-save it") from None
        return list(self._load_bin(f).keys())

    def _load_bin(self, f: Path) -> dict[str, torch.Tensor]:
        if self._bin_cache is None or self._bin_cache[0] != f:
            try:
                state = torch.load(str(f), map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:
                raise TrtbuildError(f"{f} is not a readable PyTorch checkpoint ({e})") from None
            self._bin_cache = (f, state)
        return self._bin_cache[1]

    def resolve(self, name: str) -> str | None:
        """The name as stored, trying the prefix-less form HF sometimes saves."""
        if name in self._where:
            return name
        for prefix in ("transformer.", "model."):
            if name.startswith(prefix) and name[len(prefix):] in self._where:
                return name[len(prefix):]
        return None

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor; errors name the tensor and the file."""
        stored = self.resolve(name)
        if stored is None:
            raise TrtbuildError(f"tensor {name} not found in {self.model_dir} "
                                f"({', '.join(f.name for f in self.files)}); is the model dir complete?")
        f = self._where[stored]
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as h:
                    return h.get_tensor(stored)
            except Exception as e:
                raise TrtbuildError(f"{f}: tensor {stored} could not be read ({e}); the file is truncated or corrupt") from None
        return self._load_bin(f)[stored]

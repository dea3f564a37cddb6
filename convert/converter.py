"""HF model dir → trtbuild checkpoint dir (config.json + rank0.safetensors + tokenizer/)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from trtbuild.checkpoint import (SUPPORTED_DTYPES, TOKENIZER_DIR, PretrainedConfig, expected_shapes,
                                 rank_file, save_config)
from trtbuild.convert.hf_config import pretrained_config_from_hf
from trtbuild.convert.hf_reader import HFWeightReader
from trtbuild.convert.weight_map import IGNORED_SUFFIXES, rows_for
from trtbuild.errors import TrtbuildError
from trtbuild.fsutil import atomic_output_dir, check_output_dir, dir_size, human_bytes
from trtbuild.ranks import check_mapping, split_tensors

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json", "chat_template.jinja",
                   "chat_template.json", "added_tokens.json")


@dataclass
class ConversionSummary:
    output_dir: Path
    architecture: str
    num_parameters: int
    dtype: str
    size_bytes: int
    seconds: float

    def __str__(self) -> str:
        return (f"checkpoint {self.output_dir}: {self.architecture}, {self.num_parameters / 1e6:.1f}M parameters, "
                f"{self.dtype}, {human_bytes(self.size_bytes)} on disk, {self.seconds:.1f} s")


def read_hf_weights(model_dir: str | Path, config: PretrainedConfig, progress: bool = True) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor of `config`, read from the HF dir through the architecture's table,
    checked against the expected shapes and cast to config.dtype."""
    reader = HFWeightReader(model_dir)
    if not config.tie_word_embeddings and reader.resolve("lm_head.weight") is None:
        # Some dirs tie embeddings without saying so in config.json.
        log.warning("lm_head.weight not in %s: using the tied token embedding", model_dir)
        config.tie_word_embeddings = True
    shapes = expected_shapes(config)
    rows = rows_for(config, set(shapes))
    dtype = TORCH_DTYPES[config.dtype]
    used: set[str] = set()
    weights: dict[str, torch.Tensor] = {}
    for row in tqdm(rows, desc="convert", unit="tensor", disable=not progress):
        parts = []
        for src in row.sources:
            t = reader.get(src)
            used.add(reader.resolve(src) or src)
            parts.append(t.t() if row.transpose else t)
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if row.part is not None:  # the k-th of n equal row blocks of a fused HF tensor
            k, n = row.part
            if tensor.shape[0] % n:
                raise TrtbuildError(f"{model_dir}: tensor {row.sources[0]} has {tensor.shape[0]} rows, "
                                    f"not {n} equal parts")
            tensor = tensor.chunk(n, dim=0)[k]
        if row.offset:
            tensor = tensor.float() + row.offset
        if tuple(tensor.shape) != shapes[row.checkpoint]:
            raise TrtbuildError(
                f"{model_dir}: tensor {' + '.join(row.sources)} has shape {tuple(tensor.shape)}, "
                f"expected {shapes[row.checkpoint]} from config.json")
        if not tensor.is_floating_point():
            raise TrtbuildError(f"{model_dir}: tensor {row.sources[0]} is {tensor.dtype}, not floating point: a "
                                "pre-quantized model (GPTQ, AWQ, bitsandbytes) cannot be converted; convert its "
                                "floating-point original and quantize with --use_weight_only --weight_only_precision "
                                "int4_gptq (or int4_awq, int4, int8)")
        weights[row.checkpoint] = tensor.to(dtype).contiguous()
    leftover = sorted(n for n in reader.names() - used if not n.endswith(IGNORED_SUFFIXES))
    if leftover:
        log.warning("%d tensors of %s were not used: %s", len(leftover), model_dir, ", ".join(leftover[:8]))
    return weights


def copy_tokenizer(model_dir: Path, out_dir: Path) -> None:
    """Copy the tokenizer files; write tokenizer.json from a slow tokenizer when it is absent."""
    dst = out_dir / TOKENIZER_DIR
    dst.mkdir()
    found = [f for f in TOKENIZER_FILES if (model_dir / f).is_file()]
    for f in found:
        shutil.copy2(model_dir / f, dst / f)
    if "tokenizer.json" not in found and found:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
        tok.backend_tokenizer.save(str(dst / "tokenizer.json"))
    if not found:
        log.warning("%s has no tokenizer files: run.py will need --tokenizer_dir", model_dir)


def convert_checkpoint(model_dir: str | Path, output_dir: str | Path, dtype: str = "float32",
                       force: bool = False, progress: bool = True, transform=None, tp_size: int = 1,
                       pp_size: int = 1) -> ConversionSummary:
    """Convert an HF model dir into a checkpoint dir, atomically.

    `transform(weights, config) -> (weights, config)` runs between reading and writing; LoRA merging
    and quantization plug in there. tp_size > 1 writes rank{r}.safetensors split over the ranks
    (trtbuild.ranks).
    """
    start = time.time()
    if dtype not in SUPPORTED_DTYPES:
        raise TrtbuildError(f"--dtype {dtype!r} is not one of {', '.join(SUPPORTED_DTYPES)}")
    model_dir = Path(model_dir)
    out = check_output_dir(output_dir, force)
    config = pretrained_config_from_hf(model_dir, dtype)
    check_mapping(config, tp_size, pp_size)  # before the reading: a tp_size that does not divide is one line
    weights = read_hf_weights(model_dir, config, progress)
    num_parameters = sum(t.numel() for t in weights.values())
    if transform is not None:
        weights, config = transform(weights, config)
    config = dataclasses.replace(config, mapping=check_mapping(config, tp_size, pp_size))
    with atomic_output_dir(out) as tmp:
        for rank in range(config.mapping.world_size):
            save_file(split_tensors(config, weights, config.mapping, rank), str(tmp / rank_file(rank)),
                      metadata={"format": "pt"})
        copy_tokenizer(model_dir, tmp)
        save_config(config, tmp)
    return ConversionSummary(out, config.architecture, num_parameters, dtype, dir_size(out), time.time() - start)

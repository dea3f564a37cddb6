"""Zero-copy reading of safetensors files as numpy memmaps (bf16 included), without torch.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then the raw bytes. Reading it ourselves lets the builder and the runtime stay
torch-free and gives precise errors for truncated or corrupt files.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from trtbuild.errors import TrtbuildError

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_, "F64": np.float64}


def read_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """name → read-only memory-mapped array; raises TrtbuildError naming the file if it is damaged."""
    path = Path(path)
    if not path.is_file():
        raise TrtbuildError(f"{path} not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise TrtbuildError(f"{path} is truncated (no safetensors header); re-run the step that wrote it")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise TrtbuildError(f"{path} is corrupt or truncated (header length {n} > file size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TrtbuildError(f"{path} is corrupt: its safetensors header is not JSON") from None
    header.pop("__metadata__", None)
    data_start = 8 + n
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(size - data_start,)) \
        if size > data_start else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if info["dtype"] not in DTYPES:
            raise TrtbuildError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        if end > mm.shape[0]:
            raise TrtbuildError(f"{path} is truncated: tensor {name} ends at byte {data_start + end}, "
                                f"the file has {size}; re-run the step that wrote it")
        dtype = np.dtype(DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        if (end - begin) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise TrtbuildError(f"{path}: tensor {name} has {end - begin} bytes for shape {shape} {info['dtype']}")
        out[name] = mm[begin:end].view(dtype).reshape(shape)
    return out

"""PEFT LoRA adapter dirs in checkpoint terms, with numpy only: shared by the converter (merging,
through trtbuild.convert.lora), the builder (validating and storing adapters beside the engine) and
the runtime (loading adapters into a running engine), so that none of the three needs torch to read
an adapter and all three accept and refuse exactly the same ones.

An adapter dir is what `PeftModel.save_pretrained` writes: `adapter_config.json` and exactly one of
`adapter_model.safetensors` / `adapter_model.bin`. Both formats are read the same way, without torch
(safetensors through trtbuild.tensor_file, .bin through the small zip/pickle reader below, which
accepts nothing but tensors); neither is ever converted into the other.

Target modules use TensorRT-LLM's names (`--lora_target_modules`):

  TensorRT-LLM   Llama / Mistral / Qwen2   GPT-2               checkpoint linear (transformer.layers.{i}.)
                 / Qwen3
  attn_qkv       -                         attn.c_attn         attention.qkv  (all rows)
  attn_q         self_attn.q_proj          -                   attention.qkv  rows [0, q_dim)
  attn_k         self_attn.k_proj          -                   attention.qkv  rows [q_dim, q_dim + kv_dim)
  attn_v         self_attn.v_proj          -                   attention.qkv  rows [q_dim + kv_dim, q_dim + 2 kv_dim)
  attn_dense     self_attn.o_proj          attn.c_proj         attention.dense
  mlp_h_to_4h    mlp.gate_proj             mlp.c_fc            mlp.fc
  mlp_gate       mlp.up_proj               -                   mlp.gate
  mlp_4h_to_h    mlp.down_proj             mlp.c_proj          mlp.proj

(each family module in trtbuild.models holds its HF column: `Family.hf_lora_modules`).

Every A is [r, in] and every B is [out, r] in the checkpoint's orientation, with the scale
(lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA, per module after rank_pattern/alpha_pattern)
already folded into B, so that delta W = B @ A and y = x @ W^T + (x @ A^T) @ B^T.

`fan_in_fan_out`: PEFT stores lora_A as an nn.Linear(in, r) and lora_B as nn.Linear(r, out) whatever
the base layer is; fan_in_fan_out only says that the *base* weight (GPT-2's Conv1D) is [in, out], so
that PEFT transposes B @ A before adding it. The checkpoint already holds GPT-2's weights as
[out, in], so the delta is B @ A for every layer, and the flag needs no handling beyond reading it
(PEFT itself forces it to True on Conv1D and False on nn.Linear).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import ml_dtypes
import numpy as np

from trtbuild.checkpoint import PretrainedConfig, expected_shapes
from trtbuild.errors import TrtbuildError
from trtbuild.models import family_of
from trtbuild.models.base import rows_for
from trtbuild.tensor_file import read_tensors

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"

# The order is also the order of the rank slots inside attention.qkv (see `lora_layout`).
LORA_TARGET_MODULES = ("attn_qkv", "attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_gate",
                       "mlp_4h_to_h")

MODULE_TO_LINEAR = {
    "attn_qkv": "attention.qkv", "attn_q": "attention.qkv", "attn_k": "attention.qkv", "attn_v": "attention.qkv",
    "attn_dense": "attention.dense", "mlp_h_to_4h": "mlp.fc", "mlp_gate": "mlp.gate", "mlp_4h_to_h": "mlp.proj",
}

# Settings of adapter_config.json that change what the adapter computes and that we do not implement:
# better a clear refusal than an engine whose output silently differs from PeftModel's.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora) adapters",
    "lora_bias": "adapters with a bias on lora_B (lora_bias)",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "use_qalora": "QALoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
}

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")


def module_rows(config: PretrainedConfig, module: str) -> tuple[int, int, int]:
    """(in_features, row_start, row_end) of a TensorRT-LLM target module in its checkpoint linear."""
    c = config
    H, I, q, kv = c.hidden_size, c.intermediate_size, c.q_dim, c.kv_dim
    table = {
        "attn_qkv": (H, 0, q + 2 * kv), "attn_q": (H, 0, q), "attn_k": (H, q, q + kv),
        "attn_v": (H, q + kv, q + 2 * kv), "attn_dense": (q, 0, H), "mlp_h_to_4h": (H, 0, I),
        "mlp_gate": (H, 0, I), "mlp_4h_to_h": (I, 0, H),
    }
    return table[module]


def module_shape(config: PretrainedConfig, module: str) -> tuple[int, int]:
    """(out_features, in_features) of the delta a target module adds."""
    in_f, start, end = module_rows(config, module)
    return end - start, in_f


@dataclass
class LoraModule:
    """One adapted linear: delta W = b @ a, the scale already folded into b.

    The arrays are float32 numpy arrays as read here; trtbuild.convert.lora hands out torch tensors
    of the checkpoint's dtype instead (same values).
    """

    a: Any  # [rank, in]
    b: Any  # [out, rank], scaled
    rank: int
    scale: float  # what was folded into b (for reports)
    hf_name: str  # the PEFT module path, e.g. model.layers.3.self_attn.q_proj


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter, in checkpoint terms.

    layers[i][module] for TensorRT-LLM module names; modules_to_save maps checkpoint tensor names
    (`transformer.vocab_embedding.weight`, `lm_head.weight`, norms) to full replacement tensors.
    """

    path: Path
    layers: dict[int, dict[str, LoraModule]]
    modules_to_save: dict[str, Any] = field(default_factory=dict)
    ensure_weight_tying: bool = False  # PEFT kept a tied lm_head tied to the replaced embedding
    peft_config: dict[str, Any] = field(default_factory=dict)
    weights_file: str = ""

    @property
    def target_modules(self) -> list[str]:
        """The TensorRT-LLM modules this adapter touches, in LORA_TARGET_MODULES order."""
        present = {m for mods in self.layers.values() for m in mods}
        return [m for m in LORA_TARGET_MODULES if m in present]

    @property
    def max_rank(self) -> int:
        return max((lm.rank for mods in self.layers.values() for lm in mods.values()), default=0)

    def modules(self) -> Iterable[tuple[int, str, LoraModule]]:
        for i in sorted(self.layers):
            for m in LORA_TARGET_MODULES:
                if m in self.layers[i]:
                    yield i, m, self.layers[i][m]

    def __str__(self) -> str:
        extra = f", replaces {', '.join(self.modules_to_save)}" if self.modules_to_save else ""
        return (f"LoRA adapter {self.path}: {len(self.layers)} layers, {' '.join(self.target_modules)}, "
                f"max rank {self.max_rank}{extra}")


# ---------------------------------------------------------------------------------------------
# Reading the files


def read_adapter_config(d: Path) -> dict[str, Any]:
    """adapter_config.json of a LoRA adapter dir, refusing what we cannot compute faithfully."""
    d = Path(d)
    if not d.is_dir():
        raise TrtbuildError(f"LoRA dir {d} is not a directory")
    path = d / ADAPTER_CONFIG
    if not path.is_file():
        raise TrtbuildError(f"LoRA dir {d} has no {ADAPTER_CONFIG}: pass a PEFT adapter dir "
                            "(what PeftModel.save_pretrained writes)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrtbuildError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise TrtbuildError(f"{path} is not a JSON object")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise TrtbuildError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported; only LoRA adapters are")
    for key, what in _UNSUPPORTED_OPTIONS.items():
        if cfg.get(key):
            raise TrtbuildError(f"{path}: {what} are not supported ({key}={cfg[key]!r}); "
                                "merge the adapter with PEFT and convert the merged model instead")
    if cfg.get("r") is None or cfg.get("lora_alpha") is None:
        raise TrtbuildError(f"{path}: needs `r` and `lora_alpha`")
    return cfg


def adapter_weights_file(d: Path) -> Path:
    """The one weights file of an adapter dir: both or neither is an error that says what to do."""
    d = Path(d)
    st, pt = d / ADAPTER_SAFETENSORS, d / ADAPTER_BIN
    if st.is_file() and pt.is_file():
        raise TrtbuildError(f"LoRA dir {d} holds both {ADAPTER_SAFETENSORS} and {ADAPTER_BIN}: "
                            "it is unclear which one is the adapter; remove one of them")
    if st.is_file():
        return st
    if pt.is_file():
        return pt
    raise TrtbuildError(f"LoRA dir {d} has neither {ADAPTER_SAFETENSORS} nor {ADAPTER_BIN}")


def adapter_fingerprint(adapter_dir: Path) -> str:
    """sha256 of adapter_config.json and the weights file: tells the same adapter in two dirs."""
    h = hashlib.sha256()
    for f in (Path(adapter_dir) / ADAPTER_CONFIG, adapter_weights_file(adapter_dir)):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_adapter_weights(d: Path) -> tuple[dict[str, np.ndarray], str]:
    """(name → numpy array, file name) of the adapter dir's weights file."""
    path = adapter_weights_file(d)
    if path.name == ADAPTER_SAFETENSORS:
        return read_tensors(path), path.name
    return read_torch_state_dict(path), path.name


# PyTorch's zip format (torch.save since 1.6): `<name>/data.pkl` pickles the state dict, whose
# tensors are `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` calls and whose
# storages are persistent ids ("storage", torch.<Type>Storage, key, location, numel) naming the raw
# little-endian bytes in `<name>/data/<key>`. Only these globals are resolved: anything else in the
# pickle (code, custom classes) is refused, like torch.load(weights_only=True) would.
_TORCH_STORAGES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(_TORCH_STORAGES[name])


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_rest) -> np.ndarray:
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if any(s == 0 for s in size):
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or last >= storage.shape[0]:
        raise ValueError(f"tensor of size {list(size)} at offset {offset} runs past its storage of {storage.shape[0]}")
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=tuple(s * storage.itemsize for s in stride))
    return np.array(view)  # own, contiguous, writable


def _rebuild_parameter(data: np.ndarray, *_rest) -> np.ndarray:
    return data


class _StateDictUnpickler(pickle.Unpickler):
    _GLOBALS = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
                ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
                ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
                ("collections", "OrderedDict"): dict}

    def __init__(self, file, zf: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.zf, self.prefix, self.storages = zf, prefix, {}

    def find_class(self, module: str, name: str):
        if (module, name) in self._GLOBALS:
            return self._GLOBALS[(module, name)]
        if module == "torch" and name in _TORCH_STORAGES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a plain state dict of tensors")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        kind, key = pid[1], str(pid[2])
        if key not in self.storages:
            raw = self.zf.read(f"{self.prefix}data/{key}")
            self.storages[key] = np.frombuffer(raw, dtype=kind.dtype)
        return self.storages[key]


def read_torch_state_dict(path: Path) -> dict[str, np.ndarray]:
    """A `torch.save`d state dict of tensors (PEFT's adapter_model.bin) as numpy arrays, without torch.

    Files in PyTorch's pre-1.6 (non-zip) format are read through torch when it is installed.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return _torch_load_legacy(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
            if not pkl:
                raise TrtbuildError(f"{path} is a zip file but not a PyTorch checkpoint (no data.pkl)")
            prefix = pkl[0][:-len("data.pkl")]
            if prefix + "byteorder" in names and zf.read(prefix + "byteorder").strip() != b"little":
                raise TrtbuildError(f"{path} was saved on a big-endian machine; re-save it as safetensors there")
            with zf.open(pkl[0]) as f:
                state = _StateDictUnpickler(f, zf, prefix).load()
    except TrtbuildError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, KeyError, ValueError, TypeError, EOFError) as e:
        raise TrtbuildError(f"{path} is not a readable PyTorch state dict of tensors ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise TrtbuildError(f"{path} is not a state dict of tensors")
    return state


def _torch_load_legacy(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise TrtbuildError(f"{path} is not in PyTorch's zip format (torch.save since 1.6): reading the legacy format "
                            "needs torch (pip install torch), or save the adapter with safe_serialization=True") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrtbuildError(f"{path} is not a readable PyTorch checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TrtbuildError(f"{path} is not a state dict of tensors")
    return {k: (v.detach().contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
                if v.dtype == torch.bfloat16 else v.detach().numpy()) for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# Parsing and validating against the base model


def _strip_prefix(name: str) -> str:
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key
    that matches the end of the module path, as a regex on whole dotted components."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _modules_to_save_names(config: PretrainedConfig) -> dict[str, tuple[str, bool]]:
    """HF tensor name → (checkpoint name, transpose) for every tensor a modules_to_save entry may
    replace: the architecture table's single-source rows (embeddings, lm_head, norms, GPT-2's linears)."""
    wanted = set(expected_shapes(config)) | {"lm_head.weight"}
    out = {}
    for row in rows_for(config, wanted):
        if len(row.sources) == 1 and row.part is None and not row.offset:
            out[row.sources[0]] = (row.checkpoint, row.transpose)
    return out


def _float32(t: np.ndarray, where: str) -> np.ndarray:
    if not (np.issubdtype(t.dtype, np.floating) or t.dtype == np.dtype(ml_dtypes.bfloat16)):
        raise TrtbuildError(f"{where} is {t.dtype}, not floating point")
    return np.array(t, dtype=np.float32)  # a copy: never a view of a memory-mapped file


def _dims(config: PretrainedConfig) -> str:
    c = config
    return (f"{c.architecture}: hidden {c.hidden_size}, intermediate {c.intermediate_size}, "
            f"{c.num_attention_heads} heads / {c.num_key_value_heads} KV heads of {c.head_size}")


def _parse_module_path(module_path: str, layer_prefix: str, hf_modules: dict[str, str], config: PretrainedConfig,
                       where: str, key: str) -> tuple[int, str]:
    m = re.match(rf"^(?:.*\.)?{re.escape(layer_prefix.split('.')[-2])}\.(\d+)\.(.+)$", module_path)
    if not m or m[2] not in hf_modules:
        supported = ", ".join(sorted({k.split('.')[-1] for k in hf_modules}))
        raise TrtbuildError(
            f"{where}: tensor {key} adapts {module_path}, which is not a LoRA target this trtbuild supports for "
            f"{config.architecture} ({supported}); is the adapter for another architecture?")
    layer = int(m[1])
    if layer >= config.num_hidden_layers:
        raise TrtbuildError(f"{where}: tensor {key} is for layer {layer}, the base model has "
                            f"{config.num_hidden_layers} layers: the adapter was made for another base model")
    return layer, hf_modules[m[2]]


def read_lora_adapter(adapter_dir: str | Path, config: PretrainedConfig, *,
                      modules_to_save: bool = True) -> LoraAdapter:
    """Read a PEFT LoRA adapter dir for the base model described by `config`, as float32 numpy.

    Every shape is checked against the base config: an adapter trained for another model fails
    with the tensor's name, its shape and the shape the base model needs. bf16/fp16 adapters are
    widened to float32 and the scale is folded into B in float32.

    modules_to_save=False (the runtime path, where weights are switched per request): an adapter
    that replaces whole tensors (PEFT's modules_to_save) is refused here, with what to do instead.
    """
    d = Path(adapter_dir)
    cfg = read_adapter_config(d)
    state, fname = read_adapter_weights(d)
    where = f"{d / fname}"
    r_default, alpha_default = int(cfg["r"]), float(cfg["lora_alpha"])
    use_rslora = bool(cfg.get("use_rslora", False))
    family = family_of(config)
    layer_prefix, hf_modules = family.hf_layer_prefix, family.hf_lora_modules

    pairs: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    others: dict[str, tuple[str, np.ndarray]] = {}
    for key, tensor in state.items():
        name = _strip_prefix(key)
        m = _LORA_KEY.match(name)
        if m:
            pairs.setdefault(m["module"], {})[m["ab"]] = (key, tensor)
            continue
        if ".lora_embedding_" in name or ".lora_magnitude_vector" in name or ".lora_" in name:
            raise TrtbuildError(f"{where}: tensor {key} is not supported (only lora_A/lora_B of linear layers; "
                                "LoRA on embeddings, DoRA and lora_B biases are not)")
        # modules_to_save: `lm_head.weight`, older PEFT also `lm_head.modules_to_save[.default].weight`
        others[re.sub(r"\.modules_to_save(\.[^.]+)?(?=\.(weight|bias)$)", "", name)] = (key, tensor)

    replaced: dict[str, np.ndarray] = {}
    if others and not modules_to_save:
        raise TrtbuildError(
            f"LoRA adapter {d} replaces {', '.join(sorted(others))} (modules_to_save), which cannot be switched "
            "per request: merge it at conversion (convert_checkpoint.py --hf_lora_dir)")
    if others:
        mts_names = _modules_to_save_names(config)
        mts_shapes = {**expected_shapes(config), "lm_head.weight": (config.vocab_size, config.hidden_size)}
        for plain, (key, tensor) in others.items():
            if plain not in mts_names:
                raise TrtbuildError(
                    f"{where}: tensor {key} is neither a LoRA weight of a supported target module nor a "
                    f"modules_to_save tensor this trtbuild can apply (embeddings, lm_head, norms) for "
                    f"{config.architecture}; is this an adapter for that architecture?")
            ckpt, transpose = mts_names[plain]
            t = _float32(tensor, f"{where}: {key}")
            t = np.ascontiguousarray(t.T) if transpose else t
            if tuple(t.shape) != mts_shapes[ckpt]:
                raise TrtbuildError(
                    f"{where}: tensor {key} has shape {list(t.shape)}, the base model needs "
                    f"{list(mts_shapes[ckpt])} for {ckpt}: the adapter was made for another base model "
                    f"(base_model_name_or_path: {cfg.get('base_model_name_or_path')})")
            replaced[ckpt] = t

    layers: dict[int, dict[str, LoraModule]] = {}
    for module_path, ab in sorted(pairs.items()):
        for side in "AB":
            if side not in ab:
                other = next(iter(ab.values()))[0]
                raise TrtbuildError(f"{where}: {other} has no matching lora_{side} tensor; the file is incomplete")
        layer, trt_module = _parse_module_path(module_path, layer_prefix, hf_modules, config, where, ab["A"][0])
        (a_key, a), (b_key, b) = ab["A"], ab["B"]
        a, b = _float32(a, f"{where}: {a_key}"), _float32(b, f"{where}: {b_key}")
        # "m1+m2": one HF linear whose outputs are two TensorRT-LLM modules' (Phi-3's gate_up_proj)
        parts = trt_module.split("+")
        out_sizes = [module_shape(config, m)[0] for m in parts]
        out_f, in_f = sum(out_sizes), module_shape(config, parts[0])[1]
        r = int(_pattern_value(cfg.get("rank_pattern"), module_path, r_default))
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), module_path, alpha_default))
        for key, t, want, rank_dim in ((a_key, a, [r, in_f], 0), (b_key, b, [out_f, r], 1)):
            if list(t.shape) == want:
                continue
            if t.ndim == 2 and t.shape[1 - rank_dim] == want[1 - rank_dim]:
                raise TrtbuildError(
                    f"{where}: tensor {key} has rank {t.shape[rank_dim]} but {ADAPTER_CONFIG} says r={r} for "
                    f"{module_path} (r / rank_pattern): the weights and the config do not belong together")
            raise TrtbuildError(
                f"{where}: tensor {key} has shape {list(t.shape)}, the base model needs {want} for "
                f"{trt_module} ({_dims(config)}): the adapter was made for another base model "
                f"(base_model_name_or_path: {cfg.get('base_model_name_or_path')})")
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        if any(m in layers.get(layer, {}) for m in parts):
            raise TrtbuildError(f"{where}: two sets of LoRA tensors for {module_path} (several adapter names "
                                "in one file?); save one adapter per dir")
        for m, b_rows in zip(parts, np.split(b, np.cumsum(out_sizes)[:-1], axis=0)):  # one A, B by rows
            layers.setdefault(layer, {})[m] = LoraModule(
                a=a, b=np.ascontiguousarray(b_rows) * np.float32(scale), rank=r, scale=scale, hf_name=module_path)
    if not layers and not replaced:
        raise TrtbuildError(f"{where} holds no LoRA tensors")
    adapter = LoraAdapter(path=d, layers=layers, modules_to_save=replaced,
                          ensure_weight_tying=bool(cfg.get("ensure_weight_tying", False)),
                          peft_config=cfg, weights_file=fname)
    log.info("%s", adapter)
    return adapter


# ---------------------------------------------------------------------------------------------
# Stacking for the runtime lora path


@dataclass(frozen=True)
class LoraSlot:
    """Where one target module sits in its linear's stacked rank dimension and output rows."""

    module: str
    rank_start: int  # A rows / B columns [rank_start, rank_start + max_rank)
    row_start: int  # output rows of the checkpoint linear [row_start, row_end)
    row_end: int


@dataclass(frozen=True)
class LoraLinearLayout:
    linear: str  # checkpoint linear under transformer.layers.{i}., e.g. "attention.qkv"
    in_features: int
    out_features: int
    rank: int  # stacked rank = len(slots) * max_rank
    slots: tuple[LoraSlot, ...]


def check_target_modules(config: PretrainedConfig, target_modules: Iterable[str]) -> list[str]:
    """Validate `--lora_target_modules`; returns them deduplicated in LORA_TARGET_MODULES order."""
    mods = list(target_modules)
    unknown = [m for m in mods if m not in LORA_TARGET_MODULES]
    if unknown:
        raise TrtbuildError(f"--lora_target_modules {' '.join(unknown)}: unknown; "
                            f"choose from {' '.join(LORA_TARGET_MODULES)}")
    if "mlp_gate" in mods and not config.gated_mlp:
        raise TrtbuildError(f"--lora_target_modules mlp_gate: {config.architecture} has no gated MLP (no mlp.gate)")
    if not mods:
        raise TrtbuildError("--lora_target_modules is empty")
    return [m for m in LORA_TARGET_MODULES if m in mods]


def lora_layout(config: PretrainedConfig, target_modules: Iterable[str], max_rank: int) -> dict[str, LoraLinearLayout]:
    """The stacked low-rank layout of each targeted checkpoint linear.

    One slot of `max_rank` per target module. Linears other than attention.qkv have one module,
    hence one slot. attention.qkv may have several (attn_qkv, attn_q, attn_k, attn_v, in that
    order, those targeted): A_qkv is the slots' A stacked along rank and B_qkv is block-diagonal,
    each slot's B writing only its own rows (q, k or v), so that
        x @ A_qkv^T @ B_qkv^T = [x A_q^T B_q^T | x A_k^T B_k^T | x A_v^T B_v^T]
    i.e. q, k and v keep their own A, and the network does one low-rank product per linear.
    The qkv rank is thus 3 * max_rank when attn_q, attn_k and attn_v are all targeted.
    """
    if max_rank < 1:
        raise TrtbuildError(f"--max_lora_rank {max_rank} must be at least 1")
    layout: dict[str, list[str]] = {}
    for m in check_target_modules(config, target_modules):
        layout.setdefault(MODULE_TO_LINEAR[m], []).append(m)
    out = {}
    for linear, mods in layout.items():
        slots = []
        for k, m in enumerate(mods):
            in_f, start, end = module_rows(config, m)
            slots.append(LoraSlot(m, k * max_rank, start, end))
        in_f = module_rows(config, mods[0])[0]
        out_f = config.q_dim + 2 * config.kv_dim if linear == "attention.qkv" else module_rows(config, mods[0])[2]
        out[linear] = LoraLinearLayout(linear, in_f, out_f, len(mods) * max_rank, tuple(slots))
    return out


def check_adapter_fits(adapter: LoraAdapter, target_modules: Iterable[str], max_rank: int) -> None:
    """What an engine built for `target_modules` and `max_rank` can run: errors name the adapter."""
    targets = set(target_modules)
    if adapter.modules_to_save:
        raise TrtbuildError(
            f"LoRA adapter {adapter.path} replaces {', '.join(adapter.modules_to_save)} (modules_to_save), which "
            "cannot be switched per request: merge it at conversion (convert_checkpoint.py --hf_lora_dir)")
    for i, module, lm in adapter.modules():
        if module not in targets:
            raise TrtbuildError(
                f"LoRA adapter {adapter.path} targets {module} ({lm.hf_name}), which the engine was not built "
                f"for (--lora_target_modules {' '.join(m for m in LORA_TARGET_MODULES if m in targets)})")
        if lm.rank > max_rank:
            raise TrtbuildError(f"LoRA adapter {adapter.path} has rank {lm.rank} at {lm.hf_name}, above "
                                f"--max_lora_rank {max_rank}: rebuild with --max_lora_rank {adapter.max_rank} or more")


def _to_numpy(t: Any) -> np.ndarray:
    """float32 numpy from a numpy array or (on the convert path) a torch tensor, without importing torch."""
    if not isinstance(t, np.ndarray) and hasattr(t, "detach"):
        t = t.detach().float().cpu().numpy()
    return np.asarray(t, dtype=np.float32)


def write_adapter_slot(a_out: np.ndarray, b_out: np.ndarray, adapter: LoraAdapter | None, layer: int,
                       lay: LoraLinearLayout) -> None:
    """Write one adapter's A [rank_L, in] and B [out, rank_L] of one layer's linear into the given
    (pre-zeroed or to-be-zeroed) arrays: zero-padded ranks and untargeted slots stay zero.
    `adapter=None` zeroes them (a freed slot)."""
    a_out[...] = 0
    b_out[...] = 0
    if adapter is None:
        return
    for slot in lay.slots:
        lm = adapter.layers.get(layer, {}).get(slot.module)
        if lm is None:
            continue
        r = lm.rank
        a_out[slot.rank_start:slot.rank_start + r, :] = _to_numpy(lm.a)
        b_out[slot.row_start:slot.row_end, slot.rank_start:slot.rank_start + r] = _to_numpy(lm.b)


def stack_lora_adapters(adapters: Sequence[LoraAdapter], config: PretrainedConfig, max_rank: int,
                        target_modules: Iterable[str], dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Stack adapters for the runtime path, adapter k at index k (the `lora_task_ids` value).

    Returns, per layer i and targeted checkpoint linear L (see `lora_layout`):
      `transformer.layers.{i}.{L}.lora_A`  [n_adapters, rank_L, in]
      `transformer.layers.{i}.{L}.lora_B`  [n_adapters, out, rank_L]   (scale folded in)
    zero-padded: a rank below max_rank, or a module an adapter does not target, contributes 0.
    The network adds (x @ A[t]^T) @ B[t]^T to the linear's output for a row with task id t.
    """
    layout = lora_layout(config, target_modules, max_rank)
    targets = [s.module for lay in layout.values() for s in lay.slots]
    for adapter in adapters:
        check_adapter_fits(adapter, targets, max_rank)
    n = len(adapters)
    out: dict[str, np.ndarray] = {}
    for i in range(config.num_hidden_layers):
        for linear, lay in layout.items():
            a = np.zeros((n, lay.rank, lay.in_features), dtype=dtype)
            b = np.zeros((n, lay.out_features, lay.rank), dtype=dtype)
            for k, adapter in enumerate(adapters):
                write_adapter_slot(a[k], b[k], adapter, i, lay)
            out[f"transformer.layers.{i}.{linear}.lora_A"] = a
            out[f"transformer.layers.{i}.{linear}.lora_B"] = b
    return out


def union_target_modules(adapters: Sequence[LoraAdapter]) -> list[str]:
    """The target modules an engine needs to run all `adapters` (default for --lora_target_modules)."""
    present = {m for a in adapters for m in a.target_modules}
    return [m for m in LORA_TARGET_MODULES if m in present]

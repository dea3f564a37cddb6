"""LoraManager: the adapters of a running engine with the lora plugin (trtbuild.plugins.lora).

It owns, per targeted linear, the stacked arrays A [max_loras, R, in] and B^T [max_loras, R, out]
(scale folded in) in the engine's compute dtype, allocated once. Slot k holds the
adapter with lora task id k: the adapters stored in the engine dir (`lora/{i}` → task id i) are
loaded at start, `add(dir)` loads another into a free slot of the running engine (no rebuild; it
must fit the engine's target modules and max rank), `remove(task_id)` frees one.

Each step, `bind` binds only the slots the batch uses, as zero-copy views: the contiguous range
from the lowest to the highest task id in the batch (task ids rebased onto it; -1 = base model
stays -1, which the graph masks out). When that range is mostly unused slots (e.g. task ids 0 and
5 of 6), the used slots are copied once into a compact buffer, reused while the batch's adapters
stay the same.

numpy and onnxruntime only: .safetensors and .bin adapters are read without torch.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from trtbuild.engine import EngineConfig
from trtbuild.engine_io import LORA_DIR, LORA_FORMS, LORA_MANIFEST, LORA_TASK_IDS, lora_graph_inputs
from trtbuild.errors import TrtbuildError
from trtbuild.lora_adapter import (LoraAdapter, adapter_fingerprint, check_adapter_fits, lora_layout,
                                   read_lora_adapter, write_adapter_slot)
from trtbuild.ranks import split_adapter

log = logging.getLogger(__name__)

_CACHE_SIZE = 16  # bound-slot views / compact buffers kept (one per distinct set of adapters in a batch)


def read_manifest(engine_dir: str | Path) -> dict:
    """The engine dir's lora/manifest.json (written by trtbuild.lora_engine): its form and adapters."""
    path = Path(engine_dir) / LORA_DIR / LORA_MANIFEST
    if not path.is_file():
        raise TrtbuildError(f"{path} not found: the engine dir's lora plugin is incomplete; rebuild it with trt-build")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrtbuildError(f"{path} is not valid JSON ({e}); rebuild the engine") from None
    if manifest.get("form") not in LORA_FORMS:
        raise TrtbuildError(f"{path}: unknown lora form {manifest.get('form')!r}; rebuild the engine")
    return manifest


@dataclass
class LoadedAdapter:
    task_id: int
    path: Path
    fingerprint: str
    max_rank: int
    target_modules: list[str]


class LoraManager:
    def __init__(self, config: EngineConfig, engine_dir: Path, form: str = "masked", rank: int = 0):
        from trtbuild.ranks import rank_config

        pc, bc = rank_config(config.pretrained_config, rank), config.build_config
        self.model_config = config.pretrained_config  # the whole model, which adapters are read against
        self.rank = rank
        lc = bc.lora_config
        self.engine_dir = Path(engine_dir)
        self.pretrained_config = pc
        self.form = form
        self.max_loras, self.max_rank = int(lc.max_loras), int(lc.max_lora_rank)
        self.target_modules = list(lc.lora_target_modules)
        if self.max_loras < 1 or self.max_rank < 1 or not self.target_modules:
            raise TrtbuildError(f"{self.engine_dir}/config.json: lora_config {lc} is incomplete; rebuild the engine")
        layout = lora_layout(pc, self.target_modules, self.max_rank)
        dtype = np.dtype("float32") if bc.compute_dtype == "bfloat16" else np.dtype(bc.compute_dtype)
        self.dtype = dtype
        # name → stacked array, and (layer, layout, A name, B name) to fill a slot
        self.arrays: dict[str, np.ndarray] = {}
        self._linears = []
        inputs = lora_graph_inputs(pc, layout)
        names = list(inputs)
        for a_name, b_name in zip(names[0::2], names[1::2]):
            prefix = inputs[a_name][0]
            layer, linear = int(prefix.split(".")[2]), prefix.split(".", 3)[3]
            self.arrays[a_name] = np.zeros((self.max_loras, *inputs[a_name][1]), dtype)
            self.arrays[b_name] = np.zeros((self.max_loras, *inputs[b_name][1]), dtype)
            self._linears.append((layer, layout[linear], a_name, b_name))
        self.slots: list[LoadedAdapter | None] = [None] * self.max_loras
        self._lock = threading.Lock()
        self._bound: OrderedDict[tuple, list[tuple[str, ort.OrtValue]]] = OrderedDict()

    @classmethod
    def from_engine_dir(cls, engine_dir: str | Path, config: EngineConfig, rank: int = 0) -> "LoraManager":
        """The manager of an engine dir's rank, with the adapters stored in it loaded as task ids 0, 1, ..."""
        engine_dir = Path(engine_dir)
        manager = cls(config, engine_dir, read_manifest(engine_dir)["form"], rank)
        for i, rel in enumerate(config.build_config.lora_config.lora_dir):
            task_id = manager.add(engine_dir / rel)
            if task_id != i:
                raise TrtbuildError(f"{engine_dir / rel} is the same adapter as task id {task_id}; rebuild the engine "
                                    "without the duplicate --lora_dir")
        return manager

    # ---- adapters ---------------------------------------------------------------------------
    @property
    def task_ids(self) -> list[int]:
        """The lora task ids loaded now."""
        return [s.task_id for s in self.slots if s is not None]

    def add(self, lora_dir: str | Path) -> int:
        """Load a PEFT adapter dir into a free slot; returns its lora task id.

        An adapter already loaded (same config and weights bytes) returns its existing task id.
        Errors (TrtbuildError) name the adapter and what to do: another base model, a rank above the
        engine's max_lora_rank, a target module the engine was not built for, modules_to_save,
        missing adapter_config.json, both or neither weight file, no free slot.
        """
        d = Path(lora_dir)
        adapter = read_lora_adapter(d, self.model_config, modules_to_save=False)
        check_adapter_fits(adapter, self.target_modules, self.max_rank)
        adapter = split_adapter(adapter, self.model_config, self.rank)  # a multi-rank engine: this rank's share
        fingerprint = adapter_fingerprint(d)
        with self._lock:
            for s in self.slots:
                if s is not None and s.fingerprint == fingerprint:
                    log.info("LoRA adapter %s is already loaded as task id %d", d, s.task_id)
                    return s.task_id
            free = next((k for k, s in enumerate(self.slots) if s is None), None)
            if free is None:
                raise TrtbuildError(
                    f"no free LoRA slot for {d}: {self.engine_dir} holds at most {self.max_loras} adapters (--max_loras) "
                    f"and task ids {', '.join(map(str, self.task_ids))} are loaded; remove one "
                    f"(ModelRunner.lora.remove(task_id)) or rebuild with a larger --max_loras")
            self._write(free, adapter)
            self.slots[free] = LoadedAdapter(free, d, fingerprint, adapter.max_rank, adapter.target_modules)
            self._bound.clear()  # compact buffers may hold this slot's old (zero) weights
        log.info("%s → lora task id %d", adapter, free)
        return free

    def remove(self, task_id: int) -> None:
        """Free a slot (no request still running may use it); its task id may be reused by `add`."""
        with self._lock:
            self.check_task_id(task_id)
            if task_id == -1:
                raise TrtbuildError("lora task id -1 is the base model; there is nothing to remove")
            self._write(task_id, None)
            self.slots[task_id] = None
            self._bound.clear()

    def _write(self, slot: int, adapter: LoraAdapter | None) -> None:
        for layer, lay, a_name, b_name in self._linears:
            a, b = self.arrays[a_name][slot], self.arrays[b_name][slot]
            write_adapter_slot(a, b.T, adapter, layer, lay)  # B is stored transposed: write through .T

    def check_task_id(self, task_id: int) -> None:
        t = int(task_id)
        if t == -1 or (0 <= t < self.max_loras and self.slots[t] is not None):
            return
        loaded = ", ".join(map(str, self.task_ids)) or "none"
        raise TrtbuildError(f"lora task id {t} is unknown: {self.engine_dir} has task ids {loaded} loaded "
                            "(-1 = base model); load adapters with run.py --lora_dir (ModelRunner.add_lora)")

    # ---- one step ---------------------------------------------------------------------------
    def bind(self, io: ort.IOBinding, task_ids: np.ndarray) -> None:
        """Bind lora_task_ids and the A/B slots that this batch's rows use."""
        t = np.asarray(task_ids, dtype=np.int64).reshape(-1)
        used = np.unique(t[t >= 0])
        if used.size and (used[-1] >= self.max_loras or any(self.slots[k] is None for k in used)) \
                or (t < -1).any():
            bad = [int(k) for k in t if k < -1 or k >= self.max_loras or (k >= 0 and self.slots[k] is None)]
            self.check_task_id(bad[0])
        if used.size == 0:
            # all rows are base-model rows: the masked form runs on no slot at all (its GEMMs are empty,
            # so the step costs what the base engine's does); the gather form cannot index an empty
            # axis, so it gets one slot and masks every row out
            key, rel = ("range", 0, 0 if self.form == "masked" else 1), t
        elif used[-1] - used[0] + 1 <= 2 * used.size:
            lo = int(used[0])
            key, rel = ("range", lo, int(used[-1]) + 1), np.where(t >= 0, t - lo, -1)
        else:
            key = ("compact", *map(int, used))
            rel = np.where(t >= 0, np.searchsorted(used, t), -1)
        io.bind_cpu_input(LORA_TASK_IDS, np.ascontiguousarray(rel, dtype=np.int64))
        for name, value in self._values(key):
            io.bind_ortvalue_input(name, value)

    def _values(self, key: tuple) -> list[tuple[str, ort.OrtValue]]:
        with self._lock:
            values = self._bound.get(key)
            if values is None:
                if key[0] == "range":
                    arrays = {n: a[key[1]:key[2]] for n, a in self.arrays.items()}  # views
                else:
                    idx = np.array(key[1:], np.int64)
                    arrays = {n: np.ascontiguousarray(a[idx]) for n, a in self.arrays.items()}  # one copy
                values = [(n, ort.OrtValue.ortvalue_from_numpy(a)) for n, a in arrays.items()]
                self._bound[key] = values
                while len(self._bound) > _CACHE_SIZE:
                    self._bound.popitem(last=False)
            else:
                self._bound.move_to_end(key)
            return values

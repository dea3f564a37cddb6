"""trt-build's side of the lora plugin: check the adapters against the base model and the flags,
store them beside the engine (`lora/{i}/`), record them in build_config.lora_config, and hand
the network writer its lora options (trtbuild.plugins.lora).

Torch-free, like the rest of the builder: adapters are read by trtbuild.lora_adapter.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

from trtbuild.checkpoint import PretrainedConfig
from trtbuild.engine import EXTRA_LORA_SLOTS, BuildConfig
from trtbuild.engine_io import LORA_DIR, LORA_FORMS, LORA_MANIFEST
from trtbuild.errors import TrtbuildError
from trtbuild.lora_adapter import (LoraAdapter, adapter_fingerprint, check_adapter_fits, check_target_modules,
                                   read_lora_adapter, union_target_modules)
from trtbuild.plugins.lora import LoraNetworkOptions

log = logging.getLogger(__name__)


def wants_lora(build: BuildConfig) -> bool:
    """The build asks for the lora plugin (adapters given, or --lora_plugin set)."""
    return bool(build.lora_config.lora_dir) or build.plugin_config.lora_plugin not in (None, "disable")


def resolve_lora_config(config: PretrainedConfig, build: BuildConfig, adapters: list[LoraAdapter]) -> BuildConfig:
    """`build` with lora_config's defaults filled from the adapters and the lora plugin's dtype;
    checks that every adapter fits."""
    lc = build.lora_config
    targets = (check_target_modules(config, list(lc.lora_target_modules)) if lc.lora_target_modules
               else union_target_modules(adapters))
    max_rank = lc.max_lora_rank or max(a.max_rank for a in adapters)
    if max_rank < 1:
        raise TrtbuildError(f"--max_lora_rank {max_rank} must be at least 1")
    for adapter in adapters:
        check_adapter_fits(adapter, targets, max_rank)
    max_loras = lc.max_loras or len(adapters) + EXTRA_LORA_SLOTS
    if max_loras < len(adapters):
        raise TrtbuildError(f"--max_loras {max_loras} is below the {len(adapters)} adapters given with --lora_dir: "
                            f"pass --max_loras {len(adapters)} or more")
    pc = build.plugin_config
    if pc.lora_plugin not in (None, "auto", "disable") and pc.lora_plugin != build.compute_dtype:
        raise TrtbuildError(f"--lora_plugin {pc.lora_plugin}: this engine computes in {build.compute_dtype} "
                            f"(--backend {build.backend}); use --lora_plugin auto")
    return replace(build, plugin_config=replace(pc, lora_plugin=build.compute_dtype),
                   lora_config=replace(lc, lora_target_modules=tuple(targets), max_lora_rank=max_rank,
                                       max_loras=max_loras))


def store_adapter(src: Path, dst: Path) -> None:
    """Copy an adapter dir's files (not its subdirs, e.g. trainer checkpoints) into the engine dir."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file():
            shutil.copy2(f, dst / f.name)


def prepare_lora(config: PretrainedConfig, build: BuildConfig,
                 engine_dir: Path) -> tuple[BuildConfig, LoraNetworkOptions]:
    """Validate the adapters of build.lora_config for this base model and build, store them as
    `engine_dir/lora/{i}`, and return the build with its lora_config resolved (lora_dir as stored)
    and the network options of the lora plugin (adapter i gets lora task id i at run time)."""
    lora_dirs = list(build.lora_config.lora_dir)
    form = build.lora_config.lora_form
    if form not in LORA_FORMS:
        raise TrtbuildError(f"lora form {form!r} is not one of {', '.join(LORA_FORMS)}")
    if build.backend != "onnxruntime":
        raise TrtbuildError(f"--lora_dir with --backend {build.backend}: the runtime lora plugin is built for "
                            "onnxruntime only; merge the adapters at conversion (convert_checkpoint.py --hf_lora_dir) "
                            "or build with --backend onnxruntime")
    if not lora_dirs:
        raise TrtbuildError("--lora_plugin needs --lora_dir with at least one adapter")
    adapters = [read_lora_adapter(d, config, modules_to_save=False) for d in lora_dirs]
    seen: dict[str, str] = {}
    for d in lora_dirs:
        fp = adapter_fingerprint(Path(d))
        if fp in seen:
            raise TrtbuildError(f"--lora_dir {seen[fp]} and {d} are the same adapter; pass each adapter once")
        seen[fp] = str(d)
    build = resolve_lora_config(config, build, adapters)
    lc = build.lora_config
    stored, sources = [], []
    for i, (d, adapter) in enumerate(zip(lora_dirs, adapters)):
        rel = f"{LORA_DIR}/{i}"
        store_adapter(Path(d), Path(engine_dir) / rel)
        stored.append(rel)
        sources.append({"dir": rel, "source": str(Path(d).resolve()), "weights_file": adapter.weights_file,
                        "max_rank": adapter.max_rank, "target_modules": adapter.target_modules})
        log.info("%s → task id %d", adapter, i)
    manifest = {"form": form, "adapters": sources}
    (Path(engine_dir) / LORA_DIR / LORA_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("lora plugin (%s form): %s, max rank %d, %d slots", form, " ".join(lc.lora_target_modules),
             lc.max_lora_rank, lc.max_loras)
    options = LoraNetworkOptions(config, list(lc.lora_target_modules), lc.max_lora_rank, dtype=build.compute_dtype,
                                 form=form)
    return replace(build, lora_config=replace(lc, lora_dir=tuple(stored))), options

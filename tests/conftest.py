"""Shared fixtures: tiny random HF models of every supported architecture (tiny_models.py), the one
engine factory (`engines`: convert → quantize → build once per session, shared by the tests that only
read the results), the calibration text, and per-module scratch dirs that are deleted when the module
is done (pyproject keeps only failed tests' tmp_path dirs, of the last run)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import time
from pathlib import Path

import pytest

from trtbuild.fsutil import dir_size

from tiny_models import (PPL_TEXT, REPO, SHARED, TINY_ARCHS, TinyModels,  # noqa: F401 (for the tests)
                         make_tiny_model, make_tokenizer)

os.environ.setdefault("OMP_NUM_THREADS", "1")

DEFAULT_MODEL = "smollm2-135m-instruct"
CALIB_CHARS = 100_000
# calibration of the factory's recipes unless their flags say otherwise: 4 samples of 64 tokens
CALIB_FLAGS = ("--calib_size", "4", "--calib_max_seq_length", "64")
# what the factory keeps between test modules: past this, the least recently used engines (then
# checkpoints) are deleted when a module ends; they are made again if asked for
CACHE_MB = int(os.environ.get("TRTBUILD_TEST_CACHE_MB", "1200"))


# What MPICH leaves behind for every rank that is killed (the rank tests kill some) and for every
# world whose process manager does not end cleanly: shared-memory segments and topology files; and
# the empty /tmp/python_env_* dir Triton's Python backend makes for every model it loads.
LEFTOVERS = (("/dev/shm", "mpich_shm_*"), ("/tmp", "hydra_hwloc_xmlfile_*"), ("/tmp", "python_env_*"))


def _leftovers() -> set[Path]:
    return {f for d, pattern in LEFTOVERS if Path(d).is_dir() for f in Path(d).glob(pattern)}


@pytest.fixture(scope="session", autouse=True)
def _no_leftovers():
    """Remove, once the session's servers and ranks are gone, what MPICH and Triton left behind
    during it (a directory only if it is empty)."""
    before = _leftovers()
    yield
    for path in _leftovers() - before:
        if path.is_dir():
            with contextlib.suppress(OSError):
                path.rmdir()
        else:
            path.unlink(missing_ok=True)


@pytest.fixture(params=["native", "avx2"])
def isa(request) -> str:
    """Each kernel test runs the library built for this machine and the AVX2 form (tiles of 8-float
    vectors), which any x86-64 with AVX2 runs: an AVX-512 machine checks both. (The weight-only
    kernel's tests add the form without AMX on a machine with it.)"""
    return request.param


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    """name → tiny HF model dir (TINY_ARCHS and tiny_models.TINY_VARIANTS), each made once per session."""
    return TinyModels(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The default real model, fetched by the project's own command into the cache."""
    from trtbuild.fetch import fetch_model

    return fetch_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    """The first 100,000 characters of ppl.txt: the tests' calibration text."""
    f = tmp_path_factory.mktemp("calib") / "calib.txt"
    f.write_text(PPL_TEXT.read_text()[:CALIB_CHARS])
    return f


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory) -> Path:
    """A dir for one test module's fixtures, deleted when the module is done."""
    path = tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclasses.dataclass
class _Made:
    path: Path
    size: int
    kind: str  # "checkpoint" | "engine"
    used: float = dataclasses.field(default_factory=time.monotonic)


class Engines:
    """convert → (quantize) → build, each result made once per session under `root` and shared.

        engines.checkpoint(model_dir, dtype="float32", quant=())        → checkpoint dir
        engines.engine(model_dir, BuildConfig(...), dtype=..., quant=()) → engine dir
        engines.runner(model_dir, BuildConfig(...), ..., num_threads=1) → a new ModelRunner on it

    `quant` holds convert_checkpoint.py's quantization flags; a recipe that needs calibration and
    names no --calib_dataset calibrates on `calib_file` (4 samples of 64 tokens unless the flags say
    otherwise). Results are keyed by (model dir, dtype, the recipe) and the BuildConfig (frozen, so
    hashable), and are read-only: a test that changes files copies them to its tmp_path first, and
    one that patches what a build sees (no compiler, ...) asks the factory before patching.
    Between modules the factory keeps at most CACHE_MB (TRTBUILD_TEST_CACHE_MB), evicting the least
    recently used; at the end of the session it deletes everything.
    """

    def __init__(self, root: Path, calib_file: Path, cache_bytes: int = CACHE_MB << 20):
        self.root, self.calib_file, self.cache_bytes = root, calib_file, cache_bytes
        self._made: dict[tuple, _Made] = {}
        self._count = 0

    # -- the keys --------------------------------------------------------------------------------
    def recipe(self, quant=()):
        """The QuantRecipe of convert flags, with the factory's calibration where it needs one and
        none where it does not (so that flags differing only there share a checkpoint)."""
        from trtbuild.quantization.recipe import QuantRecipe, add_quant_args, recipe_from_args

        argv = ["--calib_dataset", str(self.calib_file), *CALIB_FLAGS, *map(str, quant)]  # the flags' own win
        recipe = recipe_from_args(add_quant_args(argparse.ArgumentParser()).parse_args(argv))
        if recipe.needs_calibration:
            return recipe
        defaults = QuantRecipe()
        return dataclasses.replace(recipe, calib_dataset=None, calib_size=defaults.calib_size,
                                   calib_max_seq_length=defaults.calib_max_seq_length)

    def _checkpoint_key(self, model_dir, dtype, quant) -> tuple:
        return ("checkpoint", str(Path(model_dir).resolve()), dtype, repr(self.recipe(quant)))

    def _new_dir(self, kind: str, model_dir) -> Path:
        self._count += 1
        return self.root / f"{self._count:03d}_{kind}_{Path(model_dir).name}"

    def _remember(self, key: tuple, path: Path, kind: str) -> Path:
        self._made[key] = _Made(path, dir_size(path), kind)
        return path

    def _recall(self, key: tuple) -> Path | None:
        made = self._made.get(key)
        if made is None or not made.path.is_dir():
            return None
        made.used = time.monotonic()
        return made.path

    # -- the results -----------------------------------------------------------------------------
    def checkpoint(self, model_dir, dtype: str = "float32", quant=()) -> Path:
        from trtbuild.convert.converter import convert_checkpoint

        key = self._checkpoint_key(model_dir, dtype, quant)
        if (path := self._recall(key)) is not None:
            return path
        recipe = self.recipe(quant)
        transform = None
        if not recipe.is_noop:
            from trtbuild.quantization.api import quantize_checkpoint

            def transform(weights, config):
                return quantize_checkpoint(weights, config, recipe, tokenizer=Path(model_dir), progress=False)

        out = self._new_dir("ckpt", model_dir)
        convert_checkpoint(model_dir, out, dtype, progress=False, transform=transform)
        return self._remember(key, out, "checkpoint")

    def engine(self, model_dir, build=None, dtype: str = "float32", quant=(), keep_onnx: bool = False) -> Path:
        """The engine dir of `build` (BuildConfig(); keep_onnx: also the unoptimized rank0.onnx)."""
        from trtbuild.builder import build_engine
        from trtbuild.engine import BuildConfig

        build = BuildConfig() if build is None else build
        key = ("engine", self._checkpoint_key(model_dir, dtype, quant), build, keep_onnx)
        if (path := self._recall(key)) is not None:
            return path
        ckpt = self.checkpoint(model_dir, dtype, quant)
        out = self._new_dir("engine", model_dir)
        build_engine(ckpt, out, build, progress=False, keep_onnx=keep_onnx)
        return self._remember(key, out, "engine")

    def runner(self, model_dir, build=None, dtype: str = "float32", quant=(), keep_onnx: bool = False,
               num_threads: int = 1, **runner_options):
        """A new ModelRunner (its own KV cache and adapters) on the shared engine."""
        from trtbuild.runtime import ModelRunner

        engine = self.engine(model_dir, build, dtype, quant, keep_onnx)
        return ModelRunner.from_dir(engine, num_threads=num_threads, **runner_options)

    def runners_in_both_forms(self, model_dir, num_threads: int = 1, **limits) -> dict:
        """The attention and norm plugins on ("auto") and off ("disable") → a runner each."""
        from trtbuild.engine import BuildConfig, PluginConfig

        return {form: self.runner(model_dir, BuildConfig(**limits, plugin_config=PluginConfig(
                    gpt_attention_plugin=form, norm_plugin=form)), num_threads=num_threads)
                for form in ("auto", "disable")}

    # -- disk ------------------------------------------------------------------------------------
    def trim(self, budget: int | None = None) -> None:
        """Delete the least recently used engines, then checkpoints, until at most `budget` bytes are kept."""
        budget = self.cache_bytes if budget is None else budget
        total = self.size
        for key, made in sorted(self._made.items(), key=lambda kv: (kv[1].kind != "engine", kv[1].used)):
            if total <= budget:
                break
            shutil.rmtree(made.path, ignore_errors=True)
            del self._made[key]
            total -= made.size

    @property
    def size(self) -> int:
        return sum(m.size for m in self._made.values())


@pytest.fixture(scope="session")
def engines(tmp_path_factory, calib_file) -> Engines:
    """The session's engine factory (see Engines); everything it made is deleted at the end."""
    factory = Engines(tmp_path_factory.mktemp("engines"), calib_file)
    yield factory
    shutil.rmtree(factory.root, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _trim_engines_after_each_module(engines):
    """What one module made beyond the factory's budget goes when the module is done."""
    yield
    engines.trim()


def kernel_session(graph, path: Path, isa: str | None = None, threads: int = 2):
    """An onnxruntime session on an ONNX graph saved at `path` with every initializer in an external
    data file (`path`.data), as in an engine, and trtbuild's kernels registered (`isa`: their form,
    default this CPU's)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from trtbuild import kernels

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(kernels.DOMAIN, 1),
                                                    helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    kernels.register(so, None, isa)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def op_types(graph) -> set[str]:
    """Op types of an ONNX graph and of every If branch inside it."""
    import onnx

    ops = set()
    for node in graph.node:
        ops.add(node.op_type)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                ops |= op_types(attr.g)
    return ops

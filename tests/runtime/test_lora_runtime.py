"""The runtime LoRA path: trt-build --lora_dir engines against merged engines and PeftModel, mixed
batches, adapters added to a running engine, the two lowerings, and every bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trtbuild.builder import build_engine
from trtbuild.convert.converter import convert_checkpoint
from trtbuild.convert.lora import ADAPTER_BIN, ADAPTER_CONFIG, ADAPTER_SAFETENSORS, load_lora_adapter, \
    make_peft_adapter, merge_lora
from trtbuild.engine import BuildConfig, LoraConfig, PluginConfig
from trtbuild.errors import TrtbuildError
from trtbuild.runtime import ModelRunner, SamplingConfig

from conftest import REPO

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [100, 101, 102, 103, 104]]
NEW_TOKENS = 12
ATOL = 1e-3


def limits(attention: str = "auto", **lora) -> BuildConfig:
    return BuildConfig(max_batch_size=4, max_input_len=32, max_seq_len=64, lora_config=LoraConfig(**lora),
                       plugin_config=PluginConfig(gpt_attention_plugin=attention, norm_plugin=attention))


def build(ckpt: Path, out: Path, lora_dirs=None, form: str = "masked", attention: str = "auto",
          **lora) -> ModelRunner:
    build_engine(ckpt, out, limits(attention, lora_dir=tuple(str(d) for d in lora_dirs or ()), lora_form=form,
                                   **lora), progress=False)
    return ModelRunner.from_dir(out, num_threads=1)


def merged_engine(model: Path, adapter: Path, root: Path) -> ModelRunner:
    """What convert_checkpoint.py --hf_lora_dir gives: the adapter folded into the weights."""
    ckpt = root / f"merged_{adapter.name}"
    convert_checkpoint(model, ckpt, progress=False,
                       transform=lambda w, c: merge_lora(w, c, [load_lora_adapter(adapter, c)]))
    return build(ckpt, root / f"merged_{adapter.name}_engine")


def peft_model(model: Path, adapter: Path | None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    return base if adapter is None else PeftModel.from_pretrained(base, str(adapter)).eval()


def peft_logits(pm, prompt) -> np.ndarray:
    with torch.no_grad():
        return pm(torch.tensor([prompt])).logits[0].numpy()


def peft_greedy(pm, prompt) -> list[int]:
    with torch.no_grad():
        out = pm.generate(input_ids=torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


class Setup:
    """One tiny model, its adapters, their merged engines, and the runtime-LoRA engines."""

    def __init__(self, model: Path, ckpt: Path, root: Path, adapters: dict[str, Path], runtime: list[str], **lora):
        self.model, self.ckpt, self.root, self.adapters = model, ckpt, root, adapters
        self.names = runtime
        self.dirs = [adapters[n] for n in runtime]  # task id k = runtime[k]
        self.runner = build(self.ckpt, root / "lora_engine", self.dirs, **lora)
        self._merged: dict[str, ModelRunner] = {}
        self._peft: dict[str, object] = {}

    def merged(self, name: str) -> ModelRunner:
        if name not in self._merged:
            self._merged[name] = merged_engine(self.model, self.adapters[name], self.root)
        return self._merged[name]

    def peft(self, name: str | None):
        if name not in self._peft:
            self._peft[name] = peft_model(self.model, self.adapters[name] if name else None)
        return self._peft[name]


def setup_dir(module_tmp: Path, name: str) -> Path:
    (module_tmp / name).mkdir()
    return module_tmp / name


@pytest.fixture(scope="module")
def llama(tiny_models, engines, module_tmp) -> Setup:
    root = setup_dir(module_tmp, "llama")
    m = tiny_models["llama"]
    adapters = {
        # rank 4 (k at rank 2), .safetensors, every linear but up_proj
        "a0": make_peft_adapter(m, root / "a0", r=4, lora_alpha=8, seed=1, rank_pattern={"k_proj": 2},
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]),
        # rank 2, .bin, a subset: its other slots stay zero
        "a1": make_peft_adapter(m, root / "a1", r=2, lora_alpha=6, seed=2, safe_serialization=False,
                                target_modules=["q_proj", "v_proj", "down_proj"]),
        # rank 3, saved in bf16: added to the running engine
        "a2": make_peft_adapter(m, root / "a2", r=3, lora_alpha=3, seed=3, dtype=torch.bfloat16,
                                target_modules=["q_proj", "o_proj", "down_proj"]),
    }
    return Setup(m, engines.checkpoint(m), root, adapters, ["a0", "a1"], max_lora_rank=4, max_loras=3)


@pytest.fixture(scope="module")
def gpt2(tiny_models, engines, module_tmp) -> Setup:
    root = setup_dir(module_tmp, "gpt2")
    m = tiny_models["gpt2"]
    adapters = {"g0": make_peft_adapter(m, root / "g0", r=4, seed=4),  # c_attn (fused qkv), c_proj, c_fc
                "g1": make_peft_adapter(m, root / "g1", r=2, seed=5, safe_serialization=False,
                                        target_modules=["c_attn", "c_fc"])}
    return Setup(m, engines.checkpoint(m), root, adapters, ["g0", "g1"], max_lora_rank=4)


def family_setup(arch: str, tiny_models, engines, module_tmp, targets: dict[str, list[str]]) -> Setup:
    """Two adapters (rank 4 .safetensors, rank 2 .bin) of the given HF targets on a family's model."""
    root = setup_dir(module_tmp, arch)
    m = tiny_models[arch]
    adapters = {name: make_peft_adapter(m, root / name, r=4 - 2 * k, seed=6 + k, safe_serialization=k == 0,
                                        target_modules=modules)
                for k, (name, modules) in enumerate(targets.items())}
    return Setup(m, engines.checkpoint(m), root, adapters, list(targets), max_lora_rank=4)


@pytest.fixture(scope="module")
def qwen3(tiny_models, engines, module_tmp) -> Setup:
    """q_proj / k_proj adapted before the per-head q / k norms."""
    return family_setup("qwen3", tiny_models, engines, module_tmp, {
        "q0": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"], "q1": ["q_proj", "down_proj", "gate_proj"]})


@pytest.fixture(scope="module")
def phi3(tiny_models, engines, module_tmp) -> Setup:
    """Phi-3's fused qkv_proj (attn_qkv) and gate_up_proj (mlp_h_to_4h and mlp_gate sharing one A)."""
    return family_setup("phi3", tiny_models, engines, module_tmp, {
        "p0": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], "p1": ["qkv_proj", "gate_up_proj"]})


@pytest.fixture(scope="module")
def gemma3(tiny_models, engines, module_tmp) -> Setup:
    """Gemma 3: adapters under its sandwich norms, on sliding-window and full layers."""
    return family_setup("gemma3", tiny_models, engines, module_tmp, {
        "e0": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], "e1": ["gate_proj", "up_proj"]})


# ---------------------------------------------------------------------------------------------
# runtime == merged == PeftModel


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3", "phi3", "gemma3"])
def test_runtime_equals_merged_equals_peft(request, arch):
    s: Setup = request.getfixturevalue(arch)
    for task, name in enumerate(s.names):
        runtime = s.runner.score(PROMPTS, lora_task_ids=[task] * len(PROMPTS))
        merged = s.merged(name).score(PROMPTS)
        base = s.runner.score(PROMPTS)
        pm = s.peft(name)
        for i, p in enumerate(PROMPTS):
            ref = peft_logits(pm, p)
            np.testing.assert_allclose(runtime[i, :len(p)], ref, atol=ATOL, rtol=0)
            np.testing.assert_allclose(merged[i, :len(p)], ref, atol=ATOL, rtol=0)
            np.testing.assert_allclose(runtime[i, :len(p)], merged[i, :len(p)], atol=ATOL, rtol=0)
            assert np.abs(runtime[i, :len(p)] - base[i, :len(p)]).max() > 0.05, "the adapter changes nothing"
        sampling = SamplingConfig(max_new_tokens=NEW_TOKENS)
        got = s.runner.generate(PROMPTS, sampling, lora_task_ids=[task] * len(PROMPTS)).output_ids
        assert got == s.merged(name).generate(PROMPTS, sampling).output_ids
        assert got[0] == peft_greedy(pm, PROMPTS[0])


def test_base_rows_equal_base_engine(llama, engines):
    """Task id -1 is the base model: the same logits as an engine built without the plugin."""
    base = engines.runner(llama.model, limits())
    np.testing.assert_allclose(llama.runner.score(PROMPTS, lora_task_ids=[-1] * 3), base.score(PROMPTS),
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(llama.runner.score(PROMPTS), base.score(PROMPTS), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3", "phi3", "gemma3"])
def test_mixed_batch_equals_singles(request, arch):
    """Task ids [0, -1, 1]: one engine run for the whole batch, each row as if run alone."""
    s: Setup = request.getfixturevalue(arch)
    tasks = [0, -1, 1]
    runs = []
    run = s.runner.session.run_with_iobinding
    s.runner.session.run_with_iobinding = lambda io, *a, **k: (runs.append(1), run(io, *a, **k))[1]
    try:
        mixed = s.runner.score(PROMPTS, lora_task_ids=tasks)
    finally:
        del s.runner.session.run_with_iobinding
    assert len(runs) == 1
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS)
    mixed_tokens = s.runner.generate(PROMPTS, sampling, lora_task_ids=tasks).output_ids
    for i, (p, t) in enumerate(zip(PROMPTS, tasks)):
        alone = s.runner.score([p], lora_task_ids=[t])
        np.testing.assert_allclose(mixed[i, :len(p)], alone[0], atol=1e-5, rtol=0)
        assert mixed_tokens[i] == s.runner.generate([p], sampling, lora_task_ids=[t]).output_ids[0]
    # the same batch in another order, and task ids that are not a contiguous range
    rev = s.runner.score(PROMPTS[::-1], lora_task_ids=tasks[::-1])
    for i, p in enumerate(PROMPTS[::-1]):
        np.testing.assert_allclose(rev[i, :len(p)], mixed[2 - i, :len(p)], atol=1e-5, rtol=0)


def test_gather_form_equals_masked_form(llama, tmp_path):
    """The two lowerings of the plugin (trtbuild.plugins.lora) compute the same thing."""
    gather = build(llama.ckpt, tmp_path / "gather", llama.dirs, form="gather", max_lora_rank=4, max_loras=3)
    for tasks in ([0, -1, 1], [1, 1, 1], [-1, -1, -1], [0, 0, -1]):
        np.testing.assert_allclose(gather.score(PROMPTS, lora_task_ids=tasks),
                                   llama.runner.score(PROMPTS, lora_task_ids=tasks), atol=1e-5, rtol=0)
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS)
    assert gather.generate(PROMPTS, sampling, lora_task_ids=[1, -1, 0]).output_ids == \
        llama.runner.generate(PROMPTS, sampling, lora_task_ids=[1, -1, 0]).output_ids


def test_standard_plugins_engine(llama, tmp_path):
    """Attention/norm plugins off (the static-batch runtime path with the concat KV cache)."""
    standard = build(llama.ckpt, tmp_path / "standard", llama.dirs, attention="disable", max_lora_rank=4)
    tasks = [0, -1, 1]
    got, want = standard.score(PROMPTS, lora_task_ids=tasks), llama.runner.score(PROMPTS, lora_task_ids=tasks)
    for i, p in enumerate(PROMPTS):  # a padding position's logits are no one's (each form computes its own)
        np.testing.assert_allclose(got[i, :len(p)], want[i, :len(p)], atol=1e-4, rtol=0)
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS)
    assert standard.generate(PROMPTS, sampling, lora_task_ids=tasks).output_ids == \
        llama.runner.generate(PROMPTS, sampling, lora_task_ids=tasks).output_ids


def test_engine_dir_holds_adapters(llama):
    d = llama.runner.engine_dir
    lc = llama.runner.config.build_config.lora_config
    assert lc.lora_dir == ("lora/0", "lora/1") and lc.max_lora_rank == 4 and lc.max_loras == 3
    assert lc.lora_target_modules == ("attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_4h_to_h")
    assert llama.runner.config.build_config.plugin_config.lora_plugin == "float32"
    assert (d / "lora/0" / ADAPTER_SAFETENSORS).is_file() and (d / "lora/1" / ADAPTER_BIN).is_file()
    assert (d / "lora/0" / ADAPTER_CONFIG).read_bytes() == (llama.adapters["a0"] / ADAPTER_CONFIG).read_bytes()
    manifest = json.loads((d / "lora/manifest.json").read_text())
    assert manifest["form"] == "masked" and manifest["adapters"][1]["source"] == str(llama.adapters["a1"].resolve())
    # the weights are graph inputs with a dynamic slot axis, not initializers
    names = {i.name: i.shape for i in llama.runner.session.get_inputs()}
    assert names["lora_task_ids"] == ["batch_size"]
    assert names["lora.transformer.layers.1.attention.qkv.A"] == ["lora_slots", 12, 64]
    assert names["lora.transformer.layers.1.attention.qkv.B"] == ["lora_slots", 12, 128]
    assert names["lora.transformer.layers.0.mlp.proj.A"] == ["lora_slots", 4, 128]
    assert not any(n.startswith("lora.transformer.layers.0.mlp.gate") for n in names)


# ---------------------------------------------------------------------------------------------
# adapters added to a running engine


def test_add_lora_after_build(llama, tmp_path):
    runner = ModelRunner.from_dir(llama.runner.engine_dir, num_threads=1)  # its own slots
    assert runner.lora.task_ids == [0, 1]
    task = runner.add_lora(llama.adapters["a2"])  # bf16, rank 3, not in the engine dir
    assert task == 2 and runner.lora.task_ids == [0, 1, 2]
    assert runner.add_lora(llama.adapters["a0"]) == 0  # already loaded: same task id
    got = runner.score(PROMPTS, lora_task_ids=[2, 0, 2])
    pm = llama.peft("a2")
    for i in (0, 2):
        np.testing.assert_allclose(got[i, :len(PROMPTS[i])], peft_logits(pm, PROMPTS[i]), atol=ATOL, rtol=0)
    np.testing.assert_allclose(got[0, :len(PROMPTS[0])], llama.merged("a2").score([PROMPTS[0]])[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(got[1, :len(PROMPTS[1])], llama.runner.score([PROMPTS[1]], lora_task_ids=[0])[0],
                               atol=1e-5, rtol=0)
    # all 3 slots are taken
    other = make_peft_adapter(llama.model, tmp_path / "a4", r=2, seed=9, target_modules=["q_proj"])
    with pytest.raises(TrtbuildError, match=r"no free LoRA slot for .*a4: .* at most 3 adapters \(--max_loras\) "
                                            r"and task ids 0, 1, 2 are loaded"):
        runner.add_lora(other)
    # freeing a slot makes room, and the freed task id is unknown until reused
    runner.lora.remove(1)
    with pytest.raises(TrtbuildError, match="lora task id 1 is unknown"):
        runner.score(PROMPTS[:1], lora_task_ids=[1])
    assert runner.add_lora(other) == 1
    alone = runner.score(PROMPTS[:1], lora_task_ids=[1])
    assert np.abs(alone - runner.score(PROMPTS[:1])).max() > 1e-3


def test_run_py_with_lora(llama, capsys, tmp_path):
    from trtbuild.cli.run import main

    out = tmp_path / "out.csv"
    main(["--engine_dir", str(llama.runner.engine_dir), "--input_file", str(_ids_csv(tmp_path)),
          "--max_output_len", str(NEW_TOKENS), "--lora_dir", str(llama.adapters["a0"]), str(llama.adapters["a2"]),
          "--lora_task_uids", "0", "-1", "2", "--output_csv", str(out), "--num_threads", "1"])
    rows = [[int(t) for t in line.split(",")] for line in out.read_text().split()]
    runner = ModelRunner.from_dir(llama.runner.engine_dir, num_threads=1)
    runner.add_lora(llama.adapters["a2"])
    want = runner.generate(PROMPTS, SamplingConfig(max_new_tokens=NEW_TOKENS), lora_task_ids=[0, -1, 2]).output_ids
    assert rows == want


def _ids_csv(tmp_path: Path) -> Path:
    f = tmp_path / "prompts.csv"
    f.write_text("\n".join(",".join(map(str, p)) for p in PROMPTS) + "\n")
    return f


# ---------------------------------------------------------------------------------------------
# bad input: one clear error each, exit 2 from the command line


@pytest.fixture(scope="module")
def bad_adapters(llama, tiny_models, module_tmp) -> dict[str, Path]:
    root = setup_dir(module_tmp, "bad_lora")
    good = llama.adapters["a0"]
    out = {
        "other_model": make_peft_adapter(tiny_models["llama3"], root / "other_model", r=2),
        "rank": make_peft_adapter(llama.model, root / "rank", r=8, target_modules=["q_proj"]),
        "target": make_peft_adapter(llama.model, root / "target", r=2, target_modules=["up_proj"]),
        "modules_to_save": make_peft_adapter(llama.model, root / "mts", r=2, target_modules=["q_proj"],
                                             modules_to_save=["lm_head"]),
    }
    for name in ("no_config", "both", "neither"):
        shutil.copytree(good, root / name)
        out[name] = root / name
    (out["no_config"] / ADAPTER_CONFIG).unlink()
    shutil.copy(llama.adapters["a1"] / ADAPTER_BIN, out["both"] / ADAPTER_BIN)
    (out["neither"] / ADAPTER_SAFETENSORS).unlink()
    return out


BAD = {
    "other_model": r"other_model/adapter_model.safetensors: tensor .* has shape \[\d+, \d+\], the base model needs "
                   r"\[\d+, \d+\] .*another base model",
    "rank": r"rank/? has rank 8 at model.layers.0.self_attn.q_proj, above --max_lora_rank 4: rebuild with "
            r"--max_lora_rank 8",
    "target": r"targets mlp_gate \(model.layers.0.mlp.up_proj\), which the engine was not built for "
              r"\(--lora_target_modules attn_q attn_k attn_v attn_dense mlp_h_to_4h mlp_4h_to_h\)",
    "modules_to_save": r"replaces lm_head.weight \(modules_to_save\), which cannot be switched per request: "
                       r"merge it at conversion \(convert_checkpoint.py --hf_lora_dir\)",
    "no_config": rf"no_config has no {ADAPTER_CONFIG}",
    "both": rf"both holds both {ADAPTER_SAFETENSORS} and {ADAPTER_BIN}",
    "neither": rf"neither has neither {ADAPTER_SAFETENSORS} nor {ADAPTER_BIN}",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_at_run_time(llama, bad_adapters, capsys, case):
    runner = ModelRunner.from_dir(llama.runner.engine_dir, num_threads=1)
    with pytest.raises(TrtbuildError, match=BAD[case]):
        runner.add_lora(bad_adapters[case])
    assert runner.lora.task_ids == [0, 1]  # nothing half-loaded
    from trtbuild.cli.run import main

    with pytest.raises(SystemExit) as e:
        main(["--engine_dir", str(llama.runner.engine_dir), "--input_text", "hello", "--max_output_len", "2",
              "--lora_dir", str(bad_adapters[case])])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]


@pytest.mark.parametrize("case", ["other_model", "rank", "modules_to_save", "no_config", "both", "neither"])
def test_bad_adapter_at_build_time(llama, bad_adapters, tmp_path, capsys, case):
    from trtbuild.cli.build import main

    with pytest.raises(SystemExit) as e:
        main(["--checkpoint_dir", str(llama.ckpt), "--output_dir", str(tmp_path / "e"), "--max_lora_rank", "4",
              "--max_input_len", "32", "--max_seq_len", "64",
              "--lora_dir", str(llama.adapters["a0"]), str(bad_adapters[case])])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e").exists()  # atomic: no half engine


def test_bad_build_flags(llama, tmp_path, capsys):
    from trtbuild.cli.build import main

    a0 = str(llama.adapters["a0"])
    if not (llama.root / "a0_copy").exists():
        shutil.copytree(a0, llama.root / "a0_copy")
    cases = {
        ("--lora_target_modules", "attn_q", "attn_v"): r"targets attn_k .*not built for \(--lora_target_modules "
                                                        r"attn_q attn_v\)",
        ("--lora_target_modules", "q_proj"): r"--lora_target_modules q_proj: unknown",
        ("--max_lora_rank", "2"): r"rank 4 .* above --max_lora_rank 2",
        ("--max_loras", "1", "--lora_dir", a0, str(llama.adapters["a1"])): r"--max_loras 1 is below the 2 adapters",
        ("--lora_plugin", "float16"): r"--lora_plugin float16: this engine computes in float32",
        ("--lora_dir", a0, str(llama.adapters["a1"]), str(llama.root / "a0_copy")): r"--lora_dir .*a0 and .*a0_copy "
                                                                                   r"are the same adapter",
        ("--backend", "tensorrt"): r"--lora_dir with --backend tensorrt: .*--hf_lora_dir",
    }
    for extra, msg in cases.items():
        argv = ["--checkpoint_dir", str(llama.ckpt), "--output_dir", str(tmp_path / "e"), "--max_input_len", "32",
                "--max_seq_len", "64", "--max_lora_rank", "4", "--lora_dir", a0, *extra]
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        import re

        assert re.search(msg, capsys.readouterr().err), extra


def test_unknown_task_id(llama, engines, capsys, tmp_path):
    with pytest.raises(TrtbuildError, match=r"lora task id 2 is unknown: .* has task ids 0, 1 loaded \(-1 = base "
                                            r"model\)"):
        llama.runner.generate(PROMPTS[:1], SamplingConfig(max_new_tokens=2), lora_task_ids=[2])
    with pytest.raises(TrtbuildError, match="lora task id -3 is unknown"):
        llama.runner.score(PROMPTS[:1], lora_task_ids=[-3])
    from trtbuild.cli.run import main

    with pytest.raises(SystemExit) as e:
        main(["--engine_dir", str(llama.runner.engine_dir), "--input_file", str(_ids_csv(tmp_path)),
              "--max_output_len", "2", "--lora_task_uids", "0", "7", "-1"])
    assert e.value.code == 2 and "lora task id 7 is unknown" in capsys.readouterr().err
    base = engines.runner(llama.model, limits())
    with pytest.raises(TrtbuildError, match="built without --lora_plugin"):
        base.add_lora(llama.adapters["a0"])


# ---------------------------------------------------------------------------------------------
# the runtime reads adapters without torch


def test_runtime_runs_without_torch(llama, tmp_path):
    """An engine with a .safetensors and a .bin adapter loads, takes a bf16 adapter, scores and
    generates with torch made unimportable, and imports none of the build side (the runtime's
    promise: numpy, onnxruntime and tokenizers only; tests/runtime/test_runtime_boundary.py for the others)."""
    script = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now fails
import numpy as np
from trtbuild.runtime import ModelRunner, SamplingConfig
r = ModelRunner.from_dir({str(llama.runner.engine_dir)!r}, num_threads=1)
t = r.add_lora({str(llama.adapters["a2"])!r})
s = r.score({PROMPTS!r}, lora_task_ids=[0, 1, t])
np.save({str(tmp_path / "s.npy")!r}, s)
g = r.generate({PROMPTS!r}, SamplingConfig(max_new_tokens=3), lora_task_ids=[0, t, -1]).output_ids
np.save({str(tmp_path / "g.npy")!r}, np.array(g))
build_side = ("torch", "onnx", "transformers", "trtbuild.plugins", "trtbuild.network", "trtbuild.onnx_graph")
loaded = [m for m, v in sys.modules.items() if v is not None and any(m == b or m.startswith(b + ".") for b in build_side)]
assert not loaded, loaded
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, timeout=300)
    runner = ModelRunner.from_dir(llama.runner.engine_dir, num_threads=1)
    runner.add_lora(llama.adapters["a2"])
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), runner.score(PROMPTS, lora_task_ids=[0, 1, 2]), atol=1e-6)
    assert np.load(tmp_path / "g.npy").tolist() == runner.generate(PROMPTS, SamplingConfig(max_new_tokens=3),
                                                                   lora_task_ids=[0, 2, -1]).output_ids


# ---------------------------------------------------------------------------------------------
# the real model


@pytest.mark.slow
def test_real_model_runtime_equals_merged_equals_peft(real_model_dir, engines, tmp_path):
    """SmolLM2-135M (GQA 9/3, tied), a rank-16 adapter on every linear: runtime == merged == PeftModel."""
    adapter = make_peft_adapter(real_model_dir, tmp_path / "a", r=16, lora_alpha=32, b_std=0.01, seed=7)
    ckpt = engines.checkpoint(real_model_dir)
    runner = build(ckpt, tmp_path / "lora", [adapter], max_lora_rank=16, max_loras=1)
    merged = merged_engine(real_model_dir, adapter, tmp_path)
    pm = peft_model(real_model_dir, adapter)
    prompts = [[1, 504, 3458, 282, 4649, 314, 253, 1345, 30], [1, 1206, 1076, 314]]
    runtime_scores = runner.score(prompts, lora_task_ids=[0, 0])
    merged_scores = merged.score(prompts)
    base_scores = runner.score(prompts, lora_task_ids=[-1, -1])
    for i, p in enumerate(prompts):
        ref = peft_logits(pm, p)
        np.testing.assert_allclose(runtime_scores[i, :len(p)], ref, atol=ATOL, rtol=0)
        np.testing.assert_allclose(merged_scores[i, :len(p)], ref, atol=ATOL, rtol=0)
        assert np.abs(runtime_scores[i, :len(p)] - base_scores[i, :len(p)]).max() > 0.05
    sampling = SamplingConfig(max_new_tokens=8)
    got = runner.generate(prompts, sampling, lora_task_ids=[0, 0]).output_ids
    assert got == merged.generate(prompts, sampling).output_ids
    assert got[0] == peft_greedy(pm, prompts[0])[:8]

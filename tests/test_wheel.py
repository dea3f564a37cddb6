"""The wheel: built from the checkout and installed alone into a fresh venv, trtbuild runs the pipeline
(convert → build with its own kernels → run → Triton model repository) from the installed files only.

What this guards: everything a command reads at run time ships as package data (the kernels' sources
and headers, the Triton model templates, the launcher and the clients), and an install made without
one of them is noticed here, not by a user whose engine silently lost its kernels.

To stay quick and offline the venv gets only the wheel (`--no-deps`); the third-party packages
(numpy, onnxruntime, torch, ...) come from the project venv through a .pth line. That line adds the
project's site-packages as a plain path, so its editable-install hook (a .pth inside it) is never
run; the test checks that every trtbuild module is imported from the new venv and that neither the
checkout nor its cwd is on sys.path (commands run from a temporary dir).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, make_tiny_model

pytestmark = pytest.mark.slow

MODELS = ("preprocessing", "tensorrt_llm", "postprocessing", "ensemble", "tensorrt_llm_bls")


def pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def package_dirs() -> dict[str, str]:
    """Checkout dir → installed dir, from pyproject.toml's package-dir (the one place that says it)."""
    return {src: pkg.replace(".", "/") for pkg, src in pyproject()["tool"]["setuptools"]["package-dir"].items()}


def build_requirements_met() -> bool:
    """pyproject's build-system requires (setuptools>=N) are installed here."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        from packaging.requirements import Requirement
    except ImportError:
        return False
    for spec in pyproject()["build-system"]["requires"]:
        req = Requirement(spec)
        try:
            if not req.specifier.contains(version(req.name), prereleases=True):
                return False
        except PackageNotFoundError:
            return False
    return True


def source_files(dirs) -> list[str]:
    """The checkout's files under `dirs` (tracked or new, not ignored), relative to the checkout."""
    if (REPO / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "--", *dirs], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
        files = [f for f in out.splitlines() if (REPO / f).is_file()]  # ls-files lists deleted files too
    else:
        files = [str(p.relative_to(REPO)) for d in dirs for p in (REPO / d).rglob("*") if p.is_file()]
    return sorted(f for f in files if "__pycache__" not in f and not f.endswith(".pyc"))


def clean_env(venv: Path, kernel_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", PYTHONNOUSERSITE="1",
               TRTBUILD_KERNEL_DIR=str(kernel_dir), OMP_NUM_THREADS="1", PYTHONWARNINGS="default")
    return env


def run(cmd, cwd: Path, env=None, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(root, venv, env, wheel, build output): the wheel built from a copy of the checkout's package files and
    installed into a fresh venv; everything lives under root and is deleted afterwards."""
    root = tmp_path_factory.mktemp("wheel")
    start = time.monotonic()
    try:
        dirs = package_dirs()
        src = root / "src"
        top = ["pyproject.toml", "README.md", *pyproject()["project"].get("license-files", [])]
        for rel in [*top, *source_files(dirs)]:
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
        # built from a copy, so that the checkout gets no build/ or egg-info; with the project venv's
        # setuptools when it is recent enough (no download), else in pip's isolated build env
        isolation = ["--no-build-isolation"] if build_requirements_met() else []
        build = run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", root / "dist", src],
                    cwd=root)
        wheel = next((root / "dist").glob("trtbuild-*.whl"))

        venv = root / "venv"
        run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
        purelib = Path(run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                           cwd=root).stdout.strip())
        # the site dirs this process imports its third-party packages from (a venv's, and any it chains to)
        deps = list(dict.fromkeys(p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")
                                  and Path(p).is_dir()))
        (purelib / "_project_venv_deps.pth").write_text("".join(p + "\n" for p in deps))
        run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index",
             "-q", wheel], cwd=root)
        (root / "work").mkdir()
        print(f"wheel built and installed in {time.monotonic() - start:.1f} s")
        yield root, venv, clean_env(venv, root / "kernels"), wheel, build.stdout + build.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_wheel_builds_without_setuptools_banners(installed):
    *_, output = installed
    for banner in ("Deprecat", "would be ignored", "absent from", "!!"):
        assert banner not in output, output


def test_wheel_ships_every_file_of_the_packages(installed):
    """Every checkout file under a package dir (kernel sources and headers, Triton templates, launcher,
    clients, models.json, ...) is in the wheel, where pyproject's package-dir puts it."""
    _, _, _, wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    dirs = package_dirs()
    expected = {}
    for rel in source_files(dirs):
        src_dir = next(d for d in sorted(dirs, key=len, reverse=True) if rel == d or rel.startswith(d + "/"))
        expected[rel] = dirs[src_dir] + rel[len(src_dir):]
    missing = sorted(rel for rel, dst in expected.items() if dst not in names)
    assert not missing, f"files the wheel lacks (add them to pyproject.toml's package-data): {missing}"
    for needed in ("trtbuild/kernels/ort_op.h", "trtbuild/kernels/include/onnxruntime_c_api.h",
                   "trtbuild/triton_repo/launch_triton_server.py", "trtbuild/triton_repo/install_triton.sh",
                   "trtbuild/triton_repo/client/end_to_end_grpc_client.py",
                   *(f"trtbuild/triton_repo/all_models/inflight_batcher_llm/{m}/config.pbtxt" for m in MODELS)):
        assert needed in names, needed


def test_trtbuild_is_imported_from_the_wheel(installed):
    root, venv, env, _, _ = installed
    probe = ("import json, sys, trtbuild, trtbuild.serving, trtbuild.kernels, trtbuild.convert.cli, "
             "trtbuild.quantization, trtbuild.plugins, trtbuild.cli.build, trtbuild.cli.run\n"
             "print(json.dumps({'path': sys.path, 'modules': {n: getattr(m, '__file__', None) "
             "for n, m in sys.modules.items() if n == 'trtbuild' or n.startswith('trtbuild.')}}))")
    got = json.loads(run([venv / "bin" / "python", "-c", probe], cwd=root / "work", env=env).stdout)
    venv_dir = str(venv.resolve())
    outside = {n: f for n, f in got["modules"].items() if f is not None and not str(Path(f).resolve()).startswith(venv_dir)}
    assert len(got["modules"]) > 10 and not outside, outside
    # no sys.path entry but the venv's own holds a trtbuild (the checkout's top is where trtbuild/ is;
    # the project venv's site-packages, which is under the checkout, has only the editable hook's files)
    entries = [(root / "work" if p in ("", ".") else Path(p)).resolve() for p in got["path"]]
    shadowing = [str(p) for p in entries if p == REPO.resolve() or
                 ((p / "trtbuild").exists() and not str(p).startswith(venv_dir))]
    assert not shadowing, f"sys.path entries that could supply trtbuild besides the wheel: {shadowing}"


def test_pipeline_runs_from_the_wheel(installed):
    """convert → trt-build (compiling the kernels from the installed sources) → run → trtbuild-triton-repo."""
    root, venv, env, _, _ = installed
    work, bin_ = root / "work", venv / "bin"
    make_tiny_model("llama", work / "hf")
    run([bin_ / "trtbuild-convert", "--model_dir", "hf", "--output_dir", "ckpt"], cwd=work, env=env)

    build = run([bin_ / "trt-build", "--checkpoint_dir", "ckpt", "--output_dir", "engine", "--max_batch_size", 2,
                 "--max_input_len", 64, "--max_seq_len", 128], cwd=work, env=env)
    assert "kernels" not in build.stderr, build.stderr  # no "trtbuild's kernels: ...; onnxruntime's ops instead"
    plugins = json.loads((work / "engine" / "config.json").read_text())["build_config"]["plugin_config"]
    assert plugins["context_fmha"] is True, plugins  # the engine uses CausalPromptAttention
    assert plugins["lm_head_plugin"] is True, plugins  # and LmHead (the tiny llama's lm_head is tied)
    assert list((root / "kernels").glob("libtrtbuild_kernels-*.so")), "the kernels were not compiled from the wheel"

    out = run([bin_ / "trtbuild-run", "--engine_dir", "engine", "--input_text", "The city council met on Monday",
               "--max_output_len", 8], cwd=work, env=env)
    assert 'Input [Text 0]: "The city council met on Monday"' in out.stdout, out.stdout
    text = re.search(r'^Output \[Text 0 Beam 0\]: "(.*)"$', out.stdout, re.M | re.S)
    assert text and text.group(1).strip(), out.stdout

    repo = run([bin_ / "trtbuild-triton-repo", "--engine_dir", "engine", "--output", "model_repo", "--decoupled"],
               cwd=work, env=env)
    for m in MODELS:
        config = (work / "model_repo" / m / "config.pbtxt").read_text()
        assert "${" not in config, (m, config)  # every placeholder filled
        assert (work / "model_repo" / m / "1").is_dir()
        if m != "ensemble":
            assert (work / "model_repo" / m / "1" / "model.py").is_file(), m
    # the launch command it prints is the wheel's console command (its bin/ is first on PATH), and it runs
    launcher = re.search(r"^serve it: (.+) --model_repo (\S+)$", repo.stdout, re.M)
    assert launcher and launcher.group(1) == "trtbuild-launch-triton", repo.stdout
    assert Path(launcher.group(2)) == (work / "model_repo").resolve(), repo.stdout
    assert f"serve: trtbuild-launch-triton --model_repo {launcher.group(2)}" in (work / "model_repo" / "README.txt").read_text()
    assert "usage:" in run([*shlex.split(launcher.group(1)), "--help"], cwd=work, env=env).stdout


def test_triton_commands_from_the_wheel(installed):
    """The installed wheel sets up and launches Triton without a checkout: trtbuild-install-triton (the shipped
    installer) and trtbuild-launch-triton exist and show their help, and both put the triton venv in the per-user
    dir, outside site-packages, unless $TRTBUILD_TRITON_VENV says where (the full install is not run here: it
    downloads nvidia-pytriton)."""
    root, venv, env, _, _ = installed
    work, bin_, python = root / "work", venv / "bin", venv / "bin" / "python"
    home = root / "home"
    env = {k: v for k, v in env.items() if k != "TRTBUILD_TRITON_VENV"}
    env["HOME"] = str(home)
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=work,
                       env=env).stdout.strip())
    shipped = purelib / "trtbuild" / "triton_repo"
    assert (shipped / "install_triton.sh").is_file() and (shipped / "launch_triton_server.py").is_file()

    installer_help = run([bin_ / "trtbuild-install-triton", "--help"], cwd=work, env=env).stdout
    assert "trtbuild-install-triton [--venv DIR]" in installer_help and "--server_root" in installer_help
    assert "usage:" in run([bin_ / "trtbuild-launch-triton", "--help"], cwd=work, env=env).stdout
    assert "usage:" in run([python, "-m", "trtbuild.triton_repo.launch_triton_server", "--help"], cwd=work,
                           env=env).stdout

    user_venv = home / ".cache" / "trtbuild" / "venv-triton"
    ways = {"installer": [bin_ / "trtbuild-install-triton"],
            "launcher": [bin_ / "trtbuild-launch-triton"],
            "launcher -m": [python, "-m", "trtbuild.triton_repo.launch_triton_server"],
            "launcher file": [python, shipped / "launch_triton_server.py"]}  # what docker/entrypoint.sh runs
    for name, cmd in ways.items():
        where = Path(run([*cmd, "--print_venv"], cwd=work, env=env).stdout.strip())
        assert where == user_venv, (name, where)
        assert not str(where).startswith(str(venv)), (name, where)
        mine = root / "elsewhere"
        assert run([*cmd, "--print_venv"], cwd=work, env={**env, "TRTBUILD_TRITON_VENV": str(mine)}).stdout.strip() \
            == str(mine), name

    # without a triton venv the launcher says where it looked and what makes one
    proc = subprocess.run([bin_ / "trtbuild-launch-triton", "--check_only"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and f"no triton venv at {user_venv}" in proc.stderr, proc.stderr
    assert "trtbuild-install-triton" in proc.stderr, proc.stderr

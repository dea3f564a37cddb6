#!/usr/bin/env bash
# Make the "triton venv": the Python environment that Triton's Python-backend stub embeds to run
# the trtbuild models (preprocessing, tensorrt_llm, postprocessing, BLS), plus the real
# tritonserver 2.51 from PyPI's nvidia-pytriton 0.7.0 and tritonclient.
#
# Why a separate venv: the stub's pybind11 silently corrupts tensors or crashes under numpy 2,
# so everything the models import must come with numpy<2, while the project venv has numpy 2.
# The runtime needs only onnxruntime, numpy and tokenizers, so this venv stays small (no torch).
#
# Idempotent: a second run checks a stamp and only re-links trtbuild (seconds). Used by CI, by
# developers and by docker/Dockerfile*. Ships with trtbuild (trtbuild/triton_repo/install_triton.sh):
# an installed trtbuild runs it as `trtbuild-install-triton`, a checkout as scripts/install_triton.sh.
#
#   trtbuild-install-triton [--venv DIR] [--python PY] [--server_root DIR] [--no-editable] [--force]
#                           [--print_venv]
#
#   --venv DIR          where to make it (default $TRTBUILD_TRITON_VENV, else <checkout>/.venv-triton
#                       from a checkout, else ~/.cache/trtbuild/venv-triton: where the launcher
#                       looks, see trtbuild-launch-triton --print_venv)
#   --python PY         interpreter to base it on (default: python3 if it is 3.11-3.13, else
#                       python3.11 / python3.12 / python3.13); must be a shared-library build
#   --server_root DIR   use an existing Triton install (e.g. /opt/tritonserver in NVIDIA's image)
#                       instead of nvidia-pytriton's server; the venv's Python must then be the
#                       one its stub was built for
#   --no-editable       install a copy of trtbuild (images) instead of linking to it (a checkout:
#                       an editable install; an installed trtbuild: a link to its package dir)
#   --force             delete and remake the venv
#   --print_venv        print the venv it would make and exit
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"   # triton_repo/ of a checkout or of the package
LAUNCHER="$HERE/launch_triton_server.py"
TOP="$(cd "$HERE/.." && pwd)"
# A checkout (<checkout>/triton_repo: pip installs trtbuild from the checkout) or an installed
# trtbuild (site-packages/trtbuild/triton_repo: the venv gets the installed package itself);
# the same test as checkout_root() in launch_triton_server.py.
if [[ "$(basename "$HERE")" == triton_repo && -f "$TOP/pyproject.toml" && -f "$TOP/trtbuild/__init__.py" ]]; then
  REPO="$TOP"; PKG="$TOP/trtbuild"
else
  REPO=""; PKG="$TOP"
fi
VENV=""
PY="${TRTBUILD_TRITON_PYTHON:-}"
SERVER_ROOT=""
EDITABLE=1
FORCE=0
PRINT_VENV=0

while [[ $# -gt 0 ]]; do
  case "$1" in
    --venv) VENV="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --server_root) SERVER_ROOT="$2"; shift 2 ;;
    --no-editable) EDITABLE=0; shift ;;
    --force) FORCE=1; shift ;;
    --print_venv) PRINT_VENV=1; shift ;;
    -h|--help) awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

# Pins. numpy<2 is the point of this venv; onnxruntime and onnx match the project's pins.
PYTRITON="nvidia-pytriton==0.7.0"
REQUIREMENTS=(
  "numpy<2"
  "mpi4py==4.1.2"  # multi-rank engines: the model starts their ranks (MPICH's mpiexec runs them)
  "mpich==5.0.2"
  "fastapi==0.165.0"  # trtbuild-serve, the OpenAI-compatible server, from the same venv (the Docker image)
  "uvicorn==0.55.0"
  "prometheus-client==0.26.0"
  "onnxruntime==1.32.0"
  "onnx==1.23.2"
  "tokenizers"
  "safetensors"
  "tqdm"
  "tritonclient[all]"
  # what nvidia-pytriton declares (installed with --no-deps so that nothing else moves)
  "protobuf" "pyzmq>=23.0" "sh>=1.14" "grpcio>=1.64.3" "typing_inspect>=0.6.0" "wrapt>=1.11"
  "typer>=0.9.0" "importlib_metadata>=7.0.1"
)

log() { echo "[install_triton] $*" >&2; }
pipq() {  # pip, quiet; its full output only when it fails
  local out; out="$(mktemp)"
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check "$@" >"$out" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$out" >&2; rm -f "$out"
    die "pip install $* failed"
  fi
  rm -f "$out"
}
die() { echo "[install_triton] error: $*" >&2; exit 2; }

py_ok() {  # $1 = interpreter; true if 3.11 <= version <= 3.13
  "$1" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] <= (3, 13) else 1)' 2>/dev/null
}

if [[ -z "$VENV" ]]; then
  # The launcher's rule (default_triton_venv), so that it finds what this makes; it needs only
  # the standard library, so any Python 3 runs it.
  helper="$PY"
  [[ -n "$helper" ]] && command -v "$helper" >/dev/null || helper="$(command -v python3 || command -v python || true)"
  [[ -n "$helper" ]] || die "no python3 to run $LAUNCHER with; pass --python or --venv"
  VENV="$("$helper" "$LAUNCHER" --print_venv)" || die "$LAUNCHER --print_venv failed"
fi
if [[ $PRINT_VENV == 1 ]]; then
  echo "$VENV"
  exit 0
fi
[[ -f "$PKG/__init__.py" ]] || die "no trtbuild package at $PKG (this script belongs in its triton_repo/)"

if [[ -z "$PY" ]]; then
  for cand in python3 python3.11 python3.12 python3.13; do
    if command -v "$cand" >/dev/null && py_ok "$cand"; then PY="$cand"; break; fi
  done
  [[ -n "$PY" ]] || die "no Python 3.11-3.13 found (onnxruntime 1.32 needs >=3.11; nvidia-pytriton ships stubs up to 3.13); pass --python"
fi
command -v "$PY" >/dev/null || die "--python $PY not found"
py_ok "$PY" || die "--python $PY is $("$PY" -V 2>&1); need 3.11-3.13"
# The stub embeds libpython: this Python's shared library must exist (LIBDIR or the loader path).
if ! "$PY" - <<'EOF'
import ctypes.util, os, sys, sysconfig
name = sysconfig.get_config_var("INSTSONAME") or f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so.1.0"
libdir = sysconfig.get_config_var("LIBDIR") or ""
found = os.path.exists(os.path.join(libdir, name)) or ctypes.util.find_library(f"python{sys.version_info[0]}.{sys.version_info[1]}")
sys.exit(0 if found else 1)
EOF
then
  die "$PY has no shared libpython (the stub embeds it): use a shared-library build (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared; Debian/Ubuntu: apt-get install libpython3.X)"
fi

STAMP="$VENV/.trtbuild-triton-stamp"
WANT="$( { "$PY" -c 'import sys; print(sys.version)'; printf '%s\n' "$PYTRITON" "${REQUIREMENTS[@]}" "server_root=$SERVER_ROOT"; } | sha256sum | cut -c1-16)"

if [[ $FORCE == 1 && -d "$VENV" ]]; then
  log "removing $VENV (--force)"
  rm -rf "$VENV"
fi

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]]; then
  log "dependencies up to date in $VENV"
else
  if [[ -x "$VENV/bin/python" ]] && ! "$VENV/bin/python" -c 'import sys; sys.exit(0)' 2>/dev/null; then
    rm -rf "$VENV"
  fi
  if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV with $("$PY" -V 2>&1) ($(command -v "$PY"))"
    "$PY" -m venv "$VENV"
    # Keep the venv out of git wherever it is made (like uv and Python 3.13's venv do).
    echo '*' > "$VENV/.gitignore"
  fi
  log "installing ${REQUIREMENTS[*]}"
  pipq --upgrade pip
  pipq "${REQUIREMENTS[@]}"
  if [[ -z "$SERVER_ROOT" ]]; then
    log "installing $PYTRITON (--no-deps: it would otherwise pin what it likes)"
    pipq --no-deps "$PYTRITON"
  fi
  echo "$WANT" > "$STAMP"
fi

# trtbuild itself, without dependencies (torch/transformers are for converting, not serving).
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
unlink_package() {  # a link or copy of the installed package made by an earlier run
  if [[ -L "$SITE/trtbuild" || -f "$SITE/trtbuild/.trtbuild-install-triton-copy" ]]; then
    rm -rf "$SITE/trtbuild"
  fi
}
if [[ -n "$REPO" ]]; then
  unlink_package
  if [[ $EDITABLE == 1 ]]; then
    here="$(cd / && "$VENV/bin/python" -c 'import trtbuild, os; print(os.path.dirname(os.path.realpath(trtbuild.__file__)))' 2>/dev/null || true)"
    if [[ "$here" != "$REPO/trtbuild" ]]; then
      log "linking trtbuild from $REPO (editable, --no-deps)"
      pipq --no-deps -e "$REPO"
    fi
  else
    log "installing trtbuild from $REPO (copy, --no-deps)"
    pipq --no-deps --force-reinstall "$REPO"
  fi
else
  # An installed trtbuild has no source tree for pip: the venv gets its package dir as it is
  # (pure Python and package data; the kernels are compiled from it at run time).
  PKG="$(cd "$PKG" && pwd -P)"
  if "$VENV/bin/python" -m pip show -q trtbuild >/dev/null 2>&1; then
    log "removing the trtbuild pip installed in $VENV (replaced by $PKG)"
    "$VENV/bin/python" -m pip uninstall -y -q trtbuild >/dev/null
  fi
  if [[ $EDITABLE == 1 ]]; then
    if [[ "$(readlink "$SITE/trtbuild" 2>/dev/null || true)" != "$PKG" ]]; then
      log "linking trtbuild to $PKG"
      unlink_package
      ln -s "$PKG" "$SITE/trtbuild"
    fi
  else
    log "copying trtbuild from $PKG"
    unlink_package
    cp -R "$PKG" "$SITE/trtbuild"
    find "$SITE/trtbuild" -name __pycache__ -prune -exec rm -rf {} +
    touch "$SITE/trtbuild/.trtbuild-install-triton-copy"
  fi
fi

# numpy must still be <2 (a later pip install of something else could have upgraded it).
"$VENV/bin/python" - <<'EOF' || die "numpy in the triton venv is >=2: the Python-backend stub breaks with it; run with --force"
import sys, numpy
sys.exit(0 if int(numpy.__version__.split(".")[0]) < 2 else 1)
EOF

# Prepare the backend dir and ldd-check the server and the stub.
check_args=(--check_only --triton_venv "$VENV")
[[ -n "$SERVER_ROOT" ]] && check_args+=(--server_root "$SERVER_ROOT")
"$VENV/bin/python" "$LAUNCHER" "${check_args[@]}"
looks="$("$VENV/bin/python" "$LAUNCHER" --print_venv)"
if [[ -d "$looks" && "$(cd "$looks" && pwd -P)" == "$(cd "$VENV" && pwd -P)" ]]; then
  log "done: $VENV (where the launcher looks)"
else
  log "done: $VENV; not where the launcher looks by default: export TRTBUILD_TRITON_VENV=$VENV (or pass --triton_venv $VENV)"
fi

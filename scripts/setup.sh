#!/usr/bin/env bash
# Fresh machine → a running engine: make .venv, install trtbuild, fetch the default real model
# (or use the HF model dir given as $1), convert it, build the engine, run a prompt.
#   scripts/setup.sh [HF_MODEL_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch is pinned exactly (torch==2.13.0 in pyproject): a looser pin pulls GBs of CUDA wheels.
# setuptools says "Editable installation ... careful with folders named as your package" on every
# editable install of a package-dir layout such as ours (convert/ -> trtbuild.convert): information only.
PYTHONWARNINGS="ignore:Editable installation" python -m pip install -q -e ".[dev]"
OUT=${TRTBUILD_OUT:-out}
if [ $# -ge 1 ]; then
  MODEL=$1
else
  MODEL=$(trtbuild-fetch-model smollm2-135m-instruct | tail -1)
fi
trtbuild-convert --model_dir "$MODEL" --output_dir "$OUT/ckpt" --force
trt-build --checkpoint_dir "$OUT/ckpt" --output_dir "$OUT/engine" --max_batch_size 8 --force
trtbuild-run --engine_dir "$OUT/engine" --input_text "The capital of France is" "Write a haiku about the sea." \
  --max_output_len 48

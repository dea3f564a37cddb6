#!/usr/bin/env bash
# The whole test suite, real-model (slow) tests included, as CI runs it. Pass pytest options after,
# e.g. `scripts/test.sh -m "not slow"` for the fast subset.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
# setuptools says "Editable installation ... careful with folders named as your package" on every
# editable install of a package-dir layout such as ours (convert/ -> trtbuild.convert): information only.
PYTHONWARNINGS="ignore:Editable installation" python -m pip install -q -e ".[dev]"
# tests/runtime/test_every_cpu.py runs engines on an emulated AVX2 CPU without VNNI (qemu-user), whatever
# CPU this is: install it where we may (root, Debian/Ubuntu).
if ! command -v qemu-x86_64 >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user >/dev/null 2>&1; }; } ||
    echo "note: could not install qemu-user; tests/runtime/test_every_cpu.py needs it" >&2
fi
exec python -m pytest -q -p no:cacheprovider "$@"

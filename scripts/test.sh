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
exec python -m pytest -q -p no:cacheprovider "$@"

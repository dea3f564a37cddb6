#!/usr/bin/env bash
# Make the triton venv from a checkout: runs triton_repo/install_triton.sh, the installer that
# ships with trtbuild (an installed trtbuild runs it as `trtbuild-install-triton`). Same flags:
#   scripts/install_triton.sh [--venv DIR] [--python PY] [--server_root DIR] [--no-editable] [--force]
#                             [--print_venv]      (--help for the details)
exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/triton_repo/install_triton.sh" "$@"

"""`trtbuild-install-triton`: make the triton venv that `trtbuild-launch-triton` serves from.

    trtbuild-install-triton [--venv DIR] [--python PY] [--server_root DIR] [--no-editable]
                            [--force] [--print_venv] [--help]

It runs the installer that ships in the package, trtbuild/triton_repo/install_triton.sh (in a
checkout: triton_repo/install_triton.sh, which scripts/install_triton.sh runs), with bash: one
script for a checkout, an installed wheel and the Docker images. Its default venv is the
launcher's (launch_triton_server.default_triton_venv): $TRTBUILD_TRITON_VENV, else
<checkout>/.venv-triton from a checkout, else ~/.cache/trtbuild/venv-triton.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from typing import Optional, Sequence

from trtbuild.serving import TRITON_REPO_DIR

INSTALLER = TRITON_REPO_DIR / "install_triton.sh"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    bash = shutil.which("bash")
    if bash is None:
        print("error: trtbuild-install-triton needs bash (to run its installer "
              f"{INSTALLER})", file=sys.stderr)
        return 2
    if not INSTALLER.is_file():
        print(f"error: the installer {INSTALLER} is missing from this trtbuild install; "
              "reinstall trtbuild", file=sys.stderr)
        return 2
    try:
        return subprocess.call([bash, str(INSTALLER), *args])
    except KeyboardInterrupt:  # bash got the Ctrl-C too and stops
        return 130


if __name__ == "__main__":
    sys.exit(main())

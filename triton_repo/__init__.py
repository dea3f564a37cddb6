"""trtbuild.triton_repo: the Triton model templates (all_models/), the launcher
(launch_triton_server.py, `trtbuild-launch-triton`), the triton venv's installer (install_triton.sh,
`trtbuild-install-triton`) and the clients (client/). In a checkout this is the top-level
triton_repo/; pyproject.toml installs it as trtbuild/triton_repo.

A regular package (not a namespace one) so that `python -m trtbuild.triton_repo.launch_triton_server`
also works from an editable install, whose finder maps only packages with an __init__.py to
their checkout dirs. The scripts here import nothing from it: they run as files too.
"""

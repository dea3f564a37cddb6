#!/bin/sh
# Serve a trtbuild engine (mounted at $ENGINE_DIR, default /engine) or an existing model
# repository ($MODEL_REPO) with tritonserver on 0.0.0.0:8000 (HTTP) and :8001 (gRPC).
# Arguments are trtbuild-triton-repo flags (e.g. --decoupled --instance_count 2).
# SERVER=openai serves the engine with trtbuild-serve (OpenAI API) on 0.0.0.0:$HTTP_PORT instead;
# arguments are then its flags.
set -eu
ENGINE_DIR="${ENGINE_DIR:-/engine}"
HTTP_PORT="${HTTP_PORT:-8000}"
GRPC_PORT="${GRPC_PORT:-8001}"
TIMEOUT="${TRITON_READY_TIMEOUT:-600}"
if [ "${SERVER:-triton}" = openai ]; then
  # trtbuild-serve, the OpenAI-compatible server; arguments are its flags (e.g. --served_model_name m)
  if [ ! -f "$ENGINE_DIR/config.json" ]; then
    echo "error: no engine at $ENGINE_DIR (mount one: -v /path/to/engine:$ENGINE_DIR:ro)" >&2
    exit 2
  fi
  exec python -m trtbuild.serve.cli "$ENGINE_DIR" --host 0.0.0.0 --port "$HTTP_PORT" "$@"
fi
if [ -n "${MODEL_REPO:-}" ]; then
  repo="$MODEL_REPO"
else
  if [ ! -f "$ENGINE_DIR/config.json" ]; then
    echo "error: no engine at $ENGINE_DIR (mount one: -v /path/to/engine:$ENGINE_DIR:ro) and no MODEL_REPO" >&2
    exit 2
  fi
  repo=/tmp/triton_model_repo
  python -m trtbuild.serving --engine_dir "$ENGINE_DIR" --output "$repo" --force "$@"
fi
# exec: the launcher is PID 1 and turns `docker stop` (SIGTERM) into a clean server shutdown.
exec python /opt/trtbuild/triton_repo/launch_triton_server.py --model_repo "$repo" \
  --address 0.0.0.0 --http_port "$HTTP_PORT" --grpc_port "$GRPC_PORT" --timeout "$TIMEOUT"

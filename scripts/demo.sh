#!/usr/bin/env bash
# make demo: start the embedded server, build a small OCI image, run it as a micro-VM through
# the Machines API, show its output, exit code and timings, then stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."

export HANGAR_HOME="${HANGAR_HOME:-$HOME/.local/share/hangar}"
PORT="${HANGAR_DEMO_PORT:-4280}"
export HANGAR_API_URL="http://127.0.0.1:${PORT}"
HANGAR=.venv/bin/hangar
IMAGE_DIR="$HANGAR_HOME/demo-image"
mkdir -p "$HANGAR_HOME"

server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT

if curl -fsS "$HANGAR_API_URL/openapi.json" >/dev/null 2>&1; then
  echo "== using the hangar server already listening on $HANGAR_API_URL"
else
  echo "== starting hangar server on $HANGAR_API_URL (state in $HANGAR_HOME, log in $HANGAR_HOME/server.log)"
  "$HANGAR" server --port "$PORT" >"$HANGAR_HOME/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 100); do
    curl -fsS "$HANGAR_API_URL/openapi.json" >/dev/null 2>&1 && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$HANGAR_HOME/server.log"; exit 1; }
    sleep 0.2
  done
fi

echo "== building a small OCI image (busybox) at $IMAGE_DIR"
.venv/bin/python -m hangar.images.build "$IMAGE_DIR" demo

echo "== running it as a machine (the first run also fetches the guest kernel and builds the initramfs)"
"$HANGAR" machine run "oci:$IMAGE_DIR:demo" --app demo --rm -- \
  sh -c 'echo "hello from a hangar micro-VM"; echo "kernel: $(uname -r)"; echo "cpus: $(nproc)"; echo "memory: $(free -m | awk "/Mem:/ {print \$2}") MB"; exit 0'

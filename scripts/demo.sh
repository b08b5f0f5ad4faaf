#!/usr/bin/env bash
# make demo: start the embedded server, build a small OCI image, run it as a micro-VM through
# the Machines API, show its output, exit code and timings; leave one machine running for a
# while, and end with the dashboard's URL (the server keeps running for it).
set -euo pipefail
cd "$(dirname "$0")/.."

export HANGAR_HOME="${HANGAR_HOME:-$HOME/.local/share/hangar}"
PORT="${HANGAR_DEMO_PORT:-4280}"
export HANGAR_API_URL="http://127.0.0.1:${PORT}"
# the sandbox tier's runtime, as `make runsc` installs it
export HANGAR_RUNSC="${HANGAR_RUNSC:-$PWD/.cache/runsc/bin/runsc}"
HANGAR=.venv/bin/hangar
IMAGE_DIR="$HANGAR_HOME/demo-image"
mkdir -p "$HANGAR_HOME"

server_pid=""
keep_server=""
cleanup() {
  if [ -n "$server_pid" ] && [ -z "$keep_server" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT

if curl -fsS "$HANGAR_API_URL/openapi.json" >/dev/null 2>&1; then
  echo "== using the hangar server already listening on $HANGAR_API_URL"
else
  echo "== starting hangar server on $HANGAR_API_URL (state in $HANGAR_HOME, log in $HANGAR_HOME/server.log)"
  setsid "$HANGAR" server --port "$PORT" >"$HANGAR_HOME/server.log" 2>&1 </dev/null &
  server_pid=$!
  echo "$server_pid" >"$HANGAR_HOME/server.pid"
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

echo "== leaving a machine running for 15 minutes, for the dashboard to show"
running=$("$HANGAR" machine list --app demo --json | .venv/bin/python -c '
import json, sys
print(sum(1 for m in json.load(sys.stdin) if m["name"].startswith("dashboard-") and m["state"] == "started"))')
if [ "$running" = "0" ]; then
  "$HANGAR" machine run "oci:$IMAGE_DIR:demo" --app demo --name "dashboard-$(date +%s)" --detach -- \
    sh -c 'echo "an idle machine for the dashboard"; sleep 900'
fi

keep_server=1
token=$(cat "$HANGAR_HOME/operator.token")
echo
echo "== the dashboard (operator token; the link signs in and drops the token from the address):"
echo "   $HANGAR_API_URL/ui/?token=$token"
if [ -n "$server_pid" ]; then
  echo "   the server keeps running for it; stop it with: kill \$(cat $HANGAR_HOME/server.pid)"
fi

#!/usr/bin/env bash
# bench/zero-window.py against two builds, interleaved: the server memory that clients
# which never open their HTTP/2 window hold (issue 20).
# Usage: bench/zero-window-compare.sh BASE_BIN NEW_BIN [CLIENTS]   (SERVER_CPUS=0,1 pins the server)
set -euo pipefail
cd "$(dirname "$0")/.."
base_bin=${1:?usage: bench/zero-window-compare.sh BASE_BIN NEW_BIN [CLIENTS]}
new_bin=${2:?usage}
clients=${3:-500}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
server_pin=(); [ -n "${SERVER_CPUS:-}" ] && server_pin=(taskset -c "$SERVER_CPUS")
for build in base new; do
  bin=$new_bin
  [ "$build" = base ] && bin=$base_bin
  python3 bench/zero-window.py write "$work/c.yaml"
  RUST_LOG=error "${server_pin[@]}" "$bin" serve --config "$work/c.yaml" --xds-addr 127.0.0.1:28200 \
    --admin-addr 127.0.0.1:28201 --cache-dir "$work/cache-$build" > "$work/server.log" 2>&1 &
  server=$!
  for _ in $(seq 100); do python3 -c 'import urllib.request as u; u.urlopen("http://127.0.0.1:28201/readyz")' 2>/dev/null && break; sleep 0.1; done
  echo "$build: $(python3 bench/zero-window.py run 28200 "$server" "$work/c.yaml" "$clients")"
  kill "$server"; wait "$server" 2>/dev/null || true
done

#!/usr/bin/env bash
# bench/partial-request.py against two builds, interleaved: the server CPU a client's
# partial 4 MB request costs when the rest comes one byte per DATA frame (issue 20).
# Usage: bench/partial-compare.sh BASE_BIN NEW_BIN [ROUNDS]   (SERVER_CPUS=0,1 pins the server)
set -euo pipefail
cd "$(dirname "$0")/.."
base_bin=${1:?usage: bench/partial-compare.sh BASE_BIN NEW_BIN [ROUNDS]}
new_bin=${2:?usage}
rounds=${3:-2}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
# shellcheck source=bench/one-config.sh
. bench/one-config.sh
pin_cpus
write_one_config "$work/one.yaml"
for round in $(seq "$rounds"); do
  for build in base new; do
    bin=$new_bin
    [ "$build" = base ] && bin=$base_bin
    RUST_LOG=error "${server_pin[@]}" "$bin" serve --config "$work/one.yaml" --xds-addr 127.0.0.1:28100 \
      --admin-addr 127.0.0.1:28101 --cache-dir "$work/cache-$build" > "$work/server.log" 2>&1 &
    server=$!
    for _ in $(seq 100); do python3 -c 'import urllib.request as u; u.urlopen("http://127.0.0.1:28101/readyz")' 2>/dev/null && break; sleep 0.1; done
    for clients in 1 2; do
      echo "round $round, $build: $(python3 bench/partial-request.py 28100 "$server" 20000 "$clients")"
    done
    kill "$server"; wait "$server" 2>/dev/null || true
  done
done

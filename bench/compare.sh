#!/usr/bin/env bash
# The same load against this build and another, interleaved on this machine: memory per
# idle stream, server CPU per push (push and ACKs) and p99 of a 1 KiB change, over several
# changes per run. Usage: bench/compare.sh BASE_COMMIT [STREAMS] [ROUNDS]
#   e.g. bench/compare.sh 465f9f5 10000 2
# BASE_BIN=path/to/filterplane uses that binary for the base instead of building it;
# CHANGES=N measures N changes per run (6 unless set).
# NEW_BIN=... and LOADGEN_BIN=... use those binaries for this build and the generator
# (no cargo: a machine that only runs them). SERVER_CPUS=0,1 LOADGEN_CPUS=2-15 pin the
# server and the generator to those cores (taskset), so the generator's CPU is not the
# server's.
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?usage: bench/compare.sh BASE_COMMIT [STREAMS] [ROUNDS]}
streams=${2:-10000}
rounds=${3:-2}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; git worktree remove --force "$work/base" 2>/dev/null || true; rm -rf "$work"' EXIT
new_bin=${NEW_BIN:-target/release/filterplane}
loadgen=${LOADGEN_BIN:-target/release/xds-loadgen}
[ -n "${NEW_BIN:-}" ] && [ -n "${LOADGEN_BIN:-}" ] || cargo build --release --locked -p filterplane -p filterplane-bench
new_name=$(git rev-parse --short HEAD 2>/dev/null || echo new)
base_bin=${BASE_BIN:-}
if [ -z "$base_bin" ]; then
  git worktree add --detach "$work/base" "$base" >/dev/null
  (cd "$work/base" && CARGO_TARGET_DIR="$work/base-target" cargo build --release --locked --bin filterplane)
  base_bin="$work/base-target/release/filterplane"
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# shellcheck source=bench/one-config.sh
. bench/one-config.sh
pin_cpus
write_one_config "$work/one.yaml"
for round in $(seq "$rounds"); do
  for mode in sotw delta; do
    for build in new base; do
      bin=$new_bin
      # The generator's streams all come from 127.0.0.1: over this build's per-address cap.
      extra=(--max-xds-connections-per-address 1000000)
      [ "$build" = base ] && bin="$base_bin" && extra=()
      RUST_LOG=warn "${server_pin[@]}" "$bin" serve --config "$work/one.yaml" --xds-addr 127.0.0.1:28000 --admin-addr 127.0.0.1:28001 \
        --cache-dir "$work/cache" "${extra[@]}" > "$work/server.log" 2>&1 &
      server=$!
      for _ in $(seq 100); do curl -sf 127.0.0.1:28001/readyz >/dev/null 2>&1 && break; sleep 0.1; done
      echo "== round $round, $build ($( [ "$build" = base ] && echo "$base" || echo "$new_name")), $mode, $streams streams"
      "${loadgen_pin[@]}" "$loadgen" --server http://127.0.0.1:28000 --streams "$streams" --mode "$mode" \
        --change-file "$work/one.yaml" --change-from '"v0-' --change-to '"v1-' --server-pid "$server" --changes "${CHANGES:-6}" \
        | grep -E "KiB per stream|more changes|errors" || true
      sed -i 's/"v1-/"v0-/' "$work/one.yaml"
      kill "$server"; wait "$server" 2>/dev/null || true
    done
  done
done

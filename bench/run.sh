#!/usr/bin/env bash
# Runs every Filterplane benchmark on this machine and prints the numbers BENCHMARKS.md
# records: streams held / memory / propagation / CPU per push (1k, 5k, 10k), a 1 MiB
# inline Wasm change to 1,000 proxies over SotW and delta, reload times, and criterion's
# micro-benchmarks. Usage: bench/run.sh [--quick]   (--quick: 1k streams only, no criterion)
set -euo pipefail
cd "$(dirname "$0")/.."
quick=${1:-}
cargo build --release --locked -p filterplane -p filterplane-bench
bin=target/release
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r); commit $(git rev-parse --short HEAD)"

start_server() { # CONFIG
  RUST_LOG=warn "$bin/filterplane" serve --config "$1" --xds-addr 127.0.0.1:28000 --admin-addr 127.0.0.1:28001 \
    --cache-dir "$work/cache" --max-xds-connections-per-address 1000000 > "$work/server.log" 2>&1 &
  server=$!
  for _ in $(seq 100); do curl -sf 127.0.0.1:28001/readyz >/dev/null 2>&1 && return; sleep 0.1; done
  echo "server did not become ready"; cat "$work/server.log"; exit 1
}
stop_server() { kill "$server"; wait "$server" 2>/dev/null || true; }

# 1. Streams: one 1 KiB extension config, one change.
# shellcheck source=bench/one-config.sh
. bench/one-config.sh
write_one_config "$work/one.yaml"
sizes="1000 5000 10000"; [ "$quick" = --quick ] && sizes=1000
for mode in sotw delta; do
  for n in $sizes; do
    [ "$mode" = delta ] && [ "$n" != 10000 ] && [ "$quick" != --quick ] && continue
    start_server "$work/one.yaml"
    echo; echo "== $n streams, $mode, one 1 KiB change =="
    "$bin/xds-loadgen" --server http://127.0.0.1:28000 --streams "$n" --mode "$mode" \
      --change-file "$work/one.yaml" --change-from '"v0-' --change-to '"v1-' \
      --admin http://127.0.0.1:28001 --server-pid "$server" --changes 6 || true
    sed -i 's/"v1-/"v0-/' "$work/one.yaml"
    stop_server
  done
done

# 1b. As many streams as the file-descriptor limit allows (one connection each; the
# generator needs as many), and 100,000 streams multiplexed 10 per connection.
if [ "$quick" != --quick ]; then
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  most=$(( $(ulimit -n) - 1000 )); [ "$most" -gt 100000 ] && most=100000
  for spec in "--streams $most --ramp-per-sec 4000" "--streams 100000 --multiplex 10 --ramp-per-sec 20000 --no-wildcard"; do
    start_server "$work/one.yaml"
    echo; echo "== $spec, one 1 KiB change =="
    # shellcheck disable=SC2086
    "$bin/xds-loadgen" --server http://127.0.0.1:28000 $spec --timeout-secs 300 \
      --change-file "$work/one.yaml" --change-from '"v0-' --change-to '"v1-' --server-pid "$server" --changes 3 || true
    sed -i 's/"v1-/"v0-/' "$work/one.yaml"
    stop_server
  done
fi

# 2. A 1 MiB inline Wasm module among the ECDS resources of 1,000 proxies.
"$bin/make-module" "$work/m1.wasm" v1 1048576 >/dev/null
"$bin/make-module" "$work/m2.wasm" v2 1048576 >/dev/null
cat > "$work/wasm.yaml" <<YAML
version: 1
wasm_plugins:
  - name: big-wasm
    url: file://m1.wasm
extension_configs:
  - name: small
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
      mutations: { response_mutations: [ { append: { header: { key: x-small, value: s1 } } } ] }
YAML
for mode in sotw delta; do
  for change in "file://m1.wasm|file://m2.wasm|the 1 MiB module changes" "value: s1|value: s2|only a small config beside it changes"; do
    IFS='|' read -r from to what <<<"$change"
    start_server "$work/wasm.yaml"
    echo; echo "== 1,000 proxies, $mode, 1 MiB inline Wasm: $what =="
    "$bin/xds-loadgen" --server http://127.0.0.1:28000 --streams 1000 --mode "$mode" --no-wildcard \
      --ecds big-wasm,small --change-file "$work/wasm.yaml" --change-from "$from" --change-to "$to" \
      --server-pid "$server" || true
    sed -i "s|$to|$from|" "$work/wasm.yaml"
    stop_server
  done
done

# 3. Reload: read + parse + validate + compile + snapshot.
echo; echo "== reload =="
"$bin/reload-bench" 10 1000 10000

# 4. Micro-benchmarks.
if [ "$quick" != --quick ]; then
  echo; echo "== criterion =="
  cargo bench --locked -p filterplane-xds --bench hot_paths -- --warm-up-time 1 --measurement-time 3 2>&1 | grep -E "^[a-z]|time:"
fi

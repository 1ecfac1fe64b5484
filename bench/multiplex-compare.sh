#!/usr/bin/env bash
# STREAMS simulated Envoys multiplexed 100 per HTTP/2 connection, against one or more
# server binaries in turn, two rounds (interleaved, so builds are compared in one run):
# memory per stream, server CPU per push and the change's p99, for each of CHANGES
# changes of one 1 KiB extension config (the first not counted), and the server's own
# part of the p99 (its fan-out histogram). A binary may be a
# wrapper script (e.g. one that sets TOKIO_WORKER_THREADS).
# SERVER_CPUS=0,1 LOADGEN_CPUS=2-15 pin the server and the generator (taskset), so that
# the generator's work is not the server's: the issue's 1,000,000-stream target is set
# for 2 server cores that way.
# Usage: bench/multiplex-compare.sh [STREAMS] [CHANGES] [SERVER_BINARY...]
#   e.g. bench/multiplex-compare.sh 100000 6 /tmp/filterplane-before target/release/filterplane
#        SERVER_CPUS=0,1 LOADGEN_CPUS=2-15 bench/multiplex-compare.sh 1000000 5
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/one-config.sh
. bench/one-config.sh
pin_cpus
setup_servers 100000 6 "$@"

echo "machine: $(nproc) cores; commit $(git rev-parse --short HEAD); $streams streams, 100 per connection;" \
  "server on cores ${SERVER_CPUS:-any}, generator on ${LOADGEN_CPUS:-any}"
for round in 1 2; do
  for server_bin in "${servers[@]}"; do
    write_one_config "$work/one.yaml"
    "${server_pin[@]}" "$server_bin" serve --config "$work/one.yaml" --xds-addr 127.0.0.1:18000 --admin-addr 127.0.0.1:19000 \
      --max-xds-connections-per-address 1000000 > "$work/server.log" 2>&1 &
    pid=$!
    sleep 1.5
    "${loadgen_pin[@]}" "$bin/xds-loadgen" --streams "$streams" --multiplex 100 --ramp-per-sec 20000 --no-wildcard \
      --change-file "$work/one.yaml" --change-from '"v0-' --change-to '"v1-' \
      --server-pid "$pid" --changes "$changes" --metrics http://127.0.0.1:19000/metrics \
      --json > "$work/report.json"
    python3 - "$work/report.json" "$server_bin" "$round" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
rep = r["repeats"]
cpu = sorted(x["server_cpu_secs"] for x in rep)
p99 = sorted(round(x["p99_ms"]) for x in rep)
gen = sorted(x["loadgen_cpu_secs"] for x in rep)
# The server's own fan-out p99 (absent for a build without the histogram).
fan = sorted(round(x["server_fanout_p99_ms"]) for x in rep if x.get("server_fanout_p99_ms") is not None)
kib = (r["server"]["rss_idle_kib"] - r["server"]["rss_before_kib"]) / r["streams"]
print(f"round {sys.argv[3]} {sys.argv[2]}: received {r['change_received']['count']}, errors {len(r['errors'])}, "
      f"{kib:.2f} KiB per stream, server CPU per push {[round(c, 2) for c in cpu]} s, "
      f"p99 {p99} ms (server's fan-out p99 {f'{fan} ms' if fan else 'not counted'}), "
      f"generator CPU {[round(c, 2) for c in gen]} s",
      flush=True)
PY
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
done

#!/usr/bin/env bash
# STREAMS simulated Envoys over plaintext and over mutual TLS (certificates made here
# with openssl: a CA, the server's, one client certificate all proxies present), against
# this build with one 1 KiB extension config: resident memory per idle stream and server
# CPU per push of one change, interleaved (plaintext, mTLS, plaintext, mTLS); with more
# than one server binary named, each round runs each of them in turn (to compare builds,
# e.g. allocators, in one run).
# Usage: bench/mtls-streams.sh [STREAMS] [CHANGES] [SERVER_BINARY...]
#   e.g. bench/mtls-streams.sh 10000 5
#        bench/mtls-streams.sh 4000 3 /tmp/filterplane-glibc target/release/filterplane
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/one-config.sh
. bench/one-config.sh
setup_servers 10000 5 "$@"

pki="$work/pki"; mkdir -p "$pki"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench-ca \
  -keyout "$pki/ca.key" -out "$pki/ca.pem" 2>/dev/null
for who in server client; do
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$who" \
    -keyout "$pki/$who.key" -out "$pki/$who.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' > "$pki/$who.ext"
  openssl x509 -req -in "$pki/$who.csr" -CA "$pki/ca.pem" -CAkey "$pki/ca.key" -CAcreateserial -days 2 \
    -extfile "$pki/$who.ext" -out "$pki/$who.pem" 2>/dev/null
done

write_one_config "$work/one.yaml"
echo "machine: $(nproc) cores; commit $(git rev-parse --short HEAD); $streams streams, one 1 KiB extension config"
for round in 1 2; do
 for server_bin in "${servers[@]}"; do
  for mode in plaintext mtls; do
    tls_server=(); tls_client=()
    if [ "$mode" = mtls ]; then
      tls_server=(--xds-tls-cert "$pki/server.pem" --xds-tls-key "$pki/server.key" --xds-client-ca "$pki/ca.pem")
      tls_client=(--tls-ca "$pki/ca.pem" --tls-cert "$pki/client.pem" --tls-key "$pki/client.key")
    fi
    RUST_LOG=warn "$server_bin" serve --config "$work/one.yaml" --xds-addr 127.0.0.1:28100 \
      --admin-addr 127.0.0.1:28101 --cache-dir "$work/cache" --max-xds-connections-per-address 1000000 \
      "${tls_server[@]}" > "$work/server.log" 2>&1 &
    server=$!
    for _ in $(seq 100); do curl -sf 127.0.0.1:28101/readyz >/dev/null 2>&1 && break; sleep 0.1; done
    out=$("$bin/xds-loadgen" --server http://127.0.0.1:28100 --streams "$streams" "${tls_client[@]}" \
      --change-file "$work/one.yaml" --change-from '"v0-' --change-to '"v1-' --changes "$changes" \
      --server-pid "$server" --timeout-secs 300 --json) || { echo "$mode: xds-loadgen failed"; tail -5 "$work/server.log"; }
    kill "$server"; wait "$server" 2>/dev/null || true
    sed -i 's/"v1-/"v0-/' "$work/one.yaml"
    python3 - "$mode" "$round" "$streams" "$server_bin" <<PY
import json, sys
mode, rnd, n, who = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
r = json.loads('''$out''')
s = r["server"]
per = (s["rss_idle_kib"] - s["rss_before_kib"]) / n
cpu = sorted(x["server_cpu_secs"] for x in r["repeats"])
p99 = sorted(x["p99_ms"] for x in r["repeats"])
print(f"round {rnd} {who} {mode}: {per:.1f} KiB per idle stream; server CPU per push median {cpu[len(cpu)//2]:.3f} s "
      f"(min {cpu[0]:.3f}, max {cpu[-1]:.3f}); p99 median {p99[len(p99)//2]:.0f} ms; errors {len(r['errors'])}")
PY
  done
 done
done

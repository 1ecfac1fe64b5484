#!/usr/bin/env bash
# One endpoint changed in a mesh config (SERVICES EDS clusters and their
# ClusterLoadAssignments, one file), pushed to STREAMS simulated Envoys that each
# subscribe to all SERVICES assignments over MODE (sotw or delta): bytes each proxy
# receives for the change, write-to-receipt percentiles and the server's CPU, for this
# build and another in one run (interleaved: base, this, base, this).
# Usage: bench/eds-change.sh BASE_BIN [SERVICES] [STREAMS] [MODE] [CHANGES]
#   e.g. bench/eds-change.sh /path/to/b5fbd7f/filterplane 10000 1000 sotw 3
set -euo pipefail
cd "$(dirname "$0")/.."
base_bin=${1:?usage: bench/eds-change.sh BASE_BIN [SERVICES] [STREAMS] [MODE] [CHANGES]}
services=${2:-10000}
streams=${3:-1000}
mode=${4:-sotw}
changes=${5:-3}
new_bin=${NEW_BIN:-target/release/filterplane}
gen=${GEN_BIN:-target/release/config-scale}
loadgen=${LOADGEN_BIN:-target/release/xds-loadgen}
[ -n "${NEW_BIN:-}" ] || cargo build --release --locked -p filterplane -p filterplane-bench
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
python3 - "$new_bin" "$base_bin" "$gen" "$loadgen" "$work" "$services" "$streams" "$mode" "$changes" <<'PY'
import json, os, re, socket, subprocess, sys, time, urllib.request
new_bin, base_bin, gen, loadgen, work, services, streams, mode, changes = sys.argv[1:]
services, streams, changes = int(services), int(streams), int(changes)

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def loaded(admin):
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
    except Exception:
        return False
    return re.search(r'filterplane_config_reloads_total\{result="applied"\} [1-9]', text) is not None

print(f"{services} EDS clusters, {streams} {mode} streams each subscribed to all {services} assignments, "
      f"one endpoint changed {changes} times")
for name, binary in (("base", base_bin), ("this", new_bin), ("base", base_bin), ("this", new_bin)):
    subprocess.run([gen, "write", work, str(services), "1"], check=True)
    xds, admin = free_port(), free_port()
    log = f"{work}/{name}.log"
    p = subprocess.Popen([binary, "serve", "--config", f"{work}/mesh.yaml", "--xds-addr", f"127.0.0.1:{xds}",
                          "--admin-addr", f"127.0.0.1:{admin}", "--max-config-bytes", str(1 << 30)],
                         stdout=open(log, "w"), stderr=subprocess.STDOUT,
                         # Read by builds that cap connections per address (older ones do not).
                         env={**os.environ, "FILTERPLANE_MAX_XDS_CONNECTIONS_PER_ADDRESS": str(streams + 100)})
    started = time.time()
    while not loaded(admin):
        if p.poll() is not None or time.time() - started > 600:
            sys.exit(f"{binary} did not load: see {log}")
        time.sleep(0.05)
    # Service 7's second endpoint (config-scale's addresses are unique per service).
    out = subprocess.run([loadgen, "--server", f"http://127.0.0.1:{xds}", "--streams", str(streams),
                          "--mode", mode, "--eds", str(services), "--ecds", "", "--no-wildcard",
                          "--change-file", f"{work}/mesh.yaml", "--change-from", "10.1.8.2, port_value: 8081",
                          "--change-to", "10.1.8.2, port_value: 8082", "--changes", str(changes),
                          "--server-pid", str(p.pid), "--timeout-secs", "300", "--json"],
                         capture_output=True, text=True)
    p.kill(); p.wait()
    if out.returncode != 0:
        sys.exit(f"{name}: xds-loadgen failed: {out.stderr[-2000:]} {out.stdout[-2000:]}")
    r = json.loads(out.stdout)
    per_proxy = r["change_bytes_received"] / streams / changes
    first = r["change_received"]
    reps = r["repeats"]
    cpu = [r["server"]["cpu_secs_for_change"]] + [x.get("server_cpu_secs", 0) for x in reps]
    p99 = [first["p99_ms"]] + [x["p99_ms"] for x in reps]
    print(f"{name}: first config {r['first_full_config']['p50_ms']:.0f} ms p50; "
          f"bytes per proxy per change {per_proxy:,.0f}; change received p50 {first['p50_ms']:.0f} ms, "
          f"p99 per change {', '.join(f'{x:.0f}' for x in p99)} ms; server CPU per change "
          f"{', '.join(f'{x:.3f}' for x in cpu)} s; idle RSS {r['server']['rss_idle_kib'] / 1024:.0f} MB")
PY

#!/usr/bin/env bash
# A mesh config (SERVICES EDS clusters and their ClusterLoadAssignments) served by this
# build and by another, in one run: resident memory after the load, and the time from
# writing one changed endpoint to the new config applied (polled on /metrics every
# 2 ms, so up to 2 ms late; the server's own reload time from its log beside it).
# Usage: bench/config-scale.sh BASE_BIN [SERVICES] [FILES] [EDITS]
#   e.g. bench/config-scale.sh /path/to/b5fbd7f/filterplane 50000 100 5
# ADD=1: each edit adds an endpoint (a line more: every later entry's line moves) instead
# of changing one's port.
set -euo pipefail
cd "$(dirname "$0")/.."
base_bin=${1:?usage: bench/config-scale.sh BASE_BIN [SERVICES] [FILES] [EDITS]}
services=${2:-10000}
files=${3:-1}
edits=${4:-5}
new_bin=${NEW_BIN:-target/release/filterplane}
gen=${GEN_BIN:-target/release/config-scale}
[ -n "${NEW_BIN:-}" ] || cargo build --release --locked -p filterplane -p filterplane-bench
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
mkdir -p "$work/tiny" "$work/mesh" "$work/stage"
"$gen" write "$work/tiny" 1 1
"$gen" write "$work/mesh" "$services" "$files"
config="$work/mesh"; [ "$files" -gt 1 ] || config="$work/mesh/mesh.yaml"
python3 - "$new_bin" "$base_bin" "$gen" "$work" "$config" "$services" "$files" "$edits" "${ADD:-0}" <<'PY'
import re, subprocess, sys, time, urllib.request, socket
new_bin, base_bin, gen, work, config, services, files, edits, add = sys.argv[1:]
services, files, edits = int(services), int(files), int(edits)

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def applied(admin):
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
    except Exception:
        return -1
    m = re.search(r'filterplane_config_reloads_total\{result="applied"\} (\d+)', text)
    return int(m.group(1)) if m else 0

def rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

def serve(binary, cfg, log):
    admin = free_port()
    p = subprocess.Popen([binary, "serve", "--config", cfg, "--xds-addr", f"127.0.0.1:{free_port()}",
                          "--admin-addr", f"127.0.0.1:{admin}", "--max-config-bytes", str(1 << 30)],
                         stdout=open(log, "w"), stderr=subprocess.STDOUT)
    started = time.time()
    while applied(admin) < 1:
        if p.poll() is not None or time.time() - started > 600:
            sys.exit(f"{binary} did not load {cfg}: see {log}")
        time.sleep(0.05)
    return p, admin, time.time() - started

resources = 2 * services
print(f"{resources} resources ({services} clusters + {services} ClusterLoadAssignments) in {files} file(s)")
for name, binary in (("base", base_bin), ("this", new_bin)):
    tiny, _, _ = serve(binary, f"{work}/tiny/mesh.yaml", f"{work}/{name}-tiny.log")
    time.sleep(1)
    floor = rss_mb(tiny.pid)
    tiny.kill(); tiny.wait()
    # Each build starts from the same config (the other's edits undone).
    subprocess.run([gen, "write", f"{work}/mesh", str(services), str(files)], check=True)
    # A config's files have stood a while before anyone edits them: the loader trusts a
    # file's times only once they are 2 s old.
    time.sleep(2.1)
    log = f"{work}/{name}.log"
    p, admin, start_s = serve(binary, config, log)
    time.sleep(2)
    rss = rss_mb(p.pid)
    took, after_close = [], []
    done = []
    for k in range(edits):
        before = applied(admin)
        i = (k * 7919) % services
        # Each edit changes (or adds) one more endpoint, as an operator's edits do.
        done.append(f"{i}:{'+' if add == '1' else ''}{9000 + k}")
        # The edited file is made beside the config and written into it here, so the time
        # runs from the write itself (not from making 4 MB of YAML).
        subprocess.run([gen, "write", f"{work}/stage", str(services), str(files), *done], check=True)
        name_of = "mesh.yaml" if files <= 1 else f"svc-{i // -(-services // files):04}.yaml"
        data = open(f"{work}/stage/{name_of}", "rb").read()
        t = time.time()
        with open(f"{work}/mesh/{name_of}", "wb") as out:
            out.write(data)
        closed = time.time()
        while applied(admin) <= before:
            if time.time() - t > 120:
                sys.exit(f"{name}: edit {k} not applied in 120 s: see {log}")
            time.sleep(0.002)
        took.append((time.time() - t) * 1e3)
        after_close.append((time.time() - closed) * 1e3)
        time.sleep(0.5)
    server_ms = [float(m) for m in re.findall(r"config applied.*?ms=([0-9.]+)", open(log).read())][1:]
    p.kill(); p.wait()
    took.sort()
    after_close.sort()
    per = (rss - floor) * 1024 / resources
    print(f"{name}: start {start_s:.2f} s; RSS {rss:.0f} MB, {floor:.0f} MB with one service: "
          f"{per:.2f} KiB per resource; one endpoint {'added' if add == '1' else 'changed'}, write to applied (ms): "
          f"median {took[len(took)//2]:.0f}, min {took[0]:.0f}, max {took[-1]:.0f} "
          f"(from the file closed: {after_close[len(took)//2]:.0f}, {after_close[0]:.0f}, {after_close[-1]:.0f}); "
          f"server's reload (ms): {', '.join(f'{x:.0f}' for x in server_ms)}")
PY

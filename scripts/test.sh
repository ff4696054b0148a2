#!/usr/bin/env bash
# Runs every test: the Rust workspace (unit, golden, API, operator), the Helm
# chart tests, and the end-to-end tests that drive a real vlm-server with the
# openai and nv-ingest clients.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/e2e-venv
wanted=$(cat tests/e2e/requirements.txt tests/chart/requirements.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$venv/.requirements" 2>/dev/null)" != "$wanted" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    -r tests/e2e/requirements.txt -r tests/chart/requirements.txt
  echo "$wanted" >"$venv/.requirements"
fi

# Release mode: the model tests run real forward passes on CPU.
cargo test --workspace --release
# Same feature set as the tests (workspace-wide), so nothing is rebuilt.
cargo build --release --workspace --bins
# The Helm chart rendered and linted with the real Helm SDK, then the server
# driven by the real openai and nv-ingest-api clients.
VLM_SERVER_BIN="$PWD/target/release/vlm-server" "$venv/bin/pytest" -q tests/chart tests/e2e

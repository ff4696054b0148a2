#!/usr/bin/env bash
# Runs every test: the Rust workspace (unit, golden, API, operator) and the
# end-to-end tests that drive a real vlm-server with the openai and nv-ingest clients.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/e2e-venv
if [ ! -x "$venv/bin/pytest" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt
fi

# Release mode: the model tests run real forward passes on CPU.
cargo test --workspace --release
cargo build --release -p vlm-server
VLM_SERVER_BIN="$PWD/target/release/vlm-server" "$venv/bin/pytest" -q tests/e2e

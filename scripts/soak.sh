#!/usr/bin/env bash
# Soak: the release tokengate under mixed load for SECONDS (default 600), with token revocations
# every 30 s and a 20 s auth-server outage at 135 s. Prints a JSON report. Not part of cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin tokengate --example soak
TOKENGATE_BIN=target/release/tokengate exec target/release/examples/soak "${1:-600}"

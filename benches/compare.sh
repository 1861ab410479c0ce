#!/usr/bin/env bash
# The load comparison, with one command: installs what it needs (nginx, wrk, h2load, oha),
# builds tokengate in release mode and runs benches/compare.py. Arguments go to compare.py
# (--rounds, --seconds, --idle, --cold). See docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v nginx >/dev/null || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v taskset >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq && $sudo apt-get install -y -qq "${need[@]}"
fi
# oha: open-loop load at a fixed rate with latency correction (wrk2's role).
command -v oha >/dev/null || cargo install oha --locked
cargo build --release --bin tokengate
exec python3 benches/compare.py "$@"

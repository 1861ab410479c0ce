#!/usr/bin/env bash
# The load comparison, with one command: installs what it needs (nginx, wrk, h2load, oha),
# builds tokengate twice (the release build, and the profile-guided one of scripts/pgo-build.sh)
# and runs benches/compare.py on the PGO build, with the plain release build measured beside it
# in the 1 KiB rounds. Arguments go to compare.py (--rounds, --windows, --seconds, --idle, --cold,
# --steal-limit, --tries).
# See docs/BENCHMARKS.md. NO_PGO=1 skips the PGO build and measures the release build alone.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v nginx >/dev/null || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v taskset >/dev/null || need+=(util-linux)
command -v valgrind >/dev/null || need+=(valgrind)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq && $sudo apt-get install -y -qq "${need[@]}"
fi
# oha: open-loop load at a fixed rate with latency correction (wrk2's role).
command -v oha >/dev/null || cargo install oha --locked
cargo build --release --bin tokengate
if [ "${NO_PGO:-0}" = 1 ]; then
  exec python3 benches/compare.py "$@"
fi
scripts/pgo-build.sh
TOKENGATE_BIN=target/pgo/release/tokengate \
  exec python3 benches/compare.py --also "no-PGO=target/release/tokengate" "$@"

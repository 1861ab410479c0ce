#!/usr/bin/env bash
# The load comparison, with one command: installs what it needs (nginx, wrk, h2load, oha),
# builds tokengate twice (the release build, and the profile-guided one of scripts/pgo-build.sh,
# laid out by BOLT where it installs) and runs benches/compare.py on the PGO build, with the plain
# release build measured beside it in the 1 KiB rounds. Arguments go to compare.py (--rounds, --windows, --seconds, --idle, --cold,
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
sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
if [ ${#need[@]} -gt 0 ]; then
  $sudo apt-get update -qq && $sudo apt-get install -y -qq "${need[@]}"
fi
# BOLT, for the PGO build's code layout (scripts/pgo-build.sh), from the package of rustc's LLVM;
# where there is none, the PGO build goes without it.
llvm="$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
if [ "${NO_PGO:-0}" != 1 ] && ! command -v llvm-bolt >/dev/null && ! command -v "llvm-bolt-$llvm" >/dev/null; then
  { $sudo apt-get update -qq && $sudo apt-get install -y -qq "bolt-$llvm"; } ||
    echo "bolt-$llvm is not installable here" >&2
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

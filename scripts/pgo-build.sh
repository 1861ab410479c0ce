#!/usr/bin/env bash
# A profile-guided build of tokengate: an instrumented binary serves the soak's mixed load
# (examples/soak.rs: GETs, buffered POSTs, downloads, chunked uploads, token revocations) against
# the sandbox for SECONDS (default 40), and the release build is redone with that profile.
# Output: target/pgo/release/tokengate (the plain target/release build is left alone), reused
# as it is while no source, manifest or this script is newer than it.
# Needs the llvm-tools rustup component, which it installs. See docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-40}"
out=target/pgo/release/tokengate
# Reused while nothing it is built from changed since (PGO_REBUILD=1 forces a new build).
if [ "${PGO_REBUILD:-0}" != 1 ] && [ -x "$out" ] &&
  [ -z "$(find src examples/soak.rs Cargo.toml Cargo.lock "$0" -newer "$out" -print -quit)" ]; then
  echo "$out"
  exit 0
fi
rustup component add llvm-tools >/dev/null
profdata="$(find "$(rustc --print sysroot)" -name llvm-profdata -type f | head -1)"
data="$PWD/target/pgo-data"
rm -rf "$data"

cargo build --example soak  # the load generator; debug is fast enough for its paced load
RUSTFLAGS="-Cprofile-generate=$data" cargo build --release --bin tokengate --target-dir target/pgo-gen
rm -rf "$data" # build scripts ran instrumented too; only the proxy's own run counts
SOAK_REVOKE_EVERY=10 SOAK_OUTAGE_AT=$((seconds + 60)) TOKENGATE_BIN=target/pgo-gen/release/tokengate \
  target/debug/examples/soak "$seconds" >/dev/null
"$profdata" merge -o "$data/merged.profdata" "$data"
RUSTFLAGS="-Cprofile-use=$data/merged.profdata" cargo build --release --bin tokengate --target-dir target/pgo
echo "$out"

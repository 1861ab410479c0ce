#!/usr/bin/env bash
# A profile-guided build of tokengate: an instrumented binary serves the soak's mixed load
# (examples/soak.rs: GETs, buffered POSTs, downloads, chunked uploads, token revocations) against
# the sandbox for SECONDS (default 40), and the release build is redone with that profile.
# Then, where BOLT is installed (llvm-bolt, or the bolt-N package of rustc's LLVM, which
# benches/compare.sh installs), BOLT lays out that binary's code by a second soak of the same
# load: the hot paths together, the cold code apart. BOLT=0 skips that step.
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
llvm="$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
bolt=""
if [ "${BOLT:-1}" != 0 ]; then
  bolt="$(command -v llvm-bolt || command -v "llvm-bolt-$llvm" || true)"
fi
data="$PWD/target/pgo-data"
rm -rf "$data"

soak() { # the load both profiles are taken from, served by the tokengate binary $1
  SOAK_REVOKE_EVERY=10 SOAK_OUTAGE_AT=$((seconds + 60)) TOKENGATE_BIN="$1" \
    target/debug/examples/soak "$seconds" >/dev/null
}

cargo build --example soak  # the load generator; debug is fast enough for its paced load
RUSTFLAGS="-Cprofile-generate=$data" cargo build --release --bin tokengate --target-dir target/pgo-gen
rm -rf "$data" # build scripts ran instrumented too; only the proxy's own run counts
soak target/pgo-gen/release/tokengate
"$profdata" merge -o "$data/merged.profdata" "$data"
flags="-Cprofile-use=$data/merged.profdata"
# BOLT moves whole functions only in a binary that kept its relocations.
[ -n "$bolt" ] && flags="$flags -Clink-args=-Wl,--emit-relocs"
RUSTFLAGS="$flags" cargo build --release --bin tokengate --target-dir target/pgo
if [ -n "$bolt" ]; then
  trap 'rm -f "$out"' ERR # a failed step leaves no binary that the next run would take as done
  "$bolt" "$out" -instrument -o "$data/tokengate.instrumented" \
    --instrumentation-file="$data/bolt.fdata" >/dev/null
  soak "$data/tokengate.instrumented"
  "$bolt" "$out" -o "$data/tokengate.bolt" -data="$data/bolt.fdata" -reorder-blocks=ext-tsp \
    -reorder-functions=cdsort -split-functions -split-all-cold -split-eh -icf=all \
    -use-gnu-stack >/dev/null
  mv "$data/tokengate.bolt" "$out" # cargo's own copy in target/pgo/release/deps stays as it was
else
  echo "no llvm-bolt (bolt-$llvm): the PGO build without BOLT's layout" >&2
fi
echo "$out"

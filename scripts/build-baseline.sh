#!/usr/bin/env bash
# Build aoai_msi_filter.wasm as it was at a git ref, for `make bench
# BASELINE=<ref>`: the benchmarks then measure it side by side with the
# working tree's filter. The ref is built in a scratch worktree (removed
# afterwards) with its own target directory, trimmed like `make build` does.
set -euo pipefail
ref=${1:?usage: scripts/build-baseline.sh <git ref>}
root=$(git rev-parse --show-toplevel)
out=$root/target/bench-baseline
dir=$(mktemp -d)
git -C "$root" worktree add --detach --quiet "$dir" "$ref"
trap 'git -C "$root" worktree remove --force "$dir"' EXIT
(cd "$dir" && cargo build --quiet --release --target wasm32-wasip1 -p aoai-msi-filter --lib \
  --target-dir "$root/target/baseline-build")
mkdir -p "$out"
cp "$root/target/baseline-build/wasm32-wasip1/release/aoai_msi_filter.wasm" "$out/"
cd "$root" && cargo run --quiet -p trim-exports -- "$out/aoai_msi_filter.wasm" proxy_on_log proxy_on_done
echo "baseline $ref: $out/aoai_msi_filter.wasm ($(git rev-parse --short "$ref"))"

#!/usr/bin/env bash
# Builds the fuzz targets with cargo fuzz (libFuzzer, address sanitizer) and runs each
# for FUZZ_SECONDS (default 30) on its corpus under corpus/. A crash leaves its input
# in artifacts/<target>/ and fails the run. Prints executions per target.
#
# New inputs go to a scratch directory, so a run (CI's included) leaves the committed
# corpus as it was; FUZZ_GROW_CORPUS=1 adds them to corpus/ instead (then minimize with
# `cargo fuzz cmin` before committing).
#
# The toolchain here is stable; cargo fuzz needs nightly-only flags, which
# RUSTC_BOOTSTRAP=1 allows for this build only.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${FUZZ_SECONDS:-30}
if ! cargo fuzz --version 2>/dev/null | grep -q "0.13"; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi
export RUSTC_BOOTSTRAP=1
targets=(hash_and_path config grpc_messages grpc_handlers)
cargo fuzz build --fuzz-dir .
status=0
for target in "${targets[@]}"; do
  log=$(mktemp)
  mkdir -p "corpus/$target"
  dirs=("corpus/$target")
  if [ "${FUZZ_GROW_CORPUS:-0}" != 1 ]; then dirs=("$(mktemp -d)" "corpus/$target"); fi
  # libFuzzer reads every directory given and writes what it finds to the first.
  if cargo fuzz run --fuzz-dir . "$target" "${dirs[@]}" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    result=ok
  else
    result=FAILED
    status=1
    tail -40 "$log"
  fi
  execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo 0)
  echo "fuzz $target: $execs executions in ${seconds}s: $result"
  rm -f "$log"
  if [ "${#dirs[@]}" = 2 ]; then rm -rf "${dirs[0]}"; fi
done
exit $status

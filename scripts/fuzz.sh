#!/usr/bin/env bash
# `make fuzz`: every target in fuzz/ under libFuzzer (cargo-fuzz) for FUZZ_SECONDS each (60 by
# default), starting from seeds the agent's own encoders make, then from what earlier runs
# found (fuzz/corpus, kept between runs). A crash leaves its input in fuzz/artifacts/TARGET/ and
# fails the run; `cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...` (from fuzz/, with
# RUSTC_BOOTSTRAP=1) replays it.
#
# cargo-fuzz passes the compiler flags libFuzzer's instrumentation needs, which are unstable;
# RUSTC_BOOTSTRAP=1 lets this machine's stable toolchain accept them. No sanitizer: the agent
# is safe Rust (its one unsafe block registers a socket), so the findings sought are panics,
# hangs and unbounded memory, which libFuzzer catches without one.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-60}
export RUSTC_BOOTSTRAP=1
GRAPEVINE_FUZZ_SEEDS="$PWD/fuzz/corpus" cargo test -q -p grapevine-agent --lib fuzz::tests >/dev/null
cd fuzz
cargo fuzz build --sanitizer none
for target in $(cargo fuzz list); do
  echo "== fuzz: $target for ${secs}s"
  mkdir -p "corpus/$target"
  cargo fuzz run --sanitizer none "$target" "corpus/$target" -- \
    -max_total_time="$secs" -max_len=4096 -timeout=5 -rss_limit_mb=2048 -print_final_stats=1 2>&1 |
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+==|SUMMARY|thread|panicked|Done )|DONE' || true
  if ls "artifacts/$target"/* >/dev/null 2>&1; then
    echo "fuzz: $target left inputs in fuzz/artifacts/$target:" >&2
    ls "artifacts/$target" >&2
    exit 1
  fi
done
echo "fuzz: no target crashed, hung or ran out of memory"

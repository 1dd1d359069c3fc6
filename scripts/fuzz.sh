#!/usr/bin/env bash
# `make fuzz`: every target in fuzz/ under libFuzzer (cargo-fuzz) for FUZZ_SECONDS each (60 by
# default), starting from seeds the agent's own encoders make, then from what earlier runs
# found (fuzz/corpus, kept between runs). A crash, hang or out-of-memory input leaves its input
# in fuzz/artifacts/TARGET/ and fails the run; `cargo fuzz run TARGET artifacts/TARGET/FILE`
# (from fuzz/, with RUSTC_BOOTSTRAP=1) replays it. Inputs left by earlier runs are reported
# but do not fail later ones.
#
# cargo-fuzz passes the compiler flags libFuzzer's instrumentation needs, which are unstable;
# RUSTC_BOOTSTRAP=1 lets this machine's stable toolchain accept them. No sanitizer: the agent
# is safe Rust (its one unsafe block registers a socket), so the findings sought are panics
# (overflow checks are on), hangs and unbounded memory, which libFuzzer catches without one.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-60}
export RUSTC_BOOTSTRAP=1
if ! out=$(GRAPEVINE_FUZZ_SEEDS="$PWD/fuzz/corpus" cargo test -q -p grapevine-agent --lib fuzz::tests 2>&1); then
  echo "$out" >&2
  echo "fuzz: writing the seeds failed" >&2
  exit 1
fi
cd fuzz
cargo fuzz build --sanitizer none
targets=$(cargo fuzz list)
[ -n "$targets" ] || { echo "fuzz: cargo fuzz list found no target" >&2; exit 1; }
stamp=$(mktemp)
trap 'rm -f "$stamp"' EXIT
failed=()
for target in $targets; do
  echo "== fuzz: $target for ${secs}s"
  mkdir -p "corpus/$target" "artifacts/$target"
  old=$(find "artifacts/$target" -type f | wc -l)
  [ "$old" -eq 0 ] || echo "   ($old inputs from earlier runs in fuzz/artifacts/$target)"
  set +e
  cargo fuzz run --sanitizer none "$target" "corpus/$target" -- \
    -max_total_time="$secs" -max_len=4096 -timeout=5 -rss_limit_mb=2048 -print_final_stats=1 2>&1 |
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+==|SUMMARY|thread|panicked|Done )|DONE'
  status=${PIPESTATUS[0]}
  set -e
  new=$(find "artifacts/$target" -type f -newer "$stamp")
  if [ "$status" -ne 0 ] || [ -n "$new" ]; then
    echo "fuzz: $target failed (exit $status)${new:+; its input: $new}" >&2
    failed+=("$target")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: failed: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: no target crashed, hung or ran out of memory"

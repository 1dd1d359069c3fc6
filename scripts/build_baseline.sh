#!/usr/bin/env bash
# Builds the agent as it was before region pools and SWIM (one global chitchat pool, commit
# 6ac710f), for bench-membership to measure beside the current membership in the same run.
# The binary lands in target/baseline/release/agent; a second call reuses it.
set -euo pipefail
cd "$(dirname "$0")/.."
COMMIT=6ac710f
OUT=target/baseline
if [ -x "$OUT/release/agent" ] && [ "$(cat "$OUT/commit" 2>/dev/null)" = "$COMMIT" ]; then
  exit 0
fi
if ! git cat-file -e "$COMMIT^{commit}" 2>/dev/null; then
  echo "build_baseline: commit $COMMIT is not in this clone (a shallow clone?); run 'git fetch --unshallow' or bench with --no-baseline" >&2
  exit 1
fi
rm -rf "$OUT/src" && mkdir -p "$OUT/src"
git archive "$COMMIT" | tar -x -C "$OUT/src"
echo "building the single-pool baseline agent ($COMMIT) into $OUT ..." >&2
(cd "$OUT/src" && CARGO_TARGET_DIR="$PWD/../" cargo build --release --locked -p grapevine-agent --bin agent)
echo "$COMMIT" > "$OUT/commit"

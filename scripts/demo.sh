#!/usr/bin/env bash
# `make demo`. For now: the ring placing sessions across three regions. The multi-region agent
# cluster joins this demo with the agent itself.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet --release -p grapevine-ring --example placement

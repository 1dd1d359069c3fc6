#!/usr/bin/env bash
# Installs what `make test`, `make demo` and `make bench` need on a fresh machine (Debian 12 with
# Rust, cargo-nextest, gcc and python3). Idempotent and quiet when everything is present.
set -euo pipefail

need_cargo_tool() {
  if ! command -v "$1" >/dev/null 2>&1 && ! cargo "${1#cargo-}" --version >/dev/null 2>&1; then
    echo "deps: installing $2 with cargo" >&2
    cargo install --locked "$2"
  fi
}

rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
need_cargo_tool cargo-nextest cargo-nextest
if [ "${1:-}" = fuzz ]; then
  need_cargo_tool cargo-fuzz cargo-fuzz
fi

# Debian packages: name of a command each provides, then the package. `deps.sh bench` adds the
# peers the benchmarks measure against.
packages='curl curl'
if [ "${1:-}" = demo ]; then
  packages="$packages
dig bind9-dnsutils"
fi
if [ "${1:-}" = sim-netns ]; then
  packages="$packages
nft nftables
ip iproute2"
fi
if [ "${1:-}" = fuzz ]; then
  packages="$packages
g++ g++"
fi
if [ "${1:-}" = bench ]; then
  packages="$packages
serf serf
tcpdump tcpdump
haproxy haproxy
wrk wrk
iperf3 iperf3
nginx nginx-light"
fi
apt_missing=()
while read -r cmd pkg; do
  [ -z "$cmd" ] && continue
  command -v "$cmd" >/dev/null 2>&1 || apt_missing+=("$pkg")
done <<<"$packages"
if [ ${#apt_missing[@]} -gt 0 ]; then
  echo "deps: installing ${apt_missing[*]} with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq "${apt_missing[@]}" >/dev/null
fi

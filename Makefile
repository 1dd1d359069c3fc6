# Thin wrappers; the work lives in cargo and scripts/. See README.md.
.PHONY: demo test bench bench-ring bench-membership bench-dataplane sim sim-netns fuzz run deps lint

CARGO ?= cargo

demo: deps
	@bash scripts/deps.sh demo
	bash scripts/demo.sh

test: deps lint
	$(CARGO) test --workspace --doc --quiet
	$(CARGO) build -p grapevine-agent --bin agent
	$(CARGO) nextest run --workspace --no-fail-fast

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

bench: bench-ring bench-membership bench-dataplane

bench-ring:
	$(CARGO) bench -p grapevine-ring --bench ring

# The agent beside HashiCorp Serf and the single-pool agent at N = 10, 30, 60, 100 on loopback
# (needs root for tcpdump).
bench-membership:
	@bash scripts/deps.sh bench
	$(CARGO) build --release -p grapevine-agent --bin agent
	bash scripts/build_baseline.sh
	python3 scripts/bench_membership.py

# client -> agent -> QUIC -> agent -> nginx beside two haproxy with mutual TLS, and direct.
bench-dataplane:
	@bash scripts/deps.sh bench
	$(CARGO) build --release -p grapevine-agent --bin agent
	python3 scripts/bench_dataplane.py

# Every shipped scenario in simulated time; reports and plots land in sim-out/NAME/.
sim:
	$(CARGO) build --release -p grapevine-sim --bin sim
	@for f in sim/scenarios/*.toml; do ./target/release/sim run "$$f" || exit 1; echo; done

# The netns scenario on real agents in network namespaces (root; installs nftables).
sim-netns:
	@bash scripts/deps.sh sim-netns
	$(CARGO) build --release -p grapevine-sim -p grapevine-agent
	./target/release/sim netns sim/scenarios/netns-split.toml

# libFuzzer on the decoders of what arrives from the network (fuzz/), FUZZ_SECONDS (60) per target.
fuzz:
	@bash scripts/deps.sh fuzz
	bash scripts/fuzz.sh

run:
	$(CARGO) run --release -p grapevine-agent --bin agent -- run --dev

deps:
	@bash scripts/deps.sh

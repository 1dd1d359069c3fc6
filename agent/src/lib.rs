//! grapevine-agent: the sidecar daemon and the `agent` command.
//!
//! # Layout
//!
//! - `main.rs`: parse the command line, hand over. `cli.rs`: the clap definitions.
//! - `config.rs`: `Config`, its defaults, the file/env/flag merge and validation.
//!   `config/file.rs`: the file's shape, checked with line numbers before serde reads it.
//! - `daemon.rs`: `agent run`: binds, starts membership, health checks and the admin API,
//!   and shuts down in order (drain, leave, exit).
//! - `membership/`: the chitchat adapter, the sealed UDP transport and the keyring. Nothing
//!   outside it names a chitchat type.
//! - `cluster/`: the immutable snapshot and routing decisions (pure).
//! - `dataplane/`: the QUIC endpoint (mutual TLS), the stream header, upstream listeners,
//!   ingress, and the cluster PKI.
//! - `services.rs`, `health.rs`: the services this agent fronts and their checks.
//! - `events.rs`: cluster events (dedup and fan-out to watchers).
//! - `keys.rs`: `agent keys`, rotating the gossip keyring of a running cluster.
//! - `dns.rs`: DNS on `dns_addr`: service, upstream and node names answered from the snapshot.
//! - `admin.rs`, `api.rs`: the admin HTTP API and its JSON documents.
//! - `client.rs`: the client commands and their tables.
//! - `metrics.rs`: the Prometheus registry.
//! - `fuzz.rs`: entry points for `make fuzz` (`fuzz/`): the agent's decoders, no sockets.

pub mod admin;
pub mod api;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod dns;
pub mod events;
// Only in tests and in `make fuzz`'s builds, not in the agent binary.
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzz;
pub mod health;
pub mod keys;
pub mod membership;
pub mod metrics;
pub mod services;

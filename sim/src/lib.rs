//! grapevine-sim: rehearse partitions, loss and crashes on the agent's real membership code.
//!
//! # Layout
//!
//! - `scenario.rs`: the scenario file. `net.rs`: the simulated network (latency, jitter, loss,
//!   partitions; one seeded RNG). `runner.rs`: N agents' membership stacks on tokio's paused
//!   clock, the timeline, and what every agent sees. `report.rs`: figures, summary, SVG plots.
//!
//! The agents are the agent crate's own `Membership` (chitchat adapter, sealed transport,
//! snapshot), each over a [`net::SimSocket`] instead of a UDP socket.

pub mod net;
pub mod netns;
pub mod report;
pub mod runner;
pub mod scenario;

//! Cluster events: named, best-effort messages that reach every live member within seconds,
//! once each, like Serf's user events. They travel as short-lived gossip keys; each agent
//! deduplicates by event id and hands them to its watchers (`GET /v1/events`).
//!
//! Best effort means: an event fired during a partition reaches the other side only if the
//! partition heals before the event expires (`event_ttl`), and an agent that was down misses
//! it. Durable work queues belong in a broker (NATS, RabbitMQ, Kafka), not here.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::config::check_name;
use crate::metrics::Metrics;

/// An event as watchers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    pub name: String,
    pub payload: String,
    /// The node that fired it.
    pub origin: String,
    /// Wall-clock milliseconds since the Unix epoch, on the origin.
    pub fired_at_ms: u64,
}

/// The gossiped value of an event key (`ev:<id>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventBody {
    pub name: String,
    pub payload: String,
    pub at: u64,
}

/// Event names that start with this are the agent's own (`_keyring`, see `keys.rs`): users
/// cannot fire them and watchers never see them.
pub const INTERNAL_PREFIX: char = '_';
/// Largest payload of an internal event (not held to `event_max_payload`, which is for users).
const INTERNAL_MAX_PAYLOAD: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("invalid event name {0:?}: 1 to 63 characters from a-z, A-Z, 0-9, '-', '_' and '.'")]
    BadName(String),
    #[error("event name {0:?} is reserved: names starting with '_' are the agent's own")]
    Reserved(String),
    #[error("event payload is {size} bytes; the limit is {limit} (event_max_payload)")]
    TooLarge { size: usize, limit: usize },
}

/// A name users may fire an event under (`agent event fire` checks it before asking the agent).
pub fn check_event_name(name: &str) -> Result<(), EventError> {
    check_name("event", name).map_err(|_| EventError::BadName(name.to_string()))?;
    if name.starts_with(INTERNAL_PREFIX) {
        return Err(EventError::Reserved(name.to_string()));
    }
    Ok(())
}

/// How far back an event may have been fired and still be delivered by an agent that just
/// started (allows for clock skew between hosts); older ones were meant for earlier members.
const STARTUP_SKEW_MS: u64 = 5_000;
/// Most event ids remembered for deduplication.
const SEEN_CAP: usize = 50_000;

/// Deduplicates incoming events and fans them out to watchers.
#[derive(Debug)]
pub struct EventHub {
    tx: broadcast::Sender<Event>,
    /// The agent's own events, for the parts of the agent that act on them.
    internal: broadcast::Sender<Event>,
    seen: Mutex<Seen>,
    metrics: Arc<Metrics>,
    max_payload: usize,
    ttl: Duration,
    started_at_ms: u64,
}

#[derive(Debug, Default)]
struct Seen {
    ids: BTreeMap<String, Instant>,
    order: VecDeque<(Instant, String)>,
}

impl EventHub {
    pub fn new(metrics: Arc<Metrics>, max_payload: usize, ttl: Duration, started_at_ms: u64) -> EventHub {
        let (tx, _) = broadcast::channel(1024);
        let (internal, _) = broadcast::channel(64);
        EventHub { tx, internal, seen: Mutex::new(Seen::default()), metrics, max_payload, ttl, started_at_ms }
    }

    /// Checks an event a user is about to fire here.
    pub fn validate(&self, name: &str, payload: &str) -> Result<(), EventError> {
        check_event_name(name)?;
        if payload.len() > self.max_payload {
            return Err(EventError::TooLarge { size: payload.len(), limit: self.max_payload });
        }
        Ok(())
    }

    /// Users' events, as they arrive.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    /// The agent's own events (names starting with [`INTERNAL_PREFIX`]), as they arrive.
    pub fn subscribe_internal(&self) -> broadcast::Receiver<Event> {
        self.internal.subscribe()
    }

    /// Takes an event key seen in gossip (`id` is the key without its prefix).
    pub fn accept(&self, id: &str, value: &str, origin: &str) {
        let Ok(body) = serde_json::from_str::<EventBody>(value) else {
            self.metrics.event("rejected");
            return;
        };
        let internal = body.name.starts_with(INTERNAL_PREFIX);
        let valid = if internal {
            check_name("event", &body.name).is_ok() && body.payload.len() <= INTERNAL_MAX_PAYLOAD
        } else {
            self.validate(&body.name, &body.payload).is_ok()
        };
        if !valid {
            self.metrics.event("rejected");
            return;
        }
        if body.at.saturating_add(STARTUP_SKEW_MS) < self.started_at_ms {
            // Fired before this agent started: not ours to deliver.
            self.metrics.event("stale");
            return;
        }
        let now = Instant::now();
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            let horizon = self.ttl * 2;
            while let Some((at, _)) = seen.order.front() {
                if now.duration_since(*at) < horizon && seen.order.len() < SEEN_CAP {
                    break;
                }
                if let Some((_, old)) = seen.order.pop_front() {
                    seen.ids.remove(&old);
                }
            }
            if seen.ids.contains_key(id) {
                self.metrics.event("duplicate");
                return;
            }
            seen.ids.insert(id.to_string(), now);
            seen.order.push_back((now, id.to_string()));
        }
        self.metrics.event(if internal { "internal" } else { "received" });
        let event = Event {
            id: id.to_string(),
            name: body.name,
            payload: body.payload,
            origin: origin.to_string(),
            fired_at_ms: body.at,
        };
        if internal {
            let _ = self.internal.send(event);
        } else if self.tx.send(event).is_ok() {
            self.metrics.event("delivered");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> EventHub {
        EventHub::new(Arc::new(Metrics::new()), 16, Duration::from_secs(60), 1_000_000)
    }

    fn body(name: &str, payload: &str, at: u64) -> String {
        serde_json::to_string(&EventBody { name: name.into(), payload: payload.into(), at }).unwrap()
    }

    #[tokio::test]
    async fn delivers_each_event_once() {
        let hub = hub();
        let mut rx = hub.subscribe();
        hub.accept("n1.1.1", &body("deploy", "v2", 1_000_000), "n1");
        hub.accept("n1.1.1", &body("deploy", "v2", 1_000_000), "n1");
        hub.accept("n1.1.2", &body("flush", "", 1_000_001), "n1");
        assert_eq!(rx.recv().await.unwrap().name, "deploy");
        assert_eq!(rx.recv().await.unwrap().name, "flush");
        assert!(rx.try_recv().is_err());
        assert!(hub.metrics.render().contains("grapevine_events_total{kind=\"duplicate\"} 1"));
    }

    #[tokio::test]
    async fn rejects_bad_and_stale_events() {
        let hub = hub();
        let mut rx = hub.subscribe();
        hub.accept("a", "not json", "n1");
        hub.accept("b", &body("x", &"p".repeat(17), 1_000_000), "n1");
        hub.accept("c", &body("bad name", "", 1_000_000), "n1");
        hub.accept("d", &body("old", "", 1_000), "n1");
        // A time at the end of the clock is an event, not an overflow (a panic in debug builds).
        hub.accept("e", &body("late", "", u64::MAX), "n1");
        assert_eq!(rx.try_recv().map(|e| e.name).as_deref(), Ok("late"));
        assert!(rx.try_recv().is_err());
        assert_eq!(hub.validate("ok", &"p".repeat(17)), Err(EventError::TooLarge { size: 17, limit: 16 }));
    }

    #[tokio::test]
    async fn the_agents_own_events_reach_only_the_agent() {
        let hub = hub();
        let (mut users, mut agent) = (hub.subscribe(), hub.subscribe_internal());
        assert_eq!(hub.validate("_keyring", ""), Err(EventError::Reserved("_keyring".into())));
        // Over `event_max_payload` (16 here) but within the internal limit.
        let payload = "k".repeat(100);
        hub.accept("n1.1.1", &body("_keyring", &payload, 1_000_000), "n1");
        hub.accept("n1.1.1", &body("_keyring", &payload, 1_000_000), "n1");
        hub.accept("n1.1.2", &body("deploy", "", 1_000_000), "n1");
        assert_eq!(agent.recv().await.unwrap().payload, payload);
        assert!(agent.try_recv().is_err(), "delivered once");
        assert_eq!(users.recv().await.unwrap().name, "deploy");
        assert!(users.try_recv().is_err(), "watchers never see the agent's own events");
    }
}

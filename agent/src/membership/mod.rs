//! The membership adapter: chitchat (pinned at 0.11.0, whose message encoding is public so our
//! own sealed transport can carry it) turned into cluster snapshots.
//!
//! Everything chitchat-specific stops here. The rest of the agent sees a
//! `watch::Receiver<Arc<Snapshot>>`, an [`EventHub`] and a few commands (publish services, fire
//! an event, drain, leave).
//!
//! Each node's state is a set of key-values: `region`, `zone`, `gossip_addr`, `data_addr`,
//! `version`, `status` (`active`, `draining`, `left`), one `svc:<name>` per service (JSON
//! [`ServiceRecord`]) and short-lived `ev:<id>` event keys.

pub mod keyring;
pub mod transport;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chitchat::{
    Chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, ListenerHandle, NodeState,
    spawn_chitchat,
};
use tokio::sync::{Mutex, watch};
use tokio::time::Instant;

use crate::cluster::snapshot::{Lifecycle, Liveness, LocalNode, MemberRecord, ServiceRecord, Snapshot};
use crate::config::GossipSettings;
use crate::events::{EventBody, EventHub};
use crate::metrics::{Metrics, StateLabel};
use transport::{SealedTransport, Wire};

const KEY_REGION: &str = "region";
const KEY_ZONE: &str = "zone";
const KEY_GOSSIP_ADDR: &str = "gossip_addr";
const KEY_DATA_ADDR: &str = "data_addr";
const KEY_VERSION: &str = "version";
const KEY_STATUS: &str = "status";
const SERVICE_PREFIX: &str = "svc:";
const EVENT_PREFIX: &str = "ev:";

/// What membership needs to start.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    pub local: LocalNode,
    pub generation: u64,
    pub gossip_advertise: SocketAddr,
    pub data_advertise: Option<SocketAddr>,
    pub seeds: Vec<String>,
    pub gossip: GossipSettings,
    pub event_ttl: Duration,
}

/// A running membership: chitchat plus the tasks that turn it into snapshots.
pub struct Membership {
    handle: Arc<Mutex<Option<ChitchatHandle>>>,
    chitchat: Arc<Mutex<Chitchat>>,
    pub wire: Arc<Wire>,
    config: MembershipConfig,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    pub events: Arc<EventHub>,
    metrics: Arc<Metrics>,
    event_seq: std::sync::atomic::AtomicU64,
    _listener: ListenerHandle,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership").field("local", &self.config.local.id).finish()
    }
}

impl Membership {
    /// Starts gossip on `wire` (already bound) and the snapshot, re-probe and RTT tasks.
    pub async fn start(
        config: MembershipConfig,
        wire: Arc<Wire>,
        events: Arc<EventHub>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Membership> {
        let local = &config.local;
        let chitchat_id = ChitchatId::new(local.id.clone(), config.generation, config.gossip_advertise);
        let interval = config.gossip.interval;
        let fd = FailureDetectorConfig::new(
            config.gossip.phi_threshold,
            // Samples per peer: enough for a stable mean, far below the 1000 default's memory.
            200,
            Duration::from_secs(10).max(interval * 10),
            interval,
            config.gossip.dead_node_grace,
        );
        let chitchat_config = ChitchatConfig {
            chitchat_id,
            cluster_id: local.cluster.clone(),
            gossip_interval: interval,
            listen_addr: wire.local_addr().context("reading the gossip socket's address")?,
            seed_nodes: config.seeds.clone(),
            failure_detector_config: fd,
            marked_for_deletion_grace_period: config.event_ttl,
            catchup_callback: None,
            extra_liveness_predicate: None,
        };
        let mut initial = vec![
            (KEY_REGION.to_string(), local.region.clone()),
            (KEY_ZONE.to_string(), local.zone.clone()),
            (KEY_GOSSIP_ADDR.to_string(), config.gossip_advertise.to_string()),
            (KEY_VERSION.to_string(), local.version.clone()),
            (KEY_STATUS.to_string(), "active".to_string()),
        ];
        if let Some(d) = config.data_advertise {
            initial.push((KEY_DATA_ADDR.to_string(), d.to_string()));
        }
        let handle = spawn_chitchat(chitchat_config, initial, &SealedTransport { wire: wire.clone() })
            .await
            .context("starting gossip")?;
        let chitchat = handle.chitchat();

        // Event keys: chitchat calls listeners under its lock, so only queue them here.
        let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel::<(String, String, String)>();
        let listener = chitchat.lock().await.subscribe_event(EVENT_PREFIX, move |e| {
            let _ = ev_tx.send((e.key.to_string(), e.value.to_string(), e.node.node_id.to_string()));
        });
        let hub = events.clone();
        let mut tasks = vec![tokio::spawn(async move {
            while let Some((id, value, origin)) = ev_rx.recv().await {
                hub.accept(&id, &value, &origin);
            }
        })];

        let handle = Arc::new(Mutex::new(Some(handle)));
        let (snap_tx, snapshots) = watch::channel(Arc::new(Snapshot::empty(local.clone())));
        tasks.push(tokio::spawn(snapshot_loop(
            chitchat.clone(),
            wire.clone(),
            config.clone(),
            metrics.clone(),
            snap_tx,
        )));
        tasks.push(tokio::spawn(reprobe_loop(
            chitchat.clone(),
            handle.clone(),
            config.clone(),
            metrics.clone(),
            snapshots.clone(),
        )));
        tasks.push(tokio::spawn(ping_loop(wire.clone(), snapshots.clone())));

        Ok(Membership {
            handle,
            chitchat,
            wire,
            config,
            snapshots,
            events,
            metrics,
            event_seq: std::sync::atomic::AtomicU64::new(0),
            _listener: listener,
            tasks,
        })
    }

    /// The latest snapshot, and changes to come.
    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.clone()
    }

    /// Announces this agent's services (replacing what was announced before).
    pub async fn set_services(&self, services: &[ServiceRecord]) {
        let mut c = self.chitchat.lock().await;
        let state = c.self_node_state();
        let stale: Vec<String> = state
            .key_values()
            .filter(|(k, _)| k.starts_with(SERVICE_PREFIX))
            .filter(|(k, _)| !services.iter().any(|s| k[SERVICE_PREFIX.len()..] == s.name))
            .map(|(k, _)| k.to_string())
            .collect();
        for k in stale {
            state.delete(&k);
        }
        for s in services {
            // A ServiceRecord always serialises.
            let value = serde_json::to_string(s).unwrap_or_default();
            state.set(format!("{SERVICE_PREFIX}{}", s.name), value);
        }
    }

    /// Fires an event to every member (validated by the caller). Returns its id.
    pub async fn fire_event(&self, name: &str, payload: &str) -> String {
        let seq = self.event_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}.{}.{}", self.config.local.id, self.config.generation, seq);
        let body = EventBody { name: name.to_string(), payload: payload.to_string(), at: unix_ms() };
        let value = serde_json::to_string(&body).unwrap_or_default();
        self.chitchat.lock().await.self_node_state().set_with_ttl(format!("{EVENT_PREFIX}{id}"), value);
        self.metrics.event("fired");
        id
    }

    /// Announces that this agent takes no new work.
    pub async fn set_draining(&self) {
        self.chitchat.lock().await.self_node_state().set(KEY_STATUS, "draining");
    }

    /// Announces `left`, pushes that to a few peers at once, keeps gossiping for two rounds so
    /// it spreads, then stops gossip.
    pub async fn leave(&self) {
        self.chitchat.lock().await.self_node_state().set(KEY_STATUS, "left");
        let peers: Vec<SocketAddr> = {
            let c = self.chitchat.lock().await;
            let me = c.self_chitchat_id().clone();
            c.live_nodes().filter(|id| **id != me).map(|id| id.gossip_advertise_addr).take(8).collect()
        };
        let interval = self.config.gossip.interval;
        if let Some(h) = self.handle.lock().await.as_ref() {
            for round in 0..2 {
                for p in &peers {
                    let _ = h.gossip(*p);
                }
                if round == 0 {
                    tokio::time::sleep(interval.min(Duration::from_millis(500))).await;
                }
            }
        }
        tokio::time::sleep(interval.min(Duration::from_secs(1))).await;
        self.shutdown().await;
    }

    /// Stops gossip without announcing anything (the others will see this node die).
    pub async fn shutdown(&self) {
        if let Some(h) = self.handle.lock().await.take() {
            let _ = h.shutdown().await;
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Turns one chitchat node state into a record; `None` until its basic keys have arrived.
fn record(id: &ChitchatId, state: &NodeState, liveness: Liveness) -> Option<MemberRecord> {
    let region = state.get(KEY_REGION)?.to_string();
    let zone = state.get(KEY_ZONE).unwrap_or_default().to_string();
    let gossip_addr = state.get(KEY_GOSSIP_ADDR).and_then(|a| a.parse().ok()).unwrap_or(id.gossip_advertise_addr);
    let data_addr = state.get(KEY_DATA_ADDR).and_then(|a| a.parse().ok());
    let lifecycle = match state.get(KEY_STATUS) {
        Some("left") => Lifecycle::Left,
        Some("draining") => Lifecycle::Draining,
        _ => Lifecycle::Active,
    };
    let services = state
        .iter_prefix(SERVICE_PREFIX)
        .filter_map(|(_, v)| serde_json::from_str::<ServiceRecord>(&v.value).ok())
        .collect();
    Some(MemberRecord {
        id: id.node_id.to_string(),
        generation: id.generation_id,
        region,
        zone,
        gossip_addr,
        data_addr,
        version: state.get(KEY_VERSION).unwrap_or_default().to_string(),
        liveness,
        lifecycle,
        services,
    })
}

/// Rebuilds the snapshot whenever membership or state changes (checked twice per gossip
/// interval), and at least every 5 s so measured RTTs show.
async fn snapshot_loop(
    chitchat: Arc<Mutex<Chitchat>>,
    wire: Arc<Wire>,
    config: MembershipConfig,
    metrics: Arc<Metrics>,
    tx: watch::Sender<Arc<Snapshot>>,
) {
    let interval = config.gossip.interval;
    let suspect_after = (interval * 4).max(Duration::from_secs(2));
    // Per node: last heartbeat, when it last changed, and whether we have seen it change.
    let mut heartbeats: HashMap<ChitchatId, (u64, Instant, bool)> = HashMap::new();
    // Nodes chitchat has called live at least once: from then on its verdict alone counts.
    let mut ever_live: std::collections::HashSet<ChitchatId> = std::collections::HashSet::new();
    let mut last_fingerprint = Vec::new();
    let mut last_build = Instant::now();
    let mut epoch = 0u64;
    let mut tick = tokio::time::interval(interval / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let (records, fingerprint) = {
            let c = chitchat.lock().await;
            let me = c.self_chitchat_id().clone();
            let live: std::collections::HashSet<&ChitchatId> = c.live_nodes().collect();
            let mut records = Vec::new();
            let mut fingerprint = Vec::new();
            for (id, state) in c.node_states() {
                let hb = u64::from(state.heartbeat());
                let entry = heartbeats.entry(id.clone()).or_insert((hb, now, false));
                if entry.0 != hb {
                    *entry = (hb, now, true);
                }
                if live.contains(id) {
                    ever_live.insert(id.clone());
                }
                let stale = now.duration_since(entry.1) > suspect_after;
                let liveness = if *id == me {
                    Liveness::Alive
                } else if live.contains(id) {
                    if stale { Liveness::Suspect } else { Liveness::Alive }
                } else if entry.2 && !stale && !ever_live.contains(id) {
                    // chitchat's failure detector needs a few heartbeat intervals before it
                    // calls a newcomer alive; a heartbeat seen advancing just now is proof enough.
                    Liveness::Alive
                } else {
                    Liveness::Dead
                };
                if let Some(r) = record(id, state, liveness) {
                    fingerprint.push((id.clone(), state.max_version(), liveness as u8));
                    records.push(r);
                }
            }
            heartbeats.retain(|id, _| c.node_states().contains_key(id));
            ever_live.retain(|id| c.node_states().contains_key(id));
            (records, fingerprint)
        };
        if fingerprint == last_fingerprint && now.duration_since(last_build) < Duration::from_secs(5) {
            continue;
        }
        last_fingerprint = fingerprint;
        last_build = now;
        epoch += 1;
        let rtts = wire.rtt.all();
        let snap = Snapshot::build(config.local.clone(), records, &|a| rtts.get(a).copied(), epoch);
        for (state, n) in snap.counts() {
            metrics.members.get_or_create(&StateLabel { state: state.as_str().into() }).set(n as i64);
        }
        metrics.snapshots.inc();
        {
            let old = tx.borrow();
            let before: HashMap<&str, crate::cluster::snapshot::MemberState> =
                old.members.iter().map(|m| (m.id.as_str(), m.state)).collect();
            for m in snap.members.iter().filter(|m| m.id != config.local.id) {
                if before.get(m.id.as_str()) != Some(&m.state) {
                    tracing::info!(member = %m.id, region = %m.region, state = m.state.as_str(), "member state changed");
                }
            }
        }
        tx.send_replace(Arc::new(snap));
    }
}

/// Re-probes seeds and recently dead members so that a lone node keeps knocking (with
/// backoff) and two halves of a healed partition find each other with nobody acting.
async fn reprobe_loop(
    chitchat: Arc<Mutex<Chitchat>>,
    handle: Arc<Mutex<Option<ChitchatHandle>>>,
    config: MembershipConfig,
    metrics: Arc<Metrics>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
) {
    let mut alone_backoff = Duration::from_secs(1);
    loop {
        let alone = {
            let c = chitchat.lock().await;
            let me = c.self_chitchat_id().clone();
            c.live_nodes().all(|id| *id == me)
        };
        let wait = if alone {
            let w = alone_backoff;
            alone_backoff = (alone_backoff * 2)
                .min(Duration::from_secs(30))
                .min(config.gossip.reprobe_interval.max(Duration::from_secs(1)) * 6);
            w
        } else {
            alone_backoff = Duration::from_secs(1);
            config.gossip.reprobe_interval
        };
        tokio::time::sleep(wait).await;
        let mut targets: Vec<SocketAddr> = Vec::new();
        for seed in &config.seeds {
            if let Ok(addrs) = tokio::net::lookup_host(seed.as_str()).await {
                targets.extend(addrs.filter(|a| *a != config.gossip_advertise));
            }
        }
        let snap = snapshots.borrow().clone();
        targets.extend(
            snap.members
                .iter()
                .filter(|m| m.state == crate::cluster::snapshot::MemberState::Dead && m.id != config.local.id)
                .map(|m| m.gossip_addr)
                .take(8),
        );
        targets.sort();
        targets.dedup();
        if targets.is_empty() {
            continue;
        }
        // chitchat's gossip(addr) starts a round towards one address now.
        let h = handle.lock().await;
        let Some(h) = h.as_ref() else { return };
        for t in targets {
            metrics.reprobes.inc();
            let _ = h.gossip(t);
        }
    }
}

/// Measures RTTs with sealed pings. Routing needs the nearest member of each region, so each
/// round (every 2 s) pings at most two members per region, rotating through them; per-member
/// RTTs in `agent status` refresh more slowly in large regions.
async fn ping_loop(wire: Arc<Wire>, snapshots: watch::Receiver<Arc<Snapshot>>) {
    const PER_REGION: usize = 2;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut round = 0usize;
    loop {
        tick.tick().await;
        let snap = snapshots.borrow().clone();
        let mut by_region: std::collections::BTreeMap<&str, Vec<SocketAddr>> = std::collections::BTreeMap::new();
        for m in snap.members.iter().filter(|m| m.state.is_up() && m.id != snap.local.id) {
            by_region.entry(m.region.as_str()).or_default().push(m.gossip_addr);
        }
        for peers in by_region.values() {
            for i in 0..peers.len().min(PER_REGION) {
                wire.ping(peers[(round * PER_REGION + i) % peers.len()]).await;
            }
        }
        round = round.wrapping_add(1);
    }
}

//! The membership adapter: how an agent knows the cluster, turned into cluster snapshots.
//!
//! Three layers, all on one sealed UDP socket ([`transport::Wire`]):
//!
//! - **The region pool**: a chitchat instance (pinned at 0.11.0, whose message encoding is public
//!   so our own sealed transport can carry it) holding only this region's members and their
//!   state as key-values. Its anti-entropy round is slow (`anti_entropy_interval`, 90 s) because
//!   changes travel by version hints.
//! - **SWIM** ([`swim`], the `foca` crate) inside the region: who is alive, suspect or dead. Its
//!   probes also carry version hints ("node X is at version v"); a member that is behind pulls
//!   from X at once.
//! - **The WAN pool** ([`gateway`]): `gateways_per_region` healthy members of each region
//!   (serving ones keep their seats) run a second chitchat instance among all gateways, carrying one summary key
//!   per member of their region, and copy the other regions' summaries into their own region
//!   state. A region whose gateways stop being heard is `unreachable`, not dead.
//!
//! Everything chitchat- and foca-specific stops here. The rest of the agent sees a
//! `watch::Receiver<Arc<Snapshot>>`, an [`EventHub`] and a few commands (publish services, fire
//! an event, drain, leave).
//!
//! Each node's region state: `region`, `zone`, `gossip_addr`, `data_addr`, `version`, `status`
//! (`active`, `draining`, `left`), one `svc:<name>` per service (JSON [`ServiceRecord`]),
//! short-lived `ev:<id>` event keys, and on gateways `x:<node>` (another region's member) and
//! `reach` (the other regions' gateways and reachability).

pub mod gateway;
pub mod keyring;
pub mod swim;
pub mod transport;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use chitchat::{
    Chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, ListenerHandle, NodeState,
    spawn_chitchat,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, watch};
use tokio::time::Instant;

use crate::cluster::snapshot::{
    KeyringView, Lifecycle, Liveness, LocalNode, MemberRecord, MemberState, MemberView, RegionInfo, ServiceRecord,
    Snapshot,
};
use crate::config::GossipSettings;
use crate::events::{EventBody, EventHub};
use crate::metrics::{KindLabel, Metrics, StateLabel};
use swim::{Hint, Swim, SwimId, SwimSettings, SwimState};
use transport::{FRAME_GOSSIP, FRAME_HINT, FRAME_JOIN, FRAME_JOIN_REPLY, FRAME_SWIM, SealedTransport, Wire};

const KEY_REGION: &str = "region";
const KEY_ZONE: &str = "zone";
const KEY_GOSSIP_ADDR: &str = "gossip_addr";
const KEY_DATA_ADDR: &str = "data_addr";
const KEY_VERSION: &str = "version";
const KEY_STATUS: &str = "status";
/// The node's gossip keyring: JSON [`KeyringView`], fingerprints only.
const KEY_KEYRING: &str = "keyring";
const SERVICE_PREFIX: &str = "svc:";
const EVENT_PREFIX: &str = "ev:";
/// On a gateway's region state: one member of another region (JSON [`MemberView`]).
const REMOTE_PREFIX: &str = "x:";
/// On a gateway's region state: the other regions' gateways and reachability.
const KEY_REACH: &str = "reach";
/// On a gateway's region state, while it runs the WAN pool: it holds its seat (see
/// [`elect_gateways`]).
const KEY_GATEWAY: &str = "gateway";
/// Most addresses in a join reply.
const JOIN_REPLY_MAX: usize = 16;

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

/// "Which members of `region` do you know?", sent to seeds.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct JoinRequest {
    region: String,
}

/// The answer: members of that region, and gateways of any region.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct JoinReply {
    members: Vec<SocketAddr>,
    gateways: Vec<SocketAddr>,
}

/// A chitchat instance and its handle.
pub(crate) struct Pool {
    pub chitchat: Arc<Mutex<Chitchat>>,
    pub handle: ChitchatHandle,
    _listener: ListenerHandle,
}

/// What every membership task shares.
pub(crate) struct Shared {
    pub config: MembershipConfig,
    pub wire: Arc<Wire>,
    pub metrics: Arc<Metrics>,
    pub swim: Arc<Swim>,
    pub region: Arc<Mutex<Chitchat>>,
    pub region_handle: Mutex<Option<ChitchatHandle>>,
    pub wan: Mutex<Option<Pool>>,
    pub events: Arc<EventHub>,
    pub snapshots: watch::Sender<Arc<Snapshot>>,
    /// Gateways learned from join replies, to seed the WAN pool.
    pub known_gateways: std::sync::Mutex<Vec<SocketAddr>>,
    /// Gossip addresses in the region pool, for the pool size limit.
    pub pool_addrs: Arc<std::sync::RwLock<HashSet<SocketAddr>>>,
    /// This node's state changed in a way the region should hear about now.
    pub significant: AtomicBool,
    /// Event ids already relayed between the region and the WAN pool.
    pub relayed: std::sync::Mutex<HashMap<String, Instant>>,
    pub leaving: AtomicBool,
}

impl Shared {
    fn me(&self) -> &str {
        &self.config.local.id
    }

    /// Marks this node's state as changed in a way others should hear about now.
    pub(crate) fn changed(&self) {
        self.significant.store(true, Ordering::Relaxed);
    }
}

/// A running membership.
pub struct Membership {
    shared: Arc<Shared>,
    pub wire: Arc<Wire>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    pub events: Arc<EventHub>,
    event_seq: AtomicU64,
    _listener: ListenerHandle,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership").field("local", &self.shared.config.local.id).finish()
    }
}

/// The chitchat failure detector's settings for a pool gossiping every `interval`.
fn failure_detector(gossip: &GossipSettings, interval: Duration) -> FailureDetectorConfig {
    FailureDetectorConfig::new(
        gossip.phi_threshold,
        // Samples per peer: enough for a stable mean, far below the 1000 default's memory.
        200,
        Duration::from_secs(10).max(interval * 10),
        interval,
        gossip.dead_node_grace,
    )
}

impl Membership {
    /// Starts the region pool, SWIM and the tasks around them on `wire` (already bound).
    pub async fn start(
        config: MembershipConfig,
        wire: Arc<Wire>,
        events: Arc<EventHub>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Membership> {
        let local = config.local.clone();
        let mut tasks = vec![tokio::spawn(wire.clone().receive_loop())];

        let anti_entropy = config.gossip.anti_entropy_interval;
        let chitchat_config = ChitchatConfig {
            chitchat_id: ChitchatId::new(local.id.clone(), config.generation, config.gossip_advertise),
            cluster_id: format!("{}/{}", local.cluster, local.region),
            gossip_interval: anti_entropy,
            listen_addr: wire.local_addr().context("reading the gossip socket's address")?,
            // Seeds may be in any region: they are asked for this region's members instead.
            seed_nodes: Vec::new(),
            failure_detector_config: failure_detector(&config.gossip, anti_entropy),
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
            (KEY_KEYRING.to_string(), keyring_value(&wire.keyring().fingerprints(), false)),
        ];
        if let Some(d) = config.data_advertise {
            initial.push((KEY_DATA_ADDR.to_string(), d.to_string()));
        }
        let pool_addrs = Arc::new(std::sync::RwLock::new(HashSet::new()));
        let admit: transport::Admit = {
            let (pool_addrs, max) = (pool_addrs.clone(), config.gossip.max_pool_size);
            Arc::new(move |from| {
                let known = pool_addrs.read().unwrap_or_else(|e| e.into_inner());
                known.len() < max || known.contains(&from)
            })
        };
        let transport = SealedTransport { wire: wire.clone(), kind: FRAME_GOSSIP, admit: Some(admit) };
        let handle = spawn_chitchat(chitchat_config, initial, &transport).await.context("starting gossip")?;
        let chitchat = handle.chitchat();

        let swim = Swim::new(
            SwimId { addr: config.gossip_advertise, generation: config.generation, bump: 0 },
            &local.region,
            &SwimSettings {
                probe_interval: config.gossip.probe_interval,
                probe_timeout: config.gossip.probe_timeout,
                indirect_probes: config.gossip.indirect_probes,
                suspicion: config.gossip.suspicion_timeout,
                remember_down: config.gossip.dead_node_grace,
            },
            wire.clone(),
            metrics.clone(),
        );

        let (snap_tx, snapshots) = watch::channel(Arc::new(Snapshot::empty(local.clone())));
        let shared = Arc::new(Shared {
            config: config.clone(),
            wire: wire.clone(),
            metrics: metrics.clone(),
            swim: swim.clone(),
            region: chitchat.clone(),
            region_handle: Mutex::new(Some(handle)),
            wan: Mutex::new(None),
            events: events.clone(),
            snapshots: snap_tx,
            known_gateways: std::sync::Mutex::new(Vec::new()),
            pool_addrs,
            significant: AtomicBool::new(true),
            relayed: std::sync::Mutex::new(HashMap::new()),
            leaving: AtomicBool::new(false),
        });
        tasks.push(tokio::spawn(sync_pool_addrs(shared.clone())));

        // Event keys: chitchat calls listeners under its lock, so only queue them here.
        let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
        let listener = chitchat.lock().await.subscribe_event(EVENT_PREFIX, move |e| {
            let _ = ev_tx.send((e.key.to_string(), e.value.to_string()));
        });
        {
            let shared = shared.clone();
            tasks.push(tokio::spawn(async move {
                while let Some((id, value)) = ev_rx.recv().await {
                    shared.events.accept(&id, &value, origin_of(&id));
                    gateway::relay_to_wan(&shared, &id, &value).await;
                }
            }));
        }

        let mut swim_rx = wire.listen(FRAME_SWIM);
        {
            let swim = swim.clone();
            tasks.push(tokio::spawn(async move {
                while let Some((_, body)) = swim_rx.recv().await {
                    swim.handle(&body);
                }
            }));
        }
        tasks.push(tokio::spawn(join_server(shared.clone(), wire.listen(FRAME_JOIN), wire.listen(FRAME_JOIN_REPLY))));
        tasks.push(tokio::spawn(join_loop(shared.clone())));
        tasks.push(tokio::spawn(hint_loop(shared.clone(), wire.listen(FRAME_HINT))));
        tasks.push(tokio::spawn(snapshot_loop(shared.clone())));
        tasks.push(tokio::spawn(gateway::gateway_loop(shared.clone())));
        tasks.push(tokio::spawn(ping_loop(wire.clone(), snapshots.clone())));

        Ok(Membership {
            shared,
            wire,
            snapshots,
            events,
            event_seq: AtomicU64::new(0),
            _listener: listener,
            tasks: std::sync::Mutex::new(tasks),
        })
    }

    /// The latest snapshot, and changes to come.
    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.clone()
    }

    /// Announces this agent's services (replacing what was announced before). A change of
    /// load alone travels with the next anti-entropy round; anything else is hinted at once.
    pub async fn set_services(&self, services: &[ServiceRecord]) {
        let mut c = self.shared.region.lock().await;
        let state = c.self_node_state();
        let stale: Vec<String> = state
            .key_values()
            .filter(|(k, _)| k.starts_with(SERVICE_PREFIX))
            .filter(|(k, _)| !services.iter().any(|s| k[SERVICE_PREFIX.len()..] == s.name))
            .map(|(k, _)| k.to_string())
            .collect();
        let mut significant = !stale.is_empty();
        for k in stale {
            state.delete(&k);
        }
        for s in services {
            let key = format!("{SERVICE_PREFIX}{}", s.name);
            let before = state.get(&key).and_then(|v| serde_json::from_str::<ServiceRecord>(v).ok());
            significant |= before.is_none_or(|b| ServiceRecord { load: s.load, ..b } != *s);
            // A ServiceRecord always serialises.
            state.set(key, serde_json::to_string(s).unwrap_or_default());
        }
        if significant {
            self.shared.changed();
        }
    }

    /// Fires an event to every member of every region (validated by the caller). Returns its id.
    pub async fn fire_event(&self, name: &str, payload: &str) -> String {
        let seq = self.event_seq.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}.{}.{}", self.shared.config.local.id, self.shared.config.generation, seq);
        let body = EventBody { name: name.to_string(), payload: payload.to_string(), at: unix_ms() };
        let value = serde_json::to_string(&body).unwrap_or_default();
        let key = format!("{EVENT_PREFIX}{id}");
        self.shared.region.lock().await.self_node_state().set_with_ttl(key, value.clone());
        self.shared.changed();
        self.shared.metrics.event("fired");
        gateway::relay_to_wan(&self.shared, &id, &value).await;
        id
    }

    /// Fires one of the agent's own events (a name starting with `_`; see [`EventHub`]).
    pub async fn fire_internal(&self, name: &str, payload: &str) -> String {
        debug_assert!(name.starts_with(crate::events::INTERNAL_PREFIX));
        self.fire_event(name, payload).await
    }

    /// Announces this agent's keyring (after `agent keys` changed it): fingerprints, and
    /// whether the change could not be written to the keyring file.
    pub async fn announce_keyring(&self, fingerprints: &[String], unsaved: bool) {
        self.shared.region.lock().await.self_node_state().set(KEY_KEYRING, keyring_value(fingerprints, unsaved));
        self.shared.changed();
    }

    /// Announces that this agent takes no new work.
    pub async fn set_draining(&self) {
        self.shared.region.lock().await.self_node_state().set(KEY_STATUS, "draining");
        self.shared.changed();
    }

    /// Announces `left`: hinted and pushed to a few region members at once, carried to the
    /// other regions by a gateway, then SWIM says goodbye and gossip stops.
    pub async fn leave(&self) {
        let shared = &self.shared;
        shared.leaving.store(true, Ordering::Relaxed);
        shared.region.lock().await.self_node_state().set(KEY_STATUS, "left");
        shared.changed();
        shared.significant.store(false, Ordering::Relaxed);
        send_hint(shared).await;
        let peers: Vec<SocketAddr> = {
            let view = shared.swim.view();
            view.values().filter(|(_, s)| *s != SwimState::Down).map(|(id, _)| id.addr).take(8).collect()
        };
        if let Some(h) = shared.region_handle.lock().await.as_ref() {
            for p in &peers {
                let _ = h.gossip(*p);
            }
        }
        // Give the hint a few probe rounds, and the gateways (this one, if it is one) a tick.
        tokio::time::sleep(Duration::from_millis(600)).await;
        if let Some(h) = shared.region_handle.lock().await.as_ref() {
            for p in &peers {
                let _ = h.gossip(*p);
            }
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        shared.swim.leave();
        self.shutdown().await;
    }

    /// Stops everything without announcing anything (the others will see this node die).
    pub async fn shutdown(&self) {
        self.shared.swim.stop();
        if let Some(h) = self.shared.region_handle.lock().await.take() {
            let _ = h.shutdown().await;
        }
        gateway::stop_wan(&self.shared).await;
        for t in self.tasks.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            t.abort();
        }
    }
}

fn keyring_value(fingerprints: &[String], unsaved: bool) -> String {
    serde_json::to_string(&KeyringView { keys: fingerprints.to_vec(), unsaved }).unwrap_or_default()
}

/// The node an event id was fired on (`node.generation.seq`).
pub(crate) fn origin_of(id: &str) -> &str {
    let id = id.strip_prefix(EVENT_PREFIX).unwrap_or(id);
    id.rsplitn(3, '.').last().unwrap_or(id)
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Turns one region node state into a record; `None` until its basic keys have arrived.
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
        keyring: state.get(KEY_KEYRING).and_then(|v| serde_json::from_str(v).ok()).unwrap_or_default(),
    })
}

/// Turns another region's member, as its gateway summarised it, into a record.
fn remote_record(view: MemberView, reachable: bool) -> MemberRecord {
    let (liveness, lifecycle) = match view.state {
        MemberState::Left => (Liveness::Dead, Lifecycle::Left),
        _ if !reachable => (Liveness::Unreachable, Lifecycle::Active),
        MemberState::Alive => (Liveness::Alive, Lifecycle::Active),
        MemberState::Suspect => (Liveness::Suspect, Lifecycle::Active),
        MemberState::Dead | MemberState::Unreachable => (Liveness::Dead, Lifecycle::Active),
    };
    let lifecycle = if view.draining && lifecycle == Lifecycle::Active { Lifecycle::Draining } else { lifecycle };
    MemberRecord {
        id: view.id,
        generation: view.generation,
        region: view.region,
        zone: view.zone,
        gossip_addr: view.gossip_addr,
        data_addr: view.data_addr,
        version: view.version,
        liveness,
        lifecycle,
        services: view
            .services
            .into_iter()
            .map(|i| ServiceRecord {
                name: i.name,
                port: i.port,
                weight: i.weight,
                healthy: i.healthy,
                load: i.load,
                pinned: i.pinned,
                draining: i.draining,
            })
            .collect(),
        keyring: view.keyring,
    }
}

/// The region's gateways, among the members SWIM calls alive (or suspect) that are not
/// draining or leaving: those already serving as gateways (`incumbents`) keep their seats, the
/// first `n` of them by id; empty seats go to the others in id order. So a member joining
/// with a small id does not displace a working gateway (each change starts a WAN pool
/// instance that the other regions remember as a dead node for `dead_node_grace`), and every
/// member computes the same list from the same view.
fn elect_gateways(records: &[MemberRecord], incumbents: &HashSet<&str>, n: usize) -> Vec<String> {
    let mut candidates: Vec<(bool, &str)> = records
        .iter()
        .filter(|r| matches!(r.liveness, Liveness::Alive | Liveness::Suspect) && r.lifecycle == Lifecycle::Active)
        .map(|r| (!incumbents.contains(r.id.as_str()), r.id.as_str()))
        .collect();
    candidates.sort_unstable();
    candidates.dedup();
    candidates.into_iter().take(n).map(|(_, id)| id.to_string()).collect()
}

/// Keeps the region pool's address set (read by the pool-size guard) current.
async fn sync_pool_addrs(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut warned = false;
    loop {
        tick.tick().await;
        let addrs: HashSet<SocketAddr> =
            shared.region.lock().await.node_states().keys().map(|id| id.gossip_advertise_addr).collect();
        let n = addrs.len();
        shared.metrics.pool_size.get_or_create(&KindLabel { kind: "region" }).set(n as i64);
        if n >= shared.config.gossip.max_pool_size && !warned {
            tracing::warn!(
                members = n,
                limit = shared.config.gossip.max_pool_size,
                "the region pool is at its size limit (max_pool_size); new members are refused. Split the region"
            );
        }
        warned = n >= shared.config.gossip.max_pool_size;
        *shared.pool_addrs.write().unwrap_or_else(|e| e.into_inner()) = addrs;
    }
}

/// Rebuilds the snapshot from the region pool, SWIM's verdicts, the gateway's copy of the
/// other regions and measured RTTs, whenever any of them changes (checked every 100 ms).
async fn snapshot_loop(shared: Arc<Shared>) {
    let config = &shared.config;
    let me = config.local.id.clone();
    let mut last_fingerprint = 0u64;
    let started = Instant::now();
    // (RTT table version, other regions nearest first), recomputed when a measurement arrives.
    let mut rtt_order: (u64, String) = (u64::MAX, String::new());
    let mut epoch = 0u64;
    // Parsed records, reused until their node's state version changes: parsing every member's
    // JSON ten times a second would dominate the cost of a large cluster.
    let mut local_cache: HashMap<ChitchatId, (u64, Option<MemberRecord>)> = HashMap::new();
    type Remote = (BTreeMap<String, RegionInfo>, Vec<MemberView>);
    let mut remote_cache: Option<(Vec<(ChitchatId, u64)>, Remote)> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let view = shared.swim.view();
        let suspects = view.values().filter(|(_, s)| *s == SwimState::Suspect).count();
        shared.metrics.suspects.set(suspects as i64);
        let (mut records, fingerprint, remote) = {
            let c = shared.region.lock().await;
            let mut records = Vec::new();
            let mut incumbents: HashSet<&str> = HashSet::new();
            // What the snapshot depends on, hashed (node states come in a fixed order).
            let mut fingerprint = xxhash_rust::xxh3::Xxh3::new();
            for (id, state) in c.node_states() {
                let liveness = if *id.node_id == *me {
                    if id.generation_id != config.generation {
                        continue;
                    }
                    Liveness::Alive
                } else {
                    match view.get(&id.gossip_advertise_addr) {
                        Some((sid, s)) if sid.generation == id.generation_id => match s {
                            SwimState::Alive => Liveness::Alive,
                            SwimState::Suspect => Liveness::Suspect,
                            SwimState::Down => Liveness::Dead,
                        },
                        // A newer incarnation of the node replaced this one.
                        Some((sid, _)) if sid.generation > id.generation_id => Liveness::Dead,
                        // SWIM has not met it yet (or forgot it): shown only once SWIM vouches.
                        _ if state.get(KEY_STATUS) == Some("left") => Liveness::Dead,
                        _ => continue,
                    }
                };
                if state.get(KEY_REGION) != Some(config.local.region.as_str()) {
                    continue;
                }
                let version = state.max_version();
                let cached = local_cache.entry(id.clone()).or_insert((u64::MAX, None));
                if cached.0 != version {
                    *cached = (version, record(id, state, Liveness::Alive));
                }
                if let Some(r) = &cached.1 {
                    if state.get(KEY_GATEWAY).is_some() {
                        incumbents.insert(&*id.node_id);
                    }
                    fingerprint.update(r.id.as_bytes());
                    fingerprint.update(&[0, liveness as u8]);
                    fingerprint.update(&r.generation.to_le_bytes());
                    fingerprint.update(&version.to_le_bytes());
                    records.push(MemberRecord { liveness, ..r.clone() });
                }
            }
            local_cache.retain(|id, _| c.node_states().contains_key(id));
            let gateways = elect_gateways(&records, &incumbents, config.gossip.gateways_per_region);
            // The other regions, as copied in by our gateways (and any live member that still
            // holds a copy), the elected ones first; live generations only: chitchat keeps a
            // restarted member's old state, frozen copy and all, for `dead_node_grace`.
            let alive: HashSet<(&str, u64)> = records
                .iter()
                .filter(|r| matches!(r.liveness, Liveness::Alive | Liveness::Suspect))
                .map(|r| (r.id.as_str(), r.generation))
                .collect();
            let mut sources: Vec<(&ChitchatId, &NodeState)> = c
                .node_states()
                .iter()
                .filter(|(id, s)| alive.contains(&(&*id.node_id, id.generation_id)) && s.get(KEY_REACH).is_some())
                .collect();
            sources.sort_by_key(|(id, _)| (!gateways.iter().any(|g| **g == *id.node_id), id.node_id.clone()));
            // Every copy counts, region by region: each region, its reachability and all its
            // members come from one copy, its owner (below). A region another copy lacks (a
            // gateway that has just started has not heard every region yet) stays in view;
            // taking only the preferred copy made a whole region vanish for a moment whenever a
            // second gateway started. Never member by member: a member one copy still holds
            // after its region dropped it would stay routable.
            let remote = (!sources.is_empty()).then(|| {
                let key: Vec<(ChitchatId, u64)> =
                    sources.iter().map(|(id, s)| ((*id).clone(), s.max_version())).collect();
                for (id, s) in &sources {
                    fingerprint.update(b"~");
                    fingerprint.update(id.node_id.as_bytes());
                    fingerprint.update(&id.generation_id.to_le_bytes());
                    fingerprint.update(&s.max_version().to_le_bytes());
                }
                if remote_cache.as_ref().is_none_or(|(k, _)| *k != key) {
                    let copies: Vec<(BTreeMap<String, RegionInfo>, Vec<MemberView>)> = sources
                        .iter()
                        .map(|(_, s)| {
                            let reach = s.get(KEY_REACH).and_then(|v| serde_json::from_str(v).ok()).unwrap_or_default();
                            let members = s
                                .iter_prefix(REMOTE_PREFIX)
                                .filter_map(|(_, v)| serde_json::from_str::<MemberView>(&v.value).ok())
                                .collect();
                            (reach, members)
                        })
                        .collect();
                    // Each region's owner: the first copy with members of it (a copy may know a
                    // region's gateway before its summaries), else the first that lists it.
                    let mut owner: BTreeMap<String, usize> = BTreeMap::new();
                    for (i, (_, ms)) in copies.iter().enumerate() {
                        for m in ms {
                            owner.entry(m.region.clone()).or_insert(i);
                        }
                    }
                    for (i, (r, _)) in copies.iter().enumerate() {
                        for region in r.keys() {
                            owner.entry(region.clone()).or_insert(i);
                        }
                    }
                    let mut reach: BTreeMap<String, RegionInfo> = BTreeMap::new();
                    let mut members: Vec<MemberView> = Vec::new();
                    for (region, &i) in &owner {
                        let (r, ms) = &copies[i];
                        let info = r.get(region).or_else(|| copies.iter().find_map(|(r, _)| r.get(region)));
                        if let Some(info) = info {
                            reach.insert(region.clone(), info.clone());
                        }
                        members.extend(ms.iter().filter(|m| &m.region == region).cloned());
                    }
                    remote_cache = Some((key, (reach, members)));
                }
            });
            fingerprint.update(gateways.join(",").as_bytes());
            // RTTs matter to routing only through the order of regions (nearest first), so only
            // that order triggers a rebuild; the figures themselves refresh every 30 s. Rebuilding
            // on every jittery measurement would cost a large cluster dearly.
            let rtt_version = shared.wire.rtt.version();
            if rtt_order.0 != rtt_version {
                let rtts = shared.wire.rtt.all();
                let last = shared.snapshots.borrow().clone();
                let mut nearest: BTreeMap<&str, f64> = BTreeMap::new();
                for m in last.members.iter().filter(|m| m.region != config.local.region) {
                    if let Some(ms) = rtts.get(&m.gossip_addr) {
                        let e = nearest.entry(m.region.as_str()).or_insert(f64::INFINITY);
                        *e = e.min(*ms);
                    }
                }
                // In steps of 25%: regions about as far away as each other do not swap places on
                // every jittery sample.
                let mut order: Vec<(i64, &str)> =
                    nearest.into_iter().map(|(r, ms)| ((ms.max(0.01).ln() / 1.25f64.ln()).round() as i64, r)).collect();
                order.sort();
                rtt_order = (rtt_version, order.into_iter().map(|(_, r)| r).collect::<Vec<_>>().join(","));
            }
            fingerprint.update(rtt_order.1.as_bytes());
            fingerprint.update(&(started.elapsed().as_secs() / 30).to_le_bytes());
            (records, fingerprint.digest(), (gateways, remote))
        };
        let (gateways, remote) = remote;
        if fingerprint == last_fingerprint {
            continue;
        }
        let mut region_info: BTreeMap<String, RegionInfo> = BTreeMap::new();
        region_info.insert(config.local.region.clone(), RegionInfo { gateways: gateways.clone(), reachable: true });
        if remote.is_some()
            && let Some((_, (reach, members))) = &remote_cache
        {
            for m in members {
                if m.region == config.local.region {
                    continue;
                }
                let reachable = reach.get(&m.region).is_some_and(|r| r.reachable);
                records.push(remote_record(m.clone(), reachable));
            }
            for (region, info) in reach {
                if *region != config.local.region {
                    region_info.insert(region.clone(), info.clone());
                }
            }
        }
        last_fingerprint = fingerprint;
        epoch += 1;
        let rtts = shared.wire.rtt.all();
        let mut snap = Snapshot::build(config.local.clone(), records, &|a| rtts.get(a).copied(), epoch);
        snap.region_info = region_info;
        for (state, n) in snap.counts() {
            shared.metrics.members.get_or_create(&StateLabel { state: state.as_str().into() }).set(n as i64);
        }
        shared.metrics.snapshots.inc();
        {
            let old = shared.snapshots.borrow();
            let before: HashMap<&str, MemberState> = old.members.iter().map(|m| (m.id.as_str(), m.state)).collect();
            for m in snap.members.iter().filter(|m| m.id != me) {
                if before.get(m.id.as_str()) != Some(&m.state) {
                    tracing::info!(member = %m.id, region = %m.region, state = m.state.as_str(), "member state changed");
                }
            }
            let old_gw = old.region_info.get(&config.local.region).map(|r| &r.gateways);
            if old_gw.is_some_and(|g| *g != gateways) {
                shared.metrics.gateway_changes.get_or_create(&KindLabel { kind: "changed" }).inc();
                tracing::info!(gateways = %gateways.join(","), "region gateways changed");
            }
        }
        shared.snapshots.send_replace(Arc::new(snap));
    }
}

/// Sends a version hint for this node's current state: piggybacked on SWIM's messages, and
/// straight to every region member SWIM calls up (a small datagram each; state changes are
/// rare, and piggybacked broadcasts alone proved unreliable under loss). Returns the hint.
async fn send_hint(shared: &Shared) -> Hint {
    let version = shared.region.lock().await.self_node_state().max_version();
    let hint = Hint {
        node: shared.me().to_string(),
        generation: shared.config.generation,
        version,
        addr: shared.config.gossip_advertise,
    };
    shared.swim.hint(&hint);
    push_hint(shared, &hint).await;
    hint
}

/// Sends `hint` to every region member SWIM calls alive or suspect.
async fn push_hint(shared: &Shared, hint: &Hint) {
    let Ok(body) = postcard::to_stdvec(hint) else { return };
    let peers: Vec<SocketAddr> =
        shared.swim.view().values().filter(|(_, s)| *s != SwimState::Down).map(|(id, _)| id.addr).collect();
    for addr in peers {
        shared.wire.send_frame(addr, FRAME_HINT, &body).await;
    }
    shared.metrics.hints.get_or_create(&KindLabel { kind: "sent" }).inc();
}

/// Sends hints for this node's changes (again twice, a second apart, for loss), and pulls
/// from nodes hinted to be ahead of us (up to ten tries 300 ms apart: a pull is a three-way
/// exchange, so at 25% loss one try succeeds four times in ten), every 100 ms.
async fn hint_loop(shared: Arc<Shared>, mut direct: tokio::sync::mpsc::Receiver<transport::Inbound>) {
    const TRIES: u32 = 10;
    const SPACING: Duration = Duration::from_millis(300);
    // One pull brings everything the peer knows that we do not, so a burst of hints (many
    // members starting at once) needs few pulls: the rest find themselves satisfied.
    const PULLS_PER_TICK: usize = 2;
    // Per node: the hint, tries left and when to try next.
    let mut pending: HashMap<String, (Hint, u32, Instant)> = HashMap::new();
    // Our latest hint, repeats left and when.
    let mut repeat: Option<(Hint, u32, Instant)> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        if shared.significant.swap(false, Ordering::Relaxed) {
            let hint = send_hint(&shared).await;
            repeat = Some((hint, 2, now + Duration::from_secs(1)));
        } else if let Some((hint, left, at)) = &mut repeat
            && *at <= now
        {
            push_hint(&shared, hint).await;
            *left -= 1;
            *at = now + Duration::from_secs(1);
            if *left == 0 {
                repeat = None;
            }
        }
        let mut received = shared.swim.take_hints();
        while let Ok((_, body)) = direct.try_recv() {
            if let Ok(h) = postcard::from_bytes::<Hint>(&body) {
                received.push(h);
            }
        }
        for h in received {
            shared.metrics.hints.get_or_create(&KindLabel { kind: "received" }).inc();
            let newer =
                pending.get(&h.node).is_none_or(|(p, _, _)| (h.generation, h.version) > (p.generation, p.version));
            if h.node != shared.me() && newer {
                pending.insert(h.node.clone(), (h, TRIES, now));
            }
        }
        if pending.is_empty() {
            continue;
        }
        let mut pulls = Vec::new();
        {
            let c = shared.region.lock().await;
            pending.retain(|_, (hint, tries, next)| {
                let have = c
                    .node_states()
                    .iter()
                    .find(|(id, _)| *id.node_id == *hint.node && id.generation_id == hint.generation)
                    .map(|(_, s)| s.max_version());
                if have.is_some_and(|v| v >= hint.version) || *tries == 0 {
                    return false;
                }
                if *next <= now && pulls.len() < PULLS_PER_TICK {
                    *tries -= 1;
                    *next = now + SPACING;
                    pulls.push(hint.addr);
                }
                true
            });
        }
        if pulls.is_empty() {
            continue;
        }
        if let Some(h) = shared.region_handle.lock().await.as_ref() {
            for addr in pulls {
                shared.metrics.hints.get_or_create(&KindLabel { kind: "pull" }).inc();
                let _ = h.gossip(addr);
            }
        }
    }
}

/// Those who asked a seed for their region's members lately, by region: a seed in another
/// region may not know a new region's members yet (it learns them through the gateways), so it
/// introduces the region's newcomers to each other, and they form their region pool at once
/// instead of each electing itself gateway of a region of one.
#[derive(Debug, Default)]
struct Newcomers {
    by_region: HashMap<String, Vec<(SocketAddr, Instant)>>,
}

impl Newcomers {
    /// How long a newcomer is remembered.
    const KEEP: Duration = Duration::from_secs(60);
    const MAX_REGIONS: usize = 64;

    /// The other recent newcomers of `region`, newest first; then remembers `from`.
    fn meet(&mut self, region: &str, from: SocketAddr, now: Instant) -> Vec<SocketAddr> {
        self.by_region.retain(|_, v| {
            v.retain(|(_, at)| now.duration_since(*at) < Self::KEEP);
            !v.is_empty()
        });
        let others: Vec<SocketAddr> =
            self.by_region.get(region).into_iter().flatten().rev().map(|(a, _)| *a).filter(|a| *a != from).collect();
        if self.by_region.len() < Self::MAX_REGIONS || self.by_region.contains_key(region) {
            let list = self.by_region.entry(region.to_string()).or_default();
            list.retain(|(a, _)| *a != from);
            list.push((from, now));
            let excess = list.len().saturating_sub(JOIN_REPLY_MAX);
            list.drain(..excess);
        }
        others
    }
}

/// Answers join requests from the latest snapshot, and acts on replies: SWIM announces itself
/// and the region pool gossips to the members named; gateways are kept to seed the WAN pool.
async fn join_server(
    shared: Arc<Shared>,
    mut requests: tokio::sync::mpsc::Receiver<transport::Inbound>,
    mut replies: tokio::sync::mpsc::Receiver<transport::Inbound>,
) {
    let mut newcomers = Newcomers::default();
    loop {
        tokio::select! {
            Some((from, body)) = requests.recv() => {
                let Ok(req) = serde_json::from_slice::<JoinRequest>(&body) else {
                    shared.wire.drop_datagram("undecodable", from);
                    continue;
                };
                let snap = shared.snapshots.borrow().clone();
                let mut reply = JoinReply::default();
                let mut members: Vec<&MemberView> =
                    snap.members.iter().filter(|m| m.region == req.region && m.state.is_up()).collect();
                if req.region == snap.local.region {
                    // Ourselves first: we are certainly up.
                    reply.members.push(shared.config.gossip_advertise);
                    members.retain(|m| m.id != snap.local.id);
                }
                reply.members.extend(members.iter().map(|m| m.gossip_addr).filter(|a| *a != from));
                for a in newcomers.meet(&req.region, from, Instant::now()) {
                    if !reply.members.contains(&a) {
                        reply.members.push(a);
                    }
                }
                reply.members.truncate(JOIN_REPLY_MAX);
                for info in snap.region_info.values() {
                    for g in &info.gateways {
                        if let Some(m) = snap.members.iter().find(|m| &m.id == g) {
                            reply.gateways.push(m.gossip_addr);
                        }
                    }
                }
                reply.gateways.truncate(JOIN_REPLY_MAX);
                let body = serde_json::to_vec(&reply).unwrap_or_default();
                shared.wire.send_frame(from, FRAME_JOIN_REPLY, &body).await;
            }
            Some((from, body)) = replies.recv() => {
                let Ok(reply) = serde_json::from_slice::<JoinReply>(&body) else {
                    shared.wire.drop_datagram("undecodable", from);
                    continue;
                };
                let me = shared.config.gossip_advertise;
                // Only members SWIM has not met: a reply to a re-probe names members this agent
                // knows already, and announcing to them (and a full region-pool exchange with
                // three) every `reprobe_interval` cost a single-region cluster of 100 about
                // 2.7 kB/s per agent.
                // A member SWIM holds as down counts as not met: after a cut inside a region
                // (two members each declaring the other down) this reply is how they meet again.
                let known = shared.swim.view();
                let new: Vec<SocketAddr> = reply
                    .members
                    .iter()
                    .copied()
                    .filter(|a| *a != me && known.get(a).is_none_or(|(_, state)| *state == SwimState::Down))
                    .collect();
                for addr in &new {
                    shared.swim.announce(*addr);
                }
                if !new.is_empty()
                    && let Some(h) = shared.region_handle.lock().await.as_ref()
                {
                    for addr in new.iter().take(3) {
                        let _ = h.gossip(*addr);
                    }
                }
                let mut known = shared.known_gateways.lock().unwrap_or_else(|e| e.into_inner());
                for g in reply.gateways.into_iter().filter(|a| *a != me) {
                    if !known.contains(&g) {
                        known.push(g);
                    }
                }
                let excess = known.len().saturating_sub(64);
                known.drain(..excess);
            }
            else => return,
        }
    }
}

/// Asks the seeds for this region's members until SWIM knows someone, with backoff, and
/// keeps asking every `reprobe_interval` while this agent is alone in its region (a healed
/// cut, or a region's last member restarting). Seeds in other regions answer too. While this
/// agent hears of no other region it also asks, backing off to a minute: the answers name
/// gateways for the WAN pool, but a single-region cluster has none to give.
async fn join_loop(shared: Arc<Shared>) {
    const NO_WAN_MAX: Duration = Duration::from_secs(60);
    let first = Duration::from_millis(200);
    let mut backoff = first;
    let mut no_wan_backoff = shared.config.gossip.reprobe_interval;
    let mut next_no_wan = Instant::now();
    let started = Instant::now();
    // When to say next that no seed answers, and whether it was said.
    let mut next_warning = started + UNANSWERED_WARNING;
    let mut warned = false;
    loop {
        let alone = shared.swim.active_count() == 0;
        let no_wan = shared.snapshots.borrow().region_info.len() <= 1;
        let now = Instant::now();
        let ask_for_wan = no_wan && now >= next_no_wan;
        let asked = if alone || ask_for_wan { Some(ask_seeds(&shared).await) } else { None };
        // Nobody at all has answered: no other member of this region, none of another. A
        // seed drops what it cannot open or that names another cluster, and says nothing.
        let unheard = alone && no_wan && shared.snapshots.borrow().members.len() <= 1;
        if let Some(asked) =
            asked.filter(|a| unheard && now >= next_warning && (a.sent > 0 || !a.unresolved.is_empty()))
        {
            tracing::warn!(
                seeds = %shared.config.seeds.join(","),
                unresolved = %asked.unresolved.join(","),
                after_s = now.duration_since(started).as_secs(),
                "no seed has answered: a seed answers only agents with the same cluster name and a key in its keyring; check cluster, cluster_key_file, and that the seeds' gossip port (UDP) is reachable"
            );
            warned = true;
            next_warning = now + UNANSWERED_WARNING * 30;
        } else if warned && !unheard {
            tracing::info!("a seed answered: joined the cluster");
            warned = false;
            next_warning = now + UNANSWERED_WARNING;
        }
        if ask_for_wan {
            next_no_wan = now + no_wan_backoff;
            no_wan_backoff = (no_wan_backoff * 2).min(NO_WAN_MAX);
        } else if !no_wan {
            no_wan_backoff = shared.config.gossip.reprobe_interval;
        }
        let wait = if alone {
            let w = backoff;
            backoff = (backoff * 2).min(shared.config.gossip.reprobe_interval.max(first));
            w
        } else {
            backoff = first;
            if no_wan {
                next_no_wan.saturating_duration_since(now).max(first)
            } else {
                shared.config.gossip.reprobe_interval
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// How long an agent with seeds may hear from nobody before it says so (then every 5 min).
const UNANSWERED_WARNING: Duration = Duration::from_secs(10);

/// What [`ask_seeds`] did.
#[derive(Debug, Default)]
pub(crate) struct SeedsAsked {
    /// Addresses asked (the seeds resolved, this agent's own address left out).
    pub sent: usize,
    /// Seeds whose names did not resolve.
    pub unresolved: Vec<String>,
}

/// Asks every seed (DNS names resolved now) for this region's members and the gateways it knows.
pub(crate) async fn ask_seeds(shared: &Shared) -> SeedsAsked {
    let mut targets: Vec<SocketAddr> = Vec::new();
    let mut unresolved = Vec::new();
    for seed in &shared.config.seeds {
        match tokio::net::lookup_host(seed.as_str()).await {
            Ok(addrs) => targets.extend(addrs.filter(|a| *a != shared.config.gossip_advertise)),
            Err(_) => unresolved.push(seed.clone()),
        }
    }
    targets.sort();
    targets.dedup();
    let body = serde_json::to_vec(&JoinRequest { region: shared.config.local.region.clone() }).unwrap_or_default();
    for t in &targets {
        shared.metrics.reprobes.inc();
        shared.wire.send_frame(*t, FRAME_JOIN, &body).await;
    }
    SeedsAsked { sent: targets.len(), unresolved }
}

/// Measures RTTs to other regions with sealed pings, for routing's region order: one member
/// of each other region every 10 s, rotating through them (inside the region, SWIM's probes
/// already show who answers).
async fn ping_loop(wire: Arc<Wire>, snapshots: watch::Receiver<Arc<Snapshot>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first round soon after start, once a few members are known.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut round = 0usize;
    loop {
        tick.tick().await;
        let snap = snapshots.borrow().clone();
        let mut by_region: BTreeMap<&str, Vec<SocketAddr>> = BTreeMap::new();
        for m in snap.members.iter().filter(|m| m.state.is_up() && m.region != snap.local.region) {
            by_region.entry(m.region.as_str()).or_default().push(m.gossip_addr);
        }
        for peers in by_region.values() {
            wire.ping(peers[round % peers.len()]).await;
        }
        round = round.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, liveness: Liveness, lifecycle: Lifecycle) -> MemberRecord {
        MemberRecord {
            id: id.into(),
            generation: 1,
            region: "east".into(),
            zone: "east-a".into(),
            gossip_addr: "10.0.0.1:7946".parse().unwrap(),
            data_addr: None,
            version: String::new(),
            liveness,
            lifecycle,
            services: Vec::new(),
            keyring: KeyringView::default(),
        }
    }

    #[test]
    fn gateways_are_the_first_live_active_members_by_id() {
        let records = vec![
            rec("c", Liveness::Alive, Lifecycle::Active),
            rec("a", Liveness::Dead, Lifecycle::Active),
            rec("b", Liveness::Suspect, Lifecycle::Active),
            rec("aa", Liveness::Alive, Lifecycle::Draining),
            rec("d", Liveness::Alive, Lifecycle::Active),
        ];
        let none = HashSet::new();
        assert_eq!(elect_gateways(&records, &none, 2), ["b", "c"]);
        let mut shuffled = records.clone();
        shuffled.reverse();
        assert_eq!(elect_gateways(&shuffled, &none, 2), ["b", "c"], "order of arrival does not matter");
        assert_eq!(elect_gateways(&records, &none, 5), ["b", "c", "d"]);
    }

    #[test]
    fn serving_gateways_keep_their_seats() {
        let mut records = vec![
            rec("m", Liveness::Alive, Lifecycle::Active),
            rec("n", Liveness::Alive, Lifecycle::Active),
            rec("p", Liveness::Alive, Lifecycle::Active),
        ];
        let serving: HashSet<&str> = ["m", "n"].into();
        // A member with a smaller id joins: it waits for a seat.
        records.push(rec("a", Liveness::Alive, Lifecycle::Active));
        assert_eq!(elect_gateways(&records, &serving, 2), ["m", "n"]);
        // A gateway dies: the smallest id among the others takes its seat.
        records[0].liveness = Liveness::Dead;
        assert_eq!(elect_gateways(&records, &serving, 2), ["n", "a"]);
        // More serving than seats (two sides of a healed split): the first by id stay.
        let three: HashSet<&str> = ["n", "p", "a"].into();
        assert_eq!(elect_gateways(&records, &three, 2), ["a", "n"]);
    }

    #[test]
    fn another_regions_member_is_unreachable_not_dead_in_a_cut() {
        let view = |state| MemberView {
            id: "w-1".into(),
            region: "west".into(),
            zone: "west-a".into(),
            gossip_addr: "10.0.1.1:7946".parse().unwrap(),
            data_addr: None,
            state,
            generation: 3,
            version: String::new(),
            draining: false,
            services: Vec::new(),
            rtt_ms: None,
            keyring: KeyringView::default(),
        };
        assert_eq!(remote_record(view(MemberState::Alive), true).liveness, Liveness::Alive);
        assert_eq!(remote_record(view(MemberState::Alive), false).liveness, Liveness::Unreachable);
        assert_eq!(remote_record(view(MemberState::Dead), true).liveness, Liveness::Dead);
        let left = remote_record(view(MemberState::Left), false);
        assert_eq!(left.lifecycle, Lifecycle::Left, "a clean leave stays a leave");
    }

    #[test]
    fn a_seed_introduces_a_regions_newcomers_to_each_other() {
        let mut n = Newcomers::default();
        let t0 = Instant::now();
        let a: SocketAddr = "10.0.2.1:7946".parse().unwrap();
        let b: SocketAddr = "10.0.2.2:7946".parse().unwrap();
        let c: SocketAddr = "10.0.3.1:7946".parse().unwrap();
        assert!(n.meet("west", a, t0).is_empty());
        assert_eq!(n.meet("west", b, t0), [a]);
        assert!(n.meet("east", c, t0).is_empty(), "other regions' newcomers are not named");
        assert_eq!(n.meet("west", a, t0), [b], "not itself");
        assert!(n.meet("west", c, t0 + Newcomers::KEEP * 2).is_empty(), "forgotten after a while");
    }

    #[test]
    fn event_origin_is_the_id_prefix() {
        assert_eq!(origin_of("ev:web-1.17.3"), "web-1");
        assert_eq!(origin_of("a.b.c.1.2"), "a.b.c");
    }
}

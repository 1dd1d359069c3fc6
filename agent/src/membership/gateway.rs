//! Gateways and the WAN pool.
//!
//! Every member computes its region's gateways the same way from SWIM's view and the region
//! state (serving gateways keep their seats, empty seats go to the smallest ids: see
//! `elect_gateways`) and a member that finds itself among them starts a
//! second chitchat instance, the WAN pool, with the other regions' gateways (frame type
//! [`FRAME_WAN`]). In it a gateway publishes one key per member of its region (`m:<node>`, the
//! member as this region sees it, load rounded to a power of two so that busy members do not
//! churn the summary), and from it copies every other region's members into its own region
//! state (`x:<node>`) together with `reach`: each region's gateways and whether any of them was
//! heard lately. A region none of whose gateways has been heard for a few WAN rounds is
//! unreachable: its members show as `unreachable`, and routing leaves them alone. Events cross
//! between regions the same way, relayed once per gateway.
//!
//! A gateway that stops being elected (a member with a smaller id joined) stops its WAN pool
//! and removes what it copied; a draining or leaving one keeps publishing its region (itself
//! draining, then left) and stops at the end of the leave; the WAN pool restarts with a fresh
//! generation when it is elected again, so its new state is never mistaken for stale.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chitchat::{ChitchatConfig, ChitchatId, spawn_chitchat};
use tokio::time::Instant;

use super::transport::{FRAME_WAN, SealedTransport};
use super::{
    EVENT_PREFIX, KEY_GATEWAY, KEY_REACH, KEY_REGION, Pool, REMOTE_PREFIX, Shared, failure_detector, origin_of, unix_ms,
};
use crate::cluster::snapshot::{MemberState, MemberView, RegionInfo};
use crate::metrics::KindLabel;

/// On a gateway's WAN state: one member of its region.
const SUMMARY_PREFIX: &str = "m:";
/// On a gateway's WAN state: its region's gateways, as it sees them (comma-separated ids).
const KEY_GATEWAYS: &str = "gw";

/// How long a newly started agent must stay elected before it starts its WAN pool. An agent
/// that has just started knows few of its region's members and may elect itself for a moment;
/// each such instance used to join every gateway's WAN pool and stay there, dead, for
/// `dead_node_grace` (a cold start of 100 agents left about 100 of them).
const ELECTION_HOLD: Duration = Duration::from_secs(1);
/// After this long, an agent's view of its region has settled and an election takes effect
/// at once (a dead gateway's replacement starts without the hold).
const SETTLED_AFTER: Duration = Duration::from_secs(10);

/// Runs the gateway duties whenever this agent is elected, every 250 ms.
pub(crate) async fn gateway_loop(shared: Arc<Shared>) {
    let mut heard: HashMap<ChitchatId, (u64, Instant)> = HashMap::new();
    let mut listed: HashSet<String> = HashSet::new();
    let started = Instant::now();
    let mut elected_since: Option<Instant> = None;
    let mut last_poke = Instant::now();
    const LONELY_FIRST: Duration = Duration::from_millis(500);
    let lonely_max = (shared.config.gossip.interval * 2).max(Duration::from_secs(2));
    let mut lonely_backoff = LONELY_FIRST;
    let mut lonely_next = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let snap = shared.snapshots.borrow().clone();
        let region = &shared.config.local.region;
        let departing = shared.leaving.load(Ordering::Relaxed)
            || snap.members.iter().any(|m| m.id == *shared.me() && (m.draining || m.state == MemberState::Left));
        if departing {
            // A draining or leaving gateway gives up its seat (the region elects another) but
            // keeps its WAN pool to the end of the leave (`Membership::leave` stops it),
            // publishing its region: draining, then left. In a region of one nobody else would
            // tell the other regions, which would show it unreachable, not left.
            if shared.wan.lock().await.is_some() {
                publish(&shared, &snap).await;
                // Its copy of the other regions stays current too: in a region of one it is
                // the only copy there is.
                listed = import(&shared, &mut heard).await.unwrap_or(listed);
            }
            continue;
        }
        let elected = snap.region_info.get(region).is_some_and(|r| r.gateways.iter().any(|g| g == shared.me()));
        let now = Instant::now();
        elected_since = if elected { elected_since.or(Some(now)) } else { None };
        let held = elected_since
            .is_some_and(|at| now.duration_since(started) >= SETTLED_AFTER || now.duration_since(at) >= ELECTION_HOLD);
        let running = shared.wan.lock().await.is_some();
        if held && !running {
            match start_wan(&shared).await {
                Ok(()) => {
                    shared.region.lock().await.self_node_state().set(KEY_GATEWAY, "1");
                    shared.changed();
                    shared.metrics.gateway_changes.get_or_create(&KindLabel { kind: "promoted" }).inc();
                    tracing::info!(region = %region, "this agent is now a gateway of its region");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not start the WAN pool");
                    continue;
                }
            }
        } else if !elected && running {
            stop_wan(&shared).await;
            clear_imports(&shared).await;
            heard.clear();
            shared.metrics.gateway_changes.get_or_create(&KindLabel { kind: "demoted" }).inc();
            tracing::info!(region = %region, "this agent is no longer a gateway");
            continue;
        } else if !running {
            continue;
        }
        let peers = publish(&shared, &snap).await;
        // A WAN pool that knows no other gateway (they started after the join replies, or the
        // seeds knew none then) asks the seeds again, soon and then less often.
        if peers == 0 && now >= lonely_next {
            super::ask_seeds(&shared).await;
            lonely_next = now + lonely_backoff;
            // Up to every other WAN round, not a minute: the question or the answer may be
            // lost on a lossy link between regions, and at a cold start the seeds may know no
            // gateway yet; with a doubling backoff to a minute a cluster with 20% loss between
            // its regions went 35 s without a WAN pool. Only a lonely gateway asks (in a
            // one-region cluster the two gateways keep each other company).
            lonely_backoff = (lonely_backoff * 2).min(lonely_max);
        } else if peers > 0 {
            lonely_backoff = LONELY_FIRST;
        }
        listed = import(&shared, &mut heard).await.unwrap_or(listed);
        if last_poke.elapsed() >= shared.config.gossip.interval {
            last_poke = Instant::now();
            poke_silent(&shared, &listed).await;
        }
    }
}

async fn start_wan(shared: &Arc<Shared>) -> anyhow::Result<()> {
    let config = &shared.config;
    let interval = config.gossip.interval;
    let chitchat_config = ChitchatConfig {
        // A fresh generation per start: what this instance says is never older than what an
        // earlier instance said.
        chitchat_id: ChitchatId::new(config.local.id.clone(), unix_ms(), config.gossip_advertise),
        cluster_id: format!("{}#wan", config.local.cluster),
        gossip_interval: interval,
        listen_addr: shared.wire.local_addr()?,
        seed_nodes: Vec::new(),
        failure_detector_config: failure_detector(&config.gossip, interval),
        marked_for_deletion_grace_period: config.event_ttl,
        catchup_callback: None,
        extra_liveness_predicate: None,
    };
    let transport = SealedTransport { wire: shared.wire.clone(), kind: FRAME_WAN, admit: None };
    let initial = vec![(KEY_REGION.to_string(), config.local.region.clone())];
    let handle = spawn_chitchat(chitchat_config, initial, &transport).await?;
    let chitchat = handle.chitchat();
    // Events from other regions: delivered here and copied into this region.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    let listener = chitchat.lock().await.subscribe_event(EVENT_PREFIX, move |e| {
        let _ = tx.send((e.key.to_string(), e.value.to_string()));
    });
    let relay = shared.clone();
    tokio::spawn(async move {
        while let Some((id, value)) = rx.recv().await {
            relay.events.accept(&id, &value, origin_of(&id));
            if first_relay(&relay, &id) {
                relay.region.lock().await.self_node_state().set_with_ttl(format!("{EVENT_PREFIX}{id}"), value);
                relay.changed();
            }
        }
    });
    // Say hello to every gateway we have heard of.
    for addr in wan_seeds(shared) {
        let _ = handle.gossip(addr);
    }
    *shared.wan.lock().await = Some(Pool { chitchat, handle, _listener: listener });
    Ok(())
}

/// Stops the WAN pool, if running.
pub(crate) async fn stop_wan(shared: &Shared) {
    let pool = shared.wan.lock().await.take();
    if let Some(pool) = pool {
        let _ = pool.handle.shutdown().await;
        shared.wire.unlisten(FRAME_WAN);
    }
    shared.metrics.pool_size.get_or_create(&KindLabel { kind: "wan" }).set(0);
}

/// Gives up the seat, and removes the other regions' members and reachability this agent
/// copied in as a gateway.
async fn clear_imports(shared: &Shared) {
    let mut c = shared.region.lock().await;
    let state = c.self_node_state();
    let keys: Vec<String> = state
        .key_values()
        .filter(|(k, _)| k.starts_with(REMOTE_PREFIX) || *k == KEY_REACH || *k == KEY_GATEWAY)
        .map(|(k, _)| k.to_string())
        .collect();
    for k in &keys {
        state.delete(k);
    }
    if !keys.is_empty() {
        shared.changed();
    }
}

/// Gateways to introduce a new WAN pool to: from join replies, and the other regions'
/// gateways this region already knows.
fn wan_seeds(shared: &Shared) -> Vec<SocketAddr> {
    let mut seeds: Vec<SocketAddr> = shared.known_gateways.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let snap = shared.snapshots.borrow().clone();
    for (region, info) in &snap.region_info {
        if *region == snap.local.region {
            continue;
        }
        for g in &info.gateways {
            if let Some(m) = snap.members.iter().find(|m| &m.id == g) {
                seeds.push(m.gossip_addr);
            }
        }
    }
    seeds.retain(|a| *a != shared.config.gossip_advertise);
    seeds.sort();
    seeds.dedup();
    seeds
}

/// A member as published to the other regions: no RTT (it is ours, not theirs), load rounded
/// up to a power of two, and a suspect shown alive. Suspicion is SWIM's business inside the
/// region: a suspect is still routable, and under loss suspicions come and go every second;
/// carried across, each one changed the summaries, and every member of every other region
/// pulled the change (at 10% loss, N = 100: 6 kB/s per node of region-pool exchanges).
fn summary(m: &MemberView) -> String {
    let mut m = m.clone();
    m.rtt_ms = None;
    if m.state == MemberState::Suspect {
        m.state = MemberState::Alive;
    }
    for s in &mut m.services {
        s.load = if s.load == 0 { 0 } else { s.load.next_power_of_two() };
    }
    serde_json::to_string(&m).unwrap_or_default()
}

/// Publishes this region's members into the WAN pool; pushes at once to the other gateways
/// when anything changed. Returns how many other gateways the pool knows.
async fn publish(shared: &Shared, snap: &crate::cluster::snapshot::Snapshot) -> usize {
    let wan = shared.wan.lock().await;
    let Some(pool) = wan.as_ref() else { return 0 };
    let region = &shared.config.local.region;
    let ours: BTreeMap<String, String> = snap
        .members
        .iter()
        .filter(|m| &m.region == region && m.state != MemberState::Unreachable)
        .map(|m| (format!("{SUMMARY_PREFIX}{}", m.id), summary(m)))
        .collect();
    let (changed, peers) = {
        let mut c = pool.chitchat.lock().await;
        let me = c.self_chitchat_id().clone();
        let peers: Vec<SocketAddr> = c
            .node_states()
            .keys()
            .filter(|id| **id != me && id.node_id != me.node_id)
            .map(|id| id.gossip_advertise_addr)
            .collect();
        let state = c.self_node_state();
        let before = state.max_version();
        replace_prefixed(state, SUMMARY_PREFIX, ours);
        if let Some(info) = snap.region_info.get(region) {
            state.set(KEY_GATEWAYS, info.gateways.join(","));
        }
        (state.max_version() != before, peers)
    };
    shared.metrics.pool_size.get_or_create(&KindLabel { kind: "wan" }).set(peers.len() as i64 + 1);
    let known = peers.len();
    if changed {
        // The WAN pool's own version hint: a round with every gateway now, not at the next tick.
        let mut peers = peers;
        peers.sort();
        peers.dedup();
        for addr in peers {
            let _ = pool.handle.gossip(addr);
        }
    } else if peers.is_empty() {
        for addr in wan_seeds(shared) {
            let _ = pool.handle.gossip(addr);
        }
    }
    known
}

/// chitchat gossips only with members its failure detector calls live; one whose first
/// exchanges were lost (or that went quiet in a cut) would be left alone for long. Once per
/// WAN interval, start a round with every gateway chitchat does not call live, among those
/// their regions list as gateways now (`listed`): a former gateway lingers in the pool as a
/// dead node for `dead_node_grace`, and poking each of those with a full digest every round
/// would cost far more than the pool itself. Also starts a round with each gateway heard of
/// that the pool has never met.
async fn poke_silent(shared: &Shared, listed: &HashSet<String>) {
    let wan = shared.wan.lock().await;
    let Some(pool) = wan.as_ref() else { return };
    let silent: Vec<SocketAddr> = {
        let c = pool.chitchat.lock().await;
        let me = c.self_chitchat_id().clone();
        let live: HashSet<&ChitchatId> = c.live_nodes().collect();
        let mut silent: Vec<SocketAddr> = c
            .node_states()
            .keys()
            .filter(|id| **id != me && id.node_id != me.node_id && !live.contains(id) && listed.contains(&*id.node_id))
            .map(|id| id.gossip_advertise_addr)
            .collect();
        // Gateways this agent has heard of (from join replies) that the pool has never met:
        // the pool met its seeds only if the first exchange got through, and a pool with one
        // member already (the region's other gateway) is not lonely, so nothing else would
        // ever try them again.
        let met: HashSet<SocketAddr> = c.node_states().keys().map(|id| id.gossip_advertise_addr).collect();
        silent.extend(wan_seeds(shared).into_iter().filter(|a| !met.contains(a)));
        silent.sort();
        silent.dedup();
        silent
    };
    for addr in silent {
        let _ = pool.handle.gossip(addr);
    }
}

/// Whether a gateway's summary sees at least half of its region's (not departed) members
/// alive. One that does not is more likely cut off from its region than speaking for it: a
/// member whose packets out were lost sees everyone else dead, elects itself, and at the heal
/// its summary reached the other regions as the freshest word on its region, so they showed
/// every member of it dead for a moment. Such a gateway neither unseats the others nor is
/// preferred to them; when no gateway of a region is credible (most of it really died), the
/// summaries are used as before.
fn credible(state: &chitchat::NodeState) -> bool {
    let (mut alive, mut dead) = (0usize, 0usize);
    for (_, v) in state.iter_prefix(SUMMARY_PREFIX) {
        if v.value.contains("\"state\":\"alive\"") {
            alive += 1;
        } else if v.value.contains("\"state\":\"dead\"") {
            dead += 1;
        }
    }
    alive >= dead
}

/// Copies the other regions' members and reachability from the WAN pool into this region.
/// Returns the node ids the other regions list as their gateways now (None without a pool).
async fn import(shared: &Shared, heard: &mut HashMap<ChitchatId, (u64, Instant)>) -> Option<HashSet<String>> {
    let now = Instant::now();
    // A region is reachable while one of its gateways' heartbeats advanced this recently.
    let window = (shared.config.gossip.interval * 4).max(Duration::from_secs(3));
    let region = &shared.config.local.region;
    let (reach, remote, listed) = {
        let wan = shared.wan.lock().await;
        let pool = wan.as_ref()?;
        let c = pool.chitchat.lock().await;
        let me = c.self_chitchat_id().clone();
        // Per region: (fresh, gateway id, when its heartbeat last advanced, credible).
        let mut by_region: BTreeMap<String, Vec<(bool, &ChitchatId, Instant, bool)>> = BTreeMap::new();
        for (id, state) in c.node_states() {
            if *id == me {
                continue;
            }
            let hb = u64::from(state.heartbeat());
            let entry = heard.entry(id.clone()).or_insert((hb, now));
            if entry.0 != hb {
                *entry = (hb, now);
            }
            let fresh = now.duration_since(entry.1) <= window;
            if let Some(r) = state.get(KEY_REGION)
                && r != region
            {
                by_region.entry(r.to_string()).or_default().push((fresh, id, entry.1, credible(state)));
            }
        }
        heard.retain(|id, _| c.node_states().contains_key(id));
        // A gateway that a fresher gateway of its own region no longer lists (it died, left or
        // was demoted there) is stale at once, not only when its heartbeat has been silent for
        // the whole window: the other regions switch to the live gateway's summaries as soon
        // as it says so.
        for gateways in by_region.values_mut() {
            let lists: Vec<(Instant, Option<&str>)> =
                gateways.iter().map(|g| (g.2, c.node_state(g.1).and_then(|s| s.get(KEY_GATEWAYS)))).collect();
            let lists: Vec<_> = lists.into_iter().zip(gateways.iter().map(|g| g.3)).collect();
            for g in gateways.iter_mut() {
                let dropped = lists.iter().any(|((at, list), credible)| {
                    *credible && *at > g.2 && list.is_some_and(|l| !l.split(',').any(|id| id == &*g.1.node_id))
                });
                if dropped {
                    g.0 = false;
                }
            }
        }
        let mut reach: BTreeMap<String, RegionInfo> = BTreeMap::new();
        let mut remote: BTreeMap<String, String> = BTreeMap::new();
        let mut listed: HashSet<String> = HashSet::new();
        for (r, mut gateways) in by_region {
            // The region's own word on its gateways: the list of the one heard most recently.
            let current: Option<HashSet<String>> = gateways
                .iter()
                .max_by_key(|g| g.2)
                .and_then(|g| c.node_state(g.1))
                .and_then(|s| s.get(KEY_GATEWAYS))
                .map(|l| l.split(',').filter(|id| !id.is_empty()).map(str::to_string).collect());
            // Fresh ones first, credible ones next, then by id (and the newest instance of a
            // restarted gateway). Among silent ones the last heard from goes first: it has the
            // region's latest word (the last of a region's gateways to leave says that every
            // member left; an earlier one still shows it alive, which would read unreachable).
            let key = |g: &(bool, &ChitchatId, Instant, bool)| {
                (
                    !g.0,
                    !g.3,
                    (!g.0).then_some(std::cmp::Reverse(g.2)),
                    g.1.node_id.clone(),
                    std::cmp::Reverse(g.1.generation_id),
                )
            };
            gateways.sort_by_key(key);
            let reachable = gateways.iter().any(|g| g.0);
            // An unreachable region shows the gateways it last listed, not every former one.
            let mut ids: Vec<String> = gateways
                .iter()
                .filter(|g| g.0 || (!reachable && current.as_ref().is_none_or(|l| l.contains(&*g.1.node_id))))
                .map(|g| g.1.node_id.to_string())
                .collect();
            ids.dedup();
            listed.extend(current.unwrap_or_else(|| ids.iter().cloned().collect()));
            reach.insert(r.clone(), RegionInfo { gateways: ids, reachable });
            if let Some((_, source, ..)) = gateways.first()
                && let Some(state) = c.node_state(source)
            {
                for (k, v) in state.iter_prefix(SUMMARY_PREFIX) {
                    remote.insert(format!("{REMOTE_PREFIX}{}", &k[SUMMARY_PREFIX.len()..]), v.value.clone());
                }
            }
        }
        (reach, remote, listed)
    };
    let mut c = shared.region.lock().await;
    let state = c.self_node_state();
    let before = state.max_version();
    replace_prefixed(state, REMOTE_PREFIX, remote);
    state.set(KEY_REACH, serde_json::to_string(&reach).unwrap_or_default());
    if state.max_version() != before {
        shared.changed();
    }
    Some(listed)
}

/// Makes the keys under `prefix` exactly `keys`: others under it are deleted; unchanged values
/// keep their versions (chitchat's `set` ignores an equal value).
fn replace_prefixed(state: &mut chitchat::NodeState, prefix: &str, keys: BTreeMap<String, String>) {
    let stale: Vec<String> = state
        .key_values()
        .filter(|(k, _)| k.starts_with(prefix) && !keys.contains_key(*k))
        .map(|(k, _)| k.to_string())
        .collect();
    for k in stale {
        state.delete(&k);
    }
    for (k, v) in keys {
        state.set(k, v);
    }
}

/// True the first time an event id passes through this gateway (in either direction).
fn first_relay(shared: &Shared, id: &str) -> bool {
    let mut relayed = shared.relayed.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    let keep = shared.config.event_ttl * 2;
    if relayed.len() > 1024 {
        relayed.retain(|_, at| now.duration_since(*at) < keep);
    }
    relayed.insert(id.to_string(), now).is_none()
}

/// Copies an event of this region into the WAN pool, if this agent is a gateway.
pub(crate) async fn relay_to_wan(shared: &Shared, id: &str, value: &str) {
    let wan = shared.wan.lock().await;
    let Some(pool) = wan.as_ref() else { return };
    if !first_relay(shared, id) {
        return;
    }
    pool.chitchat.lock().await.self_node_state().set_with_ttl(format!("{EVENT_PREFIX}{id}"), value);
    let peers: HashSet<SocketAddr> = {
        let c = pool.chitchat.lock().await;
        c.node_states().keys().map(|id| id.gossip_advertise_addr).collect()
    };
    for addr in peers.into_iter().filter(|a| *a != shared.config.gossip_advertise) {
        let _ = pool.handle.gossip(addr);
    }
}

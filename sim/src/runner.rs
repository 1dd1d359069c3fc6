//! Runs a scenario: N agents' real membership stack (the agent's chitchat adapter, sealed
//! transport and snapshot code) over the simulated network, on tokio's paused clock, applying
//! the timeline and recording what every agent sees.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grapevine_agent::cluster::routing;
use grapevine_agent::cluster::snapshot::{LocalNode, MemberState, ServiceRecord, Snapshot};
use grapevine_agent::config::GossipSettings;
use grapevine_agent::events::EventHub;
use grapevine_agent::membership::keyring::Keyring;
use grapevine_agent::membership::transport::Wire;
use grapevine_agent::membership::{Membership, MembershipConfig};
use grapevine_agent::metrics::Metrics;
use serde::Serialize;
use tokio::time::Instant;

use crate::net::{Side, SimNet};
use crate::scenario::{Scenario, parse_duration};

/// One simulated node.
struct Node {
    id: String,
    region: usize,
    addr: SocketAddr,
    generation: u64,
    membership: Option<Arc<Membership>>,
    /// Running and not left.
    up: bool,
    left: bool,
}

/// A fault or change as applied, at its simulated time.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Applied {
    pub t: f64,
    pub action: String,
    pub detail: String,
    /// Nodes it concerns.
    #[serde(skip)]
    pub nodes: Vec<String>,
    /// Agents running when it happened, other than those it concerns.
    #[serde(skip)]
    pub observers: Vec<String>,
    /// For a partition: (observer, subject) pairs cut apart, each expected to see the other dead.
    #[serde(skip)]
    pub cut_pairs: Vec<(String, String)>,
    /// For a restart or join: the generation each node now runs.
    #[serde(skip)]
    pub generations: Vec<(String, u64)>,
}

/// One agent's view of one member changed.
#[derive(Debug, Clone)]
pub struct Transition {
    pub t: f64,
    pub observer: String,
    pub subject: String,
    pub state: Option<MemberState>,
    /// The observer's previous view of the subject (None: first sighting).
    pub from: Option<MemberState>,
    /// The subject's generation (incarnation) in the observer's view.
    pub generation: u64,
    /// Whether, at that moment, the subject was running and reachable from the observer.
    pub subject_up_and_reachable: bool,
}

/// Everything recorded during a run.
#[derive(Debug, Default)]
pub struct Recording {
    pub regions: Vec<String>,
    pub applied: Vec<Applied>,
    pub transitions: Vec<Transition>,
    /// (t, observers' region, observed region, mean members of the observed region that the
    /// observers see alive, members of it actually running).
    pub seen_alive: Vec<(f64, String, String, f64, usize)>,
    /// (t, region, share of sampled keys on which every up agent of the region agrees).
    pub ring_agreement: Vec<(f64, String, f64)>,
    /// (t, bytes per up node per second over the last sample, datagrams likewise).
    pub traffic: Vec<(f64, f64, f64)>,
    /// (t, every up agent sees every up node alive).
    pub complete: Vec<(f64, bool)>,
    /// (index into `applied`, share of sampled sessions whose instance changed, the ideal
    /// share) as seen by one agent of the changed region, before the event and once it settled.
    pub sessions_moved: Vec<(usize, f64, f64)>,
    /// (t, running nodes, bytes sent so far by each layer in [`LAYERS`] order), every sample.
    pub layer_bytes: Vec<(f64, usize, Vec<u64>)>,
    /// (t, observer, subject, whether the observer sees the subject's `web` instance healthy),
    /// recorded when it changes.
    pub health: Vec<(f64, String, String, bool)>,
    /// (t, region, its gateways as another region sees them), recorded when they change.
    pub gateways: Vec<(f64, String, Vec<String>)>,
    pub total_bytes: u64,
    /// Bytes sent by membership layer (region pool, swim, wan, ping, join), all nodes.
    pub bytes_by_layer: std::collections::BTreeMap<String, u64>,
    pub total_datagrams: u64,
    pub node_seconds: f64,
    pub max_nodes: usize,
    pub wall_seconds: f64,
}

/// The one service every simulated node fronts.
fn web_service(healthy: bool) -> ServiceRecord {
    ServiceRecord { name: "web".into(), port: 3000, weight: 100, healthy, load: 0, pinned: false, draining: false }
}

/// The membership layers whose sent bytes are counted apart.
pub const LAYERS: [&str; 6] = ["region", "swim", "hint", "wan", "ping", "join"];

/// Bytes sent so far by each layer, over every node incarnation.
fn layer_totals(all: &[Arc<Metrics>]) -> Vec<u64> {
    LAYERS
        .iter()
        .map(|layer| {
            all.iter()
                .map(|m| m.sent_bytes.get_or_create(&grapevine_agent::metrics::KindLabel { kind: layer }).get())
                .sum()
        })
        .collect()
}

struct World {
    nodes: Vec<Node>,
    net: SimNet,
    keyring: Keyring,
    regions: Vec<String>,
    seeds: Vec<String>,
    gossip: GossipSettings,
    next_generation: u64,
    /// Every node incarnation's metrics, for the per-layer byte counts.
    all_metrics: Vec<Arc<Metrics>>,
}

impl World {
    async fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        self.next_generation += 1;
        let generation = self.next_generation;
        let node = &mut self.nodes[i];
        node.generation = generation;
        let socket = self.net.attach(node.addr, node.region);
        let metrics = Arc::new(Metrics::new());
        self.all_metrics.push(metrics.clone());
        let wire = Wire::new(socket, self.keyring.clone(), "sim", metrics.clone());
        let local = LocalNode {
            id: node.id.clone(),
            region: self.regions[node.region].clone(),
            zone: format!("{}-a", self.regions[node.region]),
            version: "sim".into(),
            cluster: "sim".into(),
        };
        let config = MembershipConfig {
            local,
            generation,
            gossip_advertise: node.addr,
            data_advertise: Some(SocketAddr::new(node.addr.ip(), 7947)),
            seeds: self.seeds.iter().filter(|s| **s != node.addr.to_string()).cloned().collect(),
            gossip: self.gossip.clone(),
            event_ttl: Duration::from_secs(60),
        };
        let events = Arc::new(EventHub::new(metrics.clone(), 512, Duration::from_secs(60), 0));
        let m = Arc::new(Membership::start(config, wire, events, metrics).await?);
        m.set_services(&[web_service(true)]).await;
        node.membership = Some(m);
        node.up = true;
        node.left = false;
        Ok(())
    }

    fn index(&self, id: &str) -> anyhow::Result<usize> {
        self.nodes.iter().position(|n| n.id == id).ok_or_else(|| anyhow::anyhow!("no node named {id:?}"))
    }

    fn region(&self, name: &str) -> anyhow::Result<usize> {
        self.regions.iter().position(|r| r == name).ok_or_else(|| anyhow::anyhow!("no region named {name:?}"))
    }

    /// A side of a partition or lossy link: each name a region, else a node id.
    fn side(&self, names: &[String]) -> anyhow::Result<Side> {
        let mut side = Side::default();
        for name in names {
            match self.region(name) {
                Ok(r) => {
                    side.regions.insert(r);
                }
                Err(_) => {
                    let i = self.index(name).map_err(|_| anyhow::anyhow!("{name:?} is neither a region nor a node"))?;
                    side.nodes.insert(self.nodes[i].addr);
                }
            }
        }
        Ok(side)
    }

    fn add_node(&mut self, region: usize) -> usize {
        let index = self.nodes.iter().filter(|n| n.region == region).count();
        let id = format!("{}-{}", self.regions[region], index + 1);
        self.nodes.push(Node {
            id,
            region,
            addr: SimNet::address(region, index),
            generation: 0,
            membership: None,
            up: false,
            left: false,
        });
        self.nodes.len() - 1
    }

    async fn crash(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if let Some(m) = node.membership.take() {
            m.shutdown().await;
        }
        self.net.detach(node.addr);
        node.up = false;
    }
}

/// Runs the scenario with `seed`. Must run on a current-thread runtime with the clock paused.
pub async fn run(scenario: &Scenario, seed: u64) -> anyhow::Result<Recording> {
    let wall = std::time::SystemTime::now();
    let regions: Vec<String> = scenario.regions.iter().map(|r| r.name.clone()).collect();
    let net_spec = &scenario.network;
    let local = parse_duration("network.local", net_spec.local.as_deref().unwrap_or("1ms"))?;
    let remote = parse_duration("network.remote", net_spec.remote.as_deref().unwrap_or("40ms"))?;
    let mut latency = vec![vec![remote; regions.len()]; regions.len()];
    for (i, row) in latency.iter_mut().enumerate() {
        row[i] = local;
    }
    let mut pair_loss = Vec::new();
    for p in &net_spec.pairs {
        let a = regions
            .iter()
            .position(|r| *r == p.a)
            .ok_or_else(|| anyhow::anyhow!("network.pair: no region {:?}", p.a))?;
        let b = regions
            .iter()
            .position(|r| *r == p.b)
            .ok_or_else(|| anyhow::anyhow!("network.pair: no region {:?}", p.b))?;
        if let Some(l) = &p.latency {
            let d = parse_duration("network.pair.latency", l)?;
            latency[a][b] = d;
            latency[b][a] = d;
        }
        pair_loss.extend(p.loss.map(|rate| (a, b, rate)));
    }
    let net = SimNet::new(latency, net_spec.jitter.unwrap_or(0.1), net_spec.loss.unwrap_or(0.0), seed);
    for (a, b, rate) in pair_loss {
        let side = |r: usize| Side { regions: [r].into(), nodes: Default::default() };
        net.set_link_loss(side(a), side(b), false, rate);
    }
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    let gossip = scenario.gossip_settings()?;
    let mut world = World {
        nodes: Vec::new(),
        net: net.clone(),
        keyring: Keyring::from_keys(vec![key]),
        regions: regions.clone(),
        seeds: Vec::new(),
        gossip,
        next_generation: 0,
        all_metrics: Vec::new(),
    };
    for (r, spec) in scenario.regions.iter().enumerate() {
        for _ in 0..spec.nodes {
            world.add_node(r);
        }
    }
    // Seeds: the first node of each region, as a deployment would list them.
    world.seeds = (0..regions.len()).map(|r| SimNet::address(r, 0).to_string()).collect();
    let start = Instant::now();
    let elapsed = move || start.elapsed().as_secs_f64();
    for i in 0..world.nodes.len() {
        world.start_node(i).await?;
    }

    let recording = Arc::new(Mutex::new(Recording { regions: regions.clone(), ..Default::default() }));
    let world = Arc::new(tokio::sync::Mutex::new(world));
    let observer = tokio::spawn(observe(world.clone(), recording.clone(), elapsed));

    let mut events = scenario.events.clone();
    events.sort_by_key(|e| parse_duration("event.at", &e.at).unwrap_or_default());
    let mut event_times: Vec<std::time::Duration> =
        events.iter().map(|e| parse_duration("event.at", &e.at).unwrap_or_default()).collect();
    event_times.push(scenario.duration());
    for (k, e) in events.into_iter().enumerate() {
        let at = parse_duration("event.at", &e.at)?;
        tokio::time::sleep_until(start + at).await;
        let mut w = world.lock().await;
        let t = elapsed();
        // Sessions moved: one agent of the affected region maps sampled keys before the change
        // and again once it has settled (10 s later, or just before the next event).
        let probe = match (e.action.as_str(), &e.node, &e.region) {
            ("crash" | "restart" | "leave", Some(n), _) => w.index(n).ok().map(|i| w.nodes[i].region),
            ("join", _, Some(r)) => w.region(r).ok(),
            _ => None,
        }
        .and_then(|region| {
            let affected = e.node.clone().unwrap_or_default();
            let was_up = w.nodes.iter().any(|n| n.id == affected && n.up);
            let reference = w.nodes.iter().position(|n| n.up && n.region == region && n.id != affected)?;
            let before = session_map(&w.nodes[reference]);
            let instances = before_instances(&w, region);
            Some((reference, before, instances, was_up))
        });
        let mut applied = Applied {
            t,
            action: e.action.clone(),
            detail: String::new(),
            nodes: Vec::new(),
            observers: Vec::new(),
            cut_pairs: Vec::new(),
            generations: Vec::new(),
        };
        match e.action.as_str() {
            "crash" => {
                let targets: Vec<usize> = match (&e.node, &e.region) {
                    (Some(n), _) => vec![w.index(n)?],
                    (None, Some(r)) => {
                        let r = w.region(r)?;
                        (0..w.nodes.len()).filter(|&i| w.nodes[i].region == r && w.nodes[i].up).collect()
                    }
                    _ => vec![],
                };
                for i in targets {
                    applied.nodes.push(w.nodes[i].id.clone());
                    w.crash(i).await;
                }
                applied.detail = applied.nodes.join(",");
            }
            "restart" => {
                let i = w.index(e.node.as_deref().unwrap_or_default())?;
                w.crash(i).await;
                w.start_node(i).await?;
                applied.nodes.push(w.nodes[i].id.clone());
                applied.detail = w.nodes[i].id.clone();
            }
            "leave" => {
                let i = w.index(e.node.as_deref().unwrap_or_default())?;
                if let Some(m) = w.nodes[i].membership.take() {
                    // Leaving takes a few gossip rounds of simulated time; the node counts as
                    // gone from now on.
                    let (net, addr) = (w.net.clone(), w.nodes[i].addr);
                    tokio::spawn(async move {
                        m.leave().await;
                        net.detach(addr);
                    });
                }
                w.nodes[i].up = false;
                w.nodes[i].left = true;
                applied.nodes.push(w.nodes[i].id.clone());
                applied.detail = w.nodes[i].id.clone();
            }
            "join" => {
                let r = w.region(e.region.as_deref().unwrap_or_default())?;
                for _ in 0..e.count.unwrap_or(0) {
                    let i = w.add_node(r);
                    w.start_node(i).await?;
                    applied.nodes.push(w.nodes[i].id.clone());
                }
                applied.detail = format!("{} nodes in {}", applied.nodes.len(), w.regions[r]);
            }
            "partition" => {
                let (a, b) = e.between.clone().unwrap_or_default();
                w.net.partition(w.side(&a)?, w.side(&b)?, e.one_way);
                for o in w.nodes.iter().filter(|n| n.up) {
                    for s in w.nodes.iter().filter(|n| n.up && n.id != o.id && !w.net.reachable(n.addr, o.addr)) {
                        applied.cut_pairs.push((o.id.clone(), s.id.clone()));
                    }
                }
                applied.detail = format!("{} {} {}", a.join("+"), if e.one_way { "->" } else { "<->" }, b.join("+"));
            }
            "heal" => w.net.heal(),
            "unhealthy" | "healthy" => {
                let i = w.index(e.node.as_deref().unwrap_or_default())?;
                if let Some(m) = &w.nodes[i].membership {
                    m.set_services(&[web_service(e.action == "healthy")]).await;
                }
                applied.nodes.push(w.nodes[i].id.clone());
                applied.detail = w.nodes[i].id.clone();
            }
            "loss" => {
                let rate = e.rate.unwrap_or(0.0);
                match &e.between {
                    Some((a, b)) => {
                        w.net.set_link_loss(w.side(a)?, w.side(b)?, e.one_way, rate);
                        applied.detail = format!(
                            "{:.0}% {} {} {}",
                            rate * 100.0,
                            a.join("+"),
                            if e.one_way { "->" } else { "<->" },
                            b.join("+")
                        );
                    }
                    None => {
                        w.net.set_loss(rate);
                        applied.detail = format!("{:.0}%", rate * 100.0);
                    }
                }
            }
            _ => {}
        }
        applied.generations = applied
            .nodes
            .iter()
            .filter_map(|id| w.nodes.iter().find(|n| &n.id == id))
            .map(|n| (n.id.clone(), n.generation))
            .collect();
        applied.observers =
            w.nodes.iter().filter(|n| n.up && !applied.nodes.contains(&n.id)).map(|n| n.id.clone()).collect();
        let changed = applied.nodes.len();
        let index = {
            let mut r = recording.lock().unwrap_or_else(|e| e.into_inner());
            r.applied.push(applied);
            r.applied.len() - 1
        };
        if let Some((reference, before, instances, was_up)) = probe {
            let settle = (start + event_times[k + 1].min(at + Duration::from_secs(10)))
                .checked_sub(Duration::from_millis(100))
                .unwrap_or(start);
            let (world, recording) = (world.clone(), recording.clone());
            let action = e.action.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(settle).await;
                let w = world.lock().await;
                if !w.nodes[reference].up {
                    return;
                }
                let after = session_map(&w.nodes[reference]);
                let moved =
                    before.iter().zip(&after).filter(|(a, b)| a != b).count() as f64 / before.len().max(1) as f64;
                // Removing k of n instances moves k/n of the sessions; adding k to n moves k/(n+k);
                // restarting a crashed node adds it back; restarting a running one moves nothing
                // once the new generation is known.
                let n = instances.max(1) as f64;
                let k = changed as f64;
                let ideal = match action.as_str() {
                    "join" => k / (n + k),
                    "restart" if was_up => 0.0,
                    "restart" => k / (n + k),
                    _ => k / n,
                };
                recording.lock().unwrap_or_else(|e| e.into_inner()).sessions_moved.push((index, moved, ideal));
            });
        }
    }
    tokio::time::sleep_until(start + scenario.duration()).await;
    observer.abort();
    let mut w = world.lock().await;
    for i in 0..w.nodes.len() {
        if w.nodes[i].up {
            w.crash(i).await;
        }
    }
    let by_layer: std::collections::BTreeMap<String, u64> =
        LAYERS.iter().zip(layer_totals(&w.all_metrics)).map(|(l, n)| (l.to_string(), n)).collect();
    let mut rec =
        Arc::try_unwrap(recording).map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner())).unwrap_or_default();
    rec.wall_seconds = wall.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let traffic = net.traffic();
    rec.total_bytes = traffic.bytes;
    rec.bytes_by_layer = by_layer;
    rec.total_datagrams = traffic.datagrams;
    Ok(rec)
}

const SESSION_KEYS: usize = 1000;

/// Which instance of `web` each of the sampled session keys goes to, from `node`.
fn session_map(node: &Node) -> Vec<Option<String>> {
    let Some(m) = &node.membership else { return vec![None; SESSION_KEYS] };
    let snap = m.snapshots().borrow().clone();
    (0..SESSION_KEYS)
        .map(|k| {
            routing::route(&snap, "web", Some(&format!("user-{k}")), &mut |_| 0)
                .ok()
                .and_then(|r| r.chosen)
                .map(|c| c.node)
        })
        .collect()
}

/// Instances running in `region` before a change (restarting nodes count as absent).
fn before_instances(w: &World, region: usize) -> usize {
    w.nodes.iter().filter(|n| n.region == region && n.up).count()
}

/// Samples every agent's snapshot: state changes, members seen alive, ring agreement, traffic.
async fn observe(world: Arc<tokio::sync::Mutex<World>>, rec: Arc<Mutex<Recording>>, elapsed: impl Fn() -> f64) {
    let (sample, keys) = {
        let w = world.lock().await;
        let n = w.nodes.len();
        (
            if n <= 100 { Duration::from_millis(100) } else { Duration::from_millis(500) },
            if n <= 100 { 100 } else { 20 },
        )
    };
    let keys: Vec<String> = (0..keys).map(|k| format!("session-{k}")).collect();
    let mut views: BTreeMap<String, BTreeMap<String, (MemberState, u64)>> = BTreeMap::new();
    let mut health_views: BTreeMap<String, BTreeMap<String, bool>> = BTreeMap::new();
    // Each observer's snapshot at the last sample: an unchanged one has no transitions.
    let mut last_snaps: std::collections::HashMap<usize, Arc<Snapshot>> = std::collections::HashMap::new();
    type Choices = Vec<Option<String>>;
    let mut route_cache: std::collections::HashMap<usize, (Arc<Snapshot>, Choices)> = std::collections::HashMap::new();
    let mut last_traffic = (0.0, 0u64, 0u64);
    let mut tick = tokio::time::interval(sample);
    let mut since_agreement = Duration::ZERO;
    loop {
        tick.tick().await;
        let t = elapsed();
        let w = world.lock().await;
        let up: Vec<usize> = (0..w.nodes.len()).filter(|&i| w.nodes[i].up).collect();
        let snaps: Vec<(usize, Arc<Snapshot>)> = up
            .iter()
            .filter_map(|&i| w.nodes[i].membership.as_ref().map(|m| (i, m.snapshots().borrow().clone())))
            .collect();
        let up_ids: std::collections::BTreeSet<&str> = up.iter().map(|&i| w.nodes[i].id.as_str()).collect();
        let mut r = rec.lock().unwrap_or_else(|e| e.into_inner());
        r.max_nodes = r.max_nodes.max(up.len());
        r.node_seconds += up.len() as f64 * sample.as_secs_f64();
        let by_id: std::collections::HashMap<&str, usize> =
            w.nodes.iter().enumerate().map(|(i, n)| (n.id.as_str(), i)).collect();
        // State changes per observer.
        for (i, snap) in &snaps {
            if last_snaps.get(i).is_some_and(|last| Arc::ptr_eq(last, snap)) {
                continue;
            }
            last_snaps.insert(*i, snap.clone());
            let observer = &w.nodes[*i];
            let health = health_views.entry(observer.id.clone()).or_default();
            for m in &snap.members {
                if let Some(web) = m.services.iter().find(|s| s.name == "web")
                    && health.get(&m.id) != Some(&web.healthy)
                {
                    health.insert(m.id.clone(), web.healthy);
                    r.health.push((t, observer.id.clone(), m.id.clone(), web.healthy));
                }
            }
            let view = views.entry(observer.id.clone()).or_default();
            let mut now: BTreeMap<String, (MemberState, u64)> = BTreeMap::new();
            for m in &snap.members {
                if m.id != observer.id {
                    now.insert(m.id.clone(), (m.state, m.generation));
                }
            }
            for (id, (state, generation)) in &now {
                if view.get(id) != Some(&(*state, *generation)) {
                    let subject = by_id.get(id.as_str()).map(|&k| &w.nodes[k]);
                    // Only the incarnation that is running counts: an old generation dying
                    // after a restart is not a false alarm.
                    let ok = subject.is_some_and(|s| {
                        s.up && s.generation == *generation
                            && w.net.reachable(observer.addr, s.addr)
                            && w.net.reachable(s.addr, observer.addr)
                    });
                    r.transitions.push(Transition {
                        t,
                        observer: observer.id.clone(),
                        subject: id.clone(),
                        state: Some(*state),
                        from: view.get(id).filter(|(_, g)| g == generation).map(|(s, _)| *s),
                        generation: *generation,
                        subject_up_and_reachable: ok,
                    });
                }
            }
            *view = now;
        }
        // Members seen alive, per region, and whether every view is complete: one pass over
        // each snapshot.
        let nregions = w.regions.len();
        let region_index: std::collections::HashMap<&str, usize> =
            w.regions.iter().enumerate().map(|(k, r)| (r.as_str(), k)).collect();
        let mut running = vec![0usize; nregions];
        for &i in &up {
            running[w.nodes[i].region] += 1;
        }
        // sums[from][of]: members of `of` seen up, summed over observers in `from`, and observers.
        let mut sums = vec![vec![(0usize, 0usize); nregions]; nregions];
        let mut complete = true;
        for (i, snap) in &snaps {
            let mut seen = vec![0usize; nregions];
            let mut seen_running = vec![0usize; nregions];
            for m in snap.members.iter().filter(|m| m.state.is_up()) {
                if let Some(&k) = region_index.get(m.region.as_str()) {
                    seen[k] += 1;
                    if up_ids.contains(m.id.as_str()) {
                        seen_running[k] += 1;
                    }
                }
            }
            let from = w.nodes[*i].region;
            for k in 0..nregions {
                sums[from][k].0 += seen[k];
                sums[from][k].1 += 1;
                if seen_running[k] < running[k] {
                    complete = false;
                }
            }
        }
        for (ri, region) in w.regions.iter().enumerate() {
            for (fi, from) in sums.iter().enumerate() {
                let (sum, n) = from[ri];
                if n > 0 {
                    r.seen_alive.push((t, w.regions[fi].clone(), region.clone(), sum as f64 / n as f64, running[ri]));
                }
            }
        }
        r.complete.push((t, complete));
        // Each region's gateways, as the first agent of another region sees them.
        for (ri, region) in w.regions.iter().enumerate() {
            let observer = snaps
                .iter()
                .find(|(i, _)| w.nodes[*i].region != ri)
                .or_else(|| snaps.iter().find(|(i, _)| w.nodes[*i].region == ri));
            if let Some((_, snap)) = observer {
                let now = snap.region_info.get(region).map(|g| g.gateways.clone()).unwrap_or_default();
                let last = r.gateways.iter().rev().find(|(_, reg, _)| reg == region).map(|(_, _, g)| g);
                if last != Some(&now) {
                    r.gateways.push((t, region.clone(), now));
                }
            }
        }
        r.layer_bytes.push((t, up.len(), layer_totals(&w.all_metrics)));
        // Traffic over the last sample.
        let traffic = w.net.traffic();
        let dt = t - last_traffic.0;
        if dt > 0.0 && !up.is_empty() {
            let bps = (traffic.bytes - last_traffic.1) as f64 / dt / up.len() as f64;
            let dps = (traffic.datagrams - last_traffic.2) as f64 / dt / up.len() as f64;
            r.traffic.push((t, bps, dps));
        }
        last_traffic = (t, traffic.bytes, traffic.datagrams);
        // Ring agreement once a second: does every up agent of a region pick the same instance?
        since_agreement += sample;
        if since_agreement >= Duration::from_secs(1) {
            since_agreement = Duration::ZERO;
            // Each agent's choices, recomputed only when its snapshot changed.
            for (i, snap) in &snaps {
                if route_cache.get(i).is_none_or(|(s, _)| !Arc::ptr_eq(s, snap)) {
                    let chosen = keys
                        .iter()
                        .map(|k| {
                            routing::route(snap, "web", Some(k.as_str()), &mut |_| 0)
                                .ok()
                                .and_then(|r| r.chosen)
                                .map(|c| c.node)
                        })
                        .collect();
                    route_cache.insert(*i, (snap.clone(), chosen));
                }
            }
            for (ri, region) in w.regions.iter().enumerate() {
                let members: Vec<&Vec<Option<String>>> = snaps
                    .iter()
                    .filter(|(i, _)| w.nodes[*i].region == ri)
                    .filter_map(|(i, _)| route_cache.get(i).map(|(_, c)| c))
                    .collect();
                if members.is_empty() {
                    continue;
                }
                let agreed = (0..keys.len())
                    .filter(|&k| {
                        let first = &members[0][k];
                        first.is_some() && members.iter().all(|c| &c[k] == first)
                    })
                    .count();
                r.ring_agreement.push((t, region.clone(), agreed as f64 / keys.len() as f64));
            }
        }
    }
}

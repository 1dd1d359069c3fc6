//! The cluster snapshot: an immutable picture of every member and service instance, built from
//! what the membership layer knows, plus one ring per service over its healthy instances.
//! Everything above membership (routing, the admin API, the CLI, `sim`) reads snapshots only.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use grapevine_ring::{Member, Ring};
use serde::{Deserialize, Serialize};

/// A member's state as everyone sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    Alive,
    Suspect,
    Dead,
    Left,
    /// In another region that this agent's region cannot currently reach (a cut between
    /// regions): not known to be dead, and not routable.
    Unreachable,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Dead => "dead",
            MemberState::Left => "left",
            MemberState::Unreachable => "unreachable",
        }
    }

    /// Alive or suspect: still counted as reachable for routing.
    pub fn is_up(self) -> bool {
        matches!(self, MemberState::Alive | MemberState::Suspect)
    }
}

/// What the failure detector says of a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    /// Alive, but nothing heard from it for a while.
    Suspect,
    Dead,
    /// Its region cannot be reached from ours.
    Unreachable,
}

/// What a member says of itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Lifecycle {
    #[default]
    Active,
    /// Shutting down: takes no new work.
    Draining,
    /// Left the cluster on purpose.
    Left,
}

/// One service instance as its agent announces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub name: String,
    pub port: u16,
    pub weight: u32,
    pub healthy: bool,
    pub load: u64,
    #[serde(default)]
    pub pinned: bool,
    #[serde(default)]
    pub draining: bool,
}

/// A member's gossip keyring as it announces it (`agent keys`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyringView {
    /// Key fingerprints, primary first; empty from an agent that does not announce them.
    pub keys: Vec<String>,
    /// Its keyring file could not be written (a read-only mount, say) and lacks the key it seals
    /// with: restarted from it, the member would be cut off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unsaved: bool,
}

impl KeyringView {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && !self.unsaved
    }
}

/// One member as the membership layer knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberRecord {
    pub id: String,
    pub generation: u64,
    pub region: String,
    pub zone: String,
    pub gossip_addr: SocketAddr,
    pub data_addr: Option<SocketAddr>,
    pub version: String,
    pub liveness: Liveness,
    pub lifecycle: Lifecycle,
    pub services: Vec<ServiceRecord>,
    pub keyring: KeyringView,
}

/// A member in the snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberView {
    pub id: String,
    pub region: String,
    pub zone: String,
    pub gossip_addr: SocketAddr,
    pub data_addr: Option<SocketAddr>,
    pub state: MemberState,
    pub generation: u64,
    pub version: String,
    pub draining: bool,
    pub services: Vec<InstanceView>,
    /// Smoothed round-trip time from this agent, in milliseconds; null when not measured.
    pub rtt_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "KeyringView::is_empty")]
    pub keyring: KeyringView,
}

/// A service instance on a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceView {
    pub name: String,
    pub healthy: bool,
    pub load: u64,
    pub weight: u32,
    pub port: u16,
    pub pinned: bool,
    pub draining: bool,
}

/// Per-service counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSummary {
    pub name: String,
    pub instances: usize,
    pub healthy: usize,
    pub pinned: bool,
    /// Healthy instances per region.
    pub healthy_by_region: BTreeMap<String, usize>,
}

/// Who this agent is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalNode {
    pub id: String,
    pub region: String,
    pub zone: String,
    pub version: String,
    pub cluster: String,
}

/// The immutable cluster picture.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub local: LocalNode,
    /// Sorted by (region, id).
    pub members: Vec<MemberView>,
    pub services: BTreeMap<String, ServiceSummary>,
    /// One ring per service over its routable instances (member up, not draining, healthy,
    /// with a data address).
    pub rings: BTreeMap<String, Ring>,
    /// Lowest measured RTT to any up member of each region, in milliseconds; 0 for our own.
    pub region_rtt_ms: BTreeMap<String, f64>,
    /// Increases with every rebuild.
    pub epoch: u64,
    /// Per region: its gateways and whether this agent's region can reach it.
    pub region_info: BTreeMap<String, RegionInfo>,
}

/// A region as this agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RegionInfo {
    /// The members carrying this region's summary to and from the others.
    pub gateways: Vec<String>,
    /// False while a cut keeps this agent's region from hearing from it.
    pub reachable: bool,
}

impl Snapshot {
    /// An empty snapshot: only this node, nothing heard yet.
    pub fn empty(local: LocalNode) -> Snapshot {
        Snapshot {
            local,
            members: Vec::new(),
            services: BTreeMap::new(),
            rings: BTreeMap::new(),
            region_rtt_ms: BTreeMap::new(),
            epoch: 0,
            region_info: BTreeMap::new(),
        }
    }

    /// Builds a snapshot from membership records. For a node id seen with several generations
    /// (a restarted node), the newest generation wins. `rtt` gives measured RTTs by gossip
    /// address.
    pub fn build(
        local: LocalNode,
        records: impl IntoIterator<Item = MemberRecord>,
        rtt: &dyn Fn(&SocketAddr) -> Option<f64>,
        epoch: u64,
    ) -> Snapshot {
        let mut newest: BTreeMap<String, MemberRecord> = BTreeMap::new();
        for r in records {
            match newest.get(&r.id) {
                Some(existing) if existing.generation >= r.generation => {}
                _ => {
                    newest.insert(r.id.clone(), r);
                }
            }
        }
        let mut members: Vec<MemberView> = newest
            .into_values()
            .map(|r| {
                let state = match (r.lifecycle, r.liveness) {
                    (Lifecycle::Left, _) => MemberState::Left,
                    (_, Liveness::Alive) => MemberState::Alive,
                    (_, Liveness::Suspect) => MemberState::Suspect,
                    (_, Liveness::Dead) => MemberState::Dead,
                    (_, Liveness::Unreachable) => MemberState::Unreachable,
                };
                let is_local = r.id == local.id;
                let mut services: Vec<InstanceView> = r
                    .services
                    .into_iter()
                    .map(|s| InstanceView {
                        name: s.name,
                        healthy: s.healthy,
                        load: s.load,
                        weight: s.weight,
                        port: s.port,
                        pinned: s.pinned,
                        draining: s.draining,
                    })
                    .collect();
                services.sort_by(|a, b| a.name.cmp(&b.name));
                MemberView {
                    // A member not heard from has no current round-trip time, only its last.
                    rtt_ms: if is_local {
                        Some(0.0)
                    } else if state.is_up() {
                        rtt(&r.gossip_addr)
                    } else {
                        None
                    },
                    id: r.id,
                    region: r.region,
                    zone: r.zone,
                    gossip_addr: r.gossip_addr,
                    data_addr: r.data_addr,
                    state,
                    generation: r.generation,
                    version: r.version,
                    draining: r.lifecycle == Lifecycle::Draining,
                    services,
                    keyring: r.keyring,
                }
            })
            .collect();
        members.sort_by(|a, b| (&a.region, &a.id).cmp(&(&b.region, &b.id)));

        let mut services: BTreeMap<String, ServiceSummary> = BTreeMap::new();
        let mut ring_members: BTreeMap<String, Vec<Member>> = BTreeMap::new();
        let mut region_rtt_ms: BTreeMap<String, f64> = BTreeMap::new();
        region_rtt_ms.insert(local.region.clone(), 0.0);
        for m in &members {
            if m.state.is_up()
                && let Some(rtt) = m.rtt_ms
            {
                let entry = region_rtt_ms.entry(m.region.clone()).or_insert(f64::INFINITY);
                *entry = entry.min(rtt);
            }
            for s in &m.services {
                let summary = services.entry(s.name.clone()).or_insert_with(|| ServiceSummary {
                    name: s.name.clone(),
                    instances: 0,
                    healthy: 0,
                    pinned: false,
                    healthy_by_region: BTreeMap::new(),
                });
                if m.state == MemberState::Left {
                    continue;
                }
                summary.instances += 1;
                summary.pinned |= s.pinned;
                let routable = m.state.is_up() && !m.draining && s.healthy && !s.draining;
                if !routable {
                    continue;
                }
                summary.healthy += 1;
                *summary.healthy_by_region.entry(m.region.clone()).or_default() += 1;
                // An agent without certificates announces no data address: its app is healthy
                // (DNS lists it), but no agent can forward to it.
                if m.data_addr.is_some() {
                    ring_members
                        .entry(s.name.clone())
                        .or_default()
                        .push(Member::new(m.id.clone(), m.region.clone(), m.zone.clone()).with_weight(s.weight));
                }
            }
        }
        let rings = ring_members
            .into_iter()
            .filter_map(|(name, ms)| {
                let valid = ms.into_iter().filter(|m| (1..=grapevine_ring::MAX_WEIGHT).contains(&m.weight));
                Ring::new(valid).ok().map(|r| (name, r))
            })
            .collect();
        Snapshot { local, members, services, rings, region_rtt_ms, epoch, region_info: BTreeMap::new() }
    }

    pub fn member(&self, id: &str) -> Option<&MemberView> {
        self.members.iter().find(|m| m.id == id)
    }

    /// Counts by state.
    pub fn counts(&self) -> BTreeMap<MemberState, usize> {
        let mut c = BTreeMap::new();
        for s in
            [MemberState::Alive, MemberState::Suspect, MemberState::Dead, MemberState::Left, MemberState::Unreachable]
        {
            c.insert(s, 0);
        }
        for m in &self.members {
            *c.entry(m.state).or_default() += 1;
        }
        c
    }

    /// Distinct regions, sorted.
    pub fn regions(&self) -> Vec<String> {
        // Members are sorted by (region, id), so equal regions are adjacent.
        let mut r: Vec<String> = self.members.iter().map(|m| m.region.clone()).collect();
        r.dedup();
        r
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn local(id: &str, region: &str) -> LocalNode {
        LocalNode {
            id: id.into(),
            region: region.into(),
            zone: format!("{region}-a"),
            version: "0.1.0".into(),
            cluster: "t".into(),
        }
    }

    pub(crate) fn record(id: &str, region: &str, port: u16, services: &[(&str, bool)]) -> MemberRecord {
        MemberRecord {
            id: id.into(),
            generation: 1,
            region: region.into(),
            zone: format!("{region}-a"),
            gossip_addr: SocketAddr::from(([127, 0, 0, 1], port)),
            data_addr: Some(SocketAddr::from(([127, 0, 0, 1], port.wrapping_add(10_000)))),
            version: "0.1.0".into(),
            liveness: Liveness::Alive,
            lifecycle: Lifecycle::Active,
            services: services
                .iter()
                .map(|(name, healthy)| ServiceRecord {
                    name: name.to_string(),
                    port: 3000,
                    weight: 100,
                    healthy: *healthy,
                    load: 0,
                    pinned: false,
                    draining: false,
                })
                .collect(),
            keyring: KeyringView::default(),
        }
    }

    #[test]
    fn states_rings_and_counts() {
        let mut dead = record("c", "west", 3, &[("profile", true)]);
        dead.liveness = Liveness::Dead;
        let mut left = record("d", "west", 4, &[("profile", true)]);
        left.lifecycle = Lifecycle::Left;
        let records = vec![
            record("a", "east", 1, &[("profile", true), ("login", true)]),
            record("b", "east", 2, &[("profile", false)]),
            dead,
            left,
        ];
        let s = Snapshot::build(local("a", "east"), records, &|_| Some(1.5), 7);
        let states: Vec<_> = s.members.iter().map(|m| (m.id.as_str(), m.state)).collect();
        assert_eq!(
            states,
            [("a", MemberState::Alive), ("b", MemberState::Alive), ("c", MemberState::Dead), ("d", MemberState::Left)]
        );
        // Only healthy instances of up members are in the ring.
        let ring = &s.rings["profile"];
        assert_eq!(ring.len(), 1);
        assert_eq!(ring.members()[0].id, "a");
        let profile = &s.services["profile"];
        assert_eq!((profile.instances, profile.healthy), (3, 1));
        assert_eq!(s.counts()[&MemberState::Dead], 1);
        assert_eq!(s.regions(), ["east", "west"]);
        assert_eq!(s.member("a").unwrap().rtt_ms, Some(0.0));
        assert_eq!(s.member("b").unwrap().rtt_ms, Some(1.5));
    }

    #[test]
    fn an_instance_on_an_agent_without_a_data_plane_is_healthy_but_not_in_the_ring() {
        let mut gossip_only = record("b", "east", 2, &[("profile", true)]);
        gossip_only.data_addr = None;
        let records = vec![record("a", "east", 1, &[("profile", true)]), gossip_only];
        let s = Snapshot::build(local("a", "east"), records, &|_| None, 1);
        assert_eq!((s.services["profile"].instances, s.services["profile"].healthy), (2, 2));
        let ring = &s.rings["profile"];
        assert_eq!(ring.members().iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn the_newest_generation_of_a_restarted_node_wins() {
        let mut old = record("a", "east", 1, &[]);
        old.liveness = Liveness::Dead;
        let mut new = record("a", "east", 1, &[("profile", true)]);
        new.generation = 2;
        let s = Snapshot::build(local("x", "east"), vec![new, old], &|_| None, 1);
        assert_eq!(s.members.len(), 1);
        assert_eq!(s.members[0].state, MemberState::Alive);
        assert_eq!(s.members[0].generation, 2);
    }
}

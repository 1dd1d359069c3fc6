//! Routing decisions, pure: which instance a request for a service goes to from this agent, and
//! in what order to try the others.
//!
//! - Locality: the caller's region while it has routable instances; else the region with the
//!   lowest measured RTT (unmeasured regions last, then by name); a pinned service never leaves
//!   the caller's region.
//! - Keyed requests follow the service's ring (session affinity); unkeyed ones take the less
//!   loaded of two random instances of the first region that has any.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::snapshot::Snapshot;

/// How many instances after the chosen one a route lists.
pub const FAILOVER_LEN: usize = 5;

/// One instance a request may go to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub node: String,
    pub region: String,
    pub zone: String,
    pub healthy: bool,
    pub load: u64,
}

/// Where a request goes, and the failover order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub service: String,
    pub key: Option<String>,
    pub from: String,
    pub pinned: bool,
    /// `None` when no instance may take the request.
    pub chosen: Option<Target>,
    pub failover: Vec<Target>,
    /// The regions considered, nearest first.
    pub regions: Vec<String>,
    /// Instances of the route that this agent has ejected for now (they failed here): tried
    /// only after the others. Filled in by the agent, not by [`route`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ejected: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no service named {0:?} in the cluster")]
    NoSuchService(String),
}

/// The regions a request for a service may go to, nearest first.
pub fn region_order(snap: &Snapshot, pinned: bool) -> Vec<String> {
    let own = snap.local.region.clone();
    if pinned {
        return vec![own];
    }
    let mut others: Vec<(f64, String)> = snap
        .regions()
        .into_iter()
        .filter(|r| *r != own)
        .map(|r| (snap.region_rtt_ms.get(&r).copied().filter(|v| v.is_finite()).unwrap_or(f64::INFINITY), r))
        .collect();
    others.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
    std::iter::once(own).chain(others.into_iter().map(|(_, r)| r)).collect()
}

/// Routes a request for `service`. `pick(n)` returns a random index below `n` (a seeded RNG in
/// tests); it is only used for requests without a key.
pub fn route(
    snap: &Snapshot,
    service: &str,
    key: Option<&str>,
    pick: &mut dyn FnMut(usize) -> usize,
) -> Result<Route, RouteError> {
    let summary = snap.services.get(service).ok_or_else(|| RouteError::NoSuchService(service.to_string()))?;
    let regions = region_order(snap, summary.pinned);
    let mut route = Route {
        service: service.to_string(),
        key: key.map(str::to_string),
        from: snap.local.id.clone(),
        pinned: summary.pinned,
        chosen: None,
        failover: Vec::new(),
        regions: regions.clone(),
        ejected: Vec::new(),
    };
    let Some(ring) = snap.rings.get(service) else { return Ok(route) };
    let target = |id: &str| {
        let m = snap.member(id)?;
        let s = m.services.iter().find(|s| s.name == service)?;
        Some(Target {
            node: m.id.clone(),
            region: m.region.clone(),
            zone: m.zone.clone(),
            healthy: s.healthy,
            load: s.load,
        })
    };
    let mut order: Vec<Target> = match key {
        Some(k) => ring
            .failover(k, regions.iter().map(String::as_str), FAILOVER_LEN + 1)
            .iter()
            .filter_map(|m| target(&m.id))
            .collect(),
        None => {
            // Two random choices in the nearest region that has instances, then the rest by load.
            let mut order = Vec::new();
            let mut taken = BTreeSet::new();
            for region in &regions {
                let mut candidates: Vec<Target> =
                    ring.members().iter().filter(|m| &m.region == region).filter_map(|m| target(&m.id)).collect();
                if candidates.is_empty() {
                    continue;
                }
                if order.is_empty() {
                    let a = pick(candidates.len());
                    let b = pick(candidates.len());
                    let best = if candidates[b].load < candidates[a].load { b } else { a };
                    let first = candidates.remove(best);
                    taken.insert(first.node.clone());
                    order.push(first);
                }
                candidates.sort_by(|x, y| x.load.cmp(&y.load).then_with(|| x.node.cmp(&y.node)));
                order.extend(candidates.into_iter().filter(|c| !taken.contains(&c.node)));
                if order.len() > FAILOVER_LEN {
                    break;
                }
            }
            order.truncate(FAILOVER_LEN + 1);
            order
        }
    };
    if !order.is_empty() {
        route.chosen = Some(order.remove(0));
        route.failover = order;
    }
    Ok(route)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::snapshot::tests::{local, record};
    use crate::cluster::snapshot::{Liveness, Snapshot};

    fn snap(local_region: &str, pinned: bool) -> Snapshot {
        let mut records = vec![
            record("e1", "east", 1, &[("profile", true)]),
            record("e2", "east", 2, &[("profile", true)]),
            record("w1", "west", 3, &[("profile", true)]),
            record("w2", "west", 4, &[("profile", true)]),
            record("u1", "eu", 5, &[("profile", true)]),
        ];
        for r in &mut records {
            r.services[0].pinned = pinned;
            r.services[0].load = r.gossip_addr.port() as u64;
        }
        let rtt = |a: &std::net::SocketAddr| Some(if a.port() >= 5 { 80.0 } else { 30.0 });
        Snapshot::build(local("me", local_region), records, &rtt, 1)
    }

    #[test]
    fn keyed_routes_stay_in_region_and_agree_across_agents_of_the_region() {
        let s = snap("east", false);
        let r = route(&s, "profile", Some("user-1"), &mut |_| 0).unwrap();
        let chosen = r.chosen.unwrap();
        assert_eq!(chosen.region, "east");
        assert_eq!(r.regions, ["east", "west", "eu"]);
        let failover_regions: Vec<_> = r.failover.iter().map(|t| t.region.as_str()).collect();
        assert_eq!(failover_regions, ["east", "west", "west", "eu"]);
        // Another agent in the same region, with other RTTs, picks the same instance.
        let mut other = snap("east", false);
        other.local.id = "other".into();
        other.region_rtt_ms.insert("eu".into(), 1.0);
        let r2 = route(&other, "profile", Some("user-1"), &mut |_| 0).unwrap();
        assert_eq!(r2.chosen.unwrap().node, chosen.node);
        assert_eq!(r2.regions, ["east", "eu", "west"]);
    }

    #[test]
    fn fails_over_to_the_nearest_region_and_pinned_services_do_not() {
        let mut s = snap("east", false);
        for m in &mut s.members {
            if m.region == "east" {
                m.state = crate::cluster::snapshot::MemberState::Dead;
            }
        }
        // Rebuild so the ring reflects the dead members.
        let records: Vec<_> = s
            .members
            .iter()
            .map(|m| {
                let mut r = record(&m.id, &m.region, m.gossip_addr.port(), &[("profile", true)]);
                if m.region == "east" {
                    r.liveness = Liveness::Dead;
                }
                r
            })
            .collect();
        let rtt = |a: &std::net::SocketAddr| Some(if a.port() >= 5 { 80.0 } else { 30.0 });
        let s = Snapshot::build(local("me", "east"), records.clone(), &rtt, 2);
        let r = route(&s, "profile", Some("k"), &mut |_| 0).unwrap();
        assert_eq!(r.chosen.unwrap().region, "west");

        let pinned: Vec<_> = records
            .into_iter()
            .map(|mut r| {
                r.services[0].pinned = true;
                r
            })
            .collect();
        let s = Snapshot::build(local("me", "east"), pinned, &rtt, 3);
        let r = route(&s, "profile", Some("k"), &mut |_| 0).unwrap();
        assert!(r.pinned);
        assert_eq!(r.chosen, None);
        assert_eq!(r.regions, ["east"]);
    }

    #[test]
    fn unkeyed_takes_the_less_loaded_of_two() {
        let s = snap("west", false);
        // Loads are the ports: w1 = 3, w2 = 4.
        let mut picks = [1usize, 0].into_iter();
        let r = route(&s, "profile", None, &mut |_| picks.next().unwrap()).unwrap();
        assert_eq!(r.chosen.unwrap().node, "w1");
        assert_eq!(r.failover[0].node, "w2");
        assert_eq!(r.failover[1].region, "east");
    }

    #[test]
    fn unknown_service_is_an_error() {
        let s = snap("east", false);
        assert_eq!(route(&s, "nope", None, &mut |_| 0), Err(RouteError::NoSuchService("nope".into())));
    }
}

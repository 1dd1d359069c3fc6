//! The JSON documents of the admin API, shared by the server (`admin.rs`) and the client
//! commands (`client.rs`). Field names are part of the interface contract (DESIGN.md).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::cluster::snapshot::{MemberState, MemberView, Snapshot};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDoc {
    pub error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FireRequest {
    pub name: String,
    #[serde(default)]
    pub payload: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeDoc {
    pub id: String,
    pub region: String,
    pub zone: String,
    pub version: String,
    pub cluster: String,
    /// `gateway` if this agent carries its region's summary to the other regions, else `member`.
    pub role: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterDoc {
    pub members: usize,
    pub alive: usize,
    pub suspect: usize,
    pub dead: usize,
    pub left: usize,
    #[serde(default)]
    pub unreachable: usize,
    pub regions: Vec<String>,
    /// Per region: its gateways and whether this agent's region can reach it.
    #[serde(default)]
    pub region_info: BTreeMap<String, crate::cluster::snapshot::RegionInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceCountDoc {
    pub name: String,
    pub instances: usize,
    pub healthy: usize,
    pub pinned: bool,
    pub healthy_by_region: BTreeMap<String, usize>,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusDoc {
    pub node: NodeDoc,
    pub cluster: ClusterDoc,
    pub members: Vec<MemberView>,
    pub services: Vec<ServiceCountDoc>,
}

impl StatusDoc {
    pub fn from_snapshot(s: &Snapshot) -> StatusDoc {
        let counts = s.counts();
        StatusDoc {
            node: NodeDoc {
                id: s.local.id.clone(),
                region: s.local.region.clone(),
                zone: s.local.zone.clone(),
                version: s.local.version.clone(),
                cluster: s.local.cluster.clone(),
                role: if s.region_info.get(&s.local.region).is_some_and(|r| r.gateways.contains(&s.local.id)) {
                    "gateway".into()
                } else {
                    "member".into()
                },
            },
            cluster: ClusterDoc {
                members: s.members.len(),
                alive: counts[&MemberState::Alive],
                suspect: counts[&MemberState::Suspect],
                dead: counts[&MemberState::Dead],
                left: counts[&MemberState::Left],
                unreachable: counts[&MemberState::Unreachable],
                regions: s.regions(),
                region_info: s.region_info.clone(),
            },
            members: s.members.clone(),
            services: s
                .services
                .values()
                .map(|v| ServiceCountDoc {
                    name: v.name.clone(),
                    instances: v.instances,
                    healthy: v.healthy,
                    pinned: v.pinned,
                    healthy_by_region: v.healthy_by_region.clone(),
                })
                .collect(),
        }
    }
}

/// One instance of a service, as `GET /v1/services` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointDoc {
    pub node: String,
    pub region: String,
    pub zone: String,
    pub state: MemberState,
    pub healthy: bool,
    pub draining: bool,
    pub load: u64,
    pub weight: u32,
    pub port: u16,
    pub data_addr: Option<SocketAddr>,
}

/// `GET /v1/services/{name}` and the items of `GET /v1/services`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceDoc {
    pub name: String,
    pub instances: usize,
    pub healthy: usize,
    pub pinned: bool,
    pub endpoints: Vec<EndpointDoc>,
}

impl ServiceDoc {
    pub fn from_snapshot(s: &Snapshot, name: &str) -> Option<ServiceDoc> {
        let summary = s.services.get(name)?;
        let endpoints = s
            .members
            .iter()
            .filter_map(|m| {
                let i = m.services.iter().find(|i| i.name == name)?;
                Some(EndpointDoc {
                    node: m.id.clone(),
                    region: m.region.clone(),
                    zone: m.zone.clone(),
                    state: m.state,
                    healthy: i.healthy,
                    draining: i.draining || m.draining,
                    load: i.load,
                    weight: i.weight,
                    port: i.port,
                    data_addr: m.data_addr,
                })
            })
            .collect();
        Some(ServiceDoc {
            name: name.to_string(),
            instances: summary.instances,
            healthy: summary.healthy,
            pinned: summary.pinned,
            endpoints,
        })
    }
}

/// `POST /v1/keys`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRequest {
    pub action: crate::membership::keyring::KeyAction,
    /// A base64 key (`agent keygen`), or for `use` and `remove` its fingerprint.
    pub key: String,
    /// Skip the guards (see the module docs).
    #[serde(default)]
    pub force: bool,
    /// How long to wait for every member (default 30 s).
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

/// The answer to `POST /v1/keys`: which members announce the change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyOpDoc {
    pub action: crate::membership::keyring::KeyAction,
    pub fingerprint: String,
    /// Members counted: every member not dead and not left.
    pub members: usize,
    pub done: Vec<String>,
    /// Not yet announcing the change (or not heard from: unreachable, or an older agent).
    pub pending: Vec<String>,
    /// Members whose keyring file could not be written: a restart brings back its keys.
    #[serde(default)]
    pub unsaved: Vec<String>,
}

/// `GET /v1/keys`: the keys in use across the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeysDoc {
    /// Members counted: every member not dead and not left.
    pub members: usize,
    /// Every key some member announces: this agent's first, in its order, then the others.
    pub keys: Vec<KeyCount>,
    /// Counted members whose keyring is not known: unreachable, or an agent without `agent keys`.
    pub not_reporting: Vec<String>,
    /// Members whose keyring changed but whose keyring file could not be written.
    pub unsaved: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyCount {
    pub fingerprint: String,
    /// Members holding the key.
    pub installed: usize,
    /// Members sealing with it.
    pub primary: usize,
    /// On this agent: `primary`, `installed`, or null.
    pub here: Option<String>,
    /// Members that report a keyring without this key.
    #[serde(default)]
    pub missing_on: Vec<String>,
}

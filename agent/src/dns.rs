//! DNS on `dns_addr` (UDP and TCP, hickory-server): discovery by name, answered from the latest
//! snapshot, for apps that would rather resolve a name than call the admin API.
//!
//! Names, under `grapevine.`:
//!
//! - `SERVICE.service.grapevine`: the hosts of the service's instances that may take traffic
//!   (healthy, not draining, member up), this agent's region first, then the others nearest
//!   first (a pinned service: its region only), least loaded first within a region. `A`/`AAAA`
//!   give the hosts' addresses; `SRV` gives priority (the region's rank), weight, the app's port
//!   and `NODE.node.grapevine` as target, with the target's address alongside. The app port is
//!   usually bound to the instance's own loopback: these answers are for discovery and for
//!   flat networks. `SERVICE.service.REGION.grapevine` narrows to one region.
//! - `SERVICE.upstream.grapevine`: where this agent listens for the service (`[[upstream]]`):
//!   `A` is the listener's address, `SRV` its port. This is the name an app connects to.
//! - `NODE.node.grapevine`: a member's address.
//!
//! A service with no instance that may take traffic answers no records (NOERROR); an unknown
//! name under `grapevine.` answers NXDOMAIN; other names are REFUSED (this is not a recursive
//! resolver: point only `grapevine.` at it, as with Consul's `consul.`). TTLs are 0 for
//! instances and nodes (they change within seconds) and 60 s for upstream listeners.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Header, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::sync::watch;

use crate::cluster::routing;
use crate::cluster::snapshot::Snapshot;
use crate::metrics::Metrics;

/// The zone this agent answers for.
pub const DOMAIN: &str = "grapevine";
const INSTANCE_TTL: u32 = 0;
const UPSTREAM_TTL: u32 = 60;
/// Answers past this many records are left out (a UDP answer must stay small).
const MAX_RECORDS: usize = 16;

/// What a query gets: records for the answer and additional sections, or a response code.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Records { answers: Vec<Record>, additionals: Vec<Record> },
    NoSuchName,
    Refused,
}

/// A service this agent listens for, and where.
#[derive(Debug, Clone)]
pub struct UpstreamListener {
    pub service: String,
    pub addr: SocketAddr,
}

/// The answer to `name`/`kind` from `snap` (pure: no I/O).
pub fn answer(snap: &Snapshot, upstreams: &[UpstreamListener], name: &Name, kind: RecordType) -> Answer {
    let labels: Vec<String> = name.iter().map(|l| String::from_utf8_lossy(l).to_ascii_lowercase()).collect::<Vec<_>>();
    let Some((last, rest)) = labels.split_last() else { return Answer::Refused };
    if last != DOMAIN {
        return Answer::Refused;
    }
    match rest {
        [service, kind_label] if kind_label == "service" => service_answer(snap, name, service, None, kind),
        [service, kind_label, region] if kind_label == "service" => {
            if snap.regions().iter().any(|r| r.eq_ignore_ascii_case(region)) {
                service_answer(snap, name, service, Some(region), kind)
            } else {
                Answer::NoSuchName
            }
        }
        [service, kind_label] if kind_label == "upstream" => {
            let Some(u) = upstreams.iter().find(|u| u.service.eq_ignore_ascii_case(service)) else {
                return Answer::NoSuchName;
            };
            let answers = match kind {
                RecordType::SRV => vec![Record::from_rdata(
                    name.clone(),
                    UPSTREAM_TTL,
                    RData::SRV(SRV::new(0, 1, u.addr.port(), name.clone())),
                )],
                _ => address_record(name, u.addr.ip(), kind, UPSTREAM_TTL).into_iter().collect(),
            };
            let additionals = if kind == RecordType::SRV {
                address_record(
                    name,
                    u.addr.ip(),
                    if u.addr.is_ipv4() { RecordType::A } else { RecordType::AAAA },
                    UPSTREAM_TTL,
                )
                .into_iter()
                .collect()
            } else {
                Vec::new()
            };
            Answer::Records { answers, additionals }
        }
        [node, kind_label] if kind_label == "node" => {
            let Some(m) = snap.members.iter().find(|m| m.id.eq_ignore_ascii_case(node) && m.state.is_up()) else {
                return Answer::NoSuchName;
            };
            let answers = address_record(name, host_ip(m), kind, INSTANCE_TTL).into_iter().collect();
            Answer::Records { answers, additionals: Vec::new() }
        }
        _ => Answer::NoSuchName,
    }
}

/// The address an instance's host is reached at: its data-plane address, else its gossip one.
fn host_ip(m: &crate::cluster::snapshot::MemberView) -> IpAddr {
    m.data_addr.unwrap_or(m.gossip_addr).ip()
}

fn address_record(name: &Name, ip: IpAddr, kind: RecordType, ttl: u32) -> Option<Record> {
    match (ip, kind) {
        (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => {
            Some(Record::from_rdata(name.clone(), ttl, RData::A(A(v4))))
        }
        (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => {
            Some(Record::from_rdata(name.clone(), ttl, RData::AAAA(AAAA(v6))))
        }
        _ => None,
    }
}

fn service_answer(snap: &Snapshot, name: &Name, service: &str, region: Option<&str>, kind: RecordType) -> Answer {
    let Some((service, summary)) = snap.services.iter().find(|(s, _)| s.eq_ignore_ascii_case(service)) else {
        return Answer::NoSuchName;
    };
    let Some(ring) = snap.rings.get(service) else {
        return Answer::Records { answers: Vec::new(), additionals: Vec::new() };
    };
    let regions = routing::region_order(snap, summary.pinned);
    let mut answers = Vec::new();
    let mut additionals = Vec::new();
    for (rank, r) in regions.iter().enumerate() {
        if region.is_some_and(|want| !want.eq_ignore_ascii_case(r)) {
            continue;
        }
        let mut instances: Vec<(u64, &crate::cluster::snapshot::MemberView, u16, u32)> = ring
            .members()
            .iter()
            .filter(|m| &m.region == r)
            .filter_map(|m| snap.member(&m.id))
            .filter_map(|m| m.services.iter().find(|s| &s.name == service).map(|s| (s.load, m, s.port, s.weight)))
            .collect();
        instances.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
        for (_, m, port, weight) in instances {
            if answers.len() >= MAX_RECORDS {
                break;
            }
            match kind {
                RecordType::SRV => {
                    let Ok(target) = Name::from_ascii(format!("{}.node.{DOMAIN}.", m.id)) else { continue };
                    let weight = u16::try_from(weight).unwrap_or(u16::MAX);
                    let priority = u16::try_from(rank).unwrap_or(u16::MAX);
                    answers.push(Record::from_rdata(
                        name.clone(),
                        INSTANCE_TTL,
                        RData::SRV(SRV::new(priority, weight, port, target.clone())),
                    ));
                    let ip = host_ip(m);
                    let kind = if ip.is_ipv4() { RecordType::A } else { RecordType::AAAA };
                    additionals.extend(address_record(&target, ip, kind, INSTANCE_TTL));
                }
                _ => answers.extend(address_record(name, host_ip(m), kind, INSTANCE_TTL)),
            }
        }
    }
    Answer::Records { answers, additionals }
}

/// The hickory request handler: reads the latest snapshot and answers.
#[derive(Debug, Clone)]
pub struct Handler {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    upstreams: Arc<Vec<UpstreamListener>>,
    metrics: Arc<Metrics>,
}

impl Handler {
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        upstreams: Vec<UpstreamListener>,
        metrics: Arc<Metrics>,
    ) -> Handler {
        Handler { snapshots, upstreams: Arc::new(upstreams), metrics }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, mut response: R) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let failed = || {
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header { metadata, counts: Default::default() })
        };
        let Ok(info) = request.request_info() else {
            self.metrics.dns("formerr");
            return response
                .send_response(builder.error_msg(&request.metadata, ResponseCode::FormErr))
                .await
                .unwrap_or_else(|_| failed());
        };
        let name: Name = info.query.name().into();
        let snap = self.snapshots.borrow().clone();
        let result = match answer(&snap, &self.upstreams, &name, info.query.query_type()) {
            Answer::Records { answers, additionals } => {
                self.metrics.dns(if answers.is_empty() { "empty" } else { "answered" });
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.authoritative = true;
                response.send_response(builder.build(metadata, answers.iter(), [], [], additionals.iter())).await
            }
            Answer::NoSuchName => {
                self.metrics.dns("nxdomain");
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.authoritative = true;
                metadata.response_code = ResponseCode::NXDomain;
                response.send_response(builder.build_no_records(metadata)).await
            }
            Answer::Refused => {
                self.metrics.dns("refused");
                response.send_response(builder.error_msg(&request.metadata, ResponseCode::Refused)).await
            }
        };
        result.unwrap_or_else(|_| failed())
    }
}

/// Serves DNS on `udp` and `tcp` (bound by the caller, before anything starts) until dropped.
pub async fn serve(udp: tokio::net::UdpSocket, tcp: tokio::net::TcpListener, handler: Handler) {
    let mut server = hickory_server::Server::new(handler);
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 64 * 1024);
    if let Err(e) = server.block_until_done().await {
        tracing::warn!(error = %e, "the DNS server stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::snapshot::tests::{local, record};

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn addrs(a: &Answer) -> Vec<String> {
        match a {
            Answer::Records { answers, .. } => answers.iter().map(|r| r.data.to_string()).collect(),
            other => vec![format!("{other:?}")],
        }
    }

    #[test]
    fn names_resolve_to_instances_nearest_region_first() {
        let host = |id: &str, region: &str, ip: [u8; 4], healthy: bool| {
            let mut r = record(id, region, 7946, &[("web", healthy)]);
            r.data_addr = Some(SocketAddr::from((ip, 7947)));
            r
        };
        let snap = Snapshot::build(
            local("e1", "east"),
            vec![
                host("e1", "east", [10, 0, 0, 1], true),
                host("e2", "east", [10, 0, 0, 2], false),
                host("w1", "west", [10, 0, 1, 1], true),
            ],
            &|_| None,
            1,
        );
        let a = answer(&snap, &[], &name("web.service.grapevine."), RecordType::A);
        let ips = addrs(&a);
        assert_eq!(ips.len(), 2, "the unhealthy instance is left out: {ips:?}");
        assert_eq!(ips, ["10.0.0.1", "10.0.1.1"], "own region first");
        let west = answer(&snap, &[], &name("WEB.service.West.grapevine."), RecordType::A);
        assert_eq!(addrs(&west).len(), 1, "case does not matter, and a region narrows");
        let srv = answer(&snap, &[], &name("web.service.grapevine."), RecordType::SRV);
        let Answer::Records { answers, additionals } = srv else { panic!("{srv:?}") };
        let text: Vec<String> = answers.iter().map(|r| r.data.to_string()).collect();
        assert!(text[0].starts_with("0 ") && text[0].ends_with("e1.node.grapevine."), "{text:?}");
        assert!(text[1].starts_with("1 ") && text[1].ends_with("w1.node.grapevine."), "{text:?}");
        assert_eq!(additionals.len(), 2, "each target's address comes along");
        assert_eq!(answer(&snap, &[], &name("nope.service.grapevine."), RecordType::A), Answer::NoSuchName);
        assert_eq!(answer(&snap, &[], &name("web.service.mars.grapevine."), RecordType::A), Answer::NoSuchName);
        assert_eq!(answer(&snap, &[], &name("example.com."), RecordType::A), Answer::Refused);
        assert_eq!(addrs(&answer(&snap, &[], &name("w1.node.grapevine."), RecordType::A)).len(), 1);
    }

    #[test]
    fn an_upstream_name_gives_the_local_listener() {
        let snap = Snapshot::build(local("e1", "east"), vec![], &|_| None, 1);
        let up = [UpstreamListener { service: "login".into(), addr: "127.0.0.1:9001".parse().unwrap() }];
        assert_eq!(addrs(&answer(&snap, &up, &name("login.upstream.grapevine."), RecordType::A)), ["127.0.0.1"]);
        let srv = answer(&snap, &up, &name("login.upstream.grapevine."), RecordType::SRV);
        assert!(addrs(&srv)[0].contains(" 9001 "), "{srv:?}");
        assert_eq!(answer(&snap, &up, &name("profile.upstream.grapevine."), RecordType::A), Answer::NoSuchName);
    }
}

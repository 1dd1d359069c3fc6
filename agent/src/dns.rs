//! DNS on `dns_addr` (UDP and TCP, hickory-server): discovery by name, answered from the latest
//! snapshot, for apps that would rather resolve a name than call the admin API.
//!
//! Names, under `grapevine.` (the agent is authoritative for it: every answer in it has AA):
//!
//! - `grapevine.`: the zone's `SOA` and `NS ns.grapevine.`, whose address is the DNS listener's.
//! - `SERVICE.service.grapevine`: the hosts of the service's instances that may take traffic
//!   (healthy, not draining, member up), this agent's region first, then the others nearest
//!   first (a pinned service: its region only), least loaded first within a region. `A`/`AAAA`
//!   give the hosts' addresses; `SRV` gives priority (the region's rank), weight, the app's port
//!   and `NODE.node.grapevine` as target, with the target's address alongside. The app port is
//!   usually bound to the instance's own loopback: these answers are for discovery and for
//!   flat networks. `SERVICE.service.REGION.grapevine` narrows that list to one region; it never
//!   widens it (a pinned service's instances elsewhere stay out, as its traffic would get 503).
//! - `SERVICE.upstream.grapevine`: where this agent listens for the service (`[[upstream]]`):
//!   `A` is the listener's address, `SRV` its port. This is the name an app connects to.
//! - `NODE.node.grapevine`: a member's address.
//!
//! A name that exists without records of the type asked (a service with no instance that may
//! take traffic, `AAAA` of an IPv4 host, or an empty non-terminal such as `service.grapevine`
//! or `service.REGION.grapevine`) answers NOERROR with no records; a name with nothing at or
//! below it answers NXDOMAIN. Both carry the zone's SOA (RFC 2308), negative TTL 0. Names
//! outside the zone are REFUSED (this is not a recursive resolver: point only `grapevine.` at
//! it, as with Consul's `consul.`). TTLs are 0 for instances and nodes (they change within
//! seconds) and 60 s for this agent's listeners (upstreams, the name server).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Header, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, NS, SOA, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::sync::watch;

use crate::cluster::routing;
use crate::cluster::snapshot::{MemberView, ServiceSummary, Snapshot};
use crate::metrics::Metrics;

/// The zone this agent answers for.
pub const DOMAIN: &str = "grapevine";
/// Instances and nodes change within seconds: a resolver asks again every time.
const INSTANCE_TTL: u32 = 0;
/// This agent's own listeners (upstreams, and the DNS one as `ns.grapevine`) stay put while it
/// runs.
const LISTENER_TTL: u32 = 60;
/// How long a resolver may remember that a name or record does not exist: the SOA's minimum and
/// its own TTL (RFC 2308 takes the smaller). A missing name is a service not registered yet, an
/// instance not healthy yet, a member not joined yet: it changes within seconds, as instances
/// do, so it is not cached either.
const NEGATIVE_TTL: u32 = 0;
/// The name server's label under the apex.
const NAMESERVER: &str = "ns";
/// The labels under the apex that hold the names: they exist even with nothing below them yet.
const KINDS: [&str; 3] = ["service", "upstream", "node"];
/// Answers past this many records are left out (a UDP answer must stay small).
const MAX_RECORDS: usize = 16;

/// What a query gets: a response code and the records of each section. `Refused` carries no
/// records and is not authoritative; every other answer is (the agent owns the zone).
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// `NoError` (with no answers: NODATA, the name exists without records of that type),
    /// `NXDomain` (neither the name nor any name below it exists) or `Refused` (not our zone).
    pub code: ResponseCode,
    pub answers: Vec<Record>,
    /// The zone's SOA in a negative answer (NXDOMAIN or NODATA, RFC 2308).
    pub authority: Vec<Record>,
    pub additionals: Vec<Record>,
}

impl Answer {
    fn refused() -> Answer {
        Answer { code: ResponseCode::Refused, answers: Vec::new(), authority: Vec::new(), additionals: Vec::new() }
    }
}

/// What the zone holds besides the snapshot: this agent's own listeners.
#[derive(Debug, Clone)]
pub struct Zone {
    /// The address `ns.grapevine` (the apex's `NS`) resolves to: the DNS listener's.
    pub nameserver: IpAddr,
    pub upstreams: Vec<UpstreamListener>,
}

/// A service this agent listens for, and where.
#[derive(Debug, Clone)]
pub struct UpstreamListener {
    pub service: String,
    pub addr: SocketAddr,
}

/// A name in the zone that has records.
#[derive(Debug)]
enum Owner<'a> {
    /// `grapevine.`: `SOA` and `NS`.
    Apex,
    /// `ns.grapevine.`: the DNS listener's address.
    Nameserver,
    /// `SERVICE.service[.REGION].grapevine.`
    Service { name: &'a str, summary: &'a ServiceSummary, region: Option<String> },
    /// `SERVICE.upstream.grapevine.`
    Upstream(&'a UpstreamListener),
    /// `NODE.node.grapevine.`: a member that is up.
    Node(&'a MemberView),
}

/// The answer to `name`/`kind` from `snap` (pure: no I/O). `name` is answered with its own case
/// (resolvers that randomise it check the echo) and matched without it.
pub fn answer(snap: &Snapshot, zone: &Zone, name: &Name, kind: RecordType) -> Answer {
    let labels: Vec<String> = name.iter().map(|l| String::from_utf8_lossy(l).to_ascii_lowercase()).collect();
    let Some((last, rest)) = labels.split_last() else { return Answer::refused() };
    if last != DOMAIN {
        return Answer::refused();
    }
    let (code, answers, additionals) = match owner(snap, zone, rest) {
        Some(owner) => {
            let (answers, additionals) = records(snap, zone, &owner, name, kind);
            (ResponseCode::NoError, answers, additionals)
        }
        // An empty non-terminal: answering NXDOMAIN would tell a resolver (RFC 8020) that
        // nothing below exists either.
        None if has_names_below(snap, zone, rest) => (ResponseCode::NoError, Vec::new(), Vec::new()),
        None => (ResponseCode::NXDomain, Vec::new(), Vec::new()),
    };
    let authority = if answers.is_empty() { vec![soa(snap)] } else { Vec::new() };
    Answer { code, answers, authority, additionals }
}

/// The owner `rest` (the labels before `grapevine`, lower-case) names, if it has records. Ids,
/// services and regions may hold dots, so each reading of the labels is tried.
fn owner<'a>(snap: &'a Snapshot, zone: &'a Zone, rest: &[String]) -> Option<Owner<'a>> {
    match rest {
        [] => return Some(Owner::Apex),
        [ns] if ns == NAMESERVER => return Some(Owner::Nameserver),
        _ => {}
    }
    if let [id @ .., kind] = rest
        && kind == "node"
        && !id.is_empty()
    {
        let id = id.join(".");
        if let Some(m) = snap.members.iter().find(|m| m.id.eq_ignore_ascii_case(&id) && m.state.is_up()) {
            return Some(Owner::Node(m));
        }
    }
    if let [service @ .., kind] = rest
        && kind == "upstream"
        && !service.is_empty()
    {
        let service = service.join(".");
        if let Some(u) = zone.upstreams.iter().find(|u| u.service.eq_ignore_ascii_case(&service)) {
            return Some(Owner::Upstream(u));
        }
    }
    let regions = snap.regions();
    (1..rest.len()).filter(|&i| rest[i] == "service").find_map(|i| {
        let service = rest[..i].join(".");
        let (name, summary) = snap.services.iter().find(|(s, _)| s.eq_ignore_ascii_case(&service))?;
        let region = match &rest[i + 1..] {
            [] => None,
            labels => {
                let region = labels.join(".");
                Some(regions.iter().find(|r| r.eq_ignore_ascii_case(&region))?.clone())
            }
        };
        Some(Owner::Service { name: name.as_str(), summary, region })
    })
}

/// Whether some owner lies below `rest` (which has no records itself): `service.grapevine`,
/// `REGION.grapevine`, `service.REGION.grapevine`, the `eu` of a node `web-1.eu`. The three
/// kind labels always exist, so that a name that appears below them later was never denied.
fn has_names_below(snap: &Snapshot, zone: &Zone, rest: &[String]) -> bool {
    if let [kind] = rest
        && KINDS.contains(&kind.as_str())
    {
        return true;
    }
    let labels = |s: &str| s.split('.').map(str::to_ascii_lowercase).collect::<Vec<_>>();
    let below = |owner: Vec<String>| owner.len() > rest.len() && owner.ends_with(rest);
    let nodes = snap.members.iter().filter(|m| m.state.is_up()).map(|m| [labels(&m.id), vec!["node".into()]].concat());
    let upstreams = zone.upstreams.iter().map(|u| [labels(&u.service), vec!["upstream".into()]].concat());
    let regions = snap.regions();
    let services = snap.services.keys().flat_map(|s| {
        let base = [labels(s), vec!["service".into()]].concat();
        let in_regions: Vec<Vec<String>> = regions.iter().map(|r| [base.clone(), labels(r)].concat()).collect();
        std::iter::once(base).chain(in_regions)
    });
    nodes.chain(upstreams).chain(services).any(below)
}

/// The zone's SOA. The serial is the snapshot's epoch, which grows with every rebuild (serials
/// wrap, RFC 1982; there are no secondaries to read it, the refresh timers are for form).
fn soa(snap: &Snapshot) -> Record {
    let (mname, rname) = (fixed_name(NAMESERVER), fixed_name("hostmaster"));
    let serial = snap.epoch as u32;
    let soa = SOA::new(mname, rname, serial, 3600, 600, 86400, NEGATIVE_TTL);
    Record::from_rdata(fixed_name(""), NEGATIVE_TTL, RData::SOA(soa))
}

/// `LABEL.grapevine.`, or the apex for "".
fn fixed_name(label: &str) -> Name {
    let text = if label.is_empty() { format!("{DOMAIN}.") } else { format!("{label}.{DOMAIN}.") };
    // Invariant: the labels are constants made of letters, so the name parses.
    Name::from_ascii(text).expect("a fixed name of the zone parses")
}

fn records(
    snap: &Snapshot,
    zone: &Zone,
    owner: &Owner<'_>,
    name: &Name,
    kind: RecordType,
) -> (Vec<Record>, Vec<Record>) {
    match owner {
        Owner::Apex => {
            let ns = fixed_name(NAMESERVER);
            let mut answers = Vec::new();
            if matches!(kind, RecordType::SOA | RecordType::ANY) {
                let mut soa = soa(snap);
                soa.name = name.clone();
                answers.push(soa);
            }
            if matches!(kind, RecordType::NS | RecordType::ANY) {
                answers.push(Record::from_rdata(name.clone(), LISTENER_TTL, RData::NS(NS(ns.clone()))));
            }
            let additionals = if matches!(kind, RecordType::NS | RecordType::ANY) {
                address_record(&ns, zone.nameserver, address_kind(zone.nameserver), LISTENER_TTL).into_iter().collect()
            } else {
                Vec::new()
            };
            (answers, additionals)
        }
        Owner::Nameserver => {
            (address_record(name, zone.nameserver, kind, LISTENER_TTL).into_iter().collect(), Vec::new())
        }
        Owner::Upstream(u) => {
            if kind == RecordType::SRV {
                let srv = Record::from_rdata(
                    name.clone(),
                    LISTENER_TTL,
                    RData::SRV(SRV::new(0, 1, u.addr.port(), name.clone())),
                );
                let address = address_record(name, u.addr.ip(), address_kind(u.addr.ip()), LISTENER_TTL);
                (vec![srv], address.into_iter().collect())
            } else {
                (address_record(name, u.addr.ip(), kind, LISTENER_TTL).into_iter().collect(), Vec::new())
            }
        }
        Owner::Node(m) => (address_record(name, host_ip(m), kind, INSTANCE_TTL).into_iter().collect(), Vec::new()),
        Owner::Service { name: service, summary, region } => {
            service_records(snap, name, service, summary, region.as_deref(), kind)
        }
    }
}

/// The address an instance's host is reached at: its data-plane address, else its gossip one.
fn host_ip(m: &MemberView) -> IpAddr {
    m.data_addr.unwrap_or(m.gossip_addr).ip()
}

fn address_kind(ip: IpAddr) -> RecordType {
    if ip.is_ipv4() { RecordType::A } else { RecordType::AAAA }
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

/// The instances of `service` that may take this agent's traffic, in its failover order of
/// regions; `region` narrows that list to one region and never widens it (a pinned service's
/// instances elsewhere stay out, as they do for the upstreams and the ingress).
fn service_records(
    snap: &Snapshot,
    name: &Name,
    service: &str,
    summary: &ServiceSummary,
    region: Option<&str>,
    kind: RecordType,
) -> (Vec<Record>, Vec<Record>) {
    let mut answers = Vec::new();
    let mut additionals = Vec::new();
    let regions = routing::region_order(snap, summary.pinned);
    for (rank, r) in regions.iter().enumerate() {
        if region.is_some_and(|want| want != r) {
            continue;
        }
        // The instances that may take traffic, as the ring's are, but from the members
        // themselves: an agent without certificates is in no ring (nothing can forward to it),
        // yet its app is there to be found.
        let mut instances: Vec<(u64, &MemberView, u16, u32)> = snap
            .members
            .iter()
            .filter(|m| &m.region == r && m.state.is_up() && !m.draining)
            .filter_map(|m| {
                let s = m.services.iter().find(|s| s.name == service && s.healthy && !s.draining)?;
                (1..=grapevine_ring::MAX_WEIGHT).contains(&s.weight).then_some((s.load, m, s.port, s.weight))
            })
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
                    additionals.extend(address_record(&target, ip, address_kind(ip), INSTANCE_TTL));
                }
                _ => answers.extend(address_record(name, host_ip(m), kind, INSTANCE_TTL)),
            }
        }
    }
    (answers, additionals)
}

/// The hickory request handler: reads the latest snapshot and answers.
#[derive(Debug, Clone)]
pub struct Handler {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    zone: Arc<Zone>,
    metrics: Arc<Metrics>,
}

impl Handler {
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>, zone: Zone, metrics: Arc<Metrics>) -> Handler {
        Handler { snapshots, zone: Arc::new(zone), metrics }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, mut response: R) -> ResponseInfo {
        // EDNS (RFC 6891): a client that sent an OPT record gets one back, so that an answer
        // past 512 bytes (16 SRV records with their addresses) fits one UDP reply instead of
        // coming back truncated and asked again over TCP. 1232 bytes: the DNS flag day's size,
        // safe from IP fragmentation.
        let mut edns = Edns::new();
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(asked) = request.edns.as_ref() {
            edns.set_max_payload(asked.max_payload().clamp(512, EDNS_PAYLOAD));
            edns.set_version(0);
            builder.edns(&edns);
        }
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
        let query = info.query.original();
        let snap = self.snapshots.borrow().clone();
        let a = answer(&snap, &self.zone, query.name(), query.query_type());
        self.metrics.dns(match a.code {
            ResponseCode::Refused => "refused",
            ResponseCode::NXDomain => "nxdomain",
            _ if a.answers.is_empty() => "empty",
            _ => "answered",
        });
        let result = if a.code == ResponseCode::Refused {
            response.send_response(builder.error_msg(&request.metadata, ResponseCode::Refused)).await
        } else {
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.authoritative = true;
            metadata.response_code = a.code;
            response.send_response(builder.build(metadata, &a.answers, &a.authority, [], &a.additionals)).await
        };
        result.unwrap_or_else(|_| failed())
    }
}

/// The largest UDP answer sent to a client that allows more than 512 bytes.
const EDNS_PAYLOAD: u16 = 1232;

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
    use crate::cluster::snapshot::MemberRecord;
    use crate::cluster::snapshot::tests::{local, record};

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn zone() -> Zone {
        Zone {
            nameserver: "127.0.0.1".parse().unwrap(),
            upstreams: vec![UpstreamListener { service: "login".into(), addr: "127.0.0.1:9001".parse().unwrap() }],
        }
    }

    fn addrs(a: &Answer) -> Vec<String> {
        a.answers.iter().map(|r| r.data.to_string()).collect()
    }

    fn host(id: &str, region: &str, ip: [u8; 4], services: &[(&str, bool)]) -> MemberRecord {
        let mut r = record(id, region, 7946, services);
        r.data_addr = Some(SocketAddr::from((ip, 7947)));
        r
    }

    /// e1 and e2 (unhealthy) in east, w1 in west, all with `web`; seen from e1.
    fn two_regions() -> Snapshot {
        Snapshot::build(
            local("e1", "east"),
            vec![
                host("e1", "east", [10, 0, 0, 1], &[("web", true)]),
                host("e2", "east", [10, 0, 0, 2], &[("web", false)]),
                host("w1", "west", [10, 0, 1, 1], &[("web", true)]),
            ],
            &|_| None,
            7,
        )
    }

    /// A negative answer: `code`, nothing in the answer section, the zone's SOA as authority.
    fn assert_negative(a: &Answer, code: ResponseCode, what: &str) {
        assert_eq!(a.code, code, "{what}: {a:?}");
        assert!(a.answers.is_empty(), "{what}: {a:?}");
        assert_eq!(a.authority.len(), 1, "{what}: {a:?}");
        let soa = &a.authority[0];
        assert_eq!(soa.name, name("grapevine."), "{what}");
        let RData::SOA(data) = &soa.data else { panic!("{what}: {soa:?}") };
        assert_eq!((soa.ttl, data.minimum), (NEGATIVE_TTL, NEGATIVE_TTL), "{what}: the negative-caching TTL");
    }

    #[test]
    fn names_resolve_to_instances_nearest_region_first() {
        let snap = two_regions();
        let a = answer(&snap, &zone(), &name("web.service.grapevine."), RecordType::A);
        assert_eq!(a.code, ResponseCode::NoError);
        assert_eq!(addrs(&a), ["10.0.0.1", "10.0.1.1"], "the unhealthy instance is left out, own region first");
        assert!(a.authority.is_empty(), "a positive answer carries no SOA");
        let west = answer(&snap, &zone(), &name("web.service.west.grapevine."), RecordType::A);
        assert_eq!(addrs(&west), ["10.0.1.1"], "a region narrows");
        let srv = answer(&snap, &zone(), &name("web.service.grapevine."), RecordType::SRV);
        let text = addrs(&srv);
        assert!(text[0].starts_with("0 ") && text[0].ends_with("e1.node.grapevine."), "{text:?}");
        assert!(text[1].starts_with("1 ") && text[1].ends_with("w1.node.grapevine."), "{text:?}");
        assert_eq!(srv.additionals.len(), 2, "each target's address comes along");
        assert_eq!(addrs(&answer(&snap, &zone(), &name("w1.node.grapevine."), RecordType::A)), ["10.0.1.1"]);
        let nothing_of_that_type = answer(&snap, &zone(), &name("web.service.grapevine."), RecordType::AAAA);
        assert_negative(&nothing_of_that_type, ResponseCode::NoError, "AAAA of IPv4 hosts");
    }

    #[test]
    fn an_instance_on_an_agent_without_a_data_plane_is_still_found() {
        let mut gossip_only = host("e3", "east", [10, 0, 0, 3], &[("web", true)]);
        gossip_only.data_addr = None;
        gossip_only.gossip_addr = SocketAddr::from(([10, 0, 0, 3], 7946));
        let snap = Snapshot::build(
            local("e1", "east"),
            vec![host("e1", "east", [10, 0, 0, 1], &[("web", true)]), gossip_only],
            &|_| None,
            1,
        );
        assert!(!snap.rings["web"].members().iter().any(|m| m.id == "e3"), "no agent can forward to it");
        let a = answer(&snap, &zone(), &name("web.service.grapevine."), RecordType::A);
        assert_eq!(addrs(&a), ["10.0.0.1", "10.0.0.3"], "but its app is there to be found");
    }

    #[test]
    fn names_match_without_case_and_answer_with_it() {
        let snap = two_regions();
        let asked = name("WEB.Service.West.GrapeVine.");
        let a = answer(&snap, &zone(), &asked, RecordType::A);
        assert_eq!(addrs(&a), ["10.0.1.1"]);
        assert_eq!(a.answers[0].name.to_string(), "WEB.Service.West.GrapeVine.", "the owner as asked");
        assert_eq!(addrs(&answer(&snap, &zone(), &name("W1.NODE.grapevine."), RecordType::A)), ["10.0.1.1"]);
        assert_eq!(addrs(&answer(&snap, &zone(), &name("Login.Upstream.GRAPEVINE."), RecordType::A)), ["127.0.0.1"]);
        assert_eq!(answer(&snap, &zone(), &name("GRAPEVINE."), RecordType::SOA).code, ResponseCode::NoError);
    }

    #[test]
    fn the_apex_has_an_soa_and_a_name_server() {
        let snap = two_regions();
        let soa = answer(&snap, &zone(), &name("grapevine."), RecordType::SOA);
        assert_eq!(soa.code, ResponseCode::NoError);
        let [record] = soa.answers.as_slice() else { panic!("{soa:?}") };
        let RData::SOA(data) = &record.data else { panic!("{record:?}") };
        assert_eq!(data.mname, name("ns.grapevine."));
        assert_eq!(data.serial, 7, "the snapshot's epoch");
        let ns = answer(&snap, &zone(), &name("grapevine."), RecordType::NS);
        assert_eq!(addrs(&ns), ["ns.grapevine."]);
        assert_eq!(ns.additionals.len(), 1, "the name server's address comes along");
        assert_eq!(ns.additionals[0].data.to_string(), "127.0.0.1");
        assert_eq!(addrs(&answer(&snap, &zone(), &name("ns.grapevine."), RecordType::A)), ["127.0.0.1"]);
        assert_negative(&answer(&snap, &zone(), &name("grapevine."), RecordType::A), ResponseCode::NoError, "apex A");
        assert_negative(&answer(&snap, &zone(), &name("ns.grapevine."), RecordType::AAAA), ResponseCode::NoError, "ns");
        assert_eq!(addrs(&answer(&snap, &zone(), &name("grapevine."), RecordType::ANY)).len(), 2, "SOA and NS");
    }

    #[test]
    fn names_with_names_below_them_exist_without_records() {
        let mut dotted = host("web-1.eu", "east", [10, 0, 0, 9], &[("db.primary", true)]);
        dotted.services[0].port = 5432;
        let mut records = vec![
            host("e1", "east", [10, 0, 0, 1], &[("web", true)]),
            host("w1", "west", [10, 0, 1, 1], &[("web", true)]),
        ];
        records.push(dotted);
        let snap = Snapshot::build(local("e1", "east"), records, &|_| None, 1);
        for empty in [
            "service.grapevine.",
            "node.grapevine.",
            "upstream.grapevine.",
            "west.grapevine.",
            "service.west.grapevine.",
            "eu.node.grapevine.",
            "primary.service.grapevine.",
        ] {
            assert_negative(&answer(&snap, &zone(), &name(empty), RecordType::A), ResponseCode::NoError, empty);
        }
        // Dotted ids and services resolve, and so does an SRV target.
        let srv = answer(&snap, &zone(), &name("db.primary.service.grapevine."), RecordType::SRV);
        assert_eq!(addrs(&srv), ["0 100 5432 web-1.eu.node.grapevine."]);
        assert_eq!(addrs(&answer(&snap, &zone(), &srv.additionals[0].name, RecordType::A)), ["10.0.0.9"]);
        for missing in [
            "nope.service.grapevine.",
            "web.service.mars.grapevine.",
            "service.mars.grapevine.",
            "mars.grapevine.",
            "nope.node.grapevine.",
            "profile.upstream.grapevine.",
            "x.ns.grapevine.",
            "x.web.service.grapevine.",
        ] {
            assert_negative(&answer(&snap, &zone(), &name(missing), RecordType::A), ResponseCode::NXDomain, missing);
        }
        for outside in ["example.com.", "grapevine.example.com.", "."] {
            assert_eq!(answer(&snap, &zone(), &name(outside), RecordType::A), Answer::refused(), "{outside}");
        }
    }

    #[test]
    fn a_pinned_service_is_listed_only_in_the_region_it_may_serve() {
        let mut vault = host("e1", "east", [10, 0, 0, 1], &[("vault", true)]);
        vault.services[0].pinned = true;
        let members = vec![vault, host("w1", "west", [10, 0, 1, 1], &[])];
        let from_west = Snapshot::build(local("w1", "west"), members.clone(), &|_| None, 1);
        let from_east = Snapshot::build(local("e1", "east"), members, &|_| None, 1);
        for asked in ["vault.service.grapevine.", "vault.service.east.grapevine."] {
            let a = answer(&from_west, &zone(), &name(asked), RecordType::A);
            assert_negative(&a, ResponseCode::NoError, "from west, as its traffic would get 503");
            assert_eq!(addrs(&answer(&from_east, &zone(), &name(asked), RecordType::A)), ["10.0.0.1"], "{asked}");
        }
    }

    #[test]
    fn an_upstream_name_gives_the_local_listener() {
        let snap = Snapshot::build(local("e1", "east"), vec![], &|_| None, 1);
        let up = answer(&snap, &zone(), &name("login.upstream.grapevine."), RecordType::A);
        assert_eq!((addrs(&up), up.answers[0].ttl), (vec!["127.0.0.1".to_string()], LISTENER_TTL));
        let srv = answer(&snap, &zone(), &name("login.upstream.grapevine."), RecordType::SRV);
        assert!(addrs(&srv)[0].contains(" 9001 "), "{srv:?}");
        assert_eq!(srv.additionals.len(), 1);
    }
}

//! Prometheus metrics: one registry per agent, shared by every part that counts something, and
//! rendered in the text exposition format at `GET /metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabel {
    pub service: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabel {
    pub direction: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub members: Family<StateLabel, Gauge>,
    pub gossip_bytes: Family<DirectionLabel, Counter>,
    pub gossip_datagrams: Family<DirectionLabel, Counter>,
    pub gossip_dropped: Family<ReasonLabel, Counter>,
    pub health_checks: Family<CheckLabel, Counter>,
    pub service_healthy: Family<ServiceLabel, Gauge>,
    pub events: Family<KindLabel, Counter>,
    pub snapshots: Counter,
    pub reprobes: Counter,
    pub peers_refused: Family<ReasonLabel, Counter>,
    pub streams: Family<StreamLabel, Counter>,
    pub ejections: Counter,
    /// Forwarded connections closed after `idle_timeout` without a byte either way.
    pub idle_closed: Counter,
    /// When this node's certificate stops being valid (Unix seconds; 0 without one).
    pub cert_expiry: Gauge,
    pub ingress_requests: Family<CodeLabel, Counter>,
    pub dns_queries: Family<KindLabel, Counter>,
    /// Members in each gossip pool this agent belongs to (`region`, `wan`).
    pub pool_size: Family<KindLabel, Gauge>,
    /// Version hints sent, received, and pulls they started (`sent`, `received`, `pull`).
    pub hints: Family<KindLabel, Counter>,
    /// Region members SWIM currently suspects.
    pub suspects: Gauge,
    /// SWIM probes this agent started: direct, and indirect (after a direct one went unanswered).
    pub swim_probes: Family<KindLabel, Counter>,
    /// Suspicions this agent started or learned of (each runs until refuted or declared dead).
    pub swim_suspicions: Counter,
    /// Times this agent became or stopped being a gateway, and gateway sets it saw change.
    pub gateway_changes: Family<KindLabel, Counter>,
    /// Strangers a full pool refused.
    pub pool_refused: Counter,
    /// Sealed bytes sent, by what they carried.
    pub sent_bytes: Family<KindLabel, Counter>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("grapevine");
        let members = Family::<StateLabel, Gauge>::default();
        registry.register("members", "Members in this agent's view, by state", members.clone());
        let gossip_bytes = Family::<DirectionLabel, Counter>::default();
        registry.register("gossip_bytes", "Gossip bytes sent and received, sealed, on the wire", gossip_bytes.clone());
        let gossip_datagrams = Family::<DirectionLabel, Counter>::default();
        registry.register("gossip_datagrams", "Gossip datagrams sent and received", gossip_datagrams.clone());
        let gossip_dropped = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "gossip_dropped",
            "Gossip datagrams dropped unparsed or unsent, by reason",
            gossip_dropped.clone(),
        );
        let health_checks = Family::<CheckLabel, Counter>::default();
        registry.register("health_checks", "Health checks run, by service and result", health_checks.clone());
        let service_healthy = Family::<ServiceLabel, Gauge>::default();
        registry.register(
            "service_healthy",
            "1 if a service this agent fronts is healthy, else 0",
            service_healthy.clone(),
        );
        let events = Family::<KindLabel, Counter>::default();
        registry.register(
            "events",
            "Cluster events: fired here, received, delivered to watchers, duplicates, rejected",
            events.clone(),
        );
        let snapshots = Counter::default();
        registry.register("snapshots", "Cluster snapshots built", snapshots.clone());
        let reprobes = Counter::default();
        registry.register(
            "reprobes",
            "Join requests sent to seeds (at start, when alone, while no other region is known)",
            reprobes.clone(),
        );
        let peers_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "dataplane_peers_refused",
            "QUIC peers refused: failed handshakes (foreign CA, no certificate) and identity mismatches",
            peers_refused.clone(),
        );
        // At 0 from the start, so that an alert on any of them has a series to watch.
        for reason in ["handshake", "handshake_timeout", "handshake_out", "identity", "untrusted"] {
            drop(peers_refused.get_or_create(&ReasonLabel { reason }));
        }
        let streams = Family::<StreamLabel, Counter>::default();
        registry.register(
            "dataplane_streams",
            "Forwarded streams by direction and result (accepted, retried, or the refusal reason)",
            streams.clone(),
        );
        let ejections = Counter::default();
        registry.register(
            "dataplane_ejections",
            "Instances ejected locally after repeated failures",
            ejections.clone(),
        );
        let idle_closed = Counter::default();
        registry.register(
            "dataplane_idle_closed",
            "Forwarded connections closed after idle_timeout without a byte either way",
            idle_closed.clone(),
        );
        let cert_expiry = Gauge::default();
        registry.register(
            "dataplane_certificate_expiry_seconds",
            "When this node's certificate stops being valid, in Unix seconds (set at start and on reload)",
            cert_expiry.clone(),
        );
        let ingress_requests = Family::<CodeLabel, Counter>::default();
        registry.register("ingress_requests", "Ingress requests by response status", ingress_requests.clone());
        let dns_queries = Family::<KindLabel, Counter>::default();
        registry.register(
            "dns_queries",
            "DNS queries by outcome (answered, empty, nxdomain, refused, formerr)",
            dns_queries.clone(),
        );
        let pool_size = Family::<KindLabel, Gauge>::default();
        registry.register(
            "pool_members",
            "Members of each gossip pool this agent is in (region, wan)",
            pool_size.clone(),
        );
        let hints = Family::<KindLabel, Counter>::default();
        registry.register(
            "version_hints",
            "Version hints sent and received, and the pulls they started",
            hints.clone(),
        );
        let suspects = Gauge::default();
        registry.register("swim_suspects", "Members of this region SWIM currently suspects", suspects.clone());
        let swim_probes = Family::<KindLabel, Counter>::default();
        registry.register(
            "swim_probes",
            "SWIM probes started here: direct, and indirect after an unanswered direct one",
            swim_probes.clone(),
        );
        let swim_suspicions = Counter::default();
        registry.register(
            "swim_suspicions",
            "SWIM suspicions started or learned of here (each ends refuted or dead)",
            swim_suspicions.clone(),
        );
        let gateway_changes = Family::<KindLabel, Counter>::default();
        registry.register(
            "gateway_changes",
            "This agent becoming (promoted) or ceasing to be (demoted) a gateway; region gateway sets changing (changed)",
            gateway_changes.clone(),
        );
        let pool_refused = Counter::default();
        registry.register(
            "pool_refused",
            "Gossip from strangers refused because the pool is at its size limit",
            pool_refused.clone(),
        );
        let sent_bytes = Family::<KindLabel, Counter>::default();
        registry.register(
            "gossip_sent_bytes",
            "Sealed gossip bytes sent, by layer: region (pool), swim, hint, wan, ping, join",
            sent_bytes.clone(),
        );
        for state in ["alive", "suspect", "dead", "left", "unreachable"] {
            members.get_or_create(&StateLabel { state: state.into() }).set(0);
        }
        for direction in ["in", "out"] {
            gossip_bytes.get_or_create(&DirectionLabel { direction }).inc_by(0);
            gossip_datagrams.get_or_create(&DirectionLabel { direction }).inc_by(0);
        }
        Metrics {
            registry,
            members,
            gossip_bytes,
            gossip_datagrams,
            gossip_dropped,
            health_checks,
            service_healthy,
            events,
            snapshots,
            reprobes,
            peers_refused,
            streams,
            ejections,
            idle_closed,
            cert_expiry,
            ingress_requests,
            dns_queries,
            pool_size,
            hints,
            suspects,
            swim_probes,
            swim_suspicions,
            gateway_changes,
            pool_refused,
            sent_bytes,
        }
    }

    /// The metrics in the text exposition format (OpenMetrics 1.0, which Prometheus reads).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn dropped(&self, reason: &'static str) {
        self.gossip_dropped.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn event(&self, kind: &'static str) {
        self.events.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn refused(&self, reason: &'static str) {
        self.peers_refused.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn stream(&self, direction: &'static str, result: &'static str) {
        self.streams.get_or_create(&StreamLabel { direction, result }).inc();
    }

    pub fn dns(&self, kind: &'static str) {
        self.dns_queries.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn ingress(&self, code: &str) {
        self.ingress_requests.get_or_create(&CodeLabel { code: code.to_string() }).inc();
    }

    pub fn count_datagram(&self, direction: &'static str, bytes: usize) {
        self.gossip_datagrams.get_or_create(&DirectionLabel { direction }).inc();
        self.gossip_bytes.get_or_create(&DirectionLabel { direction }).inc_by(bytes as u64);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_labels() {
        let m = Metrics::new();
        m.dropped("unauthenticated");
        m.count_datagram("in", 100);
        let text = m.render();
        assert!(text.contains("grapevine_gossip_dropped_total{reason=\"unauthenticated\"} 1"), "{text}");
        assert!(text.contains("grapevine_gossip_bytes_total{direction=\"in\"} 100"), "{text}");
        assert!(text.contains("grapevine_members{state=\"alive\"} 0"), "{text}");
    }
}

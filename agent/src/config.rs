//! The agent's configuration: one `Config`, filled from built-in defaults, a TOML file,
//! `AGENT_*` environment variables and command-line flags, later sources winning.
//!
//! Every source is first read into the same [`Layer`] (all fields optional), layers are merged,
//! and only then is the result validated into a [`Config`]. Validation names the setting, the
//! bad value and what is allowed, so `agent run` can stop with exit code 2 before binding
//! anything. The environment is read through the [`Env`] trait so tests feed a map.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod file;

/// Where environment variables come from.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// A setting that could not be accepted: which one, the value given, and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting {setting} = {value:?}: {allowed}")]
pub struct ConfigError {
    pub setting: String,
    pub value: String,
    pub allowed: String,
}

impl ConfigError {
    fn new(setting: impl Into<String>, value: impl Into<String>, allowed: impl Into<String>) -> Self {
        ConfigError { setting: setting.into(), value: value.into(), allowed: allowed.into() }
    }
}

/// How logs are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A health check of a service this agent fronts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub target: CheckTarget,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive passes before an unhealthy instance counts as healthy again.
    pub rise: u32,
    /// Consecutive failures before a healthy instance counts as unhealthy.
    pub fall: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckTarget {
    /// GET this URL; any 2xx passes.
    Http(String),
    /// Open a TCP connection to this address.
    Tcp(String),
}

/// A service this sidecar fronts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceConfig {
    pub name: String,
    /// The app's local port (on 127.0.0.1).
    pub port: u16,
    pub weight: u32,
    pub pinned_to_region: bool,
    pub check: Option<Check>,
}

/// A service the local app calls through a local port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamConfig {
    pub service: String,
    pub listen: SocketAddr,
}

/// One ingress route: requests matching host and/or path prefix go to `service`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct IngressRoute {
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
    pub service: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Affinity {
    #[serde(default)]
    pub cookie: Option<String>,
    #[serde(default)]
    pub header: Option<String>,
    /// `client_ip` (the default) or `none`.
    #[serde(default)]
    pub fallback: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngressConfig {
    pub listen: SocketAddr,
    pub routes: Vec<IngressRoute>,
    pub affinity: Affinity,
}

/// Gossip tuning. Defaults suit a LAN or a few regions; see README for the trade-offs.
/// `GossipSettings::default()` is what an agent uses when nothing is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GossipSettings {
    /// The WAN pool's gossip round among gateways (`gossip_interval`); inside a region, SWIM
    /// probes and version hints carry changes, and the region pool's full exchange comes every
    /// `anti_entropy_interval`.
    pub interval: Duration,
    /// phi-accrual threshold: higher means slower but surer failure detection.
    pub phi_threshold: f64,
    /// How long a dead member's state is kept (it stops being gossiped after half of this).
    pub dead_node_grace: Duration,
    /// How often seeds and recently dead members are re-probed, so healed partitions merge.
    pub reprobe_interval: Duration,
    /// The region pool's anti-entropy round: slow, because changes travel by version hints.
    pub anti_entropy_interval: Duration,
    /// SWIM: direct probe interval, probe timeout, indirect probes, suspicion timeout.
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
    pub indirect_probes: usize,
    pub suspicion_timeout: Duration,
    /// Gateways per region in the WAN pool.
    pub gateways_per_region: usize,
    /// A pool refuses strangers past this many members.
    pub max_pool_size: usize,
}

impl Default for GossipSettings {
    fn default() -> Self {
        Layer::default().gossip_settings().unwrap_or_else(|e| unreachable!("the built-in defaults are valid: {e}"))
    }
}

/// Limits on cluster events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventSettings {
    pub max_payload: usize,
    /// How long an event stays in gossip state (and so how long it can still reach a member).
    pub ttl: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Security {
    pub cluster_key_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub dev: bool,
    pub cluster: String,
    /// None: generated (hostname + random suffix) and kept in `data_dir`.
    pub node_id: Option<String>,
    pub region: String,
    pub zone: String,
    /// None only in `--dev` without an explicit data dir: nothing is persisted.
    pub data_dir: Option<PathBuf>,
    pub join: Vec<String>,
    pub gossip_addr: SocketAddr,
    pub gossip_advertise: Option<SocketAddr>,
    pub data_addr: SocketAddr,
    pub data_advertise: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub dns_addr: SocketAddr,
    pub log_format: LogFormat,
    pub log_level: String,
    pub drain_timeout: Duration,
    /// Forwarded connections (upstream, upgraded ingress, from peers) that carry no byte either
    /// way for this long are closed; `None` never.
    pub idle_timeout: Option<Duration>,
    /// Threads of the async runtime that carries gossip and traffic.
    pub worker_threads: usize,
    pub gossip: GossipSettings,
    pub events: EventSettings,
    pub security: Security,
    pub services: Vec<ServiceConfig>,
    pub upstreams: Vec<UpstreamConfig>,
    pub ingress: Option<IngressConfig>,
}

pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:7070";
const NAME_ALLOWED: &str = "1 to 63 characters from a-z, A-Z, 0-9, '-', '_' and '.'";

// ----------------------------------------------------------------------------------------------
// Layers: every source parsed into the same shape, all optional.

/// A health check as written in the file: `{ http = "...", interval = "2s", ... }`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckLayer {
    pub http: Option<String>,
    pub tcp: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceLayer {
    pub name: String,
    pub port: u16,
    pub weight: Option<u32>,
    pub pinned_to_region: Option<bool>,
    pub check: Option<CheckLayer>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamLayer {
    pub service: String,
    pub listen: String,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IngressLayer {
    pub listen: Option<String>,
    #[serde(default)]
    pub routes: Vec<IngressRoute>,
    pub affinity: Option<Affinity>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SecurityLayer {
    pub cluster_key_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// One source's settings. Scalars are kept as strings until validation so that every source
/// reports a bad value the same way.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    pub dev: Option<bool>,
    pub cluster: Option<String>,
    pub node_id: Option<String>,
    pub region: Option<String>,
    pub zone: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub join: Option<Vec<String>>,
    pub gossip_addr: Option<String>,
    pub gossip_advertise: Option<String>,
    pub data_addr: Option<String>,
    pub data_advertise: Option<String>,
    pub admin_addr: Option<String>,
    pub dns_addr: Option<String>,
    pub log_format: Option<String>,
    pub log_level: Option<String>,
    pub drain_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub worker_threads: Option<String>,
    pub gossip_interval: Option<String>,
    pub phi_threshold: Option<String>,
    pub dead_node_grace: Option<String>,
    pub reprobe_interval: Option<String>,
    pub anti_entropy_interval: Option<String>,
    pub probe_interval: Option<String>,
    pub probe_timeout: Option<String>,
    pub indirect_probes: Option<String>,
    pub suspicion_timeout: Option<String>,
    pub gateways_per_region: Option<String>,
    pub max_pool_size: Option<String>,
    pub event_max_payload: Option<String>,
    pub event_ttl: Option<String>,
    pub security: Option<SecurityLayer>,
    #[serde(rename = "service")]
    pub services: Option<Vec<ServiceLayer>>,
    #[serde(rename = "upstream")]
    pub upstreams: Option<Vec<UpstreamLayer>>,
    pub ingress: Option<IngressLayer>,
}

/// The scalar settings that every source spells the same way: (file key, what it is).
/// Env var = `AGENT_` + upper-cased key; flag = `--` + key with dashes.
pub const SCALAR_SETTINGS: &[(&str, &str)] = &[
    ("cluster", "cluster name; agents join only agents of the same cluster"),
    ("node_id", "this node's stable id"),
    ("region", "region label"),
    ("zone", "zone label"),
    ("data_dir", "directory for the node id and API registrations"),
    ("gossip_addr", "gossip bind address (UDP)"),
    ("gossip_advertise", "gossip address peers dial"),
    ("data_addr", "QUIC data-plane bind address (UDP)"),
    ("data_advertise", "data-plane address peers dial"),
    ("admin_addr", "admin HTTP API address"),
    ("dns_addr", "DNS address"),
    ("log_format", "text or json"),
    ("log_level", "tracing filter"),
    ("drain_timeout", "how long open connections may finish on shutdown"),
    ("idle_timeout", "how long a forwarded connection may carry nothing before it is closed (0s: never)"),
    ("worker_threads", "threads carrying gossip and traffic"),
    ("gossip_interval", "gossip round interval"),
    ("phi_threshold", "failure-detector threshold"),
    ("dead_node_grace", "how long dead members are remembered"),
    ("reprobe_interval", "how often seeds and dead members are re-probed"),
    ("anti_entropy_interval", "region pool anti-entropy round interval (changes travel by hints)"),
    ("probe_interval", "SWIM direct probe interval"),
    ("probe_timeout", "how long a SWIM probe waits before asking others"),
    ("indirect_probes", "members asked to probe an unresponsive one"),
    ("suspicion_timeout", "how long a suspect may refute before it is dead"),
    ("gateways_per_region", "gateways carrying each region's summary"),
    ("max_pool_size", "largest gossip pool (its digest must fit one datagram)"),
    ("event_max_payload", "largest event payload in bytes"),
    ("event_ttl", "how long an event can still reach members"),
    ("cluster_key_file", "gossip keyring file (base64 keys, one per line, first seals)"),
    ("ca_file", "cluster CA certificates (PEM; two while the CA is replaced)"),
    ("cert_file", "this node's certificate (PEM)"),
    ("key_file", "this node's private key (PEM)"),
];

impl Layer {
    /// Reads a TOML file. A bad setting in it is named with the file, line and column.
    pub fn from_file(path: &std::path::Path) -> Result<Layer, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new("config", &shown, format!("a readable file ({e})")))?;
        Layer::parse_toml(&text).map_err(|(e, at)| match at {
            // The file is the value of a syntax error: say where in it only.
            Some(at) if e.setting == "config" => {
                ConfigError { value: shown, allowed: format!("{} ({})", e.allowed, at), ..e }
            }
            Some(at) => ConfigError { allowed: format!("{} ({shown}, {at})", e.allowed), ..e },
            None => ConfigError { allowed: format!("{} (in {shown})", e.allowed), ..e },
        })
    }

    /// Reads TOML text. A bad setting in it is named with its line and column.
    pub fn from_toml(text: &str) -> Result<Layer, ConfigError> {
        Layer::parse_toml(text).map_err(|(e, at)| match at {
            Some(at) => ConfigError { allowed: format!("{} ({at})", e.allowed), ..e },
            None => e,
        })
    }

    /// The layer, or what is wrong and where ("line L, column C").
    fn parse_toml(text: &str) -> Result<Layer, (ConfigError, Option<String>)> {
        let at = |offset: usize| {
            let (line, column) = file::line_col(text, offset);
            format!("line {line}, column {column}")
        };
        let doc = toml::de::DeTable::parse(text).map_err(|e| {
            let error = ConfigError::new("config", "", format!("valid TOML: {}", e.message().trim()));
            (error, e.span().map(|s| at(s.start)))
        })?;
        file::check(text, doc.get_ref()).map_err(|m| (m.error, Some(at(m.at))))?;
        // Numbers in the file are accepted for scalar settings and kept as strings.
        let mut value: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            (
                ConfigError::new("config", "", format!("valid TOML: {}", e.message().trim())),
                e.span().map(|s| at(s.start)),
            )
        })?;
        for (key, _) in SCALAR_SETTINGS {
            if let Some(v) = value.get_mut(*key) {
                match v {
                    toml::Value::Integer(i) => *v = toml::Value::String(i.to_string()),
                    toml::Value::Float(f) => *v = toml::Value::String(f.to_string()),
                    _ => {}
                }
            }
        }
        // The shape was checked above, so serde has nothing left to refuse; if it does, its
        // message is all there is to say.
        Layer::deserialize(toml::Value::Table(value)).map_err(|e| {
            (ConfigError::new("config", "", format!("a valid configuration ({})", e.message().trim())), None)
        })
    }

    /// Reads `AGENT_*` variables.
    pub fn from_env(env: &dyn Env) -> Result<Layer, ConfigError> {
        let mut l = Layer::default();
        let get = |key: &str| env.var(&format!("AGENT_{}", key.to_uppercase())).filter(|v| !v.is_empty());
        for (key, _) in SCALAR_SETTINGS {
            if let Some(v) = get(key) {
                l.set_scalar(key, v);
            }
        }
        if let Some(v) = get("dev") {
            l.dev = Some(parse_bool("AGENT_DEV", &v)?);
        }
        if let Some(v) = get("join") {
            l.join = Some(split_list(&v));
        }
        if let Some(v) = get("service") {
            l.services = Some(
                split_specs(&v, SERVICE_OPTIONS)
                    .iter()
                    .map(|s| parse_service_spec("AGENT_SERVICE", s))
                    .collect::<Result<_, _>>()?,
            );
        }
        if let Some(v) = get("upstream") {
            l.upstreams = Some(
                split_list(&v).iter().map(|s| parse_upstream_spec("AGENT_UPSTREAM", s)).collect::<Result<_, _>>()?,
            );
        }
        let ingress_listen = get("ingress_listen");
        let routes = get("ingress_route");
        let cookie = get("ingress_affinity_cookie");
        let header = get("ingress_affinity_header");
        let fallback = get("ingress_affinity_fallback");
        let has_affinity = cookie.is_some() || header.is_some() || fallback.is_some();
        if ingress_listen.is_some() || routes.is_some() || has_affinity {
            let routes = match routes {
                Some(r) => split_specs(&r, ROUTE_OPTIONS)
                    .iter()
                    .map(|s| parse_route_spec("AGENT_INGRESS_ROUTE", s))
                    .collect::<Result<_, _>>()?,
                None => Vec::new(),
            };
            let affinity = has_affinity.then_some(Affinity { cookie, header, fallback });
            l.ingress = Some(IngressLayer { listen: ingress_listen, routes, affinity });
        }
        Ok(l)
    }

    /// Sets one scalar setting by its file key.
    pub fn set_scalar(&mut self, key: &str, v: String) {
        let sec = || SecurityLayer::default();
        match key {
            "cluster" => self.cluster = Some(v),
            "node_id" => self.node_id = Some(v),
            "region" => self.region = Some(v),
            "zone" => self.zone = Some(v),
            "data_dir" => self.data_dir = Some(v.into()),
            "gossip_addr" => self.gossip_addr = Some(v),
            "gossip_advertise" => self.gossip_advertise = Some(v),
            "data_addr" => self.data_addr = Some(v),
            "data_advertise" => self.data_advertise = Some(v),
            "admin_addr" => self.admin_addr = Some(v),
            "dns_addr" => self.dns_addr = Some(v),
            "log_format" => self.log_format = Some(v),
            "log_level" => self.log_level = Some(v),
            "drain_timeout" => self.drain_timeout = Some(v),
            "idle_timeout" => self.idle_timeout = Some(v),
            "worker_threads" => self.worker_threads = Some(v),
            "gossip_interval" => self.gossip_interval = Some(v),
            "phi_threshold" => self.phi_threshold = Some(v),
            "dead_node_grace" => self.dead_node_grace = Some(v),
            "reprobe_interval" => self.reprobe_interval = Some(v),
            "anti_entropy_interval" => self.anti_entropy_interval = Some(v),
            "probe_interval" => self.probe_interval = Some(v),
            "probe_timeout" => self.probe_timeout = Some(v),
            "indirect_probes" => self.indirect_probes = Some(v),
            "suspicion_timeout" => self.suspicion_timeout = Some(v),
            "gateways_per_region" => self.gateways_per_region = Some(v),
            "max_pool_size" => self.max_pool_size = Some(v),
            "event_max_payload" => self.event_max_payload = Some(v),
            "event_ttl" => self.event_ttl = Some(v),
            "cluster_key_file" => self.security.get_or_insert_with(sec).cluster_key_file = Some(v.into()),
            "ca_file" => self.security.get_or_insert_with(sec).ca_file = Some(v.into()),
            "cert_file" => self.security.get_or_insert_with(sec).cert_file = Some(v.into()),
            "key_file" => self.security.get_or_insert_with(sec).key_file = Some(v.into()),
            other => debug_assert!(false, "unknown scalar setting {other}"),
        }
    }

    /// `self` with every setting present in `later` replaced by it.
    pub fn merge(mut self, later: Layer) -> Layer {
        // Every field `later` sets replaces `into`'s.
        macro_rules! take {
            ($into:expr, $from:expr; $($f:ident),*) => { $( if $from.$f.is_some() { $into.$f = $from.$f; } )* };
        }
        take!(
            self, later;
            dev,
            cluster,
            node_id,
            region,
            zone,
            data_dir,
            join,
            gossip_addr,
            gossip_advertise,
            data_addr,
            data_advertise,
            admin_addr,
            dns_addr,
            log_format,
            log_level,
            drain_timeout,
            idle_timeout,
            worker_threads,
            gossip_interval,
            phi_threshold,
            dead_node_grace,
            reprobe_interval,
            anti_entropy_interval,
            probe_interval,
            probe_timeout,
            indirect_probes,
            suspicion_timeout,
            gateways_per_region,
            max_pool_size,
            event_max_payload,
            event_ttl,
            services,
            upstreams
        );
        if let Some(s) = later.security {
            let mine = self.security.get_or_insert_with(SecurityLayer::default);
            take!(mine, s; cluster_key_file, ca_file, cert_file, key_file);
        }
        if let Some(i) = later.ingress {
            let mine = self.ingress.get_or_insert_with(IngressLayer::default);
            take!(mine, i; listen);
            if !i.routes.is_empty() {
                mine.routes = i.routes;
            }
            // Field by field: a flag naming the cookie keeps the file's fallback.
            if let Some(a) = i.affinity {
                let m = mine.affinity.get_or_insert_with(Affinity::default);
                take!(m, a; cookie, header, fallback);
            }
        }
        self
    }

    /// The gossip settings of this layer, defaults applied and validated.
    pub fn gossip_settings(&self) -> Result<GossipSettings, ConfigError> {
        let gossip = GossipSettings {
            interval: duration_in("gossip_interval", self.gossip_interval.as_deref(), "2s", ms(50), secs(60))?,
            phi_threshold: float_in("phi_threshold", self.phi_threshold.as_deref(), 8.0, 1.0, 50.0)?,
            dead_node_grace: duration_in(
                "dead_node_grace",
                self.dead_node_grace.as_deref(),
                "10m",
                secs(10),
                secs(7 * 86400),
            )?,
            reprobe_interval: duration_in(
                "reprobe_interval",
                self.reprobe_interval.as_deref(),
                "5s",
                ms(100),
                secs(3600),
            )?,
            anti_entropy_interval: duration_in(
                "anti_entropy_interval",
                self.anti_entropy_interval.as_deref(),
                "90s",
                ms(50),
                secs(600),
            )?,
            probe_interval: duration_in("probe_interval", self.probe_interval.as_deref(), "500ms", ms(20), secs(60))?,
            probe_timeout: duration_in("probe_timeout", self.probe_timeout.as_deref(), "250ms", ms(5), secs(30))?,
            indirect_probes: int_in("indirect_probes", self.indirect_probes.as_deref(), 5, 1, 16)? as usize,
            suspicion_timeout: duration_in(
                "suspicion_timeout",
                self.suspicion_timeout.as_deref(),
                "2s",
                ms(50),
                secs(600),
            )?,
            gateways_per_region: int_in("gateways_per_region", self.gateways_per_region.as_deref(), 2, 1, 8)? as usize,
            max_pool_size: int_in("max_pool_size", self.max_pool_size.as_deref(), 1000, 2, 1200)? as usize,
        };
        if gossip.probe_timeout >= gossip.probe_interval {
            return Err(ConfigError::new(
                "probe_timeout",
                humantime::format_duration(gossip.probe_timeout).to_string(),
                "a duration shorter than probe_interval",
            ));
        }
        Ok(gossip)
    }

    /// Validates the merged layers into a `Config`, applying defaults.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let gossip = self.gossip_settings()?;
        let dev = self.dev.unwrap_or(false);
        let loopback = if dev { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { IpAddr::V4(Ipv4Addr::UNSPECIFIED) };
        let cluster = self.cluster.unwrap_or_else(|| if dev { "dev".into() } else { "default".into() });
        check_name("cluster", &cluster)?;
        if let Some(id) = &self.node_id {
            check_node_id("node_id", id)?;
        }
        let region = match self.region {
            Some(r) => r,
            None if dev => "local".into(),
            None => {
                return Err(ConfigError::new(
                    "region",
                    "",
                    "a region label such as us-east (required outside --dev; set region, AGENT_REGION or --region)",
                ));
            }
        };
        check_name("region", &region)?;
        let zone = self.zone.unwrap_or_else(|| format!("{region}-a"));
        check_name("zone", &zone)?;
        let data_dir = match self.data_dir {
            Some(d) => Some(d),
            None if dev => None,
            None => Some(PathBuf::from("/var/lib/grapevine")),
        };
        let gossip_addr = socket_addr("gossip_addr", self.gossip_addr.as_deref(), SocketAddr::new(loopback, 7946))?;
        let data_addr = socket_addr("data_addr", self.data_addr.as_deref(), SocketAddr::new(loopback, 7947))?;
        let gossip_advertise = optional_socket_addr("gossip_advertise", self.gossip_advertise.as_deref())?;
        let data_advertise = optional_socket_addr("data_advertise", self.data_advertise.as_deref())?;
        // The client commands read the same setting and take `http://127.0.0.1:7070/` and
        // `localhost:7070`: so does the agent, or one AGENT_ADMIN_ADDR could not serve both.
        let admin_given = self.admin_addr.as_deref().map(|a| {
            let a = a.strip_prefix("http://").unwrap_or(a);
            let a = a.strip_suffix('/').unwrap_or(a);
            match a.strip_prefix("localhost:") {
                Some(port) => format!("127.0.0.1:{port}"),
                None => a.to_string(),
            }
        });
        let admin_addr = socket_addr(
            "admin_addr",
            admin_given.as_deref(),
            DEFAULT_ADMIN_ADDR.parse().unwrap_or_else(|_| unreachable!()),
        )?;
        let dns_addr =
            socket_addr("dns_addr", self.dns_addr.as_deref(), SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8600))?;
        let log_format = match self.log_format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => return Err(ConfigError::new("log_format", other, "text or json")),
        };
        let log_level = self.log_level.unwrap_or_else(|| "info".into());
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(ConfigError::new(
                "log_level",
                log_level,
                "a tracing filter such as info or grapevine=debug,warn",
            ));
        }
        let events = EventSettings {
            max_payload: int_in("event_max_payload", self.event_max_payload.as_deref(), 512, 0, 8192)? as usize,
            ttl: duration_in("event_ttl", self.event_ttl.as_deref(), "60s", secs(1), secs(3600))?,
        };
        let drain_timeout =
            duration_in("drain_timeout", self.drain_timeout.as_deref(), "10s", Duration::ZERO, secs(3600))?;
        let idle_timeout =
            duration_in("idle_timeout", self.idle_timeout.as_deref(), "1h", Duration::ZERO, secs(7 * 24 * 3600))?;
        if !idle_timeout.is_zero() && idle_timeout < secs(1) {
            return Err(ConfigError::new(
                "idle_timeout",
                humantime::format_duration(idle_timeout).to_string(),
                "0s (never) or a duration from 1s to 7days",
            ));
        }
        let idle_timeout = (!idle_timeout.is_zero()).then_some(idle_timeout);
        let worker_threads = int_in("worker_threads", self.worker_threads.as_deref(), 1, 1, 256)? as usize;
        let s = self.security.unwrap_or_default();
        let security = Security {
            cluster_key_file: s.cluster_key_file,
            ca_file: s.ca_file,
            cert_file: s.cert_file,
            key_file: s.key_file,
        };
        if !dev && security.cluster_key_file.is_none() {
            return Err(ConfigError::new(
                "cluster_key_file",
                "",
                "a keyring file (create one with `agent keygen > cluster.key`); required outside --dev",
            ));
        }
        let mut services = Vec::new();
        for s in self.services.unwrap_or_default() {
            let svc = resolve_service(s)?;
            if services.iter().any(|o: &ServiceConfig| o.name == svc.name) {
                return Err(ConfigError::new("service", svc.name, "each service at most once per agent"));
            }
            services.push(svc);
        }
        let mut upstreams = Vec::new();
        for u in self.upstreams.unwrap_or_default() {
            check_service_name("upstream.service", &u.service)?;
            let listen = socket_addr("upstream.listen", Some(&u.listen), gossip_addr)?;
            upstreams.push(UpstreamConfig { service: u.service, listen });
        }
        let ingress = match self.ingress {
            None => None,
            Some(i) => {
                let listen = match i.listen {
                    Some(l) => socket_addr("ingress.listen", Some(&l), gossip_addr)?,
                    None => {
                        return Err(ConfigError::new(
                            "ingress.listen",
                            "",
                            "an address such as 0.0.0.0:8080 when ingress routes are set",
                        ));
                    }
                };
                for r in &i.routes {
                    check_service_name("ingress.routes.service", &r.service)?;
                    if let Some(p) = &r.path_prefix
                        && !p.starts_with('/')
                    {
                        return Err(ConfigError::new("ingress.routes.path_prefix", p, "a path starting with '/'"));
                    }
                }
                let affinity = i.affinity.unwrap_or_default();
                if let Some(f) = &affinity.fallback
                    && f != "client_ip"
                    && f != "none"
                {
                    return Err(ConfigError::new("ingress.affinity.fallback", f, "client_ip or none"));
                }
                Some(IngressConfig { listen, routes: i.routes, affinity })
            }
        };
        Ok(Config {
            dev,
            cluster,
            node_id: self.node_id,
            region,
            zone,
            data_dir,
            join: self.join.unwrap_or_default(),
            gossip_addr,
            gossip_advertise,
            data_addr,
            data_advertise,
            admin_addr,
            dns_addr,
            log_format,
            log_level,
            drain_timeout,
            idle_timeout,
            worker_threads,
            gossip,
            events,
            security,
            services,
            upstreams,
            ingress,
        })
    }
}

/// Loads the configuration: defaults, then `file`, then the environment, then `flags`.
/// What each `AGENT_*` variable besides the scalar settings' sets (lower-cased, without `AGENT_`).
const OTHER_ENV: &[&str] = &[
    "config",
    "dev",
    "join",
    "service",
    "upstream",
    "ingress_listen",
    "ingress_route",
    "ingress_affinity_cookie",
    "ingress_affinity_header",
    "ingress_affinity_fallback",
];

/// The `AGENT_*` variables among `names` that no setting reads, each with the one it was most
/// likely meant to be: a misspelt variable is otherwise ignored without a word. (A warning, not
/// an error: other tools use the prefix too, such as CI runners' `AGENT_NAME`.)
pub fn unknown_env_vars(names: impl IntoIterator<Item = String>) -> Vec<(String, Option<String>)> {
    let known: Vec<&'static str> = SCALAR_SETTINGS.iter().map(|(k, _)| *k).chain(OTHER_ENV.iter().copied()).collect();
    let mut unknown: Vec<(String, Option<String>)> = names
        .into_iter()
        .filter_map(|name| {
            let key = name.strip_prefix("AGENT_")?.to_ascii_lowercase();
            if known.contains(&key.as_str()) {
                return None;
            }
            let close = file::closest(&key, &known).map(|k| format!("AGENT_{}", k.to_ascii_uppercase()));
            Some((name, close))
        })
        .collect();
    unknown.sort();
    unknown
}

pub fn load(file: Option<&std::path::Path>, env: &dyn Env, flags: Layer) -> Result<Config, ConfigError> {
    let mut layer = Layer::default();
    let file = file.map(PathBuf::from).or_else(|| env.var("AGENT_CONFIG").map(PathBuf::from));
    if let Some(path) = &file {
        layer = layer.merge(Layer::from_file(path)?);
    }
    layer.merge(Layer::from_env(env)?).merge(flags).resolve().map_err(|e| {
        // A value the file has right in type but not in range is found only now: say where.
        let text = file.as_ref().and_then(|p| std::fs::read_to_string(p).ok().map(|t| (p, t)));
        match text.and_then(|(p, t)| file::position_of(&t, &e.setting, &e.value).map(|o| (p, file::line_col(&t, o)))) {
            Some((path, (line, column))) => ConfigError {
                allowed: format!("{} ({}, line {line}, column {column})", e.allowed, path.display()),
                ..e
            },
            None => e,
        }
    })
}

/// Validates one service: from the file, a flag, the environment or `PUT /v1/services/NAME`.
/// Its settings are named `service[NAME].port` and so on.
pub fn resolve_service(s: ServiceLayer) -> Result<ServiceConfig, ConfigError> {
    check_service_name("service.name", &s.name)?;
    let setting = |key: &str| format!("service[{}].{key}", s.name);
    if s.port == 0 {
        return Err(ConfigError::new(setting("port"), "0", "a port from 1 to 65535"));
    }
    let weight = s.weight.unwrap_or(grapevine_ring::DEFAULT_WEIGHT);
    if weight == 0 || weight > grapevine_ring::MAX_WEIGHT {
        return Err(ConfigError::new(
            setting("weight"),
            weight.to_string(),
            format!("a weight from 1 to {}", grapevine_ring::MAX_WEIGHT),
        ));
    }
    let check = match s.check {
        None => None,
        Some(c) => {
            let target = match (c.http, c.tcp) {
                (Some(url), None) => {
                    if !(url.starts_with("http://")) {
                        return Err(ConfigError::new(setting("check.http"), url, "an http:// URL"));
                    }
                    CheckTarget::Http(url)
                }
                (None, Some(addr)) => CheckTarget::Tcp(addr),
                (Some(url), Some(addr)) => {
                    return Err(ConfigError::new(
                        setting("check"),
                        format!("http = {url}, tcp = {addr}"),
                        "only one of http (a URL to GET) or tcp (an address to connect to), not both",
                    ));
                }
                (None, None) => {
                    return Err(ConfigError::new(
                        setting("check"),
                        "",
                        "one of http (a URL to GET, such as http://127.0.0.1:3000/healthz) or tcp (an address \
                         to connect to, such as 127.0.0.1:5432)",
                    ));
                }
            };
            let interval = duration_in(&setting("check.interval"), c.interval.as_deref(), "2s", ms(100), secs(3600))?;
            let timeout = duration_in(&setting("check.timeout"), c.timeout.as_deref(), "1s", ms(10), secs(600))?;
            if timeout > interval {
                return Err(ConfigError::new(
                    setting("check.timeout"),
                    humantime::format_duration(timeout).to_string(),
                    "at most the check interval",
                ));
            }
            let rise = c.rise.unwrap_or(2);
            let fall = c.fall.unwrap_or(2);
            if !(1..=100).contains(&rise) {
                return Err(ConfigError::new(setting("check.rise"), rise.to_string(), "a whole number from 1 to 100"));
            }
            if !(1..=100).contains(&fall) {
                return Err(ConfigError::new(setting("check.fall"), fall.to_string(), "a whole number from 1 to 100"));
            }
            Some(Check { target, interval, timeout, rise, fall })
        }
    };
    Ok(ServiceConfig {
        name: s.name,
        port: s.port,
        weight,
        pinned_to_region: s.pinned_to_region.unwrap_or(false),
        check,
    })
}

// ----------------------------------------------------------------------------------------------
// Compact list forms shared by flags and env vars.

const SERVICE_OPTIONS: &[&str] = &["check", "tcp_check", "weight", "pinned", "interval", "timeout", "rise", "fall"];
/// The `--service` form, for messages.
const SERVICE_SPEC: &str = "NAME=PORT[,check=URL][,tcp_check=ADDR][,weight=N][,pinned=true][,interval=2s]\
                            [,timeout=1s][,rise=N][,fall=N], such as profile=3000,check=http://127.0.0.1:3000/healthz";
const ROUTE_OPTIONS: &[&str] = &["host", "path_prefix", "service"];

/// Splits a comma-separated env var of specs whose own options are comma-separated too: a
/// `key=value` item whose key is one of `options` belongs to the spec before it.
fn split_specs(v: &str, options: &[&str]) -> Vec<String> {
    let mut specs: Vec<String> = Vec::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let key = item.split('=').next().unwrap_or("");
        let starts_new = if options == ROUTE_OPTIONS {
            // A route starts at host= or path_prefix= unless the current one lacks it.
            specs.last().is_none_or(|cur| cur.contains("service=") && key != "service")
        } else {
            !options.contains(&key)
        };
        match specs.last_mut() {
            Some(cur) if !starts_new => {
                cur.push(',');
                cur.push_str(item);
            }
            _ => specs.push(item.to_string()),
        }
    }
    specs
}

fn split_list(v: &str) -> Vec<String> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

/// `profile=3000[,check=http://...][,tcp_check=ADDR][,weight=N][,pinned=true][,interval=2s][,timeout=1s][,rise=N][,fall=N]`
pub fn parse_service_spec(setting: &str, spec: &str) -> Result<ServiceLayer, ConfigError> {
    let bad = |allowed: &str| ConfigError::new(setting, spec, allowed);
    let mut parts = spec.split(',');
    let first = parts.next().unwrap_or("");
    let (name, port) = first.split_once('=').ok_or_else(|| bad(SERVICE_SPEC))?;
    let port: u16 = port.parse().map_err(|_| bad("NAME=PORT with PORT from 1 to 65535"))?;
    let mut s = ServiceLayer { name: name.to_string(), port, ..Default::default() };
    let mut check = CheckLayer::default();
    let mut has_check = false;
    for part in parts {
        let (k, v) = part.split_once('=').ok_or_else(|| bad(&format!("options as key=value: {SERVICE_SPEC}")))?;
        match k {
            "check" => {
                check.http = Some(v.to_string());
                has_check = true;
            }
            "tcp_check" => {
                check.tcp = Some(v.to_string());
                has_check = true;
            }
            "weight" => s.weight = Some(v.parse().map_err(|_| bad("weight=N with N from 1 to 10000"))?),
            "pinned" => s.pinned_to_region = Some(parse_bool(setting, v)?),
            "interval" => check.interval = Some(v.to_string()),
            "timeout" => check.timeout = Some(v.to_string()),
            "rise" => check.rise = Some(v.parse().map_err(|_| bad("rise=N"))?),
            "fall" => check.fall = Some(v.parse().map_err(|_| bad("fall=N"))?),
            _ => {
                let close = file::closest(k, SERVICE_OPTIONS);
                let hint = close.map(|c| format!("did you mean {c}? ")).unwrap_or_default();
                return Err(bad(&format!("{hint}options {}: {SERVICE_SPEC}", SERVICE_OPTIONS.join(", "))));
            }
        }
    }
    if has_check {
        s.check = Some(check);
    }
    Ok(s)
}

/// `login=127.0.0.1:9001`
pub fn parse_upstream_spec(setting: &str, spec: &str) -> Result<UpstreamLayer, ConfigError> {
    let (service, listen) = spec
        .split_once('=')
        .ok_or_else(|| ConfigError::new(setting, spec, "SERVICE=ADDR such as login=127.0.0.1:9001"))?;
    Ok(UpstreamLayer { service: service.to_string(), listen: listen.to_string() })
}

/// `host=H,service=S` or `path_prefix=/p,service=S`
pub fn parse_route_spec(setting: &str, spec: &str) -> Result<IngressRoute, ConfigError> {
    let bad = || ConfigError::new(setting, spec, "host=H,service=S or path_prefix=/p,service=S");
    let mut r = IngressRoute::default();
    for part in spec.split(',') {
        match part.split_once('=').ok_or_else(bad)? {
            ("host", v) => r.host = Some(v.to_string()),
            ("path_prefix", v) => r.path_prefix = Some(v.to_string()),
            ("service", v) => r.service = v.to_string(),
            _ => return Err(bad()),
        }
    }
    if r.service.is_empty() {
        return Err(bad());
    }
    Ok(r)
}

// ----------------------------------------------------------------------------------------------
// Scalar parsing.

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

fn parse_bool(setting: &str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(ConfigError::new(setting, v, "true or false")),
    }
}

pub fn check_name(setting: &str, v: &str) -> Result<(), ConfigError> {
    let ok = !v.is_empty() && v.len() <= 63 && v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok { Ok(()) } else { Err(ConfigError::new(setting, v, NAME_ALLOWED)) }
}

/// A node id: a name, and one a certificate can carry, since it is the name in the node's
/// certificate and the server name peers dial it by (so not "42", "web.1" or an IP address).
/// `agent run` and `agent cert issue` check the same.
pub fn check_node_id(setting: &str, id: &str) -> Result<(), ConfigError> {
    check_name(setting, id)?;
    match rustls::pki_types::ServerName::try_from(id) {
        Ok(rustls::pki_types::ServerName::DnsName(_)) => Ok(()),
        _ => Err(ConfigError::new(
            setting,
            id,
            "a name a certificate can carry: letters, digits, '-' and '.', not all digits after the last '.'",
        )),
    }
}

/// A service name: one DNS label, since DNS answers for SERVICE.service.grapevine.
pub fn check_service_name(setting: &str, v: &str) -> Result<(), ConfigError> {
    let ok = !v.is_empty() && v.len() <= 63 && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            setting,
            v,
            "a service name is one DNS label: 1 to 63 letters, digits and '-' (no '.': DNS names are \
             SERVICE.service.grapevine)",
        ))
    }
}

fn socket_addr(setting: &str, v: Option<&str>, default: SocketAddr) -> Result<SocketAddr, ConfigError> {
    match v {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| ConfigError::new(setting, v, "an IP address and port such as 127.0.0.1:7070")),
    }
}

fn optional_socket_addr(setting: &str, v: Option<&str>) -> Result<Option<SocketAddr>, ConfigError> {
    match v {
        None => Ok(None),
        Some(v) => match v.parse::<SocketAddr>() {
            Ok(a) if a.ip().is_unspecified() => {
                Err(ConfigError::new(setting, v, "an address peers can dial (not 0.0.0.0)"))
            }
            Ok(a) => Ok(Some(a)),
            Err(_) => {
                // A DNS name is allowed for advertise addresses: resolved once at start.
                v.to_socket_addrs().ok().and_then(|mut it| it.next()).map(Some).ok_or_else(|| {
                    ConfigError::new(setting, v, "an address and port peers can dial, such as 203.0.113.4:7946")
                })
            }
        },
    }
}

fn duration_in(
    setting: &str,
    v: Option<&str>,
    default: &str,
    min: Duration,
    max: Duration,
) -> Result<Duration, ConfigError> {
    let text = v.unwrap_or(default);
    let allowed = || {
        format!(
            "a duration such as 500ms, 2s or 1m, from {} to {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        )
    };
    let d = humantime::parse_duration(text).map_err(|_| ConfigError::new(setting, text, allowed()))?;
    if d < min || d > max {
        return Err(ConfigError::new(setting, text, allowed()));
    }
    Ok(d)
}

fn float_in(setting: &str, v: Option<&str>, default: f64, min: f64, max: f64) -> Result<f64, ConfigError> {
    let Some(text) = v else { return Ok(default) };
    match text.parse::<f64>() {
        Ok(f) if (min..=max).contains(&f) => Ok(f),
        _ => Err(ConfigError::new(setting, text, format!("a number from {min} to {max}"))),
    }
}

fn int_in(setting: &str, v: Option<&str>, default: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
    let Some(text) = v else { return Ok(default) };
    match text.parse::<u64>() {
        Ok(i) if (min..=max).contains(&i) => Ok(i),
        _ => Err(ConfigError::new(setting, text, format!("a whole number from {min} to {max}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_address_takes_the_forms_the_client_commands_take() {
        for (given, want) in [
            ("127.0.0.1:7071", "127.0.0.1:7071"),
            ("http://127.0.0.1:7072/", "127.0.0.1:7072"),
            ("localhost:7073", "127.0.0.1:7073"),
        ] {
            let c = Layer { dev: Some(true), admin_addr: Some(given.into()), ..Default::default() }.resolve().unwrap();
            assert_eq!(c.admin_addr.to_string(), want, "{given}");
        }
        assert!(
            Layer { dev: Some(true), admin_addr: Some("https://127.0.0.1:7070".into()), ..Default::default() }
                .resolve()
                .is_err()
        );
    }

    #[test]
    fn agent_variables_no_setting_reads_are_named_with_a_guess() {
        let names = ["AGENT_REGOIN", "AGENT_REGION", "AGENT_CONFIG", "AGENT_NAME", "PATH", "AGENT_INGRESS_ROUTE"];
        let unknown = unknown_env_vars(names.map(str::to_string));
        assert_eq!(unknown, [("AGENT_NAME".to_string(), None), ("AGENT_REGOIN".into(), Some("AGENT_REGION".into()))]);
    }

    #[test]
    fn node_ids_must_be_names_a_certificate_can_carry() {
        let resolve = |id: &str| {
            let mut l = Layer::default();
            l.set_scalar("node_id", id.into());
            l.set_scalar("region", "eu".into());
            l.dev = Some(true);
            l.resolve().map(|c| c.node_id.unwrap_or_default()).map_err(|e| e.setting)
        };
        assert_eq!(resolve("web-1").as_deref(), Ok("web-1"));
        assert_eq!(resolve("web-1.eu").as_deref(), Ok("web-1.eu"));
        for bad in ["42", "web.1", "10.0.0.1"] {
            assert_eq!(resolve(bad), Err("node_id".to_string()), "{bad}");
        }
    }

    #[test]
    fn idle_timeout_defaults_to_an_hour_and_zero_turns_it_off() {
        let resolve = |v: Option<&str>| {
            let mut l = Layer { dev: Some(true), ..Layer::default() };
            if let Some(v) = v {
                l.set_scalar("idle_timeout", v.into());
            }
            l.resolve().map(|c| c.idle_timeout).map_err(|e| e.setting)
        };
        assert_eq!(resolve(None), Ok(Some(Duration::from_secs(3600))));
        assert_eq!(resolve(Some("90s")), Ok(Some(Duration::from_secs(90))));
        assert_eq!(resolve(Some("0s")), Ok(None));
        assert_eq!(resolve(Some("soon")), Err("idle_timeout".to_string()));
        assert_eq!(resolve(Some("10ms")), Err("idle_timeout".to_string()), "would close every splice at once");
    }

    #[test]
    fn a_flag_naming_the_affinity_cookie_keeps_the_files_fallback() {
        let file: Layer = toml::from_str(
            r#"
[ingress]
listen = "127.0.0.1:8080"
affinity = { cookie = "a", fallback = "none" }
"#,
        )
        .unwrap();
        let flags = Layer {
            ingress: Some(IngressLayer {
                listen: None,
                routes: Vec::new(),
                affinity: Some(Affinity { cookie: Some("b".into()), header: None, fallback: None }),
            }),
            ..Layer::default()
        };
        let merged = file.merge(flags).ingress.unwrap().affinity.unwrap();
        assert_eq!(merged, Affinity { cookie: Some("b".into()), header: None, fallback: Some("none".into()) });
    }

    #[test]
    fn every_scalar_setting_survives_a_merge() {
        // A setting missing from `merge` is read from every source and then dropped.
        for (key, _) in SCALAR_SETTINGS {
            let mut later = Layer::default();
            later.set_scalar(key, "1".into());
            assert_ne!(later, Layer::default(), "{key} has no field");
            assert_eq!(Layer::default().merge(later.clone()), later, "merge drops {key}");
        }
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    const FILE: &str = r#"
cluster = "prod"
node_id = "web-1"
region = "us-east"
zone = "us-east-1a"
data_dir = "/tmp/gv"
join = ["10.0.0.5:7946", "seed.example.com:7946"]
gossip_addr = "0.0.0.0:7946"
admin_addr = "127.0.0.1:7070"
gossip_interval = "500ms"
phi_threshold = 6

[security]
cluster_key_file = "/etc/grapevine/cluster.key"

[[service]]
name = "profile"
port = 3000
weight = 100
pinned_to_region = false
check = { http = "http://127.0.0.1:3000/healthz", interval = "2s", timeout = "1s" }

[[upstream]]
service = "login"
listen = "127.0.0.1:9001"

[ingress]
listen = "0.0.0.0:8080"
routes = [ { host = "profile.example.com", service = "profile" },
           { path_prefix = "/login", service = "login" } ]
affinity = { cookie = "meteor_login_token", fallback = "client_ip" }
"#;

    #[test]
    fn the_design_example_file_parses() {
        let c = Layer::from_toml(FILE).unwrap().resolve().unwrap();
        assert_eq!(c.cluster, "prod");
        assert_eq!(c.node_id.as_deref(), Some("web-1"));
        assert_eq!(c.join.len(), 2);
        assert_eq!(c.gossip.interval, Duration::from_millis(500));
        assert_eq!(c.gossip.phi_threshold, 6.0);
        assert_eq!(
            c.services[0].check.as_ref().unwrap().target,
            CheckTarget::Http("http://127.0.0.1:3000/healthz".into())
        );
        assert_eq!(c.upstreams[0].listen, "127.0.0.1:9001".parse().unwrap());
        let ingress = c.ingress.unwrap();
        assert_eq!(ingress.routes.len(), 2);
        assert_eq!(ingress.affinity.cookie.as_deref(), Some("meteor_login_token"));
    }

    #[test]
    fn later_sources_win() {
        let file = Layer::from_toml(FILE).unwrap();
        let e = env(&[("AGENT_REGION", "us-west"), ("AGENT_ZONE", "us-west-2a"), ("AGENT_JOIN", "a:1, b:2")]);
        let mut flags = Layer::default();
        flags.set_scalar("zone", "us-west-2b".into());
        let c = file.merge(Layer::from_env(&e).unwrap()).merge(flags).resolve().unwrap();
        assert_eq!(c.cluster, "prod"); // file
        assert_eq!(c.region, "us-west"); // env over file
        assert_eq!(c.zone, "us-west-2b"); // flag over env
        assert_eq!(c.join, ["a:1", "b:2"]); // env list, comma-separated
    }

    #[test]
    fn env_lists_of_services_keep_their_options() {
        let e = env(&[
            ("AGENT_DEV", "true"),
            ("AGENT_SERVICE", "profile=3000,check=http://127.0.0.1:3000/healthz,weight=50,login=4000"),
            ("AGENT_UPSTREAM", "login=127.0.0.1:9001,profile=127.0.0.1:9002"),
            ("AGENT_INGRESS_LISTEN", "127.0.0.1:8080"),
            ("AGENT_INGRESS_ROUTE", "host=a.example,service=profile,path_prefix=/login,service=login"),
        ]);
        let c = Layer::from_env(&e).unwrap().resolve().unwrap();
        assert_eq!(c.services.len(), 2);
        assert_eq!(c.services[0].weight, 50);
        assert!(c.services[0].check.is_some());
        assert_eq!(c.services[1].name, "login");
        assert_eq!(c.upstreams.len(), 2);
        let routes = c.ingress.unwrap().routes;
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[1].path_prefix.as_deref(), Some("/login"));
    }

    #[test]
    fn bad_settings_name_the_setting_and_what_is_allowed() {
        let cases: &[(&str, &str)] = &[
            ("dev = true\ngossip_addr = \"nonsense\"", "gossip_addr"),
            ("dev = true\ngossip_interval = \"fast\"", "gossip_interval"),
            ("dev = true\nphi_threshold = 0", "phi_threshold"),
            ("dev = true\nregion = \"us east\"", "region"),
            ("dev = true\nlog_format = \"xml\"", "log_format"),
            ("dev = true\ncolour = \"blue\"", "colour"),
            ("dev = true\n[[service]]\nname = \"a\"\nport = 0", "service[a].port"),
            (
                "dev = true\n[[service]]\nname = \"a\"\nport = 1\ncheck = { http = \"ftp://x\" }",
                "service[a].check.http",
            ),
            ("[security]\ncluster_key_file = \"k\"", "region"),
            ("region = \"r\"", "cluster_key_file"),
        ];
        for (text, setting) in cases {
            let err = Layer::from_toml(text).and_then(Layer::resolve).unwrap_err();
            assert_eq!(&err.setting, setting, "{text}: {err}");
            assert!(!err.allowed.is_empty());
        }
        let err = Layer::from_env(&env(&[("AGENT_DEV", "maybe")])).unwrap_err();
        assert_eq!(err.setting, "AGENT_DEV");
        assert!(err.to_string().contains("true or false"), "{err}");
    }

    /// The error `text` gives, from the file or when resolved.
    fn error_of(text: &str) -> ConfigError {
        Layer::from_toml(text).and_then(Layer::resolve).unwrap_err()
    }

    #[test]
    fn an_unknown_key_is_named_with_its_value_line_and_a_close_match() {
        let e = error_of("dev = true\nprobe_intervall = \"1s\"\n");
        assert_eq!((e.setting.as_str(), e.value.as_str()), ("probe_intervall", "1s"), "{e}");
        assert!(e.allowed.starts_with("no such setting; did you mean probe_interval?"), "{e}");
        assert!(e.allowed.ends_with("(line 2, column 1)"), "{e}");
        let e = error_of("dev = true\ncolour = 3\n");
        assert_eq!(e.value, "3");
        assert!(e.allowed.contains("no such setting") && !e.allowed.contains("did you mean"), "{e}");
        let e = error_of("dev = true\n[[service]]\nname = \"web\"\nport = 1\npinned = true\n");
        assert_eq!(e.setting, "service[web].pinned", "{e}");
        assert!(e.allowed.contains("did you mean pinned_to_region?"), "{e}");
    }

    #[test]
    fn a_key_in_the_wrong_table_says_where_it_belongs() {
        let e = error_of("dev = true\ncluster_key_file = \"k\"\n");
        assert_eq!((e.setting.as_str(), e.value.as_str()), ("cluster_key_file", "k"), "{e}");
        assert!(
            e.allowed.contains("no such setting at the top level; cluster_key_file belongs under [security]"),
            "{e}"
        );
        let e = error_of("dev = true\n[security]\nregion = \"eu\"\n");
        assert_eq!(e.setting, "security.region", "{e}");
        assert!(e.allowed.contains("region belongs at the top level"), "{e}");
        let e = error_of("dev = true\n[[service]]\nname = \"web\"\nport = 1\nca_file = \"ca.pem\"\n");
        assert!(e.allowed.contains("ca_file belongs under [security]"), "{e}");
    }

    #[test]
    fn a_value_of_the_wrong_type_or_range_says_what_is_allowed() {
        let svc = |rest: &str| error_of(&format!("dev = true\n[[service]]\nname = \"web\"\n{rest}\n"));
        let e = svc("port = 70000");
        assert_eq!((e.setting.as_str(), e.value.as_str()), ("service[web].port", "70000"), "{e}");
        assert_eq!(e.allowed, "a port from 1 to 65535 (line 4, column 1)");
        let e = svc("port = \"3000\"");
        assert!(e.allowed.starts_with("a port from 1 to 65535, without quotes"), "{e}");
        let e = svc("port = 1\nweight = 20000");
        assert_eq!((e.setting.as_str(), e.value.as_str()), ("service[web].weight", "20000"), "{e}");
        assert!(e.allowed.starts_with("a weight from 1 to 10000"), "{e}");
        let e = svc("port = 1\npinned_to_region = \"yes\"");
        assert_eq!(e.setting, "service[web].pinned_to_region", "{e}");
        assert!(e.allowed.starts_with("true or false, without quotes"), "{e}");
        let e = svc("port = 1\ncheck = { tcp = \"127.0.0.1:1\", interval = 2 }");
        assert_eq!((e.setting.as_str(), e.value.as_str()), ("service[web].check.interval", "2"), "{e}");
        assert!(e.allowed.starts_with("a duration such as 2s, in quotes"), "{e}");
        let e = svc("weight = 5");
        assert_eq!(e.setting, "service[web].port", "{e}");
        assert!(e.allowed.starts_with("a port from 1 to 65535 (required)"), "{e}");
        let e = error_of("dev = 1\n");
        assert_eq!((e.setting.as_str(), e.value.as_str()), ("dev", "1"), "{e}");
        let e = error_of("dev = true\nregion = [\"eu\"]\n");
        assert!(e.allowed.starts_with("a single value"), "{e}");
        let e = error_of("dev = true\n[service]\nname = \"web\"\n");
        assert!(e.allowed.starts_with("one [[service]] table for each"), "{e}");
    }

    #[test]
    fn a_check_takes_one_target() {
        let e = error_of(
            "dev = true\n[[service]]\nname = \"web\"\nport = 1\ncheck = { http = \"http://127.0.0.1:1/\", tcp = \"127.0.0.1:1\" }\n",
        );
        assert_eq!(e.setting, "service[web].check", "{e}");
        assert_eq!(e.value, "http = http://127.0.0.1:1/, tcp = 127.0.0.1:1");
        assert!(e.allowed.contains("only one of http") && e.allowed.contains("not both"), "{e}");
        let e = parse_service_spec("--service", "web=1,check=http://127.0.0.1:1/,tcp_check=127.0.0.1:1")
            .and_then(resolve_service)
            .unwrap_err();
        assert_eq!(e.setting, "service[web].check", "{e}");
        let e = error_of("dev = true\n[[service]]\nname = \"web\"\nport = 1\ncheck = { interval = \"1s\" }\n");
        assert!(e.allowed.starts_with("one of http"), "{e}");
    }

    #[test]
    fn toml_syntax_errors_say_where() {
        let e = error_of("dev = true\nregion = \"eu\nzone = 1\n");
        assert_eq!(e.setting, "config");
        assert!(e.allowed.starts_with("valid TOML: "), "{e}");
        assert!(e.allowed.ends_with("(line 2, column 13)"), "{e}");
    }

    #[test]
    fn errors_in_a_file_name_the_file_not_as_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c1.toml");
        std::fs::write(&path, "dev = true\nprobe_intervall = \"1s\"\n").unwrap();
        let e = Layer::from_file(&path).unwrap_err();
        assert_eq!((e.setting.as_str(), e.value.as_str()), ("probe_intervall", "1s"), "{e}");
        assert!(e.allowed.ends_with(&format!("({}, line 2, column 1)", path.display())), "{e}");
        std::fs::write(&path, "dev = \n").unwrap();
        let e = Layer::from_file(&path).unwrap_err();
        assert_eq!((e.setting.as_str(), e.value.clone()), ("config", path.display().to_string()), "{e}");
        assert!(e.allowed.ends_with("(line 1, column 7)"), "{e}");
    }

    #[test]
    fn service_names_are_one_dns_label() {
        assert!(check_service_name("s", "api-v2").is_ok());
        for bad in ["api.v2", "a_b", "", "a b"] {
            let e = check_service_name("service.name", bad).unwrap_err();
            assert!(e.allowed.contains("one DNS label"), "{bad}: {e}");
        }
        let e = error_of("dev = true\n[[service]]\nname = \"api.v2\"\nport = 1\n");
        assert_eq!((e.setting.as_str(), e.value.as_str()), ("service.name", "api.v2"));
        let flag = parse_service_spec("--service", "api.v2=3000").unwrap();
        assert_eq!(resolve_service(flag).unwrap_err().setting, "service.name");
        let e = error_of("dev = true\n[[upstream]]\nservice = \"api.v2\"\nlisten = \"127.0.0.1:1\"\n");
        assert_eq!(e.setting, "upstream.service");
    }

    #[test]
    fn a_service_flag_without_a_port_lists_every_option() {
        let e = parse_service_spec("--service", "web").unwrap_err();
        assert_eq!((e.setting.as_str(), e.value.as_str()), ("--service", "web"));
        for option in SERVICE_OPTIONS {
            assert!(e.allowed.contains(&format!("{option}=")), "{option}: {e}");
        }
        let e = parse_service_spec("--service", "web=1,wieght=5").unwrap_err();
        assert!(e.allowed.starts_with("did you mean weight?"), "{e}");
    }

    #[test]
    fn dev_needs_nothing_else() {
        let c = Layer { dev: Some(true), ..Default::default() }.resolve().unwrap();
        assert_eq!(c.region, "local");
        assert_eq!(c.gossip_addr, "127.0.0.1:7946".parse().unwrap());
        assert!(c.data_dir.is_none());
    }
}

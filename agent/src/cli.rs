//! The `agent` command line: clap definitions, and the flags turned into a config [`Layer`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{self, ConfigError, Layer};

#[derive(Debug, Parser)]
#[command(name = "agent", version, about = "Grapevine: the sidecar agent for services across regions and providers")]
#[command(propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the agent (foreground; logs to stderr).
    Run(Box<RunArgs>),
    /// The cluster at a glance: members by region, services, this node.
    Status(ClientArgs),
    /// One line per member.
    Members(ClientArgs),
    /// One line per service instance.
    Services(ClientArgs),
    /// Where a request for SERVICE (with an affinity key) goes from this agent.
    Route(RouteArgs),
    /// Cluster events: fire one, or watch them arrive.
    #[command(subcommand)]
    Event(EventCommand),
    /// Leave the cluster gracefully: announce, drain, exit.
    Leave(ClientArgs),
    /// Read the `[security]` CA, certificate and key files again (as SIGHUP does): new
    /// connections use them, and open ones whose peer the CAs no longer vouch for are closed.
    Reload(ClientArgs),
    /// Print a new cluster key (base64, 32 bytes) for `cluster_key_file`.
    Keygen,
    /// Rotate the gossip keyring of a running cluster: install, use, remove (as `serf keys`).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The cluster CA for QUIC mutual TLS.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Node certificates signed by the cluster CA.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Print shell completions.
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
}

/// A rotation is three steps, each run once every member has the last (each command waits
/// for that): `agent keys install NEW`, `agent keys use NEW`, `agent keys remove OLD`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Per key: how many members hold it and how many seal with it.
    List(ClientArgs),
    /// Add a key on every member: it opens datagrams at once and seals after `agent keys use`.
    Install(KeyArgs),
    /// Make an installed key the one every member seals with.
    Use(KeyArgs),
    /// Drop a key from every member (not while any member seals with it).
    Remove(KeyArgs),
}

#[derive(Debug, Clone, Args)]
pub struct KeyArgs {
    /// The key, base64 as `agent keygen` prints it, or `-` to read it from standard input; for
    /// `use` and `remove` its fingerprint (from `agent keys list`) also does.
    pub key: String,
    /// Go ahead although a member lacks the key (`use`) or seals with it (`remove`).
    #[arg(long)]
    pub force: bool,
    /// How long to wait for every member to announce the change.
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = parse_wait)]
    pub wait: std::time::Duration,
    #[command(flatten)]
    pub client: ClientArgs,
}

fn parse_wait(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (a duration such as 30s)"))
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a cluster CA: DIR/ca.pem and DIR/ca.key (never overwrites an existing key).
    Init {
        /// Directory to write into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Cluster name, for the CA's common name.
        #[arg(long, default_value = "default")]
        cluster: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Issue a certificate for one node: DIR/ID.pem and DIR/ID.key (never overwrites an existing
    /// key without --force).
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The node id the certificate names (the agent's node_id).
        #[arg(long, value_name = "ID")]
        node: String,
        /// Directory to write into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Replace an existing DIR/ID.key (and DIR/ID.pem).
        #[arg(long)]
        force: bool,
        /// How long the certificate is good for, in days (default: until 2100). Agents pick up
        /// a new one with `agent reload`; `dataplane_certificate_expiry_seconds` says when
        /// theirs ends.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=36_500))]
        days: Option<u32>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Subcommand)]
pub enum EventCommand {
    /// Fire an event to every member.
    Fire {
        /// Event name (letters, digits, '-', '_', '.').
        name: String,
        /// Optional payload (UTF-8 text, up to event_max_payload bytes).
        payload: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print events as they arrive, one JSON object per line.
    Watch {
        /// Only events with this name.
        name: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Admin API address of the agent to ask [env: AGENT_ADMIN_ADDR] [default: 127.0.0.1:7070]
    #[arg(long, value_name = "ADDR")]
    pub admin_addr: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct RouteArgs {
    /// Service name.
    pub service: String,
    /// Affinity key (a session cookie, a user id, a client address).
    #[arg(long)]
    pub key: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `agent run`: every setting has a flag; the file and `AGENT_*` variables spell the same
/// settings (see README, "Configuration").
#[derive(Debug, Clone, Args, Default)]
pub struct RunArgs {
    /// TOML configuration file [env: AGENT_CONFIG]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// One-node cluster with a generated in-memory key; loopback addresses [env: AGENT_DEV]
    #[arg(long)]
    pub dev: bool,
    /// Cluster name; agents join only agents of the same cluster [env: AGENT_CLUSTER] [default: default; dev]
    #[arg(long, value_name = "NAME")]
    pub cluster: Option<String>,
    /// Stable node id [env: AGENT_NODE_ID] [default: hostname + random suffix, kept in data_dir]
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,
    /// Region label, required outside --dev [env: AGENT_REGION] [default in dev: local]
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
    /// Zone label [env: AGENT_ZONE] [default: REGION-a]
    #[arg(long, value_name = "ZONE")]
    pub zone: Option<String>,
    /// Directory for the node id and API registrations [env: AGENT_DATA_DIR] [default: /var/lib/grapevine; none in dev]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Seed to join, any live member; repeatable; DNS names allowed [env: AGENT_JOIN, comma-separated]
    #[arg(long, value_name = "HOST:PORT")]
    pub join: Vec<String>,
    /// Gossip bind address (UDP) [env: AGENT_GOSSIP_ADDR] [default: 0.0.0.0:7946; dev 127.0.0.1:7946]
    #[arg(long, value_name = "ADDR")]
    pub gossip_addr: Option<String>,
    /// Gossip address peers dial [env: AGENT_GOSSIP_ADVERTISE] [default: the bind address, or this host's address if unspecified]
    #[arg(long, value_name = "ADDR")]
    pub gossip_advertise: Option<String>,
    /// QUIC data-plane bind address (UDP) [env: AGENT_DATA_ADDR] [default: 0.0.0.0:7947; dev 127.0.0.1:7947]
    #[arg(long, value_name = "ADDR")]
    pub data_addr: Option<String>,
    /// Data-plane address peers dial [env: AGENT_DATA_ADVERTISE] [default: like gossip_advertise]
    #[arg(long, value_name = "ADDR")]
    pub data_advertise: Option<String>,
    /// Admin HTTP API address [env: AGENT_ADMIN_ADDR] [default: 127.0.0.1:7070]
    #[arg(long, value_name = "ADDR")]
    pub admin_addr: Option<String>,
    /// DNS address (UDP and TCP) [env: AGENT_DNS_ADDR] [default: 127.0.0.1:8600]
    #[arg(long, value_name = "ADDR")]
    pub dns_addr: Option<String>,
    /// Log format: text or json [env: AGENT_LOG_FORMAT] [default: text]
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Log filter, such as info or grapevine_agent=debug [env: AGENT_LOG_LEVEL] [default: info]
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// How long open connections may finish on shutdown [env: AGENT_DRAIN_TIMEOUT] [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub drain_timeout: Option<String>,
    /// How long a forwarded connection may carry no byte either way before it is closed; 0s never [env: AGENT_IDLE_TIMEOUT] [default: 1h]
    #[arg(long, value_name = "DURATION")]
    pub idle_timeout: Option<String>,
    /// Threads carrying gossip and traffic: 1 runs all on one thread (tokio current-thread), more use a work-stealing pool [env: AGENT_WORKER_THREADS] [default: 1]
    #[arg(long, value_name = "N")]
    pub worker_threads: Option<String>,
    /// Gossip round interval of the gateways' WAN pool [env: AGENT_GOSSIP_INTERVAL] [default: 2s]
    #[arg(long, value_name = "DURATION")]
    pub gossip_interval: Option<String>,
    /// WAN pool failure-detector (phi accrual) threshold [env: AGENT_PHI_THRESHOLD] [default: 8]
    #[arg(long, value_name = "PHI")]
    pub phi_threshold: Option<String>,
    /// How long dead members are remembered [env: AGENT_DEAD_NODE_GRACE] [default: 10m]
    #[arg(long, value_name = "DURATION")]
    pub dead_node_grace: Option<String>,
    /// How often seeds and dead members are re-probed [env: AGENT_REPROBE_INTERVAL] [default: 5s]
    #[arg(long, value_name = "DURATION")]
    pub reprobe_interval: Option<String>,
    /// Region pool anti-entropy round interval (changes travel by hints) [env: AGENT_ANTI_ENTROPY_INTERVAL] [default: 90s]
    #[arg(long, value_name = "DURATION")]
    pub anti_entropy_interval: Option<String>,
    /// SWIM direct probe interval [env: AGENT_PROBE_INTERVAL] [default: 500ms]
    #[arg(long, value_name = "DURATION")]
    pub probe_interval: Option<String>,
    /// How long a SWIM probe waits before asking others [env: AGENT_PROBE_TIMEOUT] [default: 250ms]
    #[arg(long, value_name = "DURATION")]
    pub probe_timeout: Option<String>,
    /// Members asked to probe an unresponsive one [env: AGENT_INDIRECT_PROBES] [default: 5]
    #[arg(long, value_name = "N")]
    pub indirect_probes: Option<String>,
    /// How long a suspect may refute before it is dead [env: AGENT_SUSPICION_TIMEOUT] [default: 2s]
    #[arg(long, value_name = "DURATION")]
    pub suspicion_timeout: Option<String>,
    /// Gateways carrying each region's summary [env: AGENT_GATEWAYS_PER_REGION] [default: 2]
    #[arg(long, value_name = "N")]
    pub gateways_per_region: Option<String>,
    /// Largest gossip pool (its digest must fit one datagram) [env: AGENT_MAX_POOL_SIZE] [default: 1000]
    #[arg(long, value_name = "N")]
    pub max_pool_size: Option<String>,
    /// Largest event payload in bytes [env: AGENT_EVENT_MAX_PAYLOAD] [default: 512]
    #[arg(long, value_name = "BYTES")]
    pub event_max_payload: Option<String>,
    /// How long an event can still reach members [env: AGENT_EVENT_TTL] [default: 60s]
    #[arg(long, value_name = "DURATION")]
    pub event_ttl: Option<String>,
    /// Gossip keyring: base64 keys, one per line, the first seals [env: AGENT_CLUSTER_KEY_FILE] [required outside dev]
    #[arg(long, value_name = "FILE")]
    pub cluster_key_file: Option<PathBuf>,
    /// Cluster CA certificate for QUIC mTLS [env: AGENT_CA_FILE]
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// This node's certificate [env: AGENT_CERT_FILE]
    #[arg(long, value_name = "FILE")]
    pub cert_file: Option<PathBuf>,
    /// This node's private key [env: AGENT_KEY_FILE]
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// A service this sidecar fronts: NAME=PORT[,check=URL][,tcp_check=ADDR][,weight=N][,pinned=true][,interval=2s][,timeout=1s][,rise=2][,fall=2]; repeatable [env: AGENT_SERVICE]
    #[arg(long, value_name = "SPEC")]
    pub service: Vec<String>,
    /// A service the app calls through a local port: SERVICE=ADDR; repeatable [env: AGENT_UPSTREAM]
    #[arg(long, value_name = "SPEC")]
    pub upstream: Vec<String>,
    /// Ingress (HTTP) listen address [env: AGENT_INGRESS_LISTEN]
    #[arg(long, value_name = "ADDR")]
    pub ingress_listen: Option<String>,
    /// Ingress route: host=H,service=S or path_prefix=/p,service=S; repeatable [env: AGENT_INGRESS_ROUTE]
    #[arg(long, value_name = "SPEC")]
    pub ingress_route: Vec<String>,
    /// Session affinity from this cookie [env: AGENT_INGRESS_AFFINITY_COOKIE]
    #[arg(long, value_name = "NAME")]
    pub ingress_affinity_cookie: Option<String>,
    /// Session affinity from this header [env: AGENT_INGRESS_AFFINITY_HEADER]
    #[arg(long, value_name = "NAME")]
    pub ingress_affinity_header: Option<String>,
    /// Without the cookie or header: client_ip (the client's address) or none (any instance)
    /// [env: AGENT_INGRESS_AFFINITY_FALLBACK]
    #[arg(long, value_name = "client_ip|none")]
    pub ingress_affinity_fallback: Option<String>,
}

impl RunArgs {
    /// The flags as a configuration layer (only what was given).
    pub fn to_layer(&self) -> Result<Layer, ConfigError> {
        let mut l = Layer::default();
        if self.dev {
            l.dev = Some(true);
        }
        let scalars: [(&str, Option<String>); 33] = [
            ("cluster", self.cluster.clone()),
            ("node_id", self.node_id.clone()),
            ("region", self.region.clone()),
            ("zone", self.zone.clone()),
            ("data_dir", self.data_dir.as_ref().map(|p| p.display().to_string())),
            ("gossip_addr", self.gossip_addr.clone()),
            ("gossip_advertise", self.gossip_advertise.clone()),
            ("data_addr", self.data_addr.clone()),
            ("data_advertise", self.data_advertise.clone()),
            ("admin_addr", self.admin_addr.clone()),
            ("dns_addr", self.dns_addr.clone()),
            ("log_format", self.log_format.clone()),
            ("log_level", self.log_level.clone()),
            ("drain_timeout", self.drain_timeout.clone()),
            ("idle_timeout", self.idle_timeout.clone()),
            ("worker_threads", self.worker_threads.clone()),
            ("gossip_interval", self.gossip_interval.clone()),
            ("phi_threshold", self.phi_threshold.clone()),
            ("dead_node_grace", self.dead_node_grace.clone()),
            ("reprobe_interval", self.reprobe_interval.clone()),
            ("anti_entropy_interval", self.anti_entropy_interval.clone()),
            ("probe_interval", self.probe_interval.clone()),
            ("probe_timeout", self.probe_timeout.clone()),
            ("indirect_probes", self.indirect_probes.clone()),
            ("suspicion_timeout", self.suspicion_timeout.clone()),
            ("gateways_per_region", self.gateways_per_region.clone()),
            ("max_pool_size", self.max_pool_size.clone()),
            ("event_max_payload", self.event_max_payload.clone()),
            ("event_ttl", self.event_ttl.clone()),
            ("cluster_key_file", self.cluster_key_file.as_ref().map(|p| p.display().to_string())),
            ("ca_file", self.ca_file.as_ref().map(|p| p.display().to_string())),
            ("cert_file", self.cert_file.as_ref().map(|p| p.display().to_string())),
            ("key_file", self.key_file.as_ref().map(|p| p.display().to_string())),
        ];
        for (key, value) in scalars {
            if let Some(v) = value {
                l.set_scalar(key, v);
            }
        }
        if !self.join.is_empty() {
            l.join = Some(self.join.clone());
        }
        if !self.service.is_empty() {
            l.services = Some(
                self.service.iter().map(|s| config::parse_service_spec("--service", s)).collect::<Result<_, _>>()?,
            );
        }
        if !self.upstream.is_empty() {
            l.upstreams = Some(
                self.upstream.iter().map(|s| config::parse_upstream_spec("--upstream", s)).collect::<Result<_, _>>()?,
            );
        }
        let has_affinity = self.ingress_affinity_cookie.is_some()
            || self.ingress_affinity_header.is_some()
            || self.ingress_affinity_fallback.is_some();
        if self.ingress_listen.is_some() || !self.ingress_route.is_empty() || has_affinity {
            l.ingress = Some(config::IngressLayer {
                listen: self.ingress_listen.clone(),
                routes: self
                    .ingress_route
                    .iter()
                    .map(|s| config::parse_route_spec("--ingress-route", s))
                    .collect::<Result<_, _>>()?,
                affinity: has_affinity.then(|| config::Affinity {
                    cookie: self.ingress_affinity_cookie.clone(),
                    header: self.ingress_affinity_header.clone(),
                    fallback: self.ingress_affinity_fallback.clone(),
                }),
            });
        }
        Ok(l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_scalar_setting_has_a_flag() {
        let cmd = Cli::command();
        let run = cmd.find_subcommand("run").unwrap();
        for (key, _) in config::SCALAR_SETTINGS {
            let flag = key.replace('_', "-");
            assert!(run.get_arguments().any(|a| a.get_long() == Some(&flag)), "no --{flag}");
        }
    }

    #[test]
    fn flags_become_a_layer() {
        let cli = Cli::try_parse_from([
            "agent",
            "run",
            "--dev",
            "--region",
            "eu",
            "--service",
            "profile=3000,check=http://127.0.0.1:3000/healthz",
            "--join",
            "a:1",
            "--join",
            "b:2",
            "--ingress-listen",
            "127.0.0.1:8080",
            "--ingress-route",
            "path_prefix=/login,service=login",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else { panic!("run") };
        let c = args.to_layer().unwrap().resolve().unwrap();
        assert_eq!(c.region, "eu");
        assert_eq!(c.join, ["a:1", "b:2"]);
        assert_eq!(c.services[0].port, 3000);
        assert_eq!(c.ingress.unwrap().routes[0].service, "login");
    }
}

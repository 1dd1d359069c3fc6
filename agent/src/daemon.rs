//! `agent run`: bind, start, serve, and on SIGTERM, SIGINT or `agent leave` shut down in order:
//! stop taking new work (draining), let open work finish (bounded), leave, exit.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

use crate::admin::{self, AdminState};
use crate::cluster::snapshot::LocalNode;
use crate::config::{Config, ConfigError};
use crate::dataplane::pki::{self, Ca};
use crate::dataplane::{DataPlane, ingress, tls, upstream};
use crate::events::EventHub;
use crate::membership::keyring::Keyring;
use crate::membership::transport::Wire;
use crate::membership::{Membership, MembershipConfig, unix_ms};
use crate::metrics::Metrics;
use crate::services::LocalServices;

/// Why the agent could not run: a setting (exit code 2) or anything else (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Runtime(#[from] anyhow::Error),
}

/// What the agent reads before binding anything, so a bad setting stops it early.
#[derive(Debug)]
pub struct Prepared {
    pub config: Config,
    pub keyring: Keyring,
    pub node_id: String,
    pub generation: u64,
    /// The node's TLS, checked; None: no certificates configured, so the data plane is off.
    pub trust: Option<tls::Trust>,
}

/// Loads the keyring and the node identity. No socket is bound yet.
pub fn prepare(config: Config) -> Result<Prepared, RunError> {
    let keyring = match &config.security.cluster_key_file {
        Some(path) => Keyring::from_file(path).map_err(|e| ConfigError {
            setting: "cluster_key_file".into(),
            value: path.display().to_string(),
            allowed: format!("a readable file of base64 keys, one per line ({e}); create one with `agent keygen`"),
        })?,
        None => Keyring::generate(),
    };
    if let Some(dir) = &config.data_dir {
        std::fs::create_dir_all(dir).map_err(|e| ConfigError {
            setting: "data_dir".into(),
            value: dir.display().to_string(),
            allowed: format!("a directory this user can create and write ({e})"),
        })?;
    }
    let node_id = node_id(&config).context("choosing the node id")?;
    let trust = trust(&config, &node_id)?;
    if trust.is_none() {
        // Without certificates the data plane is off: nothing would serve these ports.
        let needs = |setting: &str, value: String, what: &str| ConfigError {
            setting: setting.into(),
            value,
            allowed: format!("{what} needs the data plane: set ca_file, cert_file and key_file (or use --dev)"),
        };
        if let Some(u) = config.upstreams.first() {
            return Err(needs("upstream", format!("{}={}", u.service, u.listen), "an upstream listener").into());
        }
        if let Some(i) = &config.ingress {
            return Err(needs("ingress.listen", i.listen.to_string(), "the ingress").into());
        }
    }
    let generation = generation(config.data_dir.as_deref()).context("choosing the generation")?;
    Ok(Prepared { config, keyring, node_id, generation, trust })
}

/// The node's TLS, from `[security]`, generated in memory in dev, or none; made once, here,
/// so that credentials that would cut the node off stop it before anything binds. A file
/// that cannot be used is named by its own setting.
fn trust(config: &Config, node_id: &str) -> Result<Option<tls::Trust>, RunError> {
    let s = &config.security;
    let creds = match (&s.ca_file, &s.cert_file, &s.key_file) {
        (None, None, None) if config.dev => {
            let ca = Ca::generate(&config.cluster).context("generating a dev CA")?;
            ca.credentials_for(node_id).context("issuing a dev certificate")?
        }
        (None, None, None) => return Ok(None),
        (Some(ca), Some(cert), Some(key)) => {
            let files = pki::TlsFiles { ca: ca.clone(), cert: cert.clone(), key: key.clone() };
            pki::load_credentials(&files).map_err(|e| {
                let what = match e.setting {
                    "ca_file" => "the cluster CA's PEM certificate, such as ca.pem from `agent ca init`",
                    "cert_file" => "this node's PEM certificate, from `agent cert issue`",
                    _ => "this node's PEM private key, from `agent cert issue`",
                };
                ConfigError {
                    setting: e.setting.into(),
                    value: e.path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                    allowed: format!("{what} ({})", e.why),
                }
            })?
        }
        _ => {
            let named = [("ca_file", &s.ca_file), ("cert_file", &s.cert_file), ("key_file", &s.key_file)];
            let given: Vec<(&str, String)> =
                named.iter().filter_map(|(k, v)| v.as_ref().map(|p| (*k, p.display().to_string()))).collect();
            let missing: Vec<&str> = named.iter().filter(|(_, v)| v.is_none()).map(|(k, _)| *k).collect();
            // Some but not all three are set (none is matched above), so `given` is not empty.
            let (setting, value) = given[0].clone();
            let also = given[1..].iter().map(|(k, v)| format!("; {k} = {v:?} is set too")).collect::<String>();
            return Err(ConfigError {
                setting: setting.into(),
                value,
                allowed: format!(
                    "missing {}{also}: ca_file, cert_file and key_file go together (with none, the data plane is off)",
                    missing.join(" and ")
                ),
            }
            .into());
        }
    };
    let trust = tls::Trust::new(&creds, node_id).map_err(|e| ConfigError {
        setting: e.setting().into(),
        value: creds
            .files
            .as_ref()
            .and_then(|f| f.path_of(e.setting()))
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        allowed: e.to_string(),
    })?;
    Ok(Some(trust))
}

/// The node id: configured, or kept in the data dir, or hostname + random suffix (then kept).
fn node_id(config: &Config) -> anyhow::Result<String> {
    let file = config.data_dir.as_ref().map(|d| d.join("node_id"));
    if let Some(id) = &config.node_id {
        if let Some(f) = &file {
            std::fs::write(f, id)?;
        }
        return Ok(id.clone());
    }
    if let Some(f) = &file
        && let Ok(id) = std::fs::read_to_string(f)
    {
        let id = id.trim().to_string();
        if crate::config::check_node_id("node_id", &id).is_ok() {
            return Ok(id);
        }
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "node".into());
    let host: String = host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(40).collect();
    let suffix: String =
        (0..6).map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rand::random_range(0..36)])).collect();
    let id = format!("{}-{suffix}", if host.is_empty() { "node" } else { &host });
    if let Some(f) = &file {
        std::fs::write(f, &id)?;
    }
    Ok(id)
}

/// A generation larger than any this node used before: wall-clock milliseconds, bumped past
/// the last one kept in the data dir (clocks can step back).
fn generation(data_dir: Option<&Path>) -> anyhow::Result<u64> {
    let mut g = unix_ms();
    if let Some(dir) = data_dir {
        let f = dir.join("generation");
        if let Some(last) = std::fs::read_to_string(&f).ok().and_then(|s| s.trim().parse::<u64>().ok()) {
            g = g.max(last + 1);
        }
        std::fs::write(&f, g.to_string())?;
    }
    Ok(g)
}

/// The address peers should dial for a socket bound at `bound`: itself if specific; if bound
/// to 0.0.0.0, this host's outbound address.
fn advertise_for(bound: SocketAddr) -> SocketAddr {
    if !bound.ip().is_unspecified() {
        return bound;
    }
    // Connecting a UDP socket sends nothing; it only asks the kernel which source address
    // it would use.
    let ip = StdUdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|_| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    SocketAddr::new(ip, bound.port())
}

/// Runs the agent until a signal or `agent leave`.
pub async fn run(prepared: Prepared) -> Result<(), RunError> {
    let Prepared { config, keyring, node_id, generation, trust } = prepared;
    let metrics = Arc::new(Metrics::new());

    let socket = tokio::net::UdpSocket::bind(config.gossip_addr)
        .await
        .with_context(|| format!("cannot bind gossip_addr {} (UDP)", config.gossip_addr))?;
    let gossip_bound = socket.local_addr().context("reading the gossip address")?;
    let gossip_advertise = config.gossip_advertise.unwrap_or_else(|| advertise_for(gossip_bound));
    let admin_listener = tokio::net::TcpListener::bind(config.admin_addr)
        .await
        .with_context(|| format!("cannot bind admin_addr {} (TCP)", config.admin_addr))?;
    let admin_bound = admin_listener.local_addr().context("reading the admin address")?;
    let (dns_udp, dns_tcp) = bind_dns(config.dns_addr).await?;
    let dns_bound = dns_udp.local_addr().context("reading the DNS address")?;
    // The data plane's socket and listeners are bound now, so that a busy port stops the
    // agent before it joins anything.
    let data_socket = match &trust {
        Some(_) => Some(DataPlane::bind_socket(config.data_addr)?),
        None => {
            tracing::warn!(
                "no [security] certificates: the data plane is off (this agent gossips but forwards no traffic)"
            );
            None
        }
    };
    let data_advertise = match &data_socket {
        Some(s) => {
            Some(config.data_advertise.unwrap_or(advertise_for(s.local_addr().context("reading the data address")?)))
        }
        None => None,
    };
    let mut upstream_listeners = Vec::new();
    for u in &config.upstreams {
        let l = tokio::net::TcpListener::bind(u.listen)
            .await
            .with_context(|| format!("cannot bind upstream {} on {}", u.service, u.listen))?;
        upstream_listeners.push((u.service.clone(), l));
    }
    let upstream_addrs: Vec<crate::dns::UpstreamListener> = upstream_listeners
        .iter()
        .filter_map(|(service, l)| {
            l.local_addr().ok().map(|addr| crate::dns::UpstreamListener { service: service.clone(), addr })
        })
        .collect();
    let ingress_listener = match &config.ingress {
        Some(i) => Some(
            tokio::net::TcpListener::bind(i.listen)
                .await
                .with_context(|| format!("cannot bind ingress.listen {}", i.listen))?,
        ),
        None => None,
    };

    let local = LocalNode {
        id: node_id.clone(),
        region: config.region.clone(),
        zone: config.zone.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        cluster: config.cluster.clone(),
    };
    let events = Arc::new(EventHub::new(metrics.clone(), config.events.max_payload, config.events.ttl, unix_ms()));
    let wire = Wire::new(socket, keyring, &config.cluster, metrics.clone());
    // Subscribed before membership starts, so no keyring operation heard at once is missed.
    let keyring_ops = events.subscribe_internal();
    let membership = Arc::new(
        Membership::start(
            MembershipConfig {
                local,
                generation,
                gossip_advertise,
                data_advertise,
                seeds: config.join.clone(),
                gossip: config.gossip.clone(),
                event_ttl: config.events.ttl,
            },
            wire,
            events.clone(),
            metrics.clone(),
        )
        .await?,
    );

    let services = Arc::new(LocalServices::new(config.services.clone(), config.data_dir.as_deref())?);
    let mut background = vec![tokio::spawn(crate::keys::apply_loop(
        membership.clone(),
        config.security.cluster_key_file.clone(),
        keyring_ops,
    ))];
    let dataplane = match (data_socket, trust) {
        (Some(socket), Some(trust)) => {
            let dp = DataPlane::start(
                socket,
                trust,
                &node_id,
                membership.snapshots(),
                services.clone(),
                metrics.clone(),
                config.idle_timeout,
            )?;
            background.push(tokio::spawn(dp.clone().serve()));
            for (service, l) in upstream_listeners {
                tracing::info!(service = %service, listen = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "upstream listening");
                background.push(tokio::spawn(upstream::serve(l, service, dp.clone())));
            }
            // Announce open connections as each service's load.
            let (dp2, services2) = (dp.clone(), services.clone());
            background.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    for r in services2.records() {
                        services2.set_load(&r.name, dp2.active.of(&r.name));
                    }
                }
            }));
            Some(dp)
        }
        _ => None,
    };
    let ingress_task = match (ingress_listener, &dataplane, &config.ingress) {
        (Some(l), Some(dp), Some(cfg)) => {
            tracing::info!(listen = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "ingress listening");
            Some(tokio::spawn(ingress::serve(l, Arc::new(cfg.clone()), dp.clone())))
        }
        (Some(_), None, _) => {
            return Err(ConfigError {
                setting: "ingress.listen".into(),
                value: String::new(),
                allowed: "ingress needs the data plane: set ca_file, cert_file and key_file (or use --dev)".into(),
            }
            .into());
        }
        _ => None,
    };
    let publisher = {
        let (services, membership) = (services.clone(), membership.clone());
        tokio::spawn(async move {
            let mut changes = services.subscribe();
            loop {
                membership.set_services(&services.records()).await;
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
    };
    let checks = tokio::spawn(crate::health::supervise(services.clone(), metrics.clone()));
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hup) => background.push(tokio::spawn(reload_on_hangup(hup, dataplane.clone()))),
        Err(e) => tracing::error!(error = %e, "cannot listen for SIGHUP"),
    }

    let (leave_tx, mut leave_rx) = watch::channel(false);
    let (stop_admin_tx, mut stop_admin_rx) = watch::channel(false);
    let admin_state = AdminState {
        snapshots: membership.snapshots(),
        membership: membership.clone(),
        events,
        services: services.clone(),
        metrics,
        leave: leave_tx,
        dataplane: dataplane.clone(),
    };
    // `ns.grapevine` is the DNS listener: its own address, or this host's if bound to all.
    let dns_zone = crate::dns::Zone { nameserver: advertise_for(dns_bound).ip(), upstreams: upstream_addrs };
    let dns_handler = crate::dns::Handler::new(membership.snapshots(), dns_zone, admin_state.metrics.clone());
    background.push(tokio::spawn(crate::dns::serve(dns_udp, dns_tcp, dns_handler)));
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state, async move {
        let _ = stop_admin_rx.wait_for(|stop| *stop).await;
    }));

    tracing::info!(
        node_id = %node_id,
        cluster = %config.cluster,
        region = %config.region,
        gossip_addr = %gossip_bound,
        gossip_advertise = %gossip_advertise,
        admin_addr = %admin_bound,
        dns_addr = %dns_bound,
        data_addr = %data_advertise.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        generation,
        "agent ready"
    );

    let why = wait_for_stop(&mut leave_rx).await;
    tracing::info!(reason = why, "leaving the cluster: draining, then announcing the leave");
    services.drain_all();
    membership.set_draining().await;
    if let Some(t) = &ingress_task {
        t.abort();
    }
    if let Some(dp) = &dataplane {
        dp.start_draining();
        // Give the drain announcement a gossip round to spread, then let open connections
        // finish, up to drain_timeout.
        tokio::time::sleep(config.gossip.interval.min(config.drain_timeout)).await;
        let left_open = dp.drained(config.drain_timeout).await;
        if left_open > 0 {
            tracing::warn!(open = left_open, "drain_timeout reached with connections still open; closing them");
        }
    } else {
        tokio::time::sleep(config.drain_timeout.min(config.gossip.interval)).await;
    }
    membership.leave().await;
    if let Some(dp) = &dataplane {
        dp.endpoint.close(0u32.into(), b"agent left");
        let _ = tokio::time::timeout(Duration::from_secs(2), dp.endpoint.wait_idle()).await;
    }
    for t in background {
        t.abort();
    }
    let _ = stop_admin_tx.send(true);
    publisher.abort();
    checks.abort();
    let _ = tokio::time::timeout(Duration::from_secs(2), admin_task).await;
    tracing::info!("left the cluster; exiting");
    Ok(())
}

/// SIGHUP reads the `[security]` files again (as `agent reload` does). Without the handler a
/// SIGHUP would end the agent with no drain.
/// `hup` is made before the agent says it is ready, so that no SIGHUP from then on is fatal.
async fn reload_on_hangup(mut hup: tokio::signal::unix::Signal, dataplane: Option<Arc<DataPlane>>) {
    while hup.recv().await.is_some() {
        match &dataplane {
            None => tracing::warn!("SIGHUP: the data plane is off, so there are no certificates to reload"),
            Some(dp) => match dp.reload_files().await {
                Ok(_) => {}
                Err(e @ crate::dataplane::ReloadError::InMemory) => tracing::warn!("SIGHUP: {e}"),
                Err(e) => tracing::error!(error = %e, "SIGHUP: reloading the certificates failed"),
            },
        }
    }
}

async fn wait_for_stop(leave: &mut watch::Receiver<bool>) -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            let _ = leave.wait_for(|l| *l).await;
            return "agent leave";
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = leave.wait_for(|l| *l) => "agent leave",
    }
}

/// Binds DNS: TCP and UDP on one port. With port 0, TCP picks the port and UDP follows; a port
/// free for one protocol may be taken for the other, so that is tried a few times.
async fn bind_dns(addr: SocketAddr) -> anyhow::Result<(tokio::net::UdpSocket, tokio::net::TcpListener)> {
    let tries = if addr.port() == 0 { 16 } else { 1 };
    let mut last = None;
    for _ in 0..tries {
        let tcp =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot bind dns_addr {addr} (TCP)"))?;
        let bound = tcp.local_addr().context("reading the DNS address")?;
        match tokio::net::UdpSocket::bind(bound).await {
            Ok(udp) => return Ok((udp, tcp)),
            Err(e) => last = Some(anyhow::Error::new(e).context(format!("cannot bind dns_addr {bound} (UDP)"))),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("cannot bind dns_addr {addr}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_and_generation_persist() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::config::Layer { dev: Some(true), ..Default::default() }.resolve().unwrap();
        config.data_dir = Some(dir.path().to_path_buf());
        let first = node_id(&config).unwrap();
        assert_eq!(node_id(&config).unwrap(), first);
        let g1 = generation(Some(dir.path())).unwrap();
        let g2 = generation(Some(dir.path())).unwrap();
        assert!(g2 > g1);
        assert_eq!(advertise_for("10.1.2.3:7946".parse().unwrap()), "10.1.2.3:7946".parse().unwrap());
        assert_ne!(advertise_for("0.0.0.0:7946".parse().unwrap()).ip(), IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    }
}

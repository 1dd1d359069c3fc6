//! QUIC endpoint configuration: mutual TLS 1.3 with the cluster CA, ALPN `grapevine/1`, and
//! transport settings sized for a sidecar (many streams, wide windows across regions,
//! keep-alive).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;

use super::pki::NodeCredentials;

pub const ALPN: &[u8] = b"grapevine/1";

/// The largest QUIC datagram probed for and accepted: a 9000-byte jumbo frame less IPv6 and
/// UDP headers.
pub const MAX_UDP_PAYLOAD: u16 = 8952;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(creds: &NodeCredentials) -> anyhow::Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    roots.add(creds.ca.clone()).context("the cluster CA certificate is not a valid trust anchor")?;
    Ok(Arc::new(roots))
}

/// Streams a peer may open at first. quinn sets aside state for every stream a peer may open
/// (about 34 bytes each, on both ends), so a fixed credit of 65,536 cost 2.2 MB per peer
/// connection before any traffic. The receiving side raises the credit as streams stay open
/// (`DataPlane::accept_streams`), up to [`MAX_STREAMS`].
pub const INITIAL_STREAMS: u32 = 1024;
/// The most forwarded connections one peer may have open here at once.
pub const MAX_STREAMS: u32 = 1 << 20;

/// Transport settings: the defaults allow 100 streams and a 1.25 MB stream window (about
/// 25 MB/s per stream at 50 ms RTT) and no keep-alive; a sidecar needs more of each.
pub fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // One stream per forwarded connection: idle keep-alive connections hold theirs open.
    t.max_concurrent_bidi_streams(INITIAL_STREAMS.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window((16u32 << 20).into());
    t.receive_window((64u32 << 20).into());
    t.send_window(64 << 20);
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    // Probe for paths larger than Ethernet's 1500 bytes (jumbo frames inside a datacenter,
    // loopback): discovery settles on what the path carries, and fewer packets mean less
    // per-packet crypto and syscall work on bulk transfers.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    t.max_idle_timeout(Some(
        Duration::from_secs(30).try_into().unwrap_or_else(|_| unreachable!("30 s is a valid idle timeout")),
    ));
    Arc::new(t)
}

pub fn server_config(creds: &NodeCredentials) -> anyhow::Result<quinn::ServerConfig> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(creds)?, provider())
        .build()
        .context("building the client-certificate verifier")?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.identity.chain.clone(), creds.identity.key.clone_key())
        .context("the node certificate and key do not match")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    config.transport_config(transport());
    Ok(config)
}

pub fn client_config(creds: &NodeCredentials) -> anyhow::Result<quinn::ClientConfig> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(creds)?)
        .with_client_auth_cert(creds.identity.chain.clone(), creds.identity.key.clone_key())
        .context("the node certificate and key do not match")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    config.transport_config(transport());
    Ok(config)
}

/// Whether a peer's end-entity certificate (already verified against the cluster CA by rustls)
/// names `node_id`.
pub fn names_node(cert: &CertificateDer<'_>, node_id: &str) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else { return false };
    let Ok(name) = ServerName::try_from(node_id) else { return false };
    let _ = UnixTime::now();
    ee.verify_is_valid_for_subject_name(&name).is_ok()
}

/// The verified certificate chain of a connection's peer.
pub fn peer_chain(conn: &quinn::Connection) -> Option<Vec<CertificateDer<'static>>> {
    conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok().map(|b| *b)
}

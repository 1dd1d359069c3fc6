//! QUIC endpoint configuration: mutual TLS 1.3 with the cluster CA, ALPN `grapevine/1`, and
//! transport settings sized for a sidecar (many streams, wide windows across regions,
//! keep-alive).

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;

use super::pki::NodeCredentials;

pub const ALPN: &[u8] = b"grapevine/1";

/// The largest QUIC datagram probed for and accepted: a 9000-byte jumbo frame less IPv6 and
/// UDP headers.
pub const MAX_UDP_PAYLOAD: u16 = 8952;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(creds: &NodeCredentials) -> Result<Arc<RootCertStore>, TrustError> {
    let mut roots = RootCertStore::empty();
    for (i, ca) in creds.cas.iter().enumerate() {
        roots.add(ca.clone()).map_err(|e| {
            TrustError::Ca(format!("certificate {} of {} is not a valid trust anchor ({e})", i + 1, creds.cas.len()))
        })?;
    }
    Ok(Arc::new(roots))
}

/// Why a set of credentials cannot be used: it is refused before anything binds (at start) or
/// before it replaces what is in use (on reload).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    /// The CA file: the setting is `ca_file`.
    #[error("{0}")]
    Ca(String),
    /// The certificate: the setting is `cert_file`.
    #[error("{0}")]
    Identity(String),
    /// The key, which does not go with the certificate: the setting is `key_file`.
    #[error("{0}")]
    Key(String),
}

impl TrustError {
    pub fn setting(&self) -> &'static str {
        match self {
            TrustError::Ca(_) => "ca_file",
            TrustError::Identity(_) => "cert_file",
            TrustError::Key(_) => "key_file",
        }
    }
}

/// The endpoint's TLS, made from one set of credentials: the configurations new handshakes use,
/// and the verifiers that check a peer's certificate against the cluster CAs. rustls runs them
/// in each handshake; [`Trust::trusts_client`] and [`Trust::trusts_server`] run them again on
/// connections made before the CAs changed.
#[derive(Clone)]
pub struct Trust {
    pub server: quinn::ServerConfig,
    pub client: quinn::ClientConfig,
    /// How many CAs `ca_file` holds.
    pub cas: usize,
    /// The files it was made from, read again on reload; `None` when made in memory.
    pub files: Option<super::pki::TlsFiles>,
    /// When this node's certificate stops being valid (Unix seconds).
    pub not_after: Option<i64>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    server_verifier: Arc<WebPkiServerVerifier>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust").field("cas", &self.cas).finish_non_exhaustive()
    }
}

impl Trust {
    /// Refuses credentials that would cut this node off: a key that does not match the
    /// certificate, a certificate that does not name `node_id`, or one that no CA in the
    /// bundle signed (peers holding the same bundle would refuse it).
    pub fn new(creds: &NodeCredentials, node_id: &str) -> Result<Trust, TrustError> {
        let roots = roots(creds)?;
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TrustError::Ca(format!("building the client-certificate verifier: {e}")))?;
        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TrustError::Ca(format!("building the server-certificate verifier: {e}")))?;
        let chain = &creds.identity.chain;
        if !names_node(&chain[0], node_id) {
            return Err(TrustError::Identity(format!(
                "the certificate does not name this node's id {node_id:?} (`agent cert issue --node {node_id}`)"
            )));
        }
        let trust_check = |e: rustls::Error| {
            TrustError::Identity(match e {
                // BadSignature: a CA of the same name is in the file, but another one signed it.
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature,
                ) => "the certificate is not signed by a CA in ca_file, so peers would refuse it; \
                      issue it with `agent cert issue --ca DIR`, or add its CA to ca_file"
                    .to_string(),
                // Expired, not yet valid (a clock off), not for client and server use, ...
                e => format!("peers would refuse the certificate: {e}"),
            })
        };
        client_verifier.verify_client_cert(&chain[0], &chain[1..], UnixTime::now()).map_err(trust_check)?;
        // As a server too (peers dial this node by its id): a certificate from another PKI may
        // lack the serverAuth usage.
        let name = ServerName::try_from(node_id.to_string())
            .map_err(|e| TrustError::Identity(format!("the node id {node_id:?} is not a DNS name ({e})")))?;
        server_verifier.verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now()).map_err(trust_check)?;
        let server = server_config(creds, client_verifier.clone())?;
        let client = client_config_with(creds, roots)?;
        Ok(Trust {
            server,
            client,
            cas: creds.cas.len(),
            files: creds.files.clone(),
            not_after: super::pki::not_after(&chain[0]),
            client_verifier,
            server_verifier,
        })
    }

    /// Whether a peer that connected to us presented a certificate the CAs still vouch for.
    pub fn trusts_client(&self, chain: &[CertificateDer<'_>]) -> bool {
        let Some((ee, rest)) = chain.split_first() else { return false };
        self.client_verifier.verify_client_cert(ee, rest, UnixTime::now()).is_ok()
    }

    /// Whether a peer we connected to, as `node`, presented a certificate the CAs still vouch for.
    pub fn trusts_server(&self, chain: &[CertificateDer<'_>], node: &str) -> bool {
        let (Some((ee, rest)), Ok(name)) = (chain.split_first(), ServerName::try_from(node.to_string())) else {
            return false;
        };
        self.server_verifier.verify_server_cert(ee, rest, &name, &[], UnixTime::now()).is_ok()
    }
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

/// Why the certificate and key cannot make an identity.
fn key_error(e: rustls::Error) -> TrustError {
    TrustError::Key(match e {
        rustls::Error::InconsistentKeys(_) => {
            "the certificate and key do not match: the key is not this certificate's".into()
        }
        e => format!("the key cannot be used with the certificate: {e}"),
    })
}

fn server_config(
    creds: &NodeCredentials,
    verifier: Arc<dyn ClientCertVerifier>,
) -> Result<quinn::ServerConfig, TrustError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TrustError::Ca(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.identity.chain.clone(), creds.identity.key.clone_key())
        .map_err(key_error)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| TrustError::Identity(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport());
    Ok(config)
}

/// A client configuration for `creds` without the checks of [`Trust::new`]: for a test that
/// plays a peer presenting what no agent would.
pub fn client_config(creds: &NodeCredentials) -> Result<quinn::ClientConfig, TrustError> {
    client_config_with(creds, roots(creds)?)
}

fn client_config_with(creds: &NodeCredentials, roots: Arc<RootCertStore>) -> Result<quinn::ClientConfig, TrustError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TrustError::Ca(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(creds.identity.chain.clone(), creds.identity.key.clone_key())
        .map_err(key_error)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| TrustError::Identity(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
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

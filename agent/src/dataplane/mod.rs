//! The data plane: one QUIC endpoint per agent (mutual TLS with the cluster CA), one connection
//! per peer, one stream per forwarded connection or request.
//!
//! Sending: [`DataPlane::connect`] routes a request (routing.rs), then tries the chosen instance
//! and the failover order: the local app directly, or a peer over QUIC with a stream header.
//! A connect failure or a refusal before any app byte was sent moves on to the next instance
//! (at most [`MAX_ATTEMPTS`]); an instance that keeps failing is ejected locally for a growing
//! backoff. Receiving: a peer's stream is accepted only for a service this agent fronts that is
//! healthy and not draining, and only from a peer whose certificate names the node id that
//! membership lists at its address.

pub mod header;
pub mod ingress;
pub mod pki;
pub mod splice;
pub mod tls;
pub mod udp;
pub mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::cluster::routing::{self, Target};
use crate::cluster::snapshot::Snapshot;
use crate::metrics::Metrics;
use crate::services::LocalServices;
use header::{Answer, StreamHeader};

/// The most instances one request tries.
pub const MAX_ATTEMPTS: usize = 3;
/// Connecting to an app on this host.
const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A QUIC handshake with a peer, across regions.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// A peer's answer to a stream header: it only has to connect to its local app first. Short,
/// because a peer that died silently is only noticed by this timeout until membership says so.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an unknown peer may wait for membership to list it.
const PEER_LOOKUP_WAIT: Duration = Duration::from_secs(3);
/// A stream header from a peer.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Consecutive failures before an instance is ejected locally.
const EJECT_AFTER: u32 = 3;
const EJECT_MAX: Duration = Duration::from_secs(60);
/// The shortest ejection of an instance whose agent did not answer: longer than membership
/// takes to call a silent member dead (SWIM's probe, timeout and `suspicion_timeout`).
const SILENT_EJECT: Duration = Duration::from_secs(5);

/// The first wait before dialling a peer again after a failed handshake; it doubles with
/// each failure in a row, up to [`DIAL_BACKOFF_MAX`].
const DIAL_BACKOFF: Duration = Duration::from_millis(250);
const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(8);

/// One peer's connection and dialling history.
#[derive(Debug, Default)]
struct PeerSlot {
    /// The connection, and whether the peer has answered a stream on it yet.
    conn: Option<(quinn::Connection, Arc<AtomicBool>)>,
    backoff: DialBackoff,
}

/// Failed handshakes in a row with a peer at one address, and when the last one ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct DialBackoff {
    failures: u32,
    last: Option<(SocketAddr, Instant)>,
}

impl DialBackoff {
    fn failed(&mut self, addr: SocketAddr, at: Instant) {
        if self.last.is_some_and(|(a, _)| a != addr) {
            self.failures = 0;
        }
        self.failures += 1;
        self.last = Some((addr, at));
    }

    /// When `addr` may be dialled again; `None` if at once. A peer that moved (restarted on a
    /// new address) is dialled at once.
    fn retry_at(&self, addr: SocketAddr) -> Option<Instant> {
        let (a, at) = self.last?;
        if a != addr {
            return None;
        }
        let wait = DIAL_BACKOFF.saturating_mul(1 << (self.failures - 1).min(16)).min(DIAL_BACKOFF_MAX);
        Some(at + wait)
    }
}

/// A byte stream to an instance: a local TCP connection or a QUIC stream to a peer. A local
/// connection counts in this agent's load (and holds up its drain) for as long as it lives,
/// as a stream from a peer does.
pub enum BackendStream {
    Tcp(TcpStream, ActiveGuard),
    Quic(tokio::io::Join<quinn::RecvStream, quinn::SendStream>),
}

impl std::fmt::Debug for BackendStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendStream::Tcp(..) => "BackendStream::Tcp",
            BackendStream::Quic(_) => "BackendStream::Quic",
        })
    }
}

impl AsyncRead for BackendStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            BackendStream::Tcp(s, _) => Pin::new(s).poll_read(cx, buf),
            BackendStream::Quic(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Tcp(s, _) => Pin::new(s).poll_write(cx, buf),
            BackendStream::Quic(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            BackendStream::Tcp(s, _) => Pin::new(s).poll_flush(cx),
            BackendStream::Quic(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            BackendStream::Tcp(s, _) => Pin::new(s).poll_shutdown(cx),
            BackendStream::Quic(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Why one attempt at an instance failed.
#[derive(Debug)]
struct Failed {
    why: String,
    /// The instance's agent said nothing in time: it may have died without a word.
    silent: bool,
}

impl Failed {
    fn silent(why: &str) -> Failed {
        Failed { why: why.to_string(), silent: true }
    }
}

impl From<String> for Failed {
    fn from(why: String) -> Failed {
        Failed { why, silent: false }
    }
}

impl From<&str> for Failed {
    fn from(why: &str) -> Failed {
        Failed { why: why.to_string(), silent: false }
    }
}

/// Why a request could not be forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    #[error("no service named {0:?} in the cluster")]
    NoSuchService(String),
    #[error("no healthy instance of {0} may take this request")]
    NoInstance(String),
    #[error("no healthy instance of {service} in {region}, and {service} is pinned to its region")]
    Pinned { service: String, region: String },
    #[error("every instance tried for {service} failed ({attempts} attempts; last: {last})")]
    AllFailed { service: String, attempts: usize, last: String },
}

/// A forwarded connection: the stream and the instance it reached.
#[derive(Debug)]
pub struct Forwarded {
    pub stream: BackendStream,
    pub node: String,
}

/// The instances one request tries, in order: the route's choice and failover order with the
/// instances ejected here moved last (tried only when nothing else is left), at most
/// [`MAX_ATTEMPTS`] of them.
pub fn attempt_order(candidates: Vec<Target>, ejected: impl Fn(&Target) -> bool) -> Vec<Target> {
    let (fresh, ejected): (Vec<Target>, Vec<Target>) = candidates.into_iter().partition(|t| !ejected(t));
    fresh.into_iter().chain(ejected).take(MAX_ATTEMPTS).collect()
}

/// Local ejection: an instance that failed [`EJECT_AFTER`] times in a row here is tried only
/// after every other candidate for 1 s, then 2, 4, ... up to [`EJECT_MAX`] each time it is
/// ejected again; one success forgets it all. Pure: time comes in as an argument.
#[derive(Debug, Default)]
pub struct Ejections {
    by_instance: HashMap<(String, String), Ejection>,
}

#[derive(Debug, Default)]
struct Ejection {
    failures: u32,
    ejections: u32,
    until: Option<Instant>,
}

impl Ejections {
    pub fn is_ejected(&self, service: &str, node: &str, now: Instant) -> bool {
        self.by_instance.get(&(service.to_string(), node.to_string())).and_then(|e| e.until).is_some_and(|u| now < u)
    }

    /// Records a failure; returns the backoff if it ejected the instance just now.
    pub fn failed(&mut self, service: &str, node: &str, now: Instant) -> Option<Duration> {
        let e = self.by_instance.entry((service.to_string(), node.to_string())).or_default();
        e.failures += 1;
        if e.failures < EJECT_AFTER {
            return None;
        }
        Some(e.eject(now, Duration::ZERO))
    }

    /// Records an attempt the instance's agent did not answer at all (no handshake, or no
    /// answer to a stream header in time): it may have died without a word, and every request
    /// sent its way would wait as long until membership says so (a few seconds). Ejected at
    /// once, for at least [`SILENT_EJECT`]; returns the backoff.
    pub fn silent(&mut self, service: &str, node: &str, now: Instant) -> Option<Duration> {
        let e = self.by_instance.entry((service.to_string(), node.to_string())).or_default();
        if let Some(until) = e.until.filter(|u| now < *u) {
            // Already out (many requests timed out on one stall at once): not ejected again.
            e.until = Some(until.max(now + SILENT_EJECT));
            return None;
        }
        Some(e.eject(now, SILENT_EJECT))
    }

    pub fn succeeded(&mut self, service: &str, node: &str) {
        self.by_instance.remove(&(service.to_string(), node.to_string()));
    }
}

impl Ejection {
    /// Ejects for 1 s, then 2, 4, ... with each ejection in a row, at least `at_least` and at
    /// most [`EJECT_MAX`]; returns the time.
    fn eject(&mut self, now: Instant, at_least: Duration) -> Duration {
        let backoff = (Duration::from_secs(1) * 2u32.saturating_pow(self.ejections.min(16))).clamp(at_least, EJECT_MAX);
        self.until = Some(now + backoff);
        self.ejections += 1;
        self.failures = 0;
        backoff
    }
}

/// Counts open connections per local service; the count is the load this agent announces.
#[derive(Debug, Default)]
pub struct ActiveConnections {
    per_service: Mutex<HashMap<Arc<str>, u64>>,
    total: AtomicU64,
}

/// Decrements the count when the connection ends.
#[derive(Debug)]
pub struct ActiveGuard {
    owner: Arc<ActiveConnections>,
    /// Shared with the map's key: a guard allocates nothing of its own.
    service: Arc<str>,
}

impl ActiveConnections {
    pub fn enter(self: &Arc<Self>, service: &str) -> ActiveGuard {
        let mut per_service = self.per_service.lock().unwrap_or_else(|e| e.into_inner());
        let key = per_service.keys().find(|k| ***k == *service).cloned().unwrap_or_else(|| Arc::from(service));
        *per_service.entry(key.clone()).or_default() += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        ActiveGuard { owner: self.clone(), service: key }
    }

    pub fn of(&self, service: &str) -> u64 {
        self.per_service.lock().unwrap_or_else(|e| e.into_inner()).get(service).copied().unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if let Some(n) = self.owner.per_service.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&*self.service) {
            *n = n.saturating_sub(1);
        }
        self.owner.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One stream a peer has open here; counted while it lives.
#[derive(Debug)]
struct StreamSlot {
    count: Arc<AtomicU64>,
    /// Streams open when this one was taken, itself included.
    open: u64,
}

impl StreamSlot {
    fn take(count: &Arc<AtomicU64>) -> StreamSlot {
        let open = count.fetch_add(1, Ordering::Relaxed) + 1;
        StreamSlot { count: count.clone(), open }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A peer's part in a connection's handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// It connected to us.
    Client,
    /// We connected to it.
    Server,
}

/// A connection a peer opened to us, listed in `DataPlane::inbound` while it is served.
struct Inbound<'a> {
    dp: &'a DataPlane,
    id: usize,
}

impl<'a> Inbound<'a> {
    fn list(dp: &'a DataPlane, conn: &quinn::Connection, peer: &str) -> Inbound<'a> {
        let id = conn.stable_id();
        dp.inbound.lock().unwrap_or_else(|e| e.into_inner()).insert(id, (peer.to_string(), conn.clone()));
        Inbound { dp, id }
    }
}

impl Drop for Inbound<'_> {
    fn drop(&mut self) {
        self.dp.inbound.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

/// The QUIC endpoint and everything that forwards through it.
pub struct DataPlane {
    pub endpoint: quinn::Endpoint,
    node_id: String,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    services: Arc<LocalServices>,
    metrics: Arc<Metrics>,
    /// One slot per peer node: the global lock is held only to find the slot, so a handshake
    /// with one peer (up to [`HANDSHAKE_TIMEOUT`]) never delays traffic to another.
    peers: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<PeerSlot>>>>,
    ejections: Mutex<Ejections>,
    pub active: Arc<ActiveConnections>,
    draining: AtomicBool,
    /// Closes forwarded connections that carry nothing for this long (`idle_timeout`).
    pub idle: Option<Arc<splice::IdleLimit>>,
    /// The TLS new handshakes use; replaced by [`DataPlane::reload`].
    trust: Mutex<Arc<tls::Trust>>,
    /// Bumped by every reload: a connection whose handshake began under an older trust is
    /// checked again under the new one.
    trust_epoch: AtomicU64,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
    /// Failed handshakes, in both directions: logged every 10 s at most.
    handshake_log: crate::membership::transport::RateLimitedLog,
    /// Connections peers opened to us, by `stable_id`, with the peer's node id: what a reload
    /// checks again.
    inbound: Mutex<HashMap<usize, (String, quinn::Connection)>>,
    /// Connections we opened, likewise (closed ones are pruned as new ones come).
    outbound: Mutex<HashMap<usize, (String, quinn::Connection)>>,
}

/// Why a reload kept the credentials in use.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// Nothing to read: the credentials were made in memory.
    #[error("this agent's certificates were made in memory (--dev): there are no files to reload")]
    InMemory,
    #[error("kept the certificates in use: {0}")]
    Invalid(String),
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reloaded {
    /// CAs now trusted.
    pub cas: usize,
    /// Open connections closed because the peer's certificate is no longer trusted.
    pub closed: usize,
    /// When this node's certificate stops being valid (Unix seconds).
    pub not_after: Option<i64>,
}

/// Shows when this node's certificate ends (`dataplane_certificate_expiry_seconds`), and warns
/// when that is less than two weeks away.
fn note_expiry(metrics: &Metrics, trust: &tls::Trust) -> Option<i64> {
    let not_after = trust.not_after?;
    metrics.cert_expiry.set(not_after);
    let left = not_after - crate::membership::unix_ms() as i64 / 1000;
    if left < 14 * 86_400 {
        tracing::warn!(
            days_left = left / 86_400,
            "this node's certificate expires soon: issue a new one (`agent cert issue`) and `agent reload`"
        );
    }
    Some(not_after)
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane").field("node_id", &self.node_id).finish()
    }
}

impl DataPlane {
    /// Binds the UDP socket for the endpoint (before membership starts, so the advertised data
    /// address is known).
    pub fn bind_socket(addr: SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
        let socket = std::net::UdpSocket::bind(addr).with_context(|| format!("cannot bind data_addr {addr} (UDP)"))?;
        // Debian's default 208 KiB UDP buffers drop packets in bulk transfers; ask for 16 MiB
        // (the kernel caps it at net.core.rmem_max / wmem_max).
        let sock = socket2::SockRef::from(&socket);
        let _ = sock.set_recv_buffer_size(UDP_BUFFER);
        let _ = sock.set_send_buffer_size(UDP_BUFFER);
        // The kernel halves what it reports and caps requests at net.core.rmem_max; with
        // CAP_NET_ADMIN the cap can be lifted.
        if sock.recv_buffer_size().unwrap_or(0) < UDP_BUFFER {
            force_buffers(&socket);
        }
        let got = sock.recv_buffer_size().unwrap_or(0);
        if got < UDP_BUFFER {
            tracing::warn!(
                receive_buffer = got,
                wanted = UDP_BUFFER,
                "the QUIC socket's receive buffer is small and bulk transfers may drop packets; raise net.core.rmem_max and net.core.wmem_max"
            );
        }
        Ok(socket)
    }

    /// Starts the QUIC endpoint on `socket` with the node's credentials.
    pub fn start(
        socket: std::net::UdpSocket,
        trust: tls::Trust,
        node_id: &str,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        services: Arc<LocalServices>,
        metrics: Arc<Metrics>,
        idle_timeout: Option<Duration>,
    ) -> anyhow::Result<Arc<DataPlane>> {
        let runtime = Arc::new(udp::ReadOnlyRegistration);
        note_expiry(&metrics, &trust);
        let trust = Arc::new(trust);
        let endpoint =
            quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(trust.server.clone()), socket, runtime)
                .context("starting the QUIC endpoint")?;
        let idle = idle_timeout.map(|after| Arc::new(splice::IdleLimit { after, closed: metrics.idle_closed.clone() }));
        Ok(Arc::new(DataPlane {
            endpoint,
            node_id: node_id.to_string(),
            snapshots,
            services,
            metrics,
            peers: std::sync::Mutex::new(HashMap::new()),
            ejections: Mutex::new(Ejections::default()),
            active: Arc::new(ActiveConnections::default()),
            draining: AtomicBool::new(false),
            idle,
            trust: Mutex::new(trust),
            trust_epoch: AtomicU64::new(0),
            reloading: tokio::sync::Mutex::new(()),
            handshake_log: crate::membership::transport::RateLimitedLog::new(Duration::from_secs(10)),
            inbound: Mutex::new(HashMap::new()),
            outbound: Mutex::new(HashMap::new()),
        }))
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Refuse new streams from now on (open ones carry on).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Waits until no forwarded connection is open, or `limit` passes.
    pub async fn drained(&self, limit: Duration) -> u64 {
        let deadline = Instant::now() + limit;
        while self.active.total() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.active.total()
    }

    // ------------------------------------------------------------------------------------------
    // Receiving.

    /// Accepts peers' connections until the endpoint closes.
    pub async fn serve(self: Arc<Self>) {
        while let Some(incoming) = self.endpoint.accept().await {
            let dp = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                let epoch = dp.trust_epoch.load(Ordering::Acquire);
                let conn = match tokio::time::timeout(Duration::from_secs(10), incoming).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        dp.metrics.refused("handshake");
                        // A foreign CA, a certificate from a dropped one, no certificate: worth
                        // a word, not one per attempt.
                        if let Some(n) = dp.handshake_log.tick() {
                            tracing::warn!(%remote, error = %e, refused = n, "refused a QUIC peer's handshake (its certificate is not from a CA in ca_file?)");
                        }
                        return;
                    }
                    Err(_) => {
                        dp.metrics.refused("handshake_timeout");
                        return;
                    }
                };
                let Some(peer) = dp.verify_peer(&conn).await else {
                    dp.metrics.refused("identity");
                    tracing::warn!(%remote, "refused a QUIC peer whose certificate does not name the member at its address");
                    conn.close(1u32.into(), b"certificate does not name the member at this address");
                    return;
                };
                let _listed = Inbound::list(&dp, &conn, &peer);
                // A reload that ran during the handshake did not see this connection.
                if dp.trust_epoch.load(Ordering::Acquire) != epoch && !dp.still_trusted(&conn, &peer, Role::Client) {
                    dp.untrusted(&conn, &peer);
                    return;
                }
                dp.accept_streams(conn, peer).await;
            });
        }
    }

    /// The node id the snapshot lists at the connection's address, if the peer's certificate
    /// names it. A peer that connects just after joining may not be in our view yet: wait a
    /// little for membership to catch up before refusing.
    async fn verify_peer(&self, conn: &quinn::Connection) -> Option<String> {
        let chain = tls::peer_chain(conn)?;
        let cert = chain.first()?.clone();
        let remote = conn.remote_address();
        let mut snapshots = self.snapshots.clone();
        let deadline = Instant::now() + PEER_LOOKUP_WAIT;
        loop {
            let listed = {
                let snap = snapshots.borrow_and_update();
                snap.members
                    .iter()
                    .find(|m| m.data_addr == Some(remote) && m.state != crate::cluster::snapshot::MemberState::Left)
                    .map(|m| m.id.clone())
            };
            if let Some(id) = listed {
                return tls::names_node(&cert, &id).then_some(id);
            }
            if tokio::time::timeout_at(deadline, snapshots.changed()).await.is_err() {
                return None;
            }
        }
    }

    async fn accept_streams(self: &Arc<Self>, conn: quinn::Connection, peer: String) {
        // Streams this peer has open here, for the stream credit (see `tls::INITIAL_STREAMS`).
        let open = Arc::new(AtomicU64::new(0));
        let mut limit = tls::INITIAL_STREAMS;
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(_) => return,
            };
            let slot = StreamSlot::take(&open);
            // A quarter of the credit left: raise it by a quarter of what is open, so that
            // the peer never waits for credit and little stream state is set aside unused.
            if slot.open + u64::from(tls::INITIAL_STREAMS / 4) > u64::from(limit) && limit < tls::MAX_STREAMS {
                let wanted = slot.open + slot.open / 4 + u64::from(tls::INITIAL_STREAMS);
                limit = u32::try_from(wanted).unwrap_or(u32::MAX).min(tls::MAX_STREAMS);
                conn.set_max_concurrent_bi_streams(limit.into());
                tracing::debug!(peer = %peer, streams = limit, "raised the peer's stream credit");
            }
            let dp = self.clone();
            let peer = peer.clone();
            // Header checks hold more state than the splice that follows: an admitted stream
            // gets a task of its own holding only the splice and its guards.
            tokio::spawn(async move {
                if let Some((app, send, recv, active)) = dp.admit_stream(send, recv, &peer).await {
                    tokio::spawn(splice::Holding::new(
                        splice::tcp_quic(app, send, recv).idle_limit(dp.idle.as_ref()),
                        (active, slot),
                    ));
                }
            });
        }
    }

    /// Reads and checks a stream's header, connects to the local app and answers; returns what
    /// the splice needs, or None after a refusal.
    async fn admit_stream(
        &self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        peer: &str,
    ) -> Option<(TcpStream, quinn::SendStream, quinn::RecvStream, ActiveGuard)> {
        let header = match tokio::time::timeout(HEADER_TIMEOUT, header::read_header(&mut recv)).await {
            Ok(Ok(h)) => h,
            Ok(Err(answer)) => return self.refuse(send, answer, peer, "?").await,
            Err(_) => return self.refuse(send, Answer::BadHeader, peer, "?").await,
        };
        if header.target != self.node_id {
            return self.refuse(send, Answer::WrongTarget, peer, &header.service).await;
        }
        if self.draining.load(Ordering::Relaxed) {
            return self.refuse(send, Answer::Draining, peer, &header.service).await;
        }
        let Some(record) = self.services.record(&header.service) else {
            return self.refuse(send, Answer::UnknownService, peer, &header.service).await;
        };
        if record.draining {
            return self.refuse(send, Answer::Draining, peer, &header.service).await;
        }
        if !record.healthy {
            return self.refuse(send, Answer::Unhealthy, peer, &header.service).await;
        }
        let app = match tokio::time::timeout(APP_CONNECT_TIMEOUT, TcpStream::connect(("127.0.0.1", record.port))).await
        {
            Ok(Ok(s)) => s,
            _ => return self.refuse(send, Answer::ConnectFailed, peer, &header.service).await,
        };
        let _ = app.set_nodelay(true);
        if send.write_all(&[Answer::Accepted as u8]).await.is_err() {
            return None;
        }
        self.metrics.stream("in", "accepted");
        Some((app, send, recv, self.active.enter(&header.service)))
    }

    async fn refuse<T>(&self, mut send: quinn::SendStream, answer: Answer, peer: &str, service: &str) -> Option<T> {
        self.metrics.stream("in", answer.as_str());
        tracing::debug!(peer, service, reason = answer.as_str(), "refused a forwarded stream");
        let _ = send.write_all(&[answer as u8]).await;
        let _ = send.finish();
        None
    }

    // ------------------------------------------------------------------------------------------
    // Sending.

    /// Opens a connection to an instance of `service`, trying the failover order.
    pub async fn connect(
        &self,
        service: &str,
        key: Option<&str>,
        client: Option<SocketAddr>,
    ) -> Result<Forwarded, ForwardError> {
        let snap = self.snapshots.borrow().clone();
        let route = {
            // The thread-local RNG must not live across an await.
            let mut rng = rand::rng();
            let mut pick = |n: usize| rand::RngExt::random_range(&mut rng, 0..n);
            routing::route(&snap, service, key, &mut pick)
                .map_err(|_| ForwardError::NoSuchService(service.to_string()))?
        };
        let candidates: Vec<Target> = route.chosen.into_iter().chain(route.failover).collect();
        if candidates.is_empty() {
            return Err(if route.pinned {
                ForwardError::Pinned { service: service.to_string(), region: snap.local.region.clone() }
            } else {
                ForwardError::NoInstance(service.to_string())
            });
        }
        let mut last = String::new();
        let mut attempts = 0;
        for target in attempt_order(candidates, |t| self.is_ejected(service, &t.node)) {
            attempts += 1;
            match self.open(&snap, service, &target, key, client).await {
                Ok(stream) => {
                    self.record_success(service, &target.node);
                    self.metrics.stream("out", "accepted");
                    return Ok(Forwarded { stream, node: target.node });
                }
                Err(failed) => {
                    self.metrics.stream("out", "retried");
                    tracing::debug!(service, node = %target.node, reason = %failed.why, "instance refused or unreachable; trying the next");
                    self.record_failure(service, &target.node, failed.silent);
                    last = format!("{}: {}", target.node, failed.why);
                }
            }
        }
        Err(ForwardError::AllFailed { service: service.to_string(), attempts, last })
    }

    async fn open(
        &self,
        snap: &Snapshot,
        service: &str,
        target: &Target,
        key: Option<&str>,
        client: Option<SocketAddr>,
    ) -> Result<BackendStream, Failed> {
        if target.node == self.node_id {
            let record = self.services.record(service).ok_or("no longer fronted here")?;
            let s = tokio::time::timeout(APP_CONNECT_TIMEOUT, TcpStream::connect(("127.0.0.1", record.port)))
                .await
                .map_err(|_| "local app connect timed out".to_string())?
                .map_err(|e| format!("local app: {e}"))?;
            let _ = s.set_nodelay(true);
            return Ok(BackendStream::Tcp(s, self.active.enter(service)));
        }
        let member = snap.member(&target.node).ok_or("not in the snapshot")?;
        let addr = member.data_addr.ok_or("announces no data address")?;
        let (conn, answered) = self.connection(&target.node, addr).await?;
        // Waits for stream credit if the peer has none to give right now (it raises the
        // credit as streams stay open, but not past `tls::MAX_STREAMS`).
        let (mut send, mut recv) = match tokio::time::timeout(ANSWER_TIMEOUT, conn.open_bi()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.forget_connection(&target.node, &conn).await;
                return Err(format!("opening a stream: {e}").into());
            }
            Err(_) => return Err("the peer gave no stream credit in time".into()),
        };
        let h = StreamHeader {
            version: header::VERSION,
            service: service.to_string(),
            target: target.node.clone(),
            affinity_key: key.map(str::to_string),
            client_addr: client,
        };
        header::write_header(&mut send, &h).await.map_err(|e| format!("sending the header: {e}"))?;
        let mut answer = [0u8; 1];
        match tokio::time::timeout(ANSWER_TIMEOUT, recv.read_exact(&mut answer)).await {
            Ok(Ok(_)) => answered.store(true, Ordering::Relaxed),
            Ok(Err(e)) => {
                self.forget_connection(&target.node, &conn).await;
                return Err(format!("no answer: {e}").into());
            }
            Err(_) => {
                // A peer that does not answer may be gone: the next attempt starts afresh.
                self.forget_connection(&target.node, &conn).await;
                // Unless it has not answered on this connection yet: it may still be waiting
                // for membership to list us (up to PEER_LOOKUP_WAIT) before it answers at all.
                if !answered.load(Ordering::Relaxed) {
                    return Err("no answer in time on a connection it has not answered on yet".into());
                }
                return Err(Failed::silent("no answer in time"));
            }
        }
        match Answer::from_byte(answer[0]) {
            Some(Answer::Accepted) => Ok(BackendStream::Quic(tokio::io::join(recv, send))),
            Some(a) => Err(format!("refused: {}", a.as_str()).into()),
            None => Err(format!("unknown answer {}", answer[0]).into()),
        }
    }

    fn peer_slot(&self, node: &str) -> Arc<tokio::sync::Mutex<PeerSlot>> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.entry(node.to_string()).or_default().clone()
    }

    /// Drops the connection to a peer that stopped answering, if it is still the one cached
    /// (not one dialled since): the next request dials afresh.
    async fn forget_connection(&self, node: &str, conn: &quinn::Connection) {
        let slot = self.peer_slot(node);
        let mut slot = slot.lock().await;
        if slot.conn.as_ref().is_some_and(|(c, _)| c.stable_id() == conn.stable_id()) {
            slot.conn = None;
        }
    }

    /// The connection to a peer, reused, or a new one (the server name is its node id, which
    /// its certificate must name). Requests to one peer wait for one handshake together;
    /// after a failed handshake the peer is not dialled again until its backoff has passed,
    /// and requests fail at once so the caller moves on to the next instance.
    async fn connection(&self, node: &str, addr: SocketAddr) -> Result<(quinn::Connection, Arc<AtomicBool>), Failed> {
        let slot = self.peer_slot(node);
        let mut slot = slot.lock().await;
        if let Some((c, answered)) = &slot.conn {
            if c.close_reason().is_none() && c.remote_address() == addr {
                return Ok((c.clone(), answered.clone()));
            }
            slot.conn = None;
        }
        let now = Instant::now();
        if let Some(at) = slot.backoff.retry_at(addr).filter(|&at| now < at) {
            return Err(format!(
                "not dialling again for {} ms after {} failed handshakes",
                (at - now).as_millis(),
                slot.backoff.failures
            )
            .into());
        }
        let epoch = self.trust_epoch.load(Ordering::Acquire);
        let client = self.trust.lock().unwrap_or_else(|e| e.into_inner()).client.clone();
        let result = match self.endpoint.connect_with(client, addr, node) {
            Err(e) => Err(Failed::from(format!("connect: {e}"))),
            Ok(connecting) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
                Ok(Ok(c)) => Ok(c),
                Ok(Err(e)) => {
                    // TLS alerts travel as QUIC's crypto error codes, 0x100 to 0x1ff.
                    let tls = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
                    if matches!(&e, quinn::ConnectionError::TransportError(t) if tls(t.code))
                        || matches!(&e, quinn::ConnectionError::ConnectionClosed(c) if tls(c.error_code))
                    {
                        // Our verifier refused its certificate, or it refused ours.
                        self.metrics.refused("handshake_out");
                        if let Some(n) = self.handshake_log.tick() {
                            tracing::warn!(peer = node, %addr, error = %e, refused = n, "a QUIC handshake with a peer failed on its certificate or ours");
                        }
                    }
                    Err(format!("QUIC handshake: {e}").into())
                }
                Err(_) => Err(Failed::silent("QUIC handshake timed out")),
            },
        };
        // A reload that ran during the handshake: it waited for this slot, but the connection
        // was not in it yet.
        let result = result.and_then(|conn| {
            if self.trust_epoch.load(Ordering::Acquire) != epoch && !self.still_trusted(&conn, node, Role::Server) {
                self.untrusted(&conn, node);
                return Err("its certificate is no longer trusted".into());
            }
            Ok(conn)
        });
        match result {
            Ok(conn) => {
                slot.backoff = DialBackoff::default();
                let answered = Arc::new(AtomicBool::new(false));
                slot.conn = Some((conn.clone(), answered.clone()));
                let mut outbound = self.outbound.lock().unwrap_or_else(|e| e.into_inner());
                outbound.retain(|_, (_, c)| c.close_reason().is_none());
                outbound.insert(conn.stable_id(), (node.to_string(), conn.clone()));
                Ok((conn, answered))
            }
            Err(e) => {
                slot.backoff.failed(addr, Instant::now());
                Err(e)
            }
        }
    }

    // ------------------------------------------------------------------------------------------
    // Reloading certificates.

    /// Reads the `[security]` files again and reloads them (SIGHUP, `agent reload`).
    pub async fn reload_files(&self) -> Result<Reloaded, ReloadError> {
        let files = self.trust.lock().unwrap_or_else(|e| e.into_inner()).files.clone().ok_or(ReloadError::InMemory)?;
        let creds = pki::load_credentials(&files).map_err(|e| ReloadError::Invalid(format!("{e:#}")))?;
        self.reload(&creds).await
    }

    /// Replaces the credentials: new handshakes present the new certificate and trust the new
    /// CAs at once, and every open connection whose peer's certificate the new CAs do not vouch
    /// for is closed (its peer must dial again, and is refused if its certificate still fails).
    /// Credentials that would cut this node off are refused and the old ones kept.
    pub async fn reload(&self, creds: &pki::NodeCredentials) -> Result<Reloaded, ReloadError> {
        let _one = self.reloading.lock().await;
        let trust = Arc::new(tls::Trust::new(creds, &self.node_id).map_err(|e| {
            // The file at fault, as at start.
            match creds.files.as_ref().and_then(|f| f.path_of(e.setting())) {
                Some(path) => ReloadError::Invalid(format!("{} {}: {e}", e.setting(), path.display())),
                None => ReloadError::Invalid(e.to_string()),
            }
        })?);
        self.endpoint.set_server_config(Some(trust.server.clone()));
        *self.trust.lock().unwrap_or_else(|e| e.into_inner()) = trust.clone();
        let not_after = note_expiry(&self.metrics, &trust);
        self.trust_epoch.fetch_add(1, Ordering::AcqRel);
        let mut closed = 0;
        let inbound: Vec<(String, quinn::Connection)> =
            self.inbound.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        for (peer, conn) in inbound {
            if !self.still_trusted(&conn, &peer, Role::Client) {
                self.untrusted(&conn, &peer);
                closed += 1;
            }
        }
        // Every connection we dialled that is still open, cached or not (a forgotten one may
        // still carry splices). A closed one is dialled afresh by the next request.
        let outbound: Vec<(String, quinn::Connection)> = {
            let mut outbound = self.outbound.lock().unwrap_or_else(|e| e.into_inner());
            outbound.retain(|_, (_, c)| c.close_reason().is_none());
            outbound.values().cloned().collect()
        };
        for (node, conn) in outbound {
            if !self.still_trusted(&conn, &node, Role::Server) {
                self.untrusted(&conn, &node);
                closed += 1;
            }
        }
        tracing::info!(cas = trust.cas, closed, "reloaded the certificates");
        Ok(Reloaded { cas: trust.cas, closed, not_after })
    }

    /// Whether the current CAs vouch for the certificate `conn`'s peer presented; `role` is the
    /// peer's part in the handshake.
    fn still_trusted(&self, conn: &quinn::Connection, peer: &str, role: Role) -> bool {
        let Some(chain) = tls::peer_chain(conn) else { return false };
        let trust = self.trust.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match role {
            Role::Client => trust.trusts_client(&chain),
            Role::Server => trust.trusts_server(&chain, peer),
        }
    }

    fn untrusted(&self, conn: &quinn::Connection, peer: &str) {
        self.metrics.refused("untrusted");
        tracing::warn!(
            peer,
            remote = %conn.remote_address(),
            "closed a connection made with a certificate the CAs no longer vouch for (the peer may dial again with a newer one)"
        );
        conn.close(2u32.into(), b"certificate no longer trusted");
    }

    /// Which of `nodes` this agent has ejected for `service` now.
    pub fn ejected_now<'a>(&self, service: &str, nodes: impl Iterator<Item = &'a str>) -> Vec<String> {
        nodes.filter(|n| self.is_ejected(service, n)).map(str::to_string).collect()
    }

    fn is_ejected(&self, service: &str, node: &str) -> bool {
        self.ejections.lock().unwrap_or_else(|e| e.into_inner()).is_ejected(service, node, Instant::now())
    }

    fn record_failure(&self, service: &str, node: &str, silent: bool) {
        let mut ejections = self.ejections.lock().unwrap_or_else(|e| e.into_inner());
        let ejected = if silent {
            ejections.silent(service, node, Instant::now())
        } else {
            ejections.failed(service, node, Instant::now())
        };
        drop(ejections);
        if let Some(backoff) = ejected {
            self.metrics.ejections.inc();
            tracing::warn!(
                service,
                node,
                backoff_ms = backoff.as_millis() as u64,
                "instance keeps failing; ejected locally"
            );
        }
    }

    fn record_success(&self, service: &str, node: &str) {
        self.ejections.lock().unwrap_or_else(|e| e.into_inner()).succeeded(service, node);
    }
}

/// The UDP socket buffer the data plane asks for: Debian's default 208 KiB drops packets in bulk,
/// and so did 4 MiB now and then (up to 182 datagrams over four 5 s bulk runs on loopback,
/// with a 16 MiB stream window in flight); 16 MiB dropped none. The kernel takes only what is
/// queued.
const UDP_BUFFER: usize = 16 << 20;

/// SO_RCVBUFFORCE / SO_SNDBUFFORCE: like SO_RCVBUF / SO_SNDBUF past net.core.*mem_max, for a
/// process with CAP_NET_ADMIN (a container's root usually has it). Failures leave the sizes
/// as they were.
#[allow(unsafe_code)]
fn force_buffers(socket: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = UDP_BUFFER as libc::c_int;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: a valid socket descriptor, a pointer to a live c_int and its exact length.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_splice_task_fits_three_of_tokios_128_byte_lines() {
        // A task is its future plus about 104 bytes, rounded up to 128: past 280 bytes, every
        // idle connection from a peer would take 512 instead of 384.
        let from_peer = std::mem::size_of::<
            splice::Holding<splice::Splice<TcpStream, splice::QuicEnd>, (ActiveGuard, StreamSlot)>,
        >();
        let upstream = std::mem::size_of::<splice::Splice<TcpStream, splice::QuicEnd>>();
        assert!(from_peer <= 280 && upstream <= 280, "splice futures: {from_peer} and {upstream} bytes");
    }

    #[test]
    fn a_request_tries_the_failover_order_with_ejected_instances_last_and_stops_after_three() {
        let t = |n: &str| Target { node: n.into(), region: "r".into(), zone: "z".into(), healthy: true, load: 0 };
        let names = |v: Vec<Target>| v.into_iter().map(|t| t.node).collect::<Vec<_>>();
        let all = vec![t("a"), t("b"), t("c"), t("d")];
        assert_eq!(names(attempt_order(all.clone(), |_| false)), ["a", "b", "c"]);
        assert_eq!(names(attempt_order(all.clone(), |t| t.node == "a")), ["b", "c", "d"]);
        assert_eq!(
            names(attempt_order(vec![t("a"), t("b")], |t| t.node == "a")),
            ["b", "a"],
            "ejected, but the last hope"
        );
        assert!(attempt_order(Vec::new(), |_| false).is_empty());
    }

    #[test]
    fn an_instance_that_keeps_failing_is_ejected_for_a_growing_time_and_forgiven_on_success() {
        let t0 = Instant::now();
        let mut e = Ejections::default();
        assert_eq!(e.failed("web", "b", t0), None);
        assert_eq!(e.failed("web", "b", t0), None);
        assert_eq!(e.failed("web", "b", t0), Some(Duration::from_secs(1)), "the third failure in a row ejects");
        assert!(e.is_ejected("web", "b", t0 + Duration::from_millis(999)));
        assert!(!e.is_ejected("web", "b", t0 + Duration::from_secs(1)), "and only for its backoff");
        assert!(!e.is_ejected("chat", "b", t0), "per service");
        assert!(!e.is_ejected("web", "c", t0), "per instance");
        let backoffs: Vec<_> = (0..8).map(|_| (0..3).find_map(|_| e.failed("web", "b", t0)).unwrap()).collect();
        assert_eq!(backoffs[..3], [Duration::from_secs(2), Duration::from_secs(4), Duration::from_secs(8)]);
        assert_eq!(*backoffs.last().unwrap(), EJECT_MAX, "doubling up to the cap");
        e.succeeded("web", "b");
        assert!(!e.is_ejected("web", "b", t0));
        assert_eq!(e.failed("web", "b", t0), None, "a success forgets the failures");
    }

    #[test]
    fn an_instance_whose_agent_does_not_answer_is_ejected_at_once() {
        let t0 = Instant::now();
        let mut e = Ejections::default();
        assert_eq!(e.silent("web", "b", t0), Some(SILENT_EJECT), "at once, for as long as membership takes to decide");
        assert!(e.is_ejected("web", "b", t0 + SILENT_EJECT - Duration::from_millis(1)));
        assert!(!e.is_ejected("web", "b", t0 + SILENT_EJECT));
        // Many requests timing out on one stall: ejected once, not escalated by each.
        for _ in 0..10 {
            assert_eq!(e.silent("web", "b", t0 + Duration::from_secs(1)), None);
        }
        assert!(!e.is_ejected("web", "b", t0 + Duration::from_secs(6)), "{:?}", e.by_instance);
        // Silent again after the ejection ended: then the usual doubling.
        let mut at = t0 + Duration::from_secs(10);
        let mut later = Vec::new();
        for _ in 0..4 {
            let backoff = e.silent("web", "b", at).unwrap();
            later.push(backoff);
            at += backoff;
        }
        assert_eq!(later, [5, 5, 8, 16].map(Duration::from_secs));
        e.succeeded("web", "b");
        assert!(!e.is_ejected("web", "b", t0));
    }

    #[test]
    fn a_peer_that_fails_handshakes_is_dialled_less_often_until_it_moves() {
        let a: SocketAddr = "10.0.0.1:7947".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:7947".parse().unwrap();
        let t0 = Instant::now();
        let mut d = DialBackoff::default();
        assert_eq!(d.retry_at(a), None, "never failed: dial at once");
        d.failed(a, t0);
        assert_eq!(d.retry_at(a), Some(t0 + DIAL_BACKOFF));
        d.failed(a, t0);
        d.failed(a, t0);
        assert_eq!(d.retry_at(a), Some(t0 + DIAL_BACKOFF * 4), "doubles with each failure in a row");
        for _ in 0..40 {
            d.failed(a, t0);
        }
        assert_eq!(d.retry_at(a), Some(t0 + DIAL_BACKOFF_MAX), "and stops growing");
        assert_eq!(d.retry_at(b), None, "a peer on a new address is dialled at once");
        d.failed(b, t0);
        assert_eq!(d.failures, 1, "failures count per address");
    }
}

//! The sealed UDP transport under chitchat, shared with the RTT pinger.
//!
//! Every datagram is `seal(frame)`, where a frame is one type byte and a body: the region pool's
//! chitchat messages (type 0), a ping or pong carrying a 64-bit id (types 1 and 2), SWIM (3), the
//! gateways' WAN pool chitchat (4), a join request and its reply (5 and 6), and a version hint
//! (7). One receive task
//! opens every datagram and hands its body to whoever listens for its type. A datagram that does
//! not open, or opens to an unknown type, a type nobody listens for, or a body its listener
//! cannot decode, is dropped and counted by reason, and logged at most once per interval.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use chitchat::transport::{Socket, Transport};
use chitchat::{ChitchatMessage, Deserializable, Serializable};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use super::keyring::{Keyring, OVERHEAD};
use crate::metrics::Metrics;

/// The region pool's chitchat.
pub const FRAME_GOSSIP: u8 = 0;
const FRAME_PING: u8 = 1;
const FRAME_PONG: u8 = 2;
/// SWIM liveness inside the region.
pub const FRAME_SWIM: u8 = 3;
/// The gateways' WAN pool chitchat.
pub const FRAME_WAN: u8 = 4;
/// "Which members of region R do you know?" and its answer.
pub const FRAME_JOIN: u8 = 5;
pub const FRAME_JOIN_REPLY: u8 = 6;
/// A version hint sent straight to a region member.
pub const FRAME_HINT: u8 = 7;
const FRAME_KINDS: usize = 8;
/// Datagrams queued per listener before new ones are dropped.
const QUEUE: usize = 4096;

/// A received frame body and who sent it.
pub type Inbound = (SocketAddr, Vec<u8>);

/// The largest UDP payload over IPv4; chitchat sizes its messages to this.
pub const MAX_DATAGRAM: usize = 65_507;
/// Receive buffer: one byte more than any valid datagram, so oversized ones are detectable.
const RECV_BUFFER: usize = MAX_DATAGRAM + 1;

/// Logs a warning at most once per `every`, with how many were suppressed.
#[derive(Debug)]
pub struct RateLimitedLog {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimitedLog {
    pub fn new(every: Duration) -> Self {
        RateLimitedLog { every, state: Mutex::new((None, 0)) }
    }

    /// Returns how many events to report now (this one included), or None to stay quiet.
    pub fn tick(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.1 += 1;
        let now = Instant::now();
        if s.0.is_none_or(|last| now.duration_since(last) >= self.every) {
            s.0 = Some(now);
            let n = s.1;
            s.1 = 0;
            Some(n)
        } else {
            None
        }
    }
}

/// Round-trip times to peers' gossip addresses, measured by sealed pings.
#[derive(Debug, Default)]
pub struct RttTable {
    inner: Mutex<RttInner>,
}

#[derive(Debug, Default)]
struct RttInner {
    next_id: u64,
    pending: HashMap<u64, (SocketAddr, Instant)>,
    /// Smoothed RTT in milliseconds.
    rtt_ms: HashMap<SocketAddr, f64>,
    /// Bumped on every new measurement.
    version: u64,
}

impl RttTable {
    fn start(&self, to: SocketAddr) -> u64 {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        // Forget pings that were never answered.
        s.pending.retain(|_, (_, at)| now.duration_since(*at) < Duration::from_secs(10));
        s.next_id = s.next_id.wrapping_add(1);
        let id = s.next_id;
        s.pending.insert(id, (to, now));
        id
    }

    fn finish(&self, from: SocketAddr, id: u64) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((to, at)) = s.pending.remove(&id) {
            if to != from {
                return;
            }
            let sample = at.elapsed().as_secs_f64() * 1000.0;
            let smoothed = match s.rtt_ms.get(&to) {
                Some(old) => old * 0.8 + sample * 0.2,
                None => sample,
            };
            s.rtt_ms.insert(to, smoothed);
            s.version += 1;
        }
    }

    /// The smoothed RTT to `addr` in milliseconds, if measured.
    pub fn get(&self, addr: &SocketAddr) -> Option<f64> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).rtt_ms.get(addr).copied()
    }

    /// Changes whenever a measurement arrives.
    pub fn version(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).version
    }

    pub fn all(&self) -> HashMap<SocketAddr, f64> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).rtt_ms.clone()
    }
}

/// Where gossip datagrams go: a UDP socket in the agent, a simulated network in `sim`. The
/// membership stack above it is the same code either way.
#[async_trait]
pub trait DatagramSocket: Send + Sync + std::fmt::Debug + 'static {
    /// Receives one datagram. Must be cancel-safe.
    async fn recv_from(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)>;
    async fn send_to(&self, buf: &[u8], to: SocketAddr) -> std::io::Result<usize>;
    /// Sends without waiting (for replies from inside the receive loop).
    fn try_send_to(&self, buf: &[u8], to: SocketAddr) -> std::io::Result<usize>;
    fn local_addr(&self) -> std::io::Result<SocketAddr>;
}

#[async_trait]
impl DatagramSocket for UdpSocket {
    async fn recv_from(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        UdpSocket::recv_from(self, buf).await
    }
    async fn send_to(&self, buf: &[u8], to: SocketAddr) -> std::io::Result<usize> {
        UdpSocket::send_to(self, buf, to).await
    }
    fn try_send_to(&self, buf: &[u8], to: SocketAddr) -> std::io::Result<usize> {
        UdpSocket::try_send_to(self, buf, to)
    }
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        UdpSocket::local_addr(self)
    }
}

/// The socket, the keyring and the counters, shared by chitchat's socket and the pinger.
#[derive(Debug)]
pub struct Wire {
    socket: Box<dyn DatagramSocket>,
    keyring: RwLock<Keyring>,
    cluster: Vec<u8>,
    pub(crate) metrics: Arc<Metrics>,
    pub rtt: RttTable,
    bad_datagram_log: RateLimitedLog,
    listeners: Mutex<[Option<tokio::sync::mpsc::Sender<Inbound>>; FRAME_KINDS]>,
}

impl Wire {
    pub fn new(socket: impl DatagramSocket, keyring: Keyring, cluster: &str, metrics: Arc<Metrics>) -> Arc<Wire> {
        Arc::new(Wire {
            socket: Box::new(socket),
            keyring: RwLock::new(keyring),
            cluster: cluster.as_bytes().to_vec(),
            metrics,
            rtt: RttTable::default(),
            bad_datagram_log: RateLimitedLog::new(Duration::from_secs(10)),
            listeners: Mutex::new(Default::default()),
        })
    }

    /// Receives every frame of type `kind` from now on (replacing an earlier listener).
    pub fn listen(&self, kind: u8) -> tokio::sync::mpsc::Receiver<Inbound> {
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        self.listeners.lock().unwrap_or_else(|e| e.into_inner())[usize::from(kind)] = Some(tx);
        rx
    }

    /// Frames of type `kind` are dropped from now on.
    pub fn unlisten(&self, kind: u8) {
        self.listeners.lock().unwrap_or_else(|e| e.into_inner())[usize::from(kind)] = None;
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The keyring in use.
    pub fn keyring(&self) -> Keyring {
        self.keyring.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Seals and opens with `ring` from the next datagram on (`agent keys`).
    pub fn set_keyring(&self, ring: Keyring) {
        *self.keyring.write().unwrap_or_else(|e| e.into_inner()) = ring;
    }

    fn seal(&self, kind: u8, body: &[u8]) -> Vec<u8> {
        let mut plain = Vec::with_capacity(1 + body.len());
        plain.push(kind);
        plain.extend_from_slice(body);
        let mut sealed = Vec::with_capacity(plain.len() + OVERHEAD);
        self.keyring.read().unwrap_or_else(|e| e.into_inner()).seal(&self.cluster, &plain, &mut sealed);
        sealed
    }

    /// Sends a sealed frame without waiting (for callers that cannot await); a full socket
    /// buffer counts as a send error.
    pub fn try_send_frame(&self, to: SocketAddr, kind: u8, body: &[u8]) {
        let sealed = self.seal(kind, body);
        match self.socket.try_send_to(&sealed, to) {
            Ok(n) => self.count_sent(kind, n),
            Err(e) => {
                self.metrics.dropped("send_error");
                tracing::debug!(%to, error = %e, "gossip send failed");
            }
        }
    }

    /// Sends a sealed frame; errors and oversized frames are counted, never returned.
    pub async fn send_frame(&self, to: SocketAddr, kind: u8, body: &[u8]) {
        let sealed = self.seal(kind, body);
        if sealed.len() > MAX_DATAGRAM {
            self.metrics.dropped("oversized_outgoing");
            tracing::warn!(bytes = sealed.len(), %to, "gossip message too large for one datagram, not sent");
            return;
        }
        match self.socket.send_to(&sealed, to).await {
            Ok(n) => self.count_sent(kind, n),
            Err(e) => {
                self.metrics.dropped("send_error");
                tracing::debug!(%to, error = %e, "gossip send failed");
            }
        }
    }

    fn count_sent(&self, kind: u8, bytes: usize) {
        self.metrics.count_datagram("out", bytes);
        let layer = match kind {
            FRAME_GOSSIP => "region",
            FRAME_SWIM => "swim",
            FRAME_WAN => "wan",
            FRAME_PING | FRAME_PONG => "ping",
            FRAME_HINT => "hint",
            _ => "join",
        };
        self.metrics.sent_bytes.get_or_create(&crate::metrics::KindLabel { kind: layer }).inc_by(bytes as u64);
    }

    /// Sends a ping to `to`; the pong updates the RTT table.
    pub async fn ping(&self, to: SocketAddr) {
        let id = self.rtt.start(to);
        self.send_frame(to, FRAME_PING, &id.to_le_bytes()).await;
    }

    pub(crate) fn drop_datagram(&self, reason: &'static str, from: SocketAddr) {
        self.metrics.dropped(reason);
        if let Some(n) = self.bad_datagram_log.tick() {
            tracing::warn!(%from, reason, count = n, "dropped gossip datagrams that failed to open or parse");
        }
    }

    /// Reads the socket until it fails for good: opens each datagram, answers pings, records
    /// pongs and hands every other frame to its listener. Runs as one task per agent.
    pub async fn receive_loop(self: Arc<Self>) {
        let mut buf = vec![0u8; RECV_BUFFER];
        loop {
            let (len, from) = match self.socket.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) if is_transient(&e) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "gossip socket failed; membership stops receiving");
                    return;
                }
            };
            self.metrics.count_datagram("in", len);
            if len > MAX_DATAGRAM {
                self.drop_datagram("oversized", from);
                continue;
            }
            let plain = match self.keyring.read().unwrap_or_else(|e| e.into_inner()).open(&self.cluster, &buf[..len]) {
                Ok(p) => p,
                Err(e) => {
                    self.drop_datagram(e.reason(), from);
                    continue;
                }
            };
            let Some((&kind, body)) = plain.split_first() else {
                self.drop_datagram("empty", from);
                continue;
            };
            match kind {
                FRAME_PING | FRAME_PONG if body.len() == 8 => {
                    let id = u64::from_le_bytes(body.try_into().unwrap_or_default());
                    if kind == FRAME_PING {
                        let pong = self.seal(FRAME_PONG, &id.to_le_bytes());
                        if let Ok(n) = self.socket.try_send_to(&pong, from) {
                            self.count_sent(FRAME_PONG, n);
                        }
                    } else {
                        self.rtt.finish(from, id);
                    }
                }
                k if usize::from(k) < FRAME_KINDS && k != FRAME_PING && k != FRAME_PONG => {
                    let listener = self.listeners.lock().unwrap_or_else(|e| e.into_inner())[usize::from(k)].clone();
                    match listener {
                        Some(tx) => {
                            if tx.try_send((from, body.to_vec())).is_err() {
                                self.drop_datagram("queue_full", from);
                            }
                        }
                        None => self.metrics.dropped("no_listener"),
                    }
                }
                _ => self.drop_datagram("unknown_frame", from),
            }
        }
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionReset | ConnectionRefused | OutOfMemory | Interrupted | WouldBlock)
}

/// Decides whether a chitchat message from an address may reach chitchat (a pool at its size
/// limit refuses strangers).
pub type Admit = Arc<dyn Fn(SocketAddr) -> bool + Send + Sync>;

/// chitchat's `Transport`, over the shared [`Wire`], for the frames of one type (the region
/// pool or the WAN pool).
pub struct SealedTransport {
    pub wire: Arc<Wire>,
    pub kind: u8,
    pub admit: Option<Admit>,
}

impl std::fmt::Debug for SealedTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedTransport").field("kind", &self.kind).finish_non_exhaustive()
    }
}

#[async_trait]
impl Transport for SealedTransport {
    async fn open(&self, _listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        // The socket was bound before chitchat started, so that port 0 works and the
        // advertised address is known.
        Ok(Box::new(SealedSocket {
            wire: self.wire.clone(),
            kind: self.kind,
            rx: self.wire.listen(self.kind),
            admit: self.admit.clone(),
        }))
    }
}

struct SealedSocket {
    wire: Arc<Wire>,
    kind: u8,
    rx: tokio::sync::mpsc::Receiver<Inbound>,
    admit: Option<Admit>,
}

#[async_trait]
impl Socket for SealedSocket {
    async fn send(&mut self, to: SocketAddr, msg: ChitchatMessage) -> anyhow::Result<()> {
        let mut body = Vec::with_capacity(msg.serialized_len());
        msg.serialize(&mut body);
        self.wire.send_frame(to, self.kind, &body).await;
        Ok(())
    }

    /// Cancel-safe: the only await is the channel's.
    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            let Some((from, body)) = self.rx.recv().await else {
                anyhow::bail!("the gossip receive loop stopped");
            };
            match decode_gossip(&body) {
                Some(msg) => {
                    if self.admit.as_ref().is_some_and(|admit| !admit(from)) {
                        self.wire.metrics.pool_refused.inc();
                        continue;
                    }
                    return Ok((from, msg));
                }
                None => self.wire.drop_datagram("undecodable", from),
            }
        }
    }
}

/// Region-pool frame bodies as chitchat sends them (seeds for `make fuzz`).
#[cfg(any(test, fuzzing))]
pub(crate) fn gossip_seeds() -> Vec<Vec<u8>> {
    [
        ChitchatMessage::Syn { cluster_id: "demo/us-east".into(), digest: Default::default() },
        ChitchatMessage::BadCluster,
    ]
    .iter()
    .map(|m| {
        let mut body = Vec::with_capacity(m.serialized_len());
        m.serialize(&mut body);
        body
    })
    .collect()
}

/// A region- or WAN-pool frame's body as chitchat's message, if it is one.
pub(crate) fn decode_gossip(body: &[u8]) -> Option<ChitchatMessage> {
    let mut cursor = body;
    ChitchatMessage::deserialize(&mut cursor).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn wire(keyring: &Keyring, cluster: &str) -> Arc<Wire> {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        Wire::new(socket, keyring.clone(), cluster, Arc::new(Metrics::new()))
    }

    #[tokio::test]
    async fn frames_reach_their_listener_and_garbage_is_counted() {
        let key = Keyring::generate();
        let (a, b) = (wire(&key, "prod").await, wire(&key, "prod").await);
        tokio::spawn(a.clone().receive_loop());
        tokio::spawn(b.clone().receive_loop());
        let mut gossip = b.listen(FRAME_GOSSIP);
        let b_addr = b.local_addr().unwrap();
        let msg = ChitchatMessage::BadCluster;
        let mut body = Vec::new();
        msg.serialize(&mut body);
        // Garbage, a foreign cluster, a frame nobody listens for and a ping arrive first.
        let raw = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        raw.send_to(b"short", b_addr).unwrap();
        raw.send_to(&[7u8; 100], b_addr).unwrap();
        let stranger = wire(&key, "staging").await;
        stranger.send_frame(b_addr, FRAME_GOSSIP, &body).await;
        a.send_frame(b_addr, FRAME_WAN, &body).await;
        a.ping(b_addr).await;
        a.send_frame(b_addr, FRAME_GOSSIP, &body).await;
        let (from, got) = tokio::time::timeout(Duration::from_secs(5), gossip.recv()).await.unwrap().unwrap();
        assert_eq!(got, body);
        assert_eq!(from, a.local_addr().unwrap());
        let text = b.metrics.render();
        assert!(text.contains("reason=\"too_short\"} 1"), "{text}");
        assert!(text.contains("reason=\"unknown_version\"} 1"), "{text}");
        assert!(text.contains("reason=\"unauthenticated\"} 1"), "{text}");
        assert!(text.contains("reason=\"no_listener\"} 1"), "{text}");
        for _ in 0..50 {
            if a.rtt.get(&b_addr).is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the pong recorded no RTT");
    }
}

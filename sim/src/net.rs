//! The simulated network: every node's gossip socket is an endpoint here. Datagrams are
//! delivered after the latency between the two regions (with jitter), or dropped by loss or a
//! partition. All randomness comes from one seeded RNG; time is tokio's paused clock.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use grapevine_agent::membership::transport::DatagramSocket;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::mpsc;

type Datagram = (Vec<u8>, SocketAddr);

/// Traffic counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Traffic {
    pub bytes: u64,
    pub datagrams: u64,
    pub dropped: u64,
}

#[derive(Debug)]
struct State {
    endpoints: BTreeMap<SocketAddr, mpsc::UnboundedSender<Datagram>>,
    region_of: BTreeMap<SocketAddr, usize>,
    /// One-way latency between regions.
    latency: Vec<Vec<Duration>>,
    jitter: f64,
    loss: f64,
    /// Cut (from region, to region) pairs.
    cut: BTreeSet<(usize, usize)>,
    rng: StdRng,
    sent: Traffic,
}

/// The network all simulated nodes share.
#[derive(Debug, Clone)]
pub struct SimNet {
    state: Arc<Mutex<State>>,
}

impl SimNet {
    pub fn new(latency: Vec<Vec<Duration>>, jitter: f64, loss: f64, seed: u64) -> SimNet {
        SimNet {
            state: Arc::new(Mutex::new(State {
                endpoints: BTreeMap::new(),
                region_of: BTreeMap::new(),
                latency,
                jitter,
                loss,
                cut: BTreeSet::new(),
                rng: StdRng::seed_from_u64(seed ^ 0x005e_ed0f_1055),
                sent: Traffic::default(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The address of node `index` in region `region`.
    pub fn address(region: usize, index: usize) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, region as u8, (index / 250) as u8, (index % 250 + 1) as u8)), 7946)
    }

    /// Attaches a socket at `addr` (replacing a crashed node's).
    pub fn attach(&self, addr: SocketAddr, region: usize) -> SimSocket {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut s = self.lock();
        s.endpoints.insert(addr, tx);
        s.region_of.insert(addr, region);
        SimSocket { addr, net: self.clone(), rx: tokio::sync::Mutex::new(rx) }
    }

    /// Detaches an address: datagrams to it vanish (a crashed host).
    pub fn detach(&self, addr: SocketAddr) {
        self.lock().endpoints.remove(&addr);
    }

    pub fn set_loss(&self, rate: f64) {
        self.lock().loss = rate;
    }

    /// Cuts traffic from every region in `from` to every region in `to` (and back unless one-way).
    pub fn partition(&self, from: &[usize], to: &[usize], one_way: bool) {
        let mut s = self.lock();
        for &a in from {
            for &b in to {
                s.cut.insert((a, b));
                if !one_way {
                    s.cut.insert((b, a));
                }
            }
        }
    }

    pub fn heal(&self) {
        self.lock().cut.clear();
    }

    /// Whether traffic flows from `a`'s region to `b`'s now.
    pub fn reachable(&self, a: usize, b: usize) -> bool {
        !self.lock().cut.contains(&(a, b))
    }

    pub fn traffic(&self) -> Traffic {
        self.lock().sent
    }

    fn send(&self, from: SocketAddr, buf: &[u8], to: SocketAddr) {
        let (tx, delay) = {
            let mut s = self.lock();
            s.sent.bytes += buf.len() as u64;
            s.sent.datagrams += 1;
            let (Some(&rf), Some(&rt)) = (s.region_of.get(&from), s.region_of.get(&to)) else {
                s.sent.dropped += 1;
                return;
            };
            let loss = s.loss;
            if s.cut.contains(&(rf, rt)) || (loss > 0.0 && s.rng.random::<f64>() < loss) {
                s.sent.dropped += 1;
                return;
            }
            let Some(tx) = s.endpoints.get(&to).cloned() else {
                s.sent.dropped += 1;
                return;
            };
            let base = s.latency[rf][rt].as_secs_f64();
            let jitter = s.jitter;
            let factor = 1.0 + jitter * (2.0 * s.rng.random::<f64>() - 1.0);
            (tx, Duration::from_secs_f64((base * factor).max(0.0)))
        };
        let data = buf.to_vec();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send((data, from));
        });
    }
}

/// One node's gossip socket on the simulated network.
#[derive(Debug)]
pub struct SimSocket {
    addr: SocketAddr,
    net: SimNet,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Datagram>>,
}

#[async_trait]
impl DatagramSocket for SimSocket {
    async fn recv_from(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        let mut rx = self.rx.lock().await;
        match rx.recv().await {
            Some((data, from)) => {
                let n = data.len().min(buf.len());
                buf[..n].copy_from_slice(&data[..n]);
                Ok((n, from))
            }
            None => Err(std::io::Error::other("simulated socket closed")),
        }
    }

    async fn send_to(&self, buf: &[u8], to: SocketAddr) -> std::io::Result<usize> {
        self.net.send(self.addr, buf, to);
        Ok(buf.len())
    }

    fn try_send_to(&self, buf: &[u8], to: SocketAddr) -> std::io::Result<usize> {
        self.net.send(self.addr, buf, to);
        Ok(buf.len())
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

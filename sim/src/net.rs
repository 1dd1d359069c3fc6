//! The simulated network: every node's gossip socket is an endpoint here. Datagrams are
//! delivered after the latency between the two regions (with jitter), or dropped by loss (a
//! rate everywhere, or on the links between two sides) or a partition (between two sides, each
//! a set of regions and single nodes, both ways or one way). All randomness comes from one
//! seeded RNG; time is tokio's paused clock.

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

/// One side of a partition or a lossy link: whole regions and single nodes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Side {
    pub regions: BTreeSet<usize>,
    pub nodes: BTreeSet<SocketAddr>,
}

impl Side {
    fn contains(&self, addr: SocketAddr, region: usize) -> bool {
        self.regions.contains(&region) || self.nodes.contains(&addr)
    }
}

/// Traffic from `from` to `to` that a rule applies to.
#[derive(Debug, Clone, PartialEq)]
struct Link {
    from: Side,
    to: Side,
}

impl Link {
    /// From `from` to `to`, and back unless one-way.
    fn between(from: Side, to: Side, one_way: bool) -> Vec<Link> {
        let mut links = Vec::with_capacity(2);
        if !one_way {
            links.push(Link { from: to.clone(), to: from.clone() });
        }
        links.push(Link { from, to });
        links
    }

    fn matches(&self, from: SocketAddr, rf: usize, to: SocketAddr, rt: usize) -> bool {
        self.from.contains(from, rf) && self.to.contains(to, rt)
    }
}

#[derive(Debug)]
struct State {
    endpoints: BTreeMap<SocketAddr, mpsc::UnboundedSender<Datagram>>,
    region_of: BTreeMap<SocketAddr, usize>,
    /// One-way latency between regions.
    latency: Vec<Vec<Duration>>,
    jitter: f64,
    /// Loss on links no [`State::link_loss`] rule names.
    loss: f64,
    /// Loss on particular links; the last rule that matches a datagram decides.
    link_loss: Vec<(Link, f64)>,
    /// Traffic cut by partitions.
    cuts: Vec<Link>,
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
                link_loss: Vec::new(),
                cuts: Vec::new(),
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

    /// The loss rate on every link that no [`SimNet::set_link_loss`] names.
    pub fn set_loss(&self, rate: f64) {
        self.lock().loss = rate;
    }

    /// The loss rate from `from` to `to` (and back unless one-way), over the general rate.
    pub fn set_link_loss(&self, from: Side, to: Side, one_way: bool, rate: f64) {
        self.lock().link_loss.extend(Link::between(from, to, one_way).into_iter().map(|l| (l, rate)));
    }

    /// Cuts traffic from `from` to `to` (and back unless one-way).
    pub fn partition(&self, from: Side, to: Side, one_way: bool) {
        self.lock().cuts.extend(Link::between(from, to, one_way));
    }

    /// Removes every partition (loss stays as it is).
    pub fn heal(&self) {
        self.lock().cuts.clear();
    }

    /// Whether traffic flows from node `from` to node `to` now.
    pub fn reachable(&self, from: SocketAddr, to: SocketAddr) -> bool {
        let s = self.lock();
        match (s.region_of.get(&from), s.region_of.get(&to)) {
            (Some(&rf), Some(&rt)) => !s.cuts.iter().any(|c| c.matches(from, rf, to, rt)),
            _ => false,
        }
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
            let loss = s.link_loss.iter().rev().find(|(l, _)| l.matches(from, rf, to, rt)).map_or(s.loss, |(_, r)| *r);
            if s.cuts.iter().any(|c| c.matches(from, rf, to, rt)) || (loss > 0.0 && s.rng.random::<f64>() < loss) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn side(regions: &[usize], nodes: &[SocketAddr]) -> Side {
        Side { regions: regions.iter().copied().collect(), nodes: nodes.iter().copied().collect() }
    }

    /// Sends 1000 datagrams from each of `from` to `to` and returns which arrived (by index).
    async fn deliveries(net: &SimNet, from: &[SocketAddr], to: &SimSocket) -> Vec<(usize, SocketAddr)> {
        for i in 0..1000u32 {
            for &f in from {
                net.send(f, &i.to_le_bytes(), to.addr);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut got = Vec::new();
        let mut rx = to.rx.lock().await;
        while let Ok((data, f)) = rx.try_recv() {
            got.push((u32::from_le_bytes(data[..4].try_into().unwrap()) as usize, f));
        }
        got.sort();
        got
    }

    fn net(seed: u64) -> (SimNet, SocketAddr, SocketAddr, SocketAddr, SimSocket) {
        let ms = Duration::from_millis(1);
        let net = SimNet::new(vec![vec![ms; 2]; 2], 0.1, 0.2, seed);
        let (a1, a2, b1) = (SimNet::address(0, 0), SimNet::address(0, 1), SimNet::address(1, 0));
        let _ = net.attach(a1, 0);
        let _ = net.attach(a2, 0);
        let sink = net.attach(b1, 1);
        (net, a1, a2, b1, sink)
    }

    #[tokio::test(start_paused = true)]
    async fn one_seed_loses_the_same_datagrams() {
        let run = |seed| async move {
            let (net, a1, _, _, sink) = net(seed);
            deliveries(&net, &[a1], &sink).await
        };
        let (x, y, z) = (run(5).await, run(5).await, run(6).await);
        assert_eq!(x, y, "the same seed drops the same datagrams");
        assert_ne!(x, z, "another seed drops others");
        assert!((700..900).contains(&x.len()), "20% loss: {} of 1000 arrived", x.len());
    }

    #[tokio::test(start_paused = true)]
    async fn cuts_and_lossy_links_apply_to_the_sides_they_name() {
        let (net, a1, a2, b1, sink) = net(1);
        net.set_loss(0.0);
        // One node cut off one way from the other region: its datagrams out are lost, not those in.
        net.partition(side(&[], &[a1]), side(&[1], &[]), true);
        assert!(!net.reachable(a1, b1));
        assert!(net.reachable(b1, a1));
        assert!(net.reachable(a2, b1), "its neighbour is not cut");
        let got = deliveries(&net, &[a1, a2], &sink).await;
        assert!(got.iter().all(|(_, f)| *f == a2) && got.len() == 1000, "only a2's arrive");
        net.heal();
        assert!(net.reachable(a1, b1));
        // All loss on the link from a2 to region 1, none elsewhere.
        net.set_link_loss(side(&[], &[a2]), side(&[1], &[]), true, 1.0);
        let got = deliveries(&net, &[a1, a2], &sink).await;
        assert!(got.iter().all(|(_, f)| *f == a1) && got.len() == 1000, "only a1's arrive");
        // A later rule on the same link wins.
        net.set_link_loss(side(&[0], &[]), side(&[1], &[]), false, 0.0);
        assert_eq!(deliveries(&net, &[a1, a2], &sink).await.len(), 2000);
    }
}

//! SWIM liveness inside one region, with the `foca` crate (sans-IO): direct probes, indirect
//! probes through a few members, suspicion with refutation by incarnation.
//!
//! foca runs behind a mutex; every call into it collects what foca wants done (datagrams,
//! timers, notifications) in a [`Outbox`], which is carried out after the lock is released.
//! Datagrams share the sealed gossip socket (frame type [`super::transport::FRAME_SWIM`]),
//! prefixed by four bytes of the region name's hash so that a stray probe from another region
//! is dropped, not merged. foca's custom broadcasts carry version hints: "node X is at version v" (see
//! [`Hint`]); they ride on probes and acks, and a new hint is also pushed at once in a broadcast
//! of its own (`Swim::hint`), so that a change does not wait for the next probe.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroUsize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foca::{BroadcastHandler, Foca, Identity, Invalidates, Notification, PostcardCodec, Runtime, State, Timer};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::transport::{FRAME_SWIM, Wire};
use crate::metrics::{KindLabel, Metrics};

/// foca's datagrams stay under this (before the region prefix and sealing), so that a sealed
/// SWIM datagram fits in 1200 bytes.
const MAX_SWIM_PACKET: usize = 1200 - 64 - 64;

/// A member's identity in SWIM: its gossip address and generation (every probe carries two
/// identities, so they stay small: the node id is in the region pool's state, under the same
/// address). `bump` changes when foca rejoins after being declared down.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SwimId {
    pub addr: SocketAddr,
    pub generation: u64,
    pub bump: u16,
}

impl SwimId {
    /// A stand-in for a member we know only by address: foca accepts an announce addressed to
    /// any identity with its address.
    fn placeholder(addr: SocketAddr) -> SwimId {
        SwimId { addr, generation: 0, bump: 0 }
    }

    fn rank(&self) -> (u64, u16) {
        (self.generation, self.bump)
    }
}

impl Identity for SwimId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(SwimId { bump: self.bump.wrapping_add(1), ..self.clone() })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.rank() > adversary.rank()
    }
}

/// "Node `node` (of `generation`) has state up to `version`": sent when a node's state changes,
/// so members pull it now instead of at the next anti-entropy round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hint {
    pub node: String,
    pub generation: u64,
    pub version: u64,
    pub addr: SocketAddr,
}

/// The dedup key for hints: a newer version of the same node replaces an older one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HintKey {
    node: String,
    rank: (u64, u64),
}

impl Invalidates for HintKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.node == other.node && self.rank >= other.rank
    }
}

#[derive(Debug, thiserror::Error)]
#[error("undecodable version hint")]
pub struct BadHint;

/// Receives hints: keeps the newest per node, and queues new ones for the membership layer.
#[derive(Debug, Default)]
pub struct HintHandler {
    newest: HashMap<String, (u64, u64)>,
    /// foca owns the handler and offers no way back to it, so new hints are queued here.
    fresh: Arc<Mutex<Vec<Hint>>>,
}

impl BroadcastHandler<SwimId> for HintHandler {
    type Key = HintKey;
    type Error = BadHint;

    fn receive_item(&mut self, data: &[u8], _sender: Option<&SwimId>) -> Result<Option<HintKey>, BadHint> {
        let hint: Hint = postcard::from_bytes(data).map_err(|_| BadHint)?;
        let rank = (hint.generation, hint.version);
        if self.newest.get(&hint.node).is_some_and(|have| *have >= rank) {
            return Ok(None);
        }
        self.newest.insert(hint.node.clone(), rank);
        let key = HintKey { node: hint.node.clone(), rank };
        self.fresh.lock().unwrap_or_else(|e| e.into_inner()).push(hint);
        Ok(Some(key))
    }
}

/// SWIM settings, from `[gossip]`-level configuration.
#[derive(Debug, Clone)]
pub struct SwimSettings {
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
    pub indirect_probes: usize,
    pub suspicion: Duration,
    /// How long a down member is remembered.
    pub remember_down: Duration,
}

/// What foca asked for during one call.
#[derive(Default)]
struct Outbox {
    send: Vec<(SocketAddr, Vec<u8>)>,
    timers: Vec<(Timer<SwimId>, Duration)>,
    changed: bool,
    /// Inside `leave`: foca declares this node down itself, which is no news.
    leaving: bool,
}

impl Runtime<SwimId> for Outbox {
    fn notify(&mut self, notification: Notification<'_, SwimId>) {
        match notification {
            Notification::MemberUp(_) | Notification::MemberDown(_) | Notification::Rename(..) => self.changed = true,
            Notification::Defunct if self.leaving => tracing::debug!("SWIM: left"),
            Notification::Defunct => tracing::info!("SWIM: this node was declared down; rejoining"),
            Notification::Rejoin(id) => tracing::info!(bump = id.bump, "SWIM: rejoined with a renewed identity"),
            _ => {}
        }
    }

    fn send_to(&mut self, to: SwimId, data: &[u8]) {
        self.send.push((to.addr, data.to_vec()));
    }

    fn submit_after(&mut self, event: Timer<SwimId>, after: Duration) {
        self.timers.push((event, after));
    }
}

type Core = Foca<SwimId, PostcardCodec, StdRng, HintHandler>;

/// A member's SWIM state as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwimState {
    Alive,
    Suspect,
    Down,
}

/// One region's SWIM instance.
pub struct Swim {
    core: Mutex<Core>,
    wire: Arc<Wire>,
    region_tag: Vec<u8>,
    metrics: Arc<Metrics>,
    stopped: AtomicBool,
    hints: Arc<Mutex<Vec<Hint>>>,
}

impl std::fmt::Debug for Swim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swim").finish_non_exhaustive()
    }
}

impl Swim {
    pub fn new(me: SwimId, region: &str, settings: &SwimSettings, wire: Arc<Wire>, metrics: Arc<Metrics>) -> Arc<Swim> {
        let config = foca::Config {
            probe_period: settings.probe_interval,
            probe_rtt: settings.probe_timeout,
            num_indirect_probes: NonZeroUsize::new(settings.indirect_probes.max(1)).unwrap_or(NonZeroUsize::MIN),
            max_transmissions: NonZeroU8::new(8).unwrap_or(NonZeroU8::MIN),
            suspect_to_down_after: settings.suspicion,
            remove_down_after: Some(settings.remember_down),
            max_packet_size: NonZeroUsize::new(MAX_SWIM_PACKET).unwrap_or(NonZeroUsize::MIN),
            notify_down_members: true,
            periodic_announce: Some(foca::PeriodicParams {
                frequency: Duration::from_secs(30),
                num_members: NonZeroUsize::MIN,
            }),
            // Down members are re-announced to: this is how a member wrongly declared down
            // (or one side of a healed cut) comes back without anyone acting.
            periodic_announce_to_down_members: Some(foca::PeriodicParams {
                frequency: Duration::from_secs(5),
                num_members: NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN),
            }),
            periodic_gossip: Some(foca::PeriodicParams {
                frequency: Duration::from_millis(200),
                num_members: NonZeroUsize::new(3).unwrap_or(NonZeroUsize::MIN),
            }),
        };
        // Seeded from the identity: the same in every run of a simulation.
        let seed = xxhash_rust::xxh3::xxh3_64(format!("{}/{}", me.generation, me.addr).as_bytes());
        let handler = HintHandler::default();
        let hints = handler.fresh.clone();
        let foca = Foca::with_custom_broadcast(me, config, StdRng::seed_from_u64(seed), PostcardCodec, handler);
        // Four bytes of the region name's hash: a stray probe from another region is dropped.
        let region_tag = (xxhash_rust::xxh3::xxh3_64(region.as_bytes()) as u32).to_le_bytes().to_vec();
        Arc::new(Swim { core: Mutex::new(foca), wire, region_tag, metrics, stopped: AtomicBool::new(false), hints })
    }

    fn with_core<R>(self: &Arc<Self>, f: impl FnOnce(&mut Core, &mut Outbox) -> R) -> R {
        let mut out = Outbox::default();
        let r = {
            let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut core, &mut out)
        };
        self.carry_out(out);
        r
    }

    fn carry_out(self: &Arc<Self>, out: Outbox) {
        if self.stopped.load(Ordering::Relaxed) {
            return;
        }
        for (to, data) in out.send {
            let mut body = Vec::with_capacity(self.region_tag.len() + data.len());
            body.extend_from_slice(&self.region_tag);
            body.extend_from_slice(&data);
            self.wire.try_send_frame(to, FRAME_SWIM, &body);
        }
        for (timer, after) in out.timers {
            if matches!(timer, foca::Timer::ChangeSuspectToDown { .. }) {
                self.metrics.swim_suspicions.inc();
            }
            let me = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                if !me.stopped.load(Ordering::Relaxed) {
                    let kind = match &timer {
                        foca::Timer::ProbeRandomMember(_) => Some("direct"),
                        foca::Timer::SendIndirectProbe { .. } => Some("indirect"),
                        _ => None,
                    };
                    // A probe timer with nobody to probe, or an indirect-probe timer after
                    // the direct probe was answered, sends nothing and counts for nothing.
                    let sent = me.with_core(|core, out| {
                        let _ = core.handle_timer(timer, &mut *out);
                        !out.send.is_empty()
                    });
                    if let Some(kind) = kind.filter(|_| sent) {
                        me.metrics.swim_probes.get_or_create(&KindLabel { kind }).inc();
                    }
                }
            });
        }
    }

    /// Handles one SWIM datagram (region prefix included). Returns false if it was dropped.
    pub fn handle(self: &Arc<Self>, body: &[u8]) -> bool {
        let Some(data) = body.strip_prefix(self.region_tag.as_slice()) else {
            self.metrics.dropped("swim_other_region");
            return false;
        };
        let result = self.with_core(|core, out| core.handle_data(data, out));
        match result {
            Ok(()) => true,
            Err(foca::Error::DataFromOurselves) => true,
            Err(e) => {
                self.metrics.dropped("swim_undecodable");
                tracing::debug!(error = %e, "SWIM datagram refused");
                false
            }
        }
    }

    /// The bytes every SWIM body from this region starts with.
    pub fn region_tag(&self) -> &[u8] {
        &self.region_tag
    }

    /// Introduces this node to whoever listens at `addr` (same region).
    pub fn announce(self: &Arc<Self>, addr: SocketAddr) {
        self.with_core(|core, out| {
            if core.identity().addr != addr {
                let _ = core.announce(SwimId::placeholder(addr), out);
            }
        });
    }

    /// Spreads a version hint with the next probes and acks.
    pub fn hint(self: &Arc<Self>, hint: &Hint) {
        if let Ok(bytes) = postcard::to_stdvec(hint) {
            self.with_core(|core, out| {
                let _ = core.add_broadcast(&bytes);
                // Push it at once rather than waiting for the next probe.
                let _ = core.broadcast(out);
            });
        }
    }

    /// Hints received since the last call.
    pub fn take_hints(&self) -> Vec<Hint> {
        std::mem::take(&mut *self.hints.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Every member foca knows (self excluded), with its state: the newest identity per address.
    pub fn view(&self) -> HashMap<SocketAddr, (SwimId, SwimState)> {
        let core = self.core.lock().unwrap_or_else(|e| e.into_inner());
        let mut view: HashMap<SocketAddr, (SwimId, SwimState)> = HashMap::new();
        for m in core.iter_membership_state() {
            let state = match m.state() {
                State::Alive => SwimState::Alive,
                State::Suspect => SwimState::Suspect,
                State::Down => SwimState::Down,
            };
            let id = m.id();
            match view.get(&id.addr) {
                Some((have, _)) if have.rank() > id.rank() => {}
                _ => {
                    view.insert(id.addr, (id.clone(), state));
                }
            }
        }
        view
    }

    /// Members foca considers active (alive or suspect).
    pub fn active_count(&self) -> usize {
        self.core.lock().unwrap_or_else(|e| e.into_inner()).num_members()
    }

    /// Tells the region this node is leaving, then stops.
    pub fn leave(self: &Arc<Self>) {
        self.with_core(|core, out| {
            out.leaving = true;
            let _ = core.leave_cluster(out);
        });
        self.stopped.store(true, Ordering::Relaxed);
    }

    /// Stops without a word.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(port: u16, generation: u64, bump: u16) -> SwimId {
        SwimId { addr: SocketAddr::from(([10, 0, 0, 1], port)), generation, bump }
    }

    #[test]
    fn a_renewed_or_restarted_identity_wins_its_address() {
        let old = id(7946, 5, 0);
        let renewed = old.renew().unwrap();
        assert_eq!(renewed.addr, old.addr);
        assert!(renewed.win_addr_conflict(&old) && !old.win_addr_conflict(&renewed));
        let restarted = id(7946, 6, 0);
        assert!(restarted.win_addr_conflict(&renewed));
    }

    #[test]
    fn newer_hints_replace_older_ones_and_stale_ones_stop() {
        let key = |v| HintKey { node: "a".into(), rank: (1, v) };
        assert!(key(5).invalidates(&key(4)));
        assert!(!key(4).invalidates(&key(5)));
        assert!(!HintKey { node: "b".into(), rank: (1, 9) }.invalidates(&key(1)));
        let mut handler = HintHandler::default();
        let hint = |v| {
            postcard::to_stdvec(&Hint { node: "a".into(), generation: 1, version: v, addr: id(1, 1, 0).addr }).unwrap()
        };
        assert!(handler.receive_item(&hint(3), None).unwrap().is_some());
        assert!(handler.receive_item(&hint(3), None).unwrap().is_none(), "seen: not spread again");
        assert!(handler.receive_item(&hint(2), None).unwrap().is_none(), "older: not spread");
        assert!(handler.receive_item(&hint(4), None).unwrap().is_some());
        assert!(handler.receive_item(b"\xff\xff", None).is_err());
        assert_eq!(handler.fresh.lock().unwrap().len(), 2);
    }
}

//! `agent keys`: rotating a running cluster's gossip keyring without downtime, as `serf keys`
//! does: install the new key everywhere, make it primary, remove the old one.
//!
//! An operation travels as the agent's own event `_keyring` (sealed under the keys already in
//! use, relayed between regions by the gateways, never shown to event watchers). Every member
//! applies it as it hears it, rewrites its keyring file (`cluster_key_file`) so that a restart
//! keeps the change, and announces its keyring in gossip as fingerprints, primary first (the
//! member's `keyring` in `/v1/members`). The agent that was asked waits until every member it
//! knows announces the change, then says who has not.
//!
//! Guards keep a rotation from cutting members off (`force` skips them): `install` refuses
//! while a member announces no keyring (unreachable, or an agent from before this module, which
//! would show the key to its event watchers); `use` while a member does not announce the key
//! installed (it could not open what the others then seal); `remove` while the key is primary
//! anywhere, or while a member's keyring file lacks the key it seals with (it could not rewrite
//! the file; restarted, it would be cut off). Since another region's view lags by a few gossip rounds, a request first waits
//! up to [`GUARD_WAIT`] for its guard to clear. Operations are idempotent but not ordered: run
//! them one at a time, each after the last has reached every member (the command waits for
//! that), since two in flight may reach members in either order.
//!
//! A member that was down during an operation missed it (events are best-effort); `agent keys
//! list` shows what it lacks. Rotation protects against a key that may leak, not one that has:
//! the new key travels sealed under the old. After a leak, write a new keyring file to every
//! host and restart the agents.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::api::{KeyCount, KeyOpDoc, KeyRequest, KeysDoc};
use crate::cluster::snapshot::{MemberState, MemberView, Snapshot};
use crate::events::Event;
use crate::membership::Membership;
use crate::membership::keyring::{self, KeyAction, Keyring};

/// The agent's own event that carries a keyring operation.
pub const KEYRING_EVENT: &str = "_keyring";
/// How long a request waits for every member by default.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);

/// The payload of a `_keyring` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyOp {
    pub action: KeyAction,
    pub fingerprint: String,
    /// The key itself (base64), for `install` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Members an operation must reach.
fn counted(m: &MemberView) -> bool {
    !matches!(m.state, MemberState::Dead | MemberState::Left)
}

/// A counted member whose announced keyring can be believed now.
fn reporting(m: &MemberView) -> bool {
    m.state != MemberState::Unreachable && !m.keyring.keys.is_empty()
}

pub fn status(snap: &Snapshot, local: &Keyring) -> KeysDoc {
    let members: Vec<&MemberView> = snap.members.iter().filter(|m| counted(m)).collect();
    let mut keys: Vec<KeyCount> = local
        .fingerprints()
        .into_iter()
        .enumerate()
        .map(|(i, fingerprint)| KeyCount {
            fingerprint,
            installed: 0,
            primary: 0,
            here: Some(if i == 0 { "primary" } else { "installed" }.into()),
            missing_on: Vec::new(),
        })
        .collect();
    for m in members.iter().filter(|m| reporting(m)) {
        for (i, fp) in m.keyring.keys.iter().enumerate() {
            let at = match keys.iter().position(|k| &k.fingerprint == fp) {
                Some(at) => at,
                None => {
                    keys.push(KeyCount {
                        fingerprint: fp.clone(),
                        installed: 0,
                        primary: 0,
                        here: None,
                        missing_on: Vec::new(),
                    });
                    keys.len() - 1
                }
            };
            keys[at].installed += 1;
            keys[at].primary += usize::from(i == 0);
        }
    }
    for k in &mut keys {
        k.missing_on = members
            .iter()
            .filter(|m| reporting(m) && !m.keyring.keys.contains(&k.fingerprint))
            .map(|m| m.id.clone())
            .collect();
    }
    KeysDoc {
        members: members.len(),
        keys,
        not_reporting: members.iter().filter(|m| !reporting(m)).map(|m| m.id.clone()).collect(),
        unsaved: members.iter().filter(|m| m.keyring.unsaved).map(|m| m.id.clone()).collect(),
    }
}

/// Whether `m` announces the result of `action` on the key `fp`.
fn has_applied(m: &MemberView, action: KeyAction, fp: &str) -> bool {
    if !reporting(m) {
        return false;
    }
    let keys = &m.keyring.keys;
    match action {
        KeyAction::Install => keys.iter().any(|k| k == fp),
        KeyAction::Use => keys.first().is_some_and(|k| k == fp),
        KeyAction::Remove => !keys.iter().any(|k| k == fp),
    }
}

fn progress(snap: &Snapshot, action: KeyAction, fp: &str) -> (Vec<String>, Vec<String>) {
    let (done, pending): (Vec<&MemberView>, Vec<&MemberView>) =
        snap.members.iter().filter(|m| counted(m)).partition(|m| has_applied(m, action, fp));
    (done.into_iter().map(|m| m.id.clone()).collect(), pending.into_iter().map(|m| m.id.clone()).collect())
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not a key, or not one this agent holds (400).
    #[error("{0}")]
    Invalid(String),
    /// This agent's own keyring forbids it; no wait changes that (409).
    #[error("{0}")]
    Refused(String),
    /// A guard, on what other members announce: may clear as views catch up (409).
    #[error("{0}")]
    Unsafe(String),
}

/// The key argument of `agent keys ACTION KEY` read by its form alone (the client checks it
/// before asking the agent, the agent again): its fingerprint, and the key itself unless a
/// fingerprint was given (which `install` refuses).
pub fn key_argument(action: KeyAction, text: &str) -> Result<(String, Option<String>), RequestError> {
    let text = text.trim();
    let (fingerprint, key) = match keyring::decode_key(text) {
        Some(k) => (keyring::fingerprint(&k), Some(text.to_string())),
        None if text.len() == 16 && text.bytes().all(|b| b.is_ascii_hexdigit()) => (text.to_ascii_lowercase(), None),
        // Not echoed: it may be a real key with a typo.
        None => {
            return Err(RequestError::Invalid(
                "that is neither a key (base64 of 32 bytes, as `agent keygen` prints) nor a key fingerprint \
                 (16 hex digits, as `agent keys list` shows)"
                    .into(),
            ));
        }
    };
    if action == KeyAction::Install && key.is_none() {
        return Err(RequestError::Invalid(
            "install needs the key itself (base64, as `agent keygen` prints), not its fingerprint".into(),
        ));
    }
    Ok((fingerprint, key))
}

/// Checks a request against this agent's keyring and the cluster, and turns it into the
/// operation every member applies.
pub fn prepare(req: &KeyRequest, local: &Keyring, snap: &Snapshot) -> Result<KeyOp, RequestError> {
    let (fingerprint, key) = key_argument(req.action, &req.key)?;
    let op = |key| KeyOp { action: req.action, fingerprint: fingerprint.clone(), key };
    let members = || snap.members.iter().filter(|m| counted(m));
    let ids = |pred: &dyn Fn(&MemberView) -> bool| -> Vec<String> {
        members().filter(|m| pred(m)).map(|m| m.id.clone()).collect()
    };
    let held_anywhere = local.find(&fingerprint).is_some() || members().any(|m| m.keyring.keys.contains(&fingerprint));
    let unsafe_unless_forced = |ids: Vec<String>, why: String| {
        if req.force || ids.is_empty() { Ok(()) } else { Err(RequestError::Unsafe(why.replace("{}", &ids.join(", ")))) }
    };
    match req.action {
        KeyAction::Install => {
            unsafe_unless_forced(
                ids(&|m| !reporting(m)),
                "{} announce no keyring: unreachable (they would miss the key) or agents from before \
                 `agent keys`, which would show it to their event watchers; upgrade them first, or \
                 --force to install it anyway"
                    .into(),
            )?;
            Ok(op(key))
        }
        KeyAction::Use => {
            if !held_anywhere {
                return Err(RequestError::Invalid(format!(
                    "no member holds key {fingerprint}; install it first (`agent keys install KEY`)"
                )));
            }
            if local.find(&fingerprint).is_none() {
                // Installed elsewhere: the install may not have reached this agent yet.
                return Err(RequestError::Unsafe(format!(
                    "key {fingerprint} is not installed on this agent; install it first (`agent keys install KEY`)"
                )));
            }
            unsafe_unless_forced(
                ids(&|m| !has_applied(m, KeyAction::Install, &fingerprint)),
                format!(
                    "key {fingerprint} is not known to be installed on {{}}; they could not open what it seals \
                     (`agent keys list` shows who lacks it; --force to use it anyway)"
                ),
            )?;
            Ok(op(None))
        }
        KeyAction::Remove => {
            if !held_anywhere {
                return Err(RequestError::Invalid(format!(
                    "no member holds key {fingerprint} (`agent keys list` shows the keys in use)"
                )));
            }
            if local.fingerprints().first() == Some(&fingerprint) {
                return Err(RequestError::Refused(format!(
                    "key {fingerprint} is primary on this agent; make another key primary first (`agent keys use KEY`)"
                )));
            }
            unsafe_unless_forced(
                ids(&|m| m.keyring.keys.first() == Some(&fingerprint)),
                format!(
                    "key {fingerprint} is primary on {{}}; make another key primary first (`agent keys use KEY`), \
                     or --force to remove it where it is not"
                ),
            )?;
            unsafe_unless_forced(
                ids(&|m| m.keyring.unsaved),
                "{} could not write their keyring file, and it lacks the key they seal with: restarted, \
                 they would be cut off. Put that key in their files (each clears within 10 s once its \
                 file holds it), or --force"
                    .into(),
            )?;
            Ok(op(None))
        }
    }
}

/// Longest a request waits for a guard to clear: the views of other regions lag by a few
/// gossip rounds, so `use` right after `install` (from any agent) waits for them rather than
/// refusing; a member that really lacks the key is named within this long.
pub const GUARD_WAIT: Duration = Duration::from_secs(10);

/// [`prepare`], retried as the snapshot changes until it passes or up to `wait` (at most
/// [`GUARD_WAIT`]) while only a guard stands in the way.
pub async fn prepare_when_safe(
    req: &KeyRequest,
    local: impl Fn() -> Keyring,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    wait: Duration,
) -> Result<KeyOp, RequestError> {
    let deadline = tokio::time::Instant::now() + wait.min(GUARD_WAIT);
    loop {
        let result = prepare(req, &local(), &snapshots.borrow_and_update());
        match result {
            Err(RequestError::Unsafe(_)) if tokio::time::Instant::now() < deadline => {
                // A new snapshot, or this agent's own keyring changing (checked every 100 ms).
                let next = tokio::time::Instant::now() + Duration::from_millis(100);
                if let Ok(Err(_)) = tokio::time::timeout_at(deadline.min(next), snapshots.changed()).await {
                    return result;
                }
            }
            result => return result,
        }
    }
}

/// Fires `op` to every member (this one included) and waits up to `wait` until every member
/// counted announces it.
pub async fn run(
    membership: &Membership,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    op: KeyOp,
    wait: Duration,
) -> KeyOpDoc {
    let payload = serde_json::to_string(&op).unwrap_or_default();
    membership.fire_internal(KEYRING_EVENT, &payload).await;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let snap = snapshots.borrow_and_update().clone();
        let (done, pending) = progress(&snap, op.action, &op.fingerprint);
        let ended = pending.is_empty()
            || tokio::time::Instant::now() >= deadline
            || matches!(tokio::time::timeout_at(deadline, snapshots.changed()).await, Ok(Err(_)));
        if ended {
            return KeyOpDoc {
                action: op.action,
                fingerprint: op.fingerprint,
                members: done.len() + pending.len(),
                done,
                pending,
                unsaved: snap
                    .members
                    .iter()
                    .filter(|m| counted(m) && m.keyring.unsaved)
                    .map(|m| m.id.clone())
                    .collect(),
            };
        }
    }
}

/// What a member does with an operation it hears of: the new ring, `None` if it has nothing
/// to change.
pub fn apply(ring: &Keyring, op: &KeyOp) -> Result<Option<Keyring>, String> {
    let key = match (op.action, &op.key) {
        (KeyAction::Install, Some(text)) => match keyring::decode_key(text) {
            Some(k) if keyring::fingerprint(&k) == op.fingerprint => k,
            _ => return Err("the key does not match its fingerprint".into()),
        },
        (KeyAction::Install, None) => return Err("an install without its key".into()),
        (_, _) => match ring.find(&op.fingerprint) {
            Some(k) => k,
            None if op.action == KeyAction::Remove => return Ok(None),
            None => return Err(keyring::KeyActionError::NotInstalled.to_string()),
        },
    };
    ring.apply(op.action, &key).map_err(|e| e.to_string())
}

/// How often a member whose keyring file lags re-reads it (an operator updating a read-only
/// secret clears the warning within this long).
const RECHECK: Duration = Duration::from_secs(10);

/// Whether a restart from the keyring file would cut this member off: the file cannot be read,
/// or lacks the key the member seals with (the others seal with it too, or soon will).
pub fn file_lags(ring: &Keyring, path: &std::path::Path) -> bool {
    let primary = ring.fingerprints().into_iter().next();
    Keyring::from_file(path).map_or(true, |file| primary.is_none_or(|p| !file.fingerprints().contains(&p)))
}

/// Applies every keyring operation this agent hears of (`events` subscribed before
/// membership started, so none is missed), for as long as the agent runs. After each, and
/// every [`RECHECK`] while the file lags, it announces whether its keyring file lags.
pub async fn apply_loop(
    membership: Arc<Membership>,
    key_file: Option<PathBuf>,
    mut events: broadcast::Receiver<Event>,
) {
    let mut lags = false;
    let mut recheck = tokio::time::interval(RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            e = events.recv() => e,
            _ = recheck.tick(), if lags => {
                if let Some(path) = &key_file {
                    let ring = membership.wire.keyring();
                    let (r, p) = (ring.clone(), path.clone());
                    lags = tokio::task::spawn_blocking(move || file_lags(&r, &p)).await.unwrap_or(true);
                    if !lags {
                        tracing::info!(path = %path.display(), "the keyring file now holds the key this agent seals with");
                        membership.announce_keyring(&ring.fingerprints(), false).await;
                    }
                }
                continue;
            }
        };
        let event = match event {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "missed keyring operations; `agent keys list` shows this agent's keys");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if event.name != KEYRING_EVENT {
            continue;
        }
        let Ok(op) = serde_json::from_str::<KeyOp>(&event.payload) else {
            tracing::warn!(origin = %event.origin, "ignored a keyring operation this agent cannot read");
            continue;
        };
        let ring = membership.wire.keyring();
        let next = match apply(&ring, &op) {
            Ok(Some(next)) => next,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(origin = %event.origin, action = op.action.as_str(), key = %op.fingerprint, error = %e, "could not apply a keyring operation");
                continue;
            }
        };
        membership.wire.set_keyring(next.clone());
        if let Some(path) = &key_file {
            // A small write and an fsync, off the runtime thread (which must never block long).
            let (ring, file) = (next.clone(), path.clone());
            lags = tokio::task::spawn_blocking(move || match ring.save(&file) {
                Ok(()) => false,
                Err(e) => {
                    let lags = file_lags(&ring, &file);
                    tracing::error!(
                        path = %file.display(),
                        error = %e,
                        lags,
                        "could not write the keyring file{}",
                        if lags { ": a restart would bring back keys that cut this agent off" } else { "" }
                    );
                    lags
                }
            })
            .await
            .unwrap_or(true);
            recheck.reset();
        }
        membership.announce_keyring(&next.fingerprints(), lags).await;
        tracing::info!(origin = %event.origin, action = op.action.as_str(), key = %op.fingerprint, keys = next.fingerprints().len(), "keyring changed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::snapshot::{KeyringView, LocalNode};
    use crate::membership::keyring::{fingerprint, generate_key};
    use base64::Engine;

    fn b64(k: &[u8; 32]) -> String {
        base64::engine::general_purpose::STANDARD.encode(k)
    }

    fn member(id: &str, state: MemberState, keys: &[&[u8; 32]]) -> MemberView {
        MemberView {
            id: id.into(),
            region: "r".into(),
            zone: "z".into(),
            gossip_addr: "127.0.0.1:1".parse().unwrap(),
            data_addr: None,
            state,
            generation: 1,
            version: String::new(),
            draining: false,
            services: Vec::new(),
            rtt_ms: None,
            keyring: KeyringView { keys: keys.iter().map(|k| fingerprint(k)).collect(), unsaved: false },
        }
    }

    fn snapshot(members: Vec<MemberView>) -> Snapshot {
        let mut s = Snapshot::empty(LocalNode {
            id: "a".into(),
            region: "r".into(),
            zone: "z".into(),
            version: String::new(),
            cluster: "c".into(),
        });
        s.members = members;
        s
    }

    fn request(action: KeyAction, key: String) -> KeyRequest {
        KeyRequest { action, key, force: false, wait_ms: None }
    }

    #[test]
    fn status_counts_each_key_over_the_members_that_report() {
        let (old, new) = (generate_key(), generate_key());
        let local = Keyring::from_keys(vec![old, new]);
        let snap = snapshot(vec![
            member("a", MemberState::Alive, &[&old, &new]),
            member("b", MemberState::Suspect, &[&new, &old]),
            member("c", MemberState::Alive, &[&old]),
            member("d", MemberState::Alive, &[]),
            member("e", MemberState::Unreachable, &[&old]),
            member("f", MemberState::Dead, &[&old]),
        ]);
        let doc = status(&snap, &local);
        assert_eq!(doc.members, 5);
        assert_eq!(
            doc.keys,
            [
                KeyCount {
                    fingerprint: fingerprint(&old),
                    installed: 3,
                    primary: 2,
                    here: Some("primary".into()),
                    missing_on: vec![]
                },
                KeyCount {
                    fingerprint: fingerprint(&new),
                    installed: 2,
                    primary: 1,
                    here: Some("installed".into()),
                    missing_on: vec!["c".into()]
                },
            ]
        );
        assert_eq!(doc.not_reporting, ["d", "e"]);
    }

    #[test]
    fn use_waits_for_the_key_everywhere_and_remove_spares_a_primary() {
        let (old, new) = (generate_key(), generate_key());
        let local = Keyring::from_keys(vec![old, new]);
        let snap =
            snapshot(vec![member("a", MemberState::Alive, &[&old, &new]), member("b", MemberState::Alive, &[&old])]);
        // Install takes the key, not a fingerprint.
        let op = prepare(&request(KeyAction::Install, b64(&new)), &local, &snap).unwrap();
        assert_eq!(op, KeyOp { action: KeyAction::Install, fingerprint: fingerprint(&new), key: Some(b64(&new)) });
        assert!(matches!(
            prepare(&request(KeyAction::Install, fingerprint(&new)), &local, &snap),
            Err(RequestError::Invalid(_))
        ));
        assert!(matches!(
            prepare(&request(KeyAction::Install, "nonsense".into()), &local, &snap),
            Err(RequestError::Invalid(_))
        ));
        // Use: b does not hold the key yet; by fingerprint or by key, forced or not.
        let err = prepare(&request(KeyAction::Use, fingerprint(&new)), &local, &snap).unwrap_err();
        assert!(matches!(&err, RequestError::Unsafe(m) if m.contains(" b;")), "{err}");
        let forced = KeyRequest { force: true, ..request(KeyAction::Use, b64(&new)) };
        assert_eq!(prepare(&forced, &local, &snap).unwrap().key, None, "only install carries the key");
        let unknown = generate_key();
        assert!(matches!(
            prepare(&request(KeyAction::Use, b64(&unknown)), &local, &snap),
            Err(RequestError::Invalid(_))
        ));
        // Remove: never this agent's primary; another member's only with force.
        assert!(matches!(
            prepare(&request(KeyAction::Remove, b64(&old)), &local, &snap),
            Err(RequestError::Refused(_))
        ));
        let local_new = Keyring::from_keys(vec![new, old]);
        let err = prepare(&request(KeyAction::Remove, b64(&old)), &local_new, &snap).unwrap_err();
        assert!(matches!(&err, RequestError::Unsafe(m) if m.contains("primary on a, b;")), "{err}");
        let forced = KeyRequest { force: true, ..request(KeyAction::Remove, b64(&old)) };
        assert!(prepare(&forced, &local_new, &snap).is_ok());
    }

    #[test]
    fn guards_name_members_that_announce_no_keyring_or_could_not_save_it() {
        let (old, new) = (generate_key(), generate_key());
        let local = Keyring::from_keys(vec![new, old]);
        let mut unsaved = member("b", MemberState::Alive, &[&new, &old]);
        unsaved.keyring.unsaved = true;
        let snap = snapshot(vec![
            member("a", MemberState::Alive, &[&new, &old]),
            unsaved,
            member("c", MemberState::Alive, &[]),
        ]);
        // An agent from before `agent keys` would show an installed key to its event watchers.
        let err = prepare(&request(KeyAction::Install, b64(&generate_key())), &local, &snap).unwrap_err();
        assert!(matches!(&err, RequestError::Unsafe(m) if m.starts_with("c announce")), "{err}");
        // A member that could not write its file would restart with the old key alone.
        let snap = snapshot(snap.members[..2].to_vec());
        let err = prepare(&request(KeyAction::Remove, b64(&old)), &local, &snap).unwrap_err();
        assert!(matches!(&err, RequestError::Unsafe(m) if m.starts_with("b could not write")), "{err}");
        let forced = KeyRequest { force: true, ..request(KeyAction::Remove, b64(&old)) };
        assert!(prepare(&forced, &local, &snap).is_ok());
        // A fingerprint no member holds is a typo, not a success.
        let err = prepare(&request(KeyAction::Remove, fingerprint(&generate_key())), &local, &snap).unwrap_err();
        assert!(matches!(err, RequestError::Invalid(_)));
        // Installed elsewhere but not yet here: worth waiting for.
        let here = Keyring::from_keys(vec![old]);
        assert!(matches!(
            prepare(&request(KeyAction::Use, fingerprint(&new)), &here, &snap),
            Err(RequestError::Unsafe(_))
        ));
    }

    #[test]
    fn a_keyring_file_lags_when_it_lacks_the_key_that_seals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        let (old, new) = (generate_key(), generate_key());
        std::fs::write(&path, format!("{}\n", b64(&old))).unwrap();
        // Installed but not yet sealing: a restart from the old file still talks to everyone.
        assert!(!file_lags(&Keyring::from_keys(vec![old, new]), &path));
        assert!(file_lags(&Keyring::from_keys(vec![new, old]), &path));
        // The operator puts the new key in the file (alone, or beside the old).
        std::fs::write(&path, format!("{}\n", b64(&new))).unwrap();
        assert!(!file_lags(&Keyring::from_keys(vec![new, old]), &path));
        assert!(file_lags(&Keyring::from_keys(vec![new]), &dir.path().join("gone")));
    }

    #[test]
    fn a_member_applies_operations_idempotently() {
        let (old, new) = (generate_key(), generate_key());
        let ring = Keyring::from_keys(vec![old]);
        let install = KeyOp { action: KeyAction::Install, fingerprint: fingerprint(&new), key: Some(b64(&new)) };
        let ring = apply(&ring, &install).unwrap().unwrap();
        assert!(apply(&ring, &install).unwrap().is_none());
        let forged = KeyOp { fingerprint: fingerprint(&old), ..install.clone() };
        assert!(apply(&ring, &forged).is_err(), "a key must match its fingerprint");
        let using = KeyOp { action: KeyAction::Use, fingerprint: fingerprint(&new), key: None };
        let ring = apply(&ring, &using).unwrap().unwrap();
        assert_eq!(ring.fingerprints()[0], fingerprint(&new));
        let remove = KeyOp { action: KeyAction::Remove, fingerprint: fingerprint(&old), key: None };
        let ring = apply(&ring, &remove).unwrap().unwrap();
        assert!(apply(&ring, &remove).unwrap().is_none(), "removing a key it lacks changes nothing");
        let use_missing = KeyOp { action: KeyAction::Use, fingerprint: fingerprint(&old), key: None };
        assert!(apply(&ring, &use_missing).is_err());
    }

    #[test]
    fn progress_counts_members_announcing_the_change() {
        let (old, new) = (generate_key(), generate_key());
        let snap = snapshot(vec![
            member("a", MemberState::Alive, &[&new, &old]),
            member("b", MemberState::Alive, &[&old, &new]),
            member("c", MemberState::Unreachable, &[&new, &old]),
            member("d", MemberState::Left, &[&old]),
        ]);
        let fp = fingerprint(&new);
        assert_eq!(progress(&snap, KeyAction::Install, &fp), (vec!["a".into(), "b".into()], vec!["c".into()]));
        assert_eq!(progress(&snap, KeyAction::Use, &fp), (vec!["a".into()], vec!["b".into(), "c".into()]));
        let fp_old = fingerprint(&old);
        assert_eq!(progress(&snap, KeyAction::Remove, &fp_old), (vec![], vec!["a".into(), "b".into(), "c".into()]));
    }
}

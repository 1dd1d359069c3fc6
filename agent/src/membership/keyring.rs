//! The gossip keyring: every datagram is sealed with ChaCha20-Poly1305 under the primary key;
//! any key in the ring may open one, so keys rotate without downtime (install the new key
//! everywhere, make it primary, remove the old one).
//!
//! `agent keys` rotates a running cluster's keyring ([`KeyAction`], applied by every member
//! as it hears of it; see `keys.rs`). Keys are named by fingerprints: the first 8 bytes of
//! SHA-256 over a label and the key, in hex, which say nothing about the key.
//!
//! Envelope: `0xA2 | nonce (12) | ciphertext | tag (16)`, 29 bytes on top of the plaintext
//! (memberlist, under Serf, adds the same 29 with AES-GCM). The cluster name is the AEAD's
//! associated data, so a datagram from another cluster never opens even under the same key.
//!
//! Nonces never repeat under one key: each keyring starts at a random 96-bit nonce (32 random
//! bits, then a 64-bit counter from a random start) and counts up by one per datagram. Two
//! processes collide only if their ranges overlap: with a thousand agents each sealing a
//! billion datagrams, about 10^-14. Random 96-bit nonces alone would reach NIST's 2^32
//! per-key bound in days on a busy cluster; XChaCha's 192-bit nonces (the first envelope)
//! cost 12 more bytes on every datagram, which at two SWIM probes a second was 10% of the
//! idle traffic.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};

/// The envelope's first byte: its version (the first, XChaCha envelope began `0x47 0x01`).
const VERSION: u8 = 0xA2;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Bytes a sealed datagram adds to its plaintext.
pub const OVERHEAD: usize = 1 + NONCE_LEN + TAG_LEN;

/// Why a datagram did not open. Each is counted; none is ever parsed further.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    TooShort,
    UnknownVersion,
    /// No key in the ring opened it: another key, another cluster, or tampered bytes.
    Unauthenticated,
}

impl OpenError {
    pub fn reason(self) -> &'static str {
        match self {
            OpenError::TooShort => "too_short",
            OpenError::UnknownVersion => "unknown_version",
            OpenError::Unauthenticated => "unauthenticated",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("cannot read keyring {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("keyring {path} line {line}: not a base64-encoded 32-byte key")]
    BadKey { path: String, line: usize },
    #[error("keyring {path} has no key")]
    Empty { path: String },
}

/// A ring of 32-byte keys; the first seals. Clones share the nonce sequence.
#[derive(Clone)]
pub struct Keyring {
    keys: Vec<([u8; 32], ChaCha20Poly1305)>,
    /// The nonce's first 4 bytes, random per keyring.
    salt: [u8; 4],
    /// The nonce's last 8 bytes: a counter from a random start.
    counter: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keyring({} keys)", self.keys.len())
    }
}

impl Keyring {
    /// A keyring of one fresh random key (for `--dev`).
    pub fn generate() -> Keyring {
        Keyring::from_keys(vec![generate_key()])
    }

    pub fn from_keys(keys: Vec<[u8; 32]>) -> Keyring {
        let start = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        let (salt, counter) = start.split_at(4);
        Keyring {
            keys: keys.into_iter().map(|k| (k, ChaCha20Poly1305::new(&k.into()))).collect(),
            salt: salt.try_into().unwrap_or_default(),
            counter: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(u64::from_be_bytes(
                counter.try_into().unwrap_or_default(),
            ))),
        }
    }

    /// Reads base64 keys, one per line (blank lines and `#` comments ignored); the first seals.
    pub fn from_file(path: &Path) -> Result<Keyring, KeyringError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KeyringError::Read { path: p.clone(), source })?;
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            keys.push(decode_key(line).ok_or(KeyringError::BadKey { path: p.clone(), line: i + 1 })?);
        }
        if keys.is_empty() {
            return Err(KeyringError::Empty { path: p });
        }
        Ok(Keyring::from_keys(keys))
    }

    /// Base64 of every key, primary first.
    pub fn encoded(&self) -> Vec<String> {
        self.keys.iter().map(|(k, _)| B64.encode(k)).collect()
    }

    /// The fingerprint of every key, primary first.
    pub fn fingerprints(&self) -> Vec<String> {
        self.keys.iter().map(|(k, _)| fingerprint(k)).collect()
    }

    /// The key with this fingerprint, if the ring holds it.
    pub fn find(&self, fingerprint_hex: &str) -> Option<[u8; 32]> {
        self.keys.iter().map(|(k, _)| *k).find(|k| fingerprint(k) == fingerprint_hex)
    }

    /// The ring after `action` on `key`; `Ok(None)` if it is that way already. The nonce
    /// sequence carries on, so a key that stays primary never sees a nonce twice.
    pub fn apply(&self, action: KeyAction, key: &[u8; 32]) -> Result<Option<Keyring>, KeyActionError> {
        let at = self.keys.iter().position(|(k, _)| k == key);
        let mut keys: Vec<[u8; 32]> = self.keys.iter().map(|(k, _)| *k).collect();
        match (action, at) {
            (KeyAction::Install, Some(_)) | (KeyAction::Use, Some(0)) | (KeyAction::Remove, None) => return Ok(None),
            (KeyAction::Install, None) => keys.push(*key),
            (KeyAction::Use, None) => return Err(KeyActionError::NotInstalled),
            (KeyAction::Use, Some(i)) => {
                let k = keys.remove(i);
                keys.insert(0, k);
            }
            (KeyAction::Remove, Some(0)) => return Err(KeyActionError::Primary),
            (KeyAction::Remove, Some(i)) => {
                keys.remove(i);
            }
        }
        Ok(Some(Keyring {
            keys: keys.into_iter().map(|k| (k, ChaCha20Poly1305::new(&k.into()))).collect(),
            salt: self.salt,
            counter: self.counter.clone(),
        }))
    }

    /// Writes the ring to `path` the way [`Keyring::from_file`] reads it. Normally a fresh
    /// temporary file beside it (created 0600, then given the file's mode and owner, synced)
    /// renamed over it, so the file is whole at every moment. A file that cannot be replaced
    /// that way (mounted on its own, or in a directory this agent may not write) is overwritten
    /// in place if it is writable; other failures leave it as it was.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::{ErrorKind, Write};
        // Through a symlink (a mounted secret, say) to the file it names.
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let mut text = String::from("# The gossip keyring, written by `agent keys`: the first key seals.\n");
        for k in self.encoded() {
            text.push_str(&k);
            text.push('\n');
        }
        let meta = std::fs::metadata(&path).ok();
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let replace = || -> std::io::Result<()> {
            let mut tmp = tempfile::Builder::new()
                .prefix(".keyring-")
                .permissions(std::fs::Permissions::from_mode(0o600))
                .tempfile_in(dir)?;
            if let Some(meta) = &meta {
                // The file's mode only with its owner and group: under another group, no more
                // than the owner's part of it.
                let mode = match std::os::unix::fs::fchown(tmp.as_file(), Some(meta.uid()), Some(meta.gid())) {
                    Ok(()) => meta.permissions().mode(),
                    Err(_) => meta.permissions().mode() & 0o700,
                };
                tmp.as_file().set_permissions(std::fs::Permissions::from_mode(mode))?;
            }
            tmp.write_all(text.as_bytes())?;
            tmp.as_file().sync_all()?;
            tmp.persist(&path).map_err(|e| e.error)?;
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(())
        };
        match replace() {
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::PermissionDenied
                        | ErrorKind::ReadOnlyFilesystem
                        | ErrorKind::ResourceBusy
                        | ErrorKind::CrossesDevices
                ) =>
            {
                // Overwritten from the start, then cut to length (not truncated first), so a
                // failed write never leaves an empty file.
                let mut f = std::fs::OpenOptions::new().write(true).open(&path)?;
                f.write_all(text.as_bytes())?;
                f.set_len(text.len() as u64)?;
                f.sync_all()
            }
            result => result,
        }
    }

    /// Appends the sealed form of `plaintext` to `out`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
        let (_, cipher) = &self.keys[0];
        let count = self.counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut nonce = Nonce::default();
        nonce[..4].copy_from_slice(&self.salt);
        nonce[4..].copy_from_slice(&count.to_be_bytes());
        // Encryption with a valid key and nonce only fails past 2^38 bytes; a datagram is smaller.
        let sealed = cipher
            .encrypt(&nonce, Payload { msg: plaintext, aad })
            .unwrap_or_else(|_| unreachable!("datagrams are far below ChaCha20's length limit"));
        out.reserve(1 + NONCE_LEN + sealed.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
    }

    /// Opens a sealed datagram with any key in the ring.
    pub fn open(&self, aad: &[u8], datagram: &[u8]) -> Result<Vec<u8>, OpenError> {
        if datagram.len() < OVERHEAD {
            return Err(OpenError::TooShort);
        }
        if datagram[0] != VERSION {
            return Err(OpenError::UnknownVersion);
        }
        let nonce = Nonce::from_slice(&datagram[1..1 + NONCE_LEN]);
        let body = &datagram[1 + NONCE_LEN..];
        for (_, cipher) in &self.keys {
            if let Ok(plain) = cipher.decrypt(nonce, Payload { msg: body, aad }) {
                return Ok(plain);
            }
        }
        Err(OpenError::Unauthenticated)
    }
}

/// A new random key.
pub fn generate_key() -> [u8; 32] {
    ChaCha20Poly1305::generate_key(&mut OsRng).into()
}

/// A new random key, base64-encoded (what `agent keygen` prints).
pub fn generate_encoded() -> String {
    B64.encode(generate_key())
}

/// A base64-encoded 32-byte key, as `agent keygen` prints it.
pub fn decode_key(text: &str) -> Option<[u8; 32]> {
    B64.decode(text.trim()).ok()?.try_into().ok()
}

/// A key's name in `agent keys` and gossip: 16 hex digits of SHA-256 over a label and the key.
pub fn fingerprint(key: &[u8; 32]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"grapevine keyring fingerprint\0");
    ctx.update(key);
    ctx.finish().as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// A change to every member's keyring (`agent keys install|use|remove`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyAction {
    /// Add a key that opens datagrams (it does not seal yet).
    Install,
    /// Make an installed key the one that seals.
    Use,
    /// Drop a key that is not primary.
    Remove,
}

impl KeyAction {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAction::Install => "install",
            KeyAction::Use => "use",
            KeyAction::Remove => "remove",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyActionError {
    #[error("the key is not installed; install it first (`agent keys install KEY`)")]
    NotInstalled,
    #[error("the key is primary; make another key primary first (`agent keys use KEY`)")]
    Primary,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_with_any_key_in_the_ring() {
        let (old, new) = (generate_key(), generate_key());
        let sender = Keyring::from_keys(vec![new]);
        let receiver = Keyring::from_keys(vec![old, new]);
        let mut sealed = Vec::new();
        sender.seal(b"prod", b"hello", &mut sealed);
        assert_eq!(sealed.len(), 5 + OVERHEAD);
        assert_eq!(receiver.open(b"prod", &sealed).unwrap(), b"hello");
        // Another cluster name, another key, or a flipped bit never opens.
        assert_eq!(receiver.open(b"staging", &sealed), Err(OpenError::Unauthenticated));
        assert_eq!(Keyring::generate().open(b"prod", &sealed), Err(OpenError::Unauthenticated));
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(receiver.open(b"prod", &tampered), Err(OpenError::Unauthenticated));
        assert_eq!(receiver.open(b"prod", &sealed[..10]), Err(OpenError::TooShort));
        let mut other_version = sealed;
        other_version[0] = 0x47;
        assert_eq!(receiver.open(b"prod", &other_version), Err(OpenError::UnknownVersion));
    }

    #[test]
    fn nonces_never_repeat_within_a_keyring_or_its_clones() {
        let ring = Keyring::generate();
        let clone = ring.clone();
        let mut seen = std::collections::HashSet::new();
        for i in 0..1000 {
            let mut sealed = Vec::new();
            if i % 2 == 0 {
                ring.seal(b"c", b"x", &mut sealed)
            } else {
                clone.seal(b"c", b"x", &mut sealed)
            }
            assert!(seen.insert(sealed[1..1 + NONCE_LEN].to_vec()), "nonce reused at datagram {i}");
        }
        // Another keyring (another process) starts elsewhere.
        let mut sealed = Vec::new();
        Keyring::from_keys(ring.keys.iter().map(|(k, _)| *k).collect()).seal(b"c", b"x", &mut sealed);
        assert!(!seen.contains(&sealed[1..1 + NONCE_LEN]));
    }

    #[test]
    fn install_use_remove_rotate_a_ring_and_repeat_harmlessly() {
        let (old, new) = (generate_key(), generate_key());
        let ring = Keyring::from_keys(vec![old]);
        let installed = ring.apply(KeyAction::Install, &new).unwrap().unwrap();
        assert_eq!(installed.fingerprints(), [fingerprint(&old), fingerprint(&new)]);
        assert!(installed.apply(KeyAction::Install, &new).unwrap().is_none());
        assert_eq!(ring.apply(KeyAction::Use, &new).unwrap_err(), KeyActionError::NotInstalled);
        let used = installed.apply(KeyAction::Use, &new).unwrap().unwrap();
        assert_eq!(used.fingerprints(), [fingerprint(&new), fingerprint(&old)]);
        assert!(used.apply(KeyAction::Use, &new).unwrap().is_none());
        assert_eq!(used.apply(KeyAction::Remove, &new).unwrap_err(), KeyActionError::Primary);
        let removed = used.apply(KeyAction::Remove, &old).unwrap().unwrap();
        assert_eq!(removed.fingerprints(), [fingerprint(&new)]);
        assert!(removed.apply(KeyAction::Remove, &old).unwrap().is_none());
        assert_eq!(removed.find(&fingerprint(&new)), Some(new));
        assert_eq!(removed.find(&fingerprint(&old)), None);
        // Datagrams sealed before and after the rotation open with the rotated ring's keys.
        let mut sealed = Vec::new();
        ring.seal(b"c", b"before", &mut sealed);
        assert_eq!(used.open(b"c", &sealed).unwrap(), b"before");
        // The nonce sequence carries on through a rotation.
        let (mut a, mut b) = (Vec::new(), Vec::new());
        removed.seal(b"c", b"x", &mut a);
        used.seal(b"c", b"x", &mut b);
        assert_ne!(a[1..1 + NONCE_LEN], b[1..1 + NONCE_LEN]);
    }

    #[test]
    fn a_fingerprint_is_stable_and_names_one_key() {
        let key = [7u8; 32];
        assert_eq!(fingerprint(&key), fingerprint(&key));
        assert_eq!(fingerprint(&key).len(), 16);
        assert_ne!(fingerprint(&key), fingerprint(&[8u8; 32]));
    }

    #[test]
    fn a_saved_ring_reads_back_and_keeps_the_file_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        std::fs::write(&path, format!("{}\n", generate_encoded())).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let ring = Keyring::from_file(&path).unwrap().apply(KeyAction::Install, &generate_key()).unwrap().unwrap();
        ring.save(&path).unwrap();
        assert_eq!(Keyring::from_file(&path).unwrap().encoded(), ring.encoded());
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left behind");
        // A link is followed: the file it names is replaced, the link stays.
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let two = ring.apply(KeyAction::Install, &generate_key()).unwrap().unwrap();
        two.save(&link).unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(Keyring::from_file(&path).unwrap().encoded(), two.encoded());
        // Where the file cannot be written, nothing is, and no temporary file is left.
        let gone = dir.path().join("gone").join("cluster.key");
        assert!(two.save(&gone).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn reads_a_keyring_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        let (a, b) = (generate_encoded(), generate_encoded());
        std::fs::write(&path, format!("# primary\n{a}\n\n{b}\n")).unwrap();
        assert_eq!(Keyring::from_file(&path).unwrap().encoded(), [a, b]);
        std::fs::write(&path, "not-a-key\n").unwrap();
        assert!(matches!(Keyring::from_file(&path), Err(KeyringError::BadKey { line: 1, .. })));
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(Keyring::from_file(&path), Err(KeyringError::Empty { .. })));
    }
}

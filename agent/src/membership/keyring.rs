//! The gossip keyring: every datagram is sealed with ChaCha20-Poly1305 under the primary key;
//! any key in the ring may open one, so keys rotate without downtime (install the new key
//! everywhere, make it primary, remove the old one).
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

fn decode_key(text: &str) -> Option<[u8; 32]> {
    B64.decode(text).ok()?.try_into().ok()
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

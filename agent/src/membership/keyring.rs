//! The gossip keyring: every datagram is sealed with XChaCha20-Poly1305 under the primary key;
//! any key in the ring may open one, so keys rotate without downtime (install the new key
//! everywhere, make it primary, remove the old one).
//!
//! Envelope: `0x47 0x01 | nonce (24) | ciphertext | tag (16)`. The cluster name is the AEAD's
//! associated data, so a datagram from another cluster never opens even under the same key.
//! Nonces are random (192 bits), so no counter state is needed across restarts.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

const MAGIC: u8 = 0x47;
const VERSION: u8 = 1;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Bytes a sealed datagram adds to its plaintext.
pub const OVERHEAD: usize = 2 + NONCE_LEN + TAG_LEN;

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

/// A ring of 32-byte keys; the first seals.
#[derive(Clone)]
pub struct Keyring {
    keys: Vec<([u8; 32], XChaCha20Poly1305)>,
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
        Keyring { keys: keys.into_iter().map(|k| (k, XChaCha20Poly1305::new(&k.into()))).collect() }
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
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        // Encryption with a valid key and nonce only fails past 2^38 bytes; a datagram is smaller.
        let sealed = cipher
            .encrypt(&nonce, Payload { msg: plaintext, aad })
            .unwrap_or_else(|_| unreachable!("datagrams are far below XChaCha20's length limit"));
        out.reserve(2 + NONCE_LEN + sealed.len());
        out.push(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
    }

    /// Opens a sealed datagram with any key in the ring.
    pub fn open(&self, aad: &[u8], datagram: &[u8]) -> Result<Vec<u8>, OpenError> {
        if datagram.len() < OVERHEAD {
            return Err(OpenError::TooShort);
        }
        if datagram[0] != MAGIC || datagram[1] != VERSION {
            return Err(OpenError::UnknownVersion);
        }
        let nonce = XNonce::from_slice(&datagram[2..2 + NONCE_LEN]);
        let body = &datagram[2 + NONCE_LEN..];
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
    XChaCha20Poly1305::generate_key(&mut OsRng).into()
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
        other_version[1] = 9;
        assert_eq!(receiver.open(b"prod", &other_version), Err(OpenError::UnknownVersion));
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

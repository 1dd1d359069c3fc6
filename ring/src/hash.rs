//! The fixed, versioned hash functions behind every ring position.
//!
//! Every agent must map a key to the same instance, on every machine and across releases, so
//! nothing here may depend on the process (no `DefaultHasher`, no random seeds) or on the
//! platform (integers are hashed as little-endian bytes). Changing anything in this file changes
//! the mapping: bump [`HASH_VERSION`] and update the pinned vectors in `tests/pinned.rs`.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// The version of the key → position mapping. Agents gossip it so that a cluster never mixes
/// two mappings silently.
pub const HASH_VERSION: u32 = 1;

/// Domain separation between key hashes and member point hashes.
const POINT_SEED: u64 = 0x6772_6170_6576_696e; // "grapevin"

/// The 64-bit hash of an affinity key (XXH3-64, seed 0).
#[inline]
pub(crate) fn key_hash(key: &[u8]) -> u64 {
    xxh3_64(key)
}

/// Position of probe `j` of a key whose hash is `h`: independent-looking positions derived from
/// one key hash by the SplitMix64 finaliser, so a lookup hashes the key bytes only once.
#[inline]
pub(crate) fn probe(h: u64, j: u32) -> u64 {
    mix64(h.wrapping_add(u64::from(j).wrapping_mul(0x9e37_79b9_7f4a_7c15)))
}

/// Position of point `j` of the member named `id`.
#[inline]
pub(crate) fn point(id: &str, j: u32) -> u64 {
    mix64(xxh3_64_with_seed(id.as_bytes(), POINT_SEED) ^ u64::from(j).wrapping_mul(0xd6e8_feb8_6659_fd93))
}

/// SplitMix64's output function: a bijection on u64 with full avalanche.
#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_fixed() {
        // XXH3-64 of the empty input with seed 0 is part of the XXH3 specification.
        assert_eq!(key_hash(b""), 0x2d06_8005_38d3_94c2);
        assert_ne!(point("web-1", 0), point("web-1", 1));
        assert_ne!(probe(7, 0), probe(7, 1));
    }
}

//! grapevine-ring: the consistent-hash ring every Grapevine agent uses for session affinity and
//! discovery.
//!
//! # Layout
//!
//! - [`Ring`] (`ring.rs`): the ring, lookups, preference and failover orders, bounded load.
//! - `points.rs`: sorted points with a direct-address index (successor in O(1) on average).
//! - `hash.rs`: the fixed, versioned hash ([`HASH_VERSION`]).
//! - [`ClassicRing`] (`classic.rs`): the classic one-point-per-virtual-node ring of the
//!   `hashring` crate behind the same vocabulary; the baseline in the benchmarks.
//!
//! # Guarantees
//!
//! - **Deterministic.** The mapping is a function of the member set (ids, weights, regions)
//!   alone: not of insertion order, the process, the machine or the release, until
//!   [`HASH_VERSION`] changes. `tests/pinned.rs` pins known key → owner pairs.
//! - **Minimal movement.** Every key has a preference order over all members (its "score"
//!   against each member), and its owner is the first present member in that order. So
//!   removing a member moves only the keys it owned, each to the next member in its order;
//!   adding a member moves only the keys it now owns (about `weight / total_weight` of them);
//!   removing then re-adding a member restores the exact mapping.
//! - **Balance.** Each member has points in proportion to its weight
//!   ([`POINTS_PER_100_WEIGHT`] at weight 100) and each key is looked up with [`PROBES`]
//!   probes; the key goes to the point nearest, clockwise, to any probe ("multi-probe
//!   consistent hashing", Appleton and O'Reilly, 2015). The probes even out the arcs that make
//!   a one-probe ring lopsided, without the memory and rebuild cost of thousands of virtual
//!   nodes. `make bench` prints the measured peak-to-mean load.
//! - **Bounded load**, on request: [`Ring::owner_bounded`] never places a new session on a
//!   member already at `ceil(c × mean)` (weighted), walking the key's preference order.
//! - **Regions.** The preference order within a region is the global order filtered to that
//!   region, so [`Ring::owner_in_region`] and [`Ring::failover`] agree with [`Ring::owners`].
//! - **Pure.** No I/O, no clock, no randomness, no async runtime.
//!
//! # Example
//!
//! ```
//! use grapevine_ring::{Member, Ring};
//!
//! let ring = Ring::new([
//!     Member::new("east-1", "us-east", "us-east-1a"),
//!     Member::new("east-2", "us-east", "us-east-1b"),
//!     Member::new("west-1", "us-west", "us-west-2a").with_weight(200),
//! ])?;
//! let key = "meteor_login_token=abc";
//! let owner = ring.owner(key).unwrap();
//! // The failover order starts with the owner and lists every member once.
//! let order = ring.owners(key, 3);
//! assert_eq!(order[0], owner);
//! // Within a region, the order is the global order filtered to that region.
//! let east = ring.owner_in_region(key, "us-east").unwrap();
//! assert_eq!(Some(east), ring.preference(key).find(|m| m.region == "us-east"));
//! // Removing a member that does not own the key leaves the key where it was.
//! let other = ring.members().iter().find(|m| m.id != owner.id).unwrap();
//! assert_eq!(ring.without_member(&other.id).owner(key).unwrap().id, owner.id);
//! // Bounded load: with the owner already holding every session, a new one goes elsewhere.
//! let mut loads = vec![0; ring.len()];
//! loads[ring.ordinal(&owner.id).unwrap()] = 10;
//! assert_ne!(ring.owner_bounded(key, &loads, 1.25).unwrap().id, owner.id);
//! # Ok::<(), grapevine_ring::RingError>(())
//! ```

mod classic;
mod hash;
mod points;
mod ring;

pub use classic::ClassicRing;
pub use hash::HASH_VERSION;
pub use ring::{DEFAULT_LOAD_FACTOR, MAX_WEIGHT, POINTS_PER_100_WEIGHT, PROBES, Preference, Ring};

/// The weight a member has unless told otherwise.
pub const DEFAULT_WEIGHT: u32 = 100;

/// One member of a ring: a service instance, named by a stable id, with a weight, a region and a
/// zone. Two members are the same member when their ids are equal.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Member {
    /// Stable unique id (a node id, or `node/service` for one instance of a service).
    pub id: String,
    /// Free-form region label, such as `us-east`.
    pub region: String,
    /// Free-form zone label, such as `us-east-1a`.
    pub zone: String,
    /// Relative capacity, 1 to [`MAX_WEIGHT`]; [`DEFAULT_WEIGHT`] by default.
    pub weight: u32,
}

impl Member {
    /// A member of weight [`DEFAULT_WEIGHT`].
    pub fn new(id: impl Into<String>, region: impl Into<String>, zone: impl Into<String>) -> Self {
        Member { id: id.into(), region: region.into(), zone: zone.into(), weight: DEFAULT_WEIGHT }
    }

    /// The same member with another weight.
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    fn validate(&self) -> Result<(), RingError> {
        if self.id.is_empty() {
            return Err(RingError::EmptyId);
        }
        if self.weight == 0 || self.weight > MAX_WEIGHT {
            return Err(RingError::Weight { id: self.id.clone(), weight: self.weight });
        }
        Ok(())
    }
}

/// Why a ring could not be built. No variant leaves a partly built ring behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingError {
    /// Two members share an id.
    DuplicateMember(String),
    /// A member has an empty id.
    EmptyId,
    /// A member's weight is outside 1..=[`MAX_WEIGHT`].
    Weight { id: String, weight: u32 },
    /// The members would need more points than the ring can index (2³² − 1).
    TooLarge { points: usize },
}

impl std::fmt::Display for RingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RingError::DuplicateMember(id) => write!(f, "member {id:?} appears twice"),
            RingError::EmptyId => write!(f, "member id is empty"),
            RingError::Weight { id, weight } => {
                write!(f, "member {id:?} has weight {weight}; allowed: 1 to {MAX_WEIGHT}")
            }
            RingError::TooLarge { points } => write!(f, "{points} ring points is more than 2^32 - 1"),
        }
    }
}

impl std::error::Error for RingError {}

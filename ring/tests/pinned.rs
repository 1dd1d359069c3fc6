//! Known key → owner pairs. The mapping must never change by accident: every agent in a cluster,
//! whatever its release, must send a session to the same instance. If this test fails, either
//! the change was a mistake, or it is deliberate and `HASH_VERSION` must be bumped (and the
//! release notes must say that sessions will move once during a rolling upgrade).

use grapevine_ring::{HASH_VERSION, Member, POINTS_PER_100_WEIGHT, PROBES, Ring};

#[test]
fn known_keys_keep_their_owners() {
    assert_eq!((HASH_VERSION, PROBES, POINTS_PER_100_WEIGHT), (1, 8, 64));
    // Listed out of order on purpose: the mapping must not depend on it.
    let ring = Ring::new([
        Member::new("west-2", "us-west", "us-west-2b").with_weight(50),
        Member::new("web-1", "us-east", "us-east-1a"),
        Member::new("eu-1", "eu-central", "eu-central-1a"),
        Member::new("web-3", "us-east", "us-east-1a").with_weight(200),
        Member::new("west-1", "us-west", "us-west-2a"),
        Member::new("web-2", "us-east", "us-east-1b"),
    ])
    .unwrap();
    let pinned: [(&str, [&str; 3], &str); 8] = [
        ("", ["west-2", "west-1", "web-3"], "west-2"),
        ("a", ["web-3", "west-1", "west-2"], "west-1"),
        ("meteor_login_token=Zx81", ["web-3", "web-2", "eu-1"], "west-1"),
        ("10.0.0.7", ["web-1", "web-2", "eu-1"], "west-2"),
        ("user:42", ["west-1", "web-1", "web-2"], "west-1"),
        ("session-00000001", ["web-2", "web-3", "web-1"], "west-2"),
        ("7f3e9a1c0b5d4e2f8a6b3c1d0e9f8a7b", ["web-2", "eu-1", "web-1"], "west-2"),
        ("ünïcödé", ["web-2", "web-3", "eu-1"], "west-2"),
    ];
    for (key, owners, in_west) in pinned {
        let got: Vec<&str> = ring.owners(key, 3).iter().map(|m| m.id.as_str()).collect();
        assert_eq!(got, owners, "owners of {key:?}");
        assert_eq!(ring.owner_in_region(key, "us-west").unwrap().id, in_west, "us-west owner of {key:?}");
    }
}

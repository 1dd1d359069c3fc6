//! Where sessions land on a small three-region ring, and what moves when an instance leaves.
//! Run with `cargo run -p grapevine-ring --example placement`.
#![allow(clippy::print_stdout)]

use grapevine_ring::{Member, Ring};

fn main() {
    let ring = Ring::new([
        Member::new("east-1", "us-east", "us-east-1a"),
        Member::new("east-2", "us-east", "us-east-1b"),
        Member::new("west-1", "us-west", "us-west-2a"),
        Member::new("west-2", "us-west", "us-west-2b"),
        Member::new("eu-1", "eu-central", "eu-central-1a").with_weight(200),
    ])
    .expect("distinct ids and valid weights");
    let keys: Vec<String> = (1..=8).map(|i| format!("meteor_login_token=user{i}")).collect();

    println!("{:<28} {:<8} {:<10} {:<10} failover from us-east", "session key", "owner", "in us-east", "in us-west");
    for k in &keys {
        let failover: Vec<&str> =
            ring.failover(k, ["us-east", "us-west", "eu-central"], 4).iter().map(|m| m.id.as_str()).collect();
        println!(
            "{:<28} {:<8} {:<10} {:<10} {}",
            k,
            ring.owner(k).unwrap().id,
            ring.owner_in_region(k, "us-east").unwrap().id,
            ring.owner_in_region(k, "us-west").unwrap().id,
            failover.join(" → ")
        );
    }

    let smaller = ring.without_member("east-1");
    println!("\nafter east-1 leaves, only its sessions move (owner in us-east):");
    for k in &keys {
        let before = &ring.owner_in_region(k, "us-east").unwrap().id;
        let after = &smaller.owner_in_region(k, "us-east").unwrap().id;
        let note = if before == after { "stays".to_string() } else { format!("moves {before} → {after}") };
        println!("  {k:<28} {note}");
    }
}

//! Small scenarios run in simulated time, with the report asserted.

use grapevine_sim::report;
use grapevine_sim::runner::{self, Recording};
use grapevine_sim::scenario::Scenario;

fn run(text: &str, seed: u64) -> (Recording, report::Report) {
    let scenario = Scenario::from_toml(text).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    let rec = runtime.block_on(runner::run(&scenario, seed)).unwrap();
    let r = report::build(&rec, &scenario, seed, scenario.duration().as_secs_f64());
    (rec, r)
}

const SPLIT: &str = r#"
name = "test-split"
duration = "70s"
[[region]]
name = "east"
nodes = 4
[[region]]
name = "west"
nodes = 4
[[event]]
at = "15s"
action = "partition"
between = [["east"], ["west"]]
[[event]]
at = "40s"
action = "heal"
"#;

#[test]
fn a_split_is_seen_on_both_sides_and_heals_by_itself() {
    let (_, r) = run(SPLIT, 7);
    assert!(r.initial_convergence_s.is_some_and(|s| s < 10.0), "{r:?}");
    let split = r.events.iter().find(|e| e.action == "partition").unwrap();
    assert_eq!(split.observers, 8);
    let seen = split.all_s.expect("every agent saw the other side unreachable during the split");
    assert!(seen < 20.0, "took {seen} s");
    // A cut between regions makes the other side unreachable, never dead.
    assert_eq!(r.false_positives, 0, "{:?}", r.false_positive_examples);
    let heal = r.events.iter().find(|e| e.action == "heal").unwrap();
    let healed = heal.all_s.expect("every agent saw every node alive after the heal");
    assert!(healed < 15.0, "took {healed} s");
    assert!(r.bytes_per_node_s > 0.0);
    let summary = report::summary(&r);
    assert!(summary.contains("heal"), "{summary}");
}

const CRASH: &str = r#"
name = "test-crash"
duration = "45s"
[[region]]
name = "east"
nodes = 5
[[region]]
name = "west"
nodes = 3
[[event]]
at = "10s"
action = "crash"
node = "east-2"
[[event]]
at = "25s"
action = "restart"
node = "east-2"
[[event]]
at = "35s"
action = "leave"
node = "west-3"
"#;

#[test]
fn crash_restart_and_leave_are_seen_everywhere_without_false_positives() {
    let (rec, r) = run(CRASH, 3);
    let crash = &r.events[0];
    assert_eq!(crash.action, "crash");
    assert!(crash.all_s.is_some_and(|s| s < 15.0), "{crash:?}");
    assert!(crash.first_s.unwrap() <= crash.all_s.unwrap());
    // One of five instances in its region: a fifth of the sessions move, and only those.
    assert_eq!(crash.sessions_moved_ideal, Some(0.2));
    let moved = crash.sessions_moved.unwrap();
    assert!((0.1..0.3).contains(&moved), "moved {moved}");
    let restart = &r.events[1];
    assert!(restart.all_s.is_some_and(|s| s < 10.0), "{restart:?}");
    let leave = &r.events[2];
    assert_eq!(leave.seen_as, "left");
    assert!(leave.all_s.is_some_and(|s| s < 10.0), "{leave:?}");
    assert_eq!(r.false_positives, 0, "{:?}", r.false_positive_examples);
    // The plots exist and are SVG.
    for (name, svg) in report::plots(&rec, 45.0) {
        assert!(svg.starts_with("<svg") && svg.contains("polyline"), "{name}");
    }
}

#[test]
fn one_seed_applies_the_same_faults_at_the_same_times() {
    let (a, _) = run(CRASH, 11);
    let (b, _) = run(CRASH, 11);
    let faults =
        |r: &Recording| r.applied.iter().map(|x| (x.t, x.action.clone(), x.detail.clone())).collect::<Vec<_>>();
    assert_eq!(faults(&a), faults(&b));
    assert_eq!(faults(&a).len(), 3);
    assert_eq!(faults(&a)[0].0, 10.0);
}

const GROWN: &str = r#"
name = "test-grown"
duration = "60s"
[[region]]
name = "east"
nodes = 2
[[region]]
name = "west"
nodes = 2
[[event]]
at = "5s"
action = "join"
region = "east"
count = 8
[[event]]
at = "6s"
action = "join"
region = "west"
count = 8
"#;

const AT_ONCE: &str = r#"
name = "test-at-once"
duration = "60s"
[[region]]
name = "east"
nodes = 10
[[region]]
name = "west"
nodes = 10
"#;

#[test]
fn members_joining_never_displace_a_gateway_nor_cost_wan_traffic() {
    let (rec, grown) = run(GROWN, 3);
    // east-10 sorts before east-2, yet east-1 and east-2 keep serving.
    for region in ["east", "west"] {
        // As another region sees them, once it sees any.
        let seen: Vec<&Vec<String>> =
            rec.gateways.iter().filter(|(_, r, g)| r == region && !g.is_empty()).map(|(_, _, g)| g).collect();
        let want = vec![format!("{region}-1"), format!("{region}-2")];
        assert!(!seen.is_empty() && seen.iter().all(|g| **g == want), "{region}: {seen:?}");
    }
    let (_, at_once) = run(AT_ONCE, 3);
    let wan = |r: &report::Report| r.bytes_per_node_s_by_layer.get("wan").copied().unwrap_or(0.0);
    assert!(
        wan(&grown) < wan(&at_once) * 1.3,
        "WAN bytes per node per second: grown by joins {:.0}, started at once {:.0}",
        wan(&grown),
        wan(&at_once)
    );
}

const ONE_REGION: &str = r#"
name = "test-one-region"
duration = "60s"
[[region]]
name = "east"
nodes = 10
"#;

#[test]
fn a_single_region_cluster_does_not_keep_rejoining() {
    // With no other region to find, agents ask the seeds again now and then; the answers name
    // members they know already and must not start a full region-pool exchange each time.
    let (_, r) = run(ONE_REGION, 5);
    let idle = &r.idle_bytes_per_node_s_by_layer;
    let churn = idle.get("region").copied().unwrap_or(0.0) + idle.get("join").copied().unwrap_or(0.0);
    assert!(churn < 150.0, "idle region-pool and join bytes per node per second: {churn:.0} ({idle:?})");
}

const PARTIAL: &str = r#"
name = "test-partial"
duration = "60s"
[[region]]
name = "east"
nodes = 4
[[region]]
name = "west"
nodes = 3
[network]
[[network.pair]]
a = "east"
b = "west"
loss = 0.2
[[event]]
at = "15s"
action = "partition"
between = [["east-3"], ["east", "west"]]
one_way = true
[[event]]
at = "35s"
action = "heal"
"#;

#[test]
fn a_node_whose_packets_out_are_lost_is_seen_dead_and_comes_back() {
    let (rec, r) = run(PARTIAL, 3);
    let cut = r.events.iter().find(|e| e.action == "partition").unwrap();
    // Everyone else (six agents) can no longer hear east-3; east-3 still hears them all.
    assert_eq!(cut.observers, 6, "{cut:?}");
    let seen = cut.all_s.unwrap_or_else(|| panic!("every other agent saw east-3 dead or unreachable: {cut:?}"));
    assert!(seen < 15.0, "took {seen} s");
    let applied = rec.applied.iter().find(|a| a.action == "partition").unwrap();
    assert!(applied.cut_pairs.iter().all(|(_, subject)| subject == "east-3"), "{:?}", applied.cut_pairs);
    let heal = r.events.iter().find(|e| e.action == "heal").unwrap();
    assert!(heal.all_s.is_some_and(|s| s < 15.0), "{heal:?}");
    // Neither the lossy link between the regions nor the cut-off node's own view (it saw
    // everyone dead, as a gateway of one) makes anyone else see live members dead.
    assert_eq!(r.false_positives, 0, "{:?}", r.false_positive_examples);
}

const PAIR_SPLIT: &str = r#"
name = "test-pair-split"
duration = "60s"
[[region]]
name = "east"
nodes = 2
[[region]]
name = "west"
nodes = 2
[[event]]
at = "10s"
action = "partition"
between = [["east-1"], ["east-2"]]
[[event]]
at = "30s"
action = "heal"
"#;

#[test]
fn the_two_members_of_a_region_cut_from_each_other_meet_again_after_the_heal() {
    // Each declares the other down; neither is then alone in the cluster, so only the seeds'
    // join replies (naming members SWIM holds as down) bring them back together.
    let (_, r) = run(PAIR_SPLIT, 1);
    let cut = r.events.iter().find(|e| e.action == "partition").unwrap();
    assert!(cut.all_s.is_some(), "{cut:?}");
    let heal = r.events.iter().find(|e| e.action == "heal").unwrap();
    let healed = heal.all_s.unwrap_or_else(|| panic!("never whole again after the heal: {heal:?}"));
    assert!(healed < 20.0, "took {healed} s");
}

//! `make bench-ring`: grapevine-ring beside the `hashring` crate, measured in the same run.
//!
//! Timings (lookup, rebuild) are measured by criterion; its medians are read back from its
//! output directory and printed in one table with the balance, movement and memory figures,
//! which are counted directly. Every row shows our figure, `hashring`'s (160 virtual nodes per
//! member, the classic setting), and their ratio.
#![allow(unsafe_code)] // the counting allocator below
#![allow(missing_docs, clippy::print_stdout)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use criterion::{BatchSize, Criterion};
use grapevine_ring::{ClassicRing, DEFAULT_LOAD_FACTOR, Member, POINTS_PER_100_WEIGHT, PROBES, Ring};

/// Live heap bytes, for the memory rows.
struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const SIZES: [usize; 3] = [10, 100, 1000];
const VNODES: u32 = 160;
const BALANCE_KEYS: usize = 1_000_000;
const MOVE_KEYS: usize = 200_000;
const MOVE_TRIALS: usize = 10;

/// Deterministic 32-character session ids (a fixed xorshift stream, so every run sees the same keys).
fn session_ids(n: usize, seed: u64) -> Vec<String> {
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    (0..n).map(|_| format!("{:016x}{:016x}", next(), next())).collect()
}

fn members(n: usize) -> Vec<Member> {
    const REGIONS: [&str; 3] = ["us-east", "us-west", "eu-central"];
    (0..n).map(|i| Member::new(format!("node-{i:04}"), REGIONS[i % 3], format!("{}-a", REGIONS[i % 3]))).collect()
}

fn criterion_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("criterion")
}

/// criterion's median estimate for one benchmark, in nanoseconds.
fn median_ns(group: &str, function: &str) -> f64 {
    let path = criterion_dir().join(group).join(function).join("new/estimates.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("criterion estimates are JSON");
    json["median"]["point_estimate"].as_f64().expect("median.point_estimate")
}

fn time_with_criterion(c: &mut Criterion) {
    for n in SIZES {
        let ms = members(n);
        let ours = Ring::new(ms.clone()).unwrap();
        let classic = ClassicRing::new(ms.clone(), VNODES).unwrap();
        let keys = session_ids(1 << 14, 7);
        let mask = keys.len() - 1;

        let mut g = c.benchmark_group(format!("lookup-n{n}"));
        let mut i = 0usize;
        g.bench_function("grapevine", |b| {
            b.iter(|| {
                i = (i + 1) & mask;
                black_box(ours.owner(black_box(&keys[i])))
            })
        });
        g.bench_function("hashring", |b| {
            b.iter(|| {
                i = (i + 1) & mask;
                black_box(classic.owner(black_box(&keys[i])))
            })
        });
        g.bench_function("grapevine-in-region", |b| {
            b.iter(|| {
                i = (i + 1) & mask;
                black_box(ours.owner_in_region(black_box(&keys[i]), "us-west"))
            })
        });
        g.finish();

        let newcomer = Member::new("node-new", "us-east", "us-east-a");
        let leaver = ms[n / 2].id.clone();
        let mut g = c.benchmark_group(format!("rebuild-n{n}"));
        g.bench_function("grapevine-join", |b| b.iter(|| black_box(ours.with_member(newcomer.clone()).unwrap())));
        g.bench_function("grapevine-leave", |b| b.iter(|| black_box(ours.without_member(&leaver))));
        g.bench_function("hashring-join", |b| {
            b.iter_batched(|| classic.clone(), |mut r| r.add(newcomer.clone()), BatchSize::LargeInput)
        });
        g.bench_function("hashring-leave", |b| {
            b.iter_batched(|| classic.clone(), |mut r| r.remove(&leaver), BatchSize::LargeInput)
        });
        g.finish();
    }
}

fn peak_to_mean(counts: &[u64]) -> f64 {
    let mean = counts.iter().sum::<u64>() as f64 / counts.len() as f64;
    *counts.iter().max().unwrap() as f64 / mean
}

struct Row {
    metric: String,
    n: usize,
    ours: f64,
    theirs: f64,
    unit: &'static str,
    target: String,
}

fn main() {
    let quick = std::env::var_os("RING_BENCH_QUICK").is_some();
    let mut c = Criterion::default()
        .output_directory(&criterion_dir())
        .warm_up_time(Duration::from_millis(if quick { 100 } else { 500 }))
        .measurement_time(Duration::from_millis(if quick { 300 } else { 2000 }))
        .sample_size(if quick { 10 } else { 30 })
        .configure_from_args();
    time_with_criterion(&mut c);

    let mut rows = Vec::new();
    let mut floor = Vec::new();
    for n in SIZES {
        let ms = members(n);

        rows.push(Row {
            metric: "lookup (32-byte key, hashing included)".into(),
            n,
            ours: median_ns(&format!("lookup-n{n}"), "grapevine"),
            theirs: median_ns(&format!("lookup-n{n}"), "hashring"),
            unit: "ns",
            target: if n == 1000 { "≤ 100 ns, ≥ 2× faster".into() } else { String::new() },
        });
        rows.push(Row {
            metric: "lookup within one of 3 regions".into(),
            n,
            ours: median_ns(&format!("lookup-n{n}"), "grapevine-in-region"),
            theirs: f64::NAN,
            unit: "ns",
            target: String::new(),
        });
        for (what, ours, theirs) in
            [("join", "grapevine-join", "hashring-join"), ("leave", "grapevine-leave", "hashring-leave")]
        {
            rows.push(Row {
                metric: format!("rebuild after one {what}"),
                n,
                ours: median_ns(&format!("rebuild-n{n}"), ours) / 1000.0,
                theirs: median_ns(&format!("rebuild-n{n}"), theirs) / 1000.0,
                unit: "µs",
                target: if n == 1000 { "≤ 1000 µs".into() } else { String::new() },
            });
        }

        // Balance over 1M random session ids.
        let keys = session_ids(BALANCE_KEYS, 11);
        let ours = Ring::new(ms.clone()).unwrap();
        let classic = ClassicRing::new(ms.clone(), VNODES).unwrap();
        let mut ours_counts = vec![0u64; n];
        let mut classic_counts = vec![0u64; n];
        let mut bounded = vec![0u64; n];
        let mut ideal = vec![0u64; n];
        for k in &keys {
            ours_counts[ours.ordinal(&ours.owner(k).unwrap().id).unwrap()] += 1;
            classic_counts[classic_ordinal(&classic, k)] += 1;
            let b = ours.owner_bounded(k, &bounded, DEFAULT_LOAD_FACTOR).unwrap();
            bounded[ours.ordinal(&b.id).unwrap()] += 1;
            ideal[(xxhash_rust::xxh3::xxh3_64(k.as_bytes()) % n as u64) as usize] += 1;
        }
        rows.push(Row {
            metric: "peak-to-mean load, 1M keys".into(),
            n,
            ours: peak_to_mean(&ours_counts),
            theirs: peak_to_mean(&classic_counts),
            unit: "×",
            target: if n == 1000 { "≤ 1.10".into() } else { String::new() },
        });
        rows.push(Row {
            metric: "peak-to-mean, bounded load c=1.25".into(),
            n,
            ours: peak_to_mean(&bounded),
            theirs: f64::NAN,
            unit: "×",
            target: "≤ 1.25".into(),
        });
        floor.push((n, peak_to_mean(&ideal)));

        // Keys moved on one join and one leave, as a multiple of the ideal share.
        let keys = &keys[..MOVE_KEYS];
        let (mut oj, mut ol, mut cj, mut cl) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for t in 0..MOVE_TRIALS {
            let newcomer = Member::new(format!("joiner-{t}"), "us-east", "us-east-a");
            let leaver = ms[(t * 7919) % n].id.clone();
            let joined = ours.with_member(newcomer.clone()).unwrap();
            let left = ours.without_member(&leaver);
            let mut c_joined = classic.clone();
            c_joined.add(newcomer);
            let mut c_left = classic.clone();
            c_left.remove(&leaver);
            let ours_now = owners_of(keys, |k| ours.owner(k).map(|m| m.id.as_str()));
            let classic_now = owners_of(keys, |k| classic.owner(k).map(|m| m.id.as_str()));
            oj.push(moved(&ours_now, &owners_of(keys, |k| joined.owner(k).map(|m| m.id.as_str()))) * (n + 1) as f64);
            ol.push(moved(&ours_now, &owners_of(keys, |k| left.owner(k).map(|m| m.id.as_str()))) * n as f64);
            cj.push(
                moved(&classic_now, &owners_of(keys, |k| c_joined.owner(k).map(|m| m.id.as_str()))) * (n + 1) as f64,
            );
            cl.push(moved(&classic_now, &owners_of(keys, |k| c_left.owner(k).map(|m| m.id.as_str()))) * n as f64);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let max = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
        for (what, ours, theirs) in [
            ("keys moved on join, mean of 10 (× ideal)", mean(&oj), mean(&cj)),
            ("keys moved on join, worst of 10 (× ideal)", max(&oj), max(&cj)),
            ("keys moved on leave, mean of 10 (× ideal)", mean(&ol), mean(&cl)),
            ("keys moved on leave, worst of 10 (× ideal)", max(&ol), max(&cl)),
        ] {
            rows.push(Row { metric: what.into(), n, ours, theirs, unit: "×", target: "≤ 1.1".into() });
        }

        // Memory: live heap bytes held by the built ring.
        drop((ours, classic));
        let before = LIVE.load(Ordering::Relaxed);
        let ours = Ring::new(ms.clone()).unwrap();
        let ours_bytes = LIVE.load(Ordering::Relaxed) - before;
        let before = LIVE.load(Ordering::Relaxed);
        let classic = ClassicRing::new(ms.clone(), VNODES).unwrap();
        let classic_bytes = LIVE.load(Ordering::Relaxed) - before;
        black_box((&ours, &classic));
        rows.push(Row {
            metric: "memory held by the ring".into(),
            n,
            ours: ours_bytes as f64 / 1024.0,
            theirs: classic_bytes as f64 / 1024.0,
            unit: "KiB",
            target: String::new(),
        });
    }

    rows.sort_by(|a, b| a.metric.cmp(&b.metric).then(a.n.cmp(&b.n)));
    println!();
    println!(
        "grapevine-ring: {PROBES} probes, {POINTS_PER_100_WEIGHT} points per member of weight 100; \
         hashring 0.3: {VNODES} virtual nodes per member. Ratio = grapevine / hashring (lower is better)."
    );
    println!("{:<44} {:>5} {:>12} {:>12} {:>7}  target", "metric", "N", "grapevine", "hashring", "ratio");
    for r in &rows {
        let fmt = |v: f64| {
            if v.is_nan() {
                "-".to_string()
            } else if v >= 100.0 {
                format!("{v:.0} {}", r.unit)
            } else {
                format!("{v:.3} {}", r.unit)
            }
        };
        let ratio = if r.theirs.is_nan() { "-".to_string() } else { format!("{:.2}", r.ours / r.theirs) };
        println!("{:<44} {:>5} {:>12} {:>12} {:>7}  {}", r.metric, r.n, fmt(r.ours), fmt(r.theirs), ratio, r.target);
    }
    println!();
    println!("Sampling floor: a perfectly uniform assignment of the same 1M keys gives peak-to-mean");
    for (n, f) in floor {
        println!("  N = {n:>4}: {f:.3}");
    }
    println!("(the busiest of N bins of a random 1M-key sample; no ring can measure below it).");
}

fn classic_ordinal(r: &ClassicRing, key: &str) -> usize {
    let id = &r.owner(key).unwrap().id;
    id.trim_start_matches("node-").parse().unwrap()
}

fn owners_of<'a>(keys: &[String], owner: impl Fn(&str) -> Option<&'a str>) -> Vec<&'a str> {
    keys.iter().map(|k| owner(k).unwrap_or("")).collect()
}

/// The share of keys whose owner differs.
fn moved(a: &[&str], b: &[&str]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / a.len() as f64
}

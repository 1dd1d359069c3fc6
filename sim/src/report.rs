//! Turns a recording into figures a person can read: how long each change took to be seen by
//! the first and by every agent, false positives, ring agreement, traffic; as JSON, a summary
//! and SVG plots.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use grapevine_agent::cluster::snapshot::MemberState;
use serde::Serialize;

use crate::runner::{Applied, Recording};

#[derive(Debug, Clone, Serialize)]
pub struct EventFigure {
    pub t: f64,
    pub action: String,
    pub detail: String,
    /// What "seen" means for this event.
    pub seen_as: String,
    /// Seconds until the first agent saw it; null if none did.
    pub first_s: Option<f64>,
    /// Seconds until every agent that could see it did; null if some never did.
    pub all_s: Option<f64>,
    /// Agents that saw it / agents that should have.
    pub seen_by: usize,
    pub observers: usize,
    /// Share of 1000 sampled sessions whose instance changed, seen from an agent of the
    /// affected region, and the ideal share for this change.
    pub sessions_moved: Option<f64>,
    pub sessions_moved_ideal: Option<f64>,
    /// For a crash: seconds until every agent of the crashed node's own region saw it dead.
    #[serde(default)]
    pub all_in_region_s: Option<f64>,
    /// For a crashed gateway: seconds until another region saw its region's gateways without
    /// it and back to full strength.
    #[serde(default)]
    pub gateway_replaced_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FalsePositive {
    pub t: f64,
    pub observer: String,
    pub subject: String,
    /// Seconds until the observer saw it up again; null if never within the run.
    pub for_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub description: String,
    pub seed: u64,
    pub simulated_s: f64,
    pub wall_s: f64,
    pub max_nodes: usize,
    /// Seconds until every agent saw every node alive after the start.
    pub initial_convergence_s: Option<f64>,
    pub events: Vec<EventFigure>,
    pub false_positives: usize,
    /// Distinct (observer, subject) pairs among the false positives.
    pub false_positive_pairs: usize,
    pub false_positive_examples: Vec<FalsePositive>,
    /// Lowest ring agreement seen per region, and the mean.
    pub ring_agreement_min: BTreeMap<String, f64>,
    pub ring_agreement_mean: BTreeMap<String, f64>,
    pub bytes_per_node_s: f64,
    /// Bytes per node per second while nothing happens: from 10 s after the start converged
    /// until the first event (or the end), the mean of the samples. None if there is no such span.
    #[serde(default)]
    pub idle_bytes_per_node_s: Option<f64>,
    /// The same with each datagram's IPv4 and UDP headers (28 bytes), as a capture on the wire
    /// (and Serf's figure in bench-membership) counts them.
    #[serde(default)]
    pub idle_wire_bytes_per_node_s: Option<f64>,
    /// Idle datagrams per node per second, over the same span.
    #[serde(default)]
    pub idle_datagrams_per_node_s: Option<f64>,
    /// The same, by membership layer (region pool, swim, wan, ping, join).
    #[serde(default)]
    pub bytes_per_node_s_by_layer: BTreeMap<String, f64>,
    /// Idle bytes per node per second by layer, over the same span as `idle_bytes_per_node_s`.
    #[serde(default)]
    pub idle_bytes_per_node_s_by_layer: BTreeMap<String, f64>,
    pub datagrams_per_node_s: f64,
}

fn first_complete_after(rec: &Recording, t: f64) -> Option<f64> {
    rec.complete.iter().find(|(at, ok)| *at >= t && *ok).map(|(at, _)| at - t)
}

/// Times until each observer's view of `subject` became `want` (in `generation`, if given),
/// after `t`.
fn seen_times(rec: &Recording, t: f64, subject: &str, want: &[MemberState], until: f64) -> BTreeMap<String, f64> {
    seen_times_of(rec, t, subject, want, until, None)
}

fn seen_times_of(
    rec: &Recording,
    t: f64,
    subject: &str,
    want: &[MemberState],
    until: f64,
    generation: Option<u64>,
) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for tr in &rec.transitions {
        if tr.t >= t
            && tr.t <= until
            && tr.subject == subject
            && tr.state.is_some_and(|s| want.contains(&s))
            && generation.is_none_or(|g| tr.generation == g)
        {
            out.entry(tr.observer.clone()).or_insert(tr.t - t);
        }
    }
    out
}

pub fn build(rec: &Recording, scenario: &crate::scenario::Scenario, seed: u64, simulated_s: f64) -> Report {
    let mut events = Vec::new();
    let next_change = |a: &Applied| rec.applied.iter().map(|b| b.t).filter(|&t| t > a.t).fold(simulated_s, f64::min);
    for a in &rec.applied {
        let until = next_change(a);
        let mut figure = |seen_as: &str, per_subject: Vec<BTreeMap<String, f64>>, observers: usize| {
            // For several subjects (a region crash), an observer has seen it when it saw all.
            let mut merged: BTreeMap<String, f64> = BTreeMap::new();
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for m in &per_subject {
                for (o, s) in m {
                    let e = merged.entry(o.clone()).or_insert(0.0);
                    *e = e.max(*s);
                    *counts.entry(o.clone()).or_default() += 1;
                }
            }
            let complete: Vec<f64> =
                merged.iter().filter(|(o, _)| counts.get(*o) == Some(&per_subject.len())).map(|(_, s)| *s).collect();
            events.push(EventFigure {
                t: a.t,
                action: a.action.clone(),
                detail: a.detail.clone(),
                seen_as: seen_as.into(),
                first_s: complete.iter().cloned().reduce(f64::min),
                all_s: if complete.len() >= observers && observers > 0 {
                    complete.iter().cloned().reduce(f64::max)
                } else {
                    None
                },
                seen_by: complete.len(),
                observers,
                sessions_moved: None,
                sessions_moved_ideal: None,
                gateway_replaced_s: None,
                all_in_region_s: None,
            });
        };
        match a.action.as_str() {
            "crash" | "leave" => {
                // When a whole region goes at once, no gateway is left to report its members
                // dead: other regions see them `unreachable`, as behind a cut, and route
                // elsewhere; either counts as seen.
                let region_gone = a.action == "crash" && a.nodes.len() > 1;
                let want = match (a.action.as_str(), region_gone) {
                    ("crash", false) => vec![MemberState::Dead],
                    ("crash", true) => vec![MemberState::Dead, MemberState::Unreachable],
                    _ => vec![MemberState::Left],
                };
                let observers = &a.observers;
                let per: Vec<_> = a
                    .nodes
                    .iter()
                    .map(|n| {
                        seen_times(rec, a.t, n, &want, until)
                            .into_iter()
                            .filter(|(o, _)| observers.contains(o))
                            .collect()
                    })
                    .collect();
                let seen_as = match (a.action.as_str(), region_gone) {
                    ("crash", false) => "dead",
                    ("crash", true) => "dead (in other regions: unreachable)",
                    _ => "left",
                };
                figure(seen_as, per, observers.len());
            }
            "restart" | "join" => {
                let observers = &a.observers;
                let per: Vec<_> = a
                    .nodes
                    .iter()
                    .map(|n| {
                        let generation = a.generations.iter().find(|(id, _)| id == n).map(|(_, g)| *g);
                        seen_times_of(rec, a.t, n, &[MemberState::Alive, MemberState::Suspect], until, generation)
                            .into_iter()
                            .filter(|(o, _)| observers.contains(o))
                            .collect()
                    })
                    .collect();
                figure("alive", per, observers.len());
            }
            "partition" => {
                // Each agent has seen the split when every node it can no longer hear from is
                // dead (cut inside its region) or unreachable (in a region cut off) in its view.
                let mut per_observer: BTreeMap<&str, Vec<Option<f64>>> = BTreeMap::new();
                for (o, subject) in &a.cut_pairs {
                    let seen = seen_times(rec, a.t, subject, &[MemberState::Dead, MemberState::Unreachable], until)
                        .get(o)
                        .copied();
                    per_observer.entry(o.as_str()).or_default().push(seen);
                }
                let done: Vec<f64> = per_observer
                    .values()
                    .filter(|v| v.iter().all(Option::is_some))
                    .map(|v| v.iter().flatten().cloned().fold(0.0, f64::max))
                    .collect();
                events.push(EventFigure {
                    t: a.t,
                    action: a.action.clone(),
                    detail: a.detail.clone(),
                    seen_as: "every node on the other side dead or unreachable".into(),
                    first_s: done.iter().cloned().reduce(f64::min),
                    all_s: if done.len() == per_observer.len() && !done.is_empty() {
                        done.iter().cloned().reduce(f64::max)
                    } else {
                        None
                    },
                    seen_by: done.len(),
                    observers: per_observer.len(),
                    sessions_moved: None,
                    sessions_moved_ideal: None,
                    gateway_replaced_s: None,
                    all_in_region_s: None,
                });
            }
            "unhealthy" | "healthy" => {
                let want = a.action == "healthy";
                let subject = a.nodes.first().cloned().unwrap_or_default();
                let mut seen: BTreeMap<String, f64> = BTreeMap::new();
                for (t, o, s, h) in &rec.health {
                    if *t >= a.t && *t <= until && *s == subject && *h == want && a.observers.contains(o) {
                        seen.entry(o.clone()).or_insert(t - a.t);
                    }
                }
                figure(if want { "healthy" } else { "unhealthy" }, vec![seen], a.observers.len());
            }
            "heal" | "loss" => {
                let done = first_complete_after(rec, a.t).filter(|s| a.t + s <= until);
                let observers = a.observers.len();
                events.push(EventFigure {
                    t: a.t,
                    action: a.action.clone(),
                    detail: a.detail.clone(),
                    seen_as: "every agent sees every running node alive".into(),
                    first_s: None,
                    all_s: if a.action == "heal" { done } else { None },
                    seen_by: 0,
                    observers,
                    sessions_moved: None,
                    sessions_moved_ideal: None,
                    gateway_replaced_s: None,
                    all_in_region_s: None,
                });
            }
            _ => {}
        }
    }

    // Crashes: how long until every agent of the node's own region saw it dead.
    for e in events.iter_mut().filter(|e| e.action == "crash") {
        let Some(a) = rec.applied.iter().find(|a| a.t == e.t && a.action == "crash") else { continue };
        let region_of =
            |id: &str| rec.regions.iter().filter(|r| id.starts_with(&format!("{r}-"))).max_by_key(|r| r.len());
        let mut worst: Option<f64> = Some(0.0);
        for n in &a.nodes {
            let region = region_of(n);
            let peers: Vec<&String> = a.observers.iter().filter(|o| region_of(o) == region).collect();
            let seen = seen_times(rec, a.t, n, &[MemberState::Dead], next_change(a));
            for o in peers {
                worst = match (worst, seen.get(o)) {
                    (Some(w), Some(s)) => Some(w.max(*s)),
                    _ => None,
                };
            }
        }
        e.all_in_region_s = worst.filter(|_| a.nodes.len() == 1);
    }

    // Crashed gateways: how long until their region had a full set of gateways without them.
    for e in events.iter_mut().filter(|e| e.action == "crash") {
        let Some(a) = rec.applied.iter().find(|a| a.t == e.t && a.action == "crash") else { continue };
        for n in &a.nodes {
            let Some(region) = rec.regions.iter().find(|r| n.starts_with(&format!("{r}-"))) else { continue };
            let before = rec.gateways.iter().rfind(|(t, r, _)| *t <= e.t && r == region);
            let Some((_, _, was)) = before else { continue };
            if !was.contains(n) {
                continue;
            }
            e.gateway_replaced_s = rec
                .gateways
                .iter()
                .find(|(t, r, g)| *t > e.t && r == region && !g.contains(n) && g.len() >= was.len())
                .map(|(t, _, _)| t - e.t);
        }
    }

    // Sessions moved, matched to their events by time.
    for (index, moved, ideal) in &rec.sessions_moved {
        if let Some(a) = rec.applied.get(*index)
            && let Some(e) = events.iter_mut().find(|e| e.t == a.t && e.action == a.action)
        {
            e.sessions_moved = Some(*moved);
            e.sessions_moved_ideal = Some(*ideal);
        }
    }

    // False positives: an agent marking dead a node that was running and reachable both ways.
    let mut fps = Vec::new();
    for (k, tr) in rec.transitions.iter().enumerate() {
        if tr.state == Some(MemberState::Dead) && tr.from.is_some_and(MemberState::is_up) && tr.subject_up_and_reachable
        {
            let back = rec.transitions[k + 1..]
                .iter()
                .find(|o| {
                    o.observer == tr.observer && o.subject == tr.subject && o.state.is_some_and(MemberState::is_up)
                })
                .map(|o| o.t - tr.t);
            fps.push(FalsePositive {
                t: tr.t,
                observer: tr.observer.clone(),
                subject: tr.subject.clone(),
                for_s: back,
            });
        }
    }
    let pairs: std::collections::BTreeSet<(&str, &str)> =
        fps.iter().map(|f| (f.observer.as_str(), f.subject.as_str())).collect();

    // Ring agreement counts from the moment every agent first saw every node: before that,
    // agents that have not heard of an instance yet disagree by construction.
    let converged_at = first_complete_after(rec, 0.0).unwrap_or(simulated_s);
    let mut ring_min: BTreeMap<String, f64> = BTreeMap::new();
    let mut ring_sum: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for (_, region, share) in rec.ring_agreement.iter().filter(|(t, _, _)| *t >= converged_at) {
        let m = ring_min.entry(region.clone()).or_insert(1.0);
        *m = m.min(*share);
        let s = ring_sum.entry(region.clone()).or_default();
        s.0 += share;
        s.1 += 1;
    }
    let node_s = rec.node_seconds.max(1e-9);
    Report {
        scenario: scenario.name.clone(),
        description: scenario.description.clone(),
        seed,
        simulated_s,
        wall_s: rec.wall_seconds,
        max_nodes: rec.max_nodes,
        initial_convergence_s: first_complete_after(rec, 0.0),
        events,
        false_positives: fps.len(),
        false_positive_pairs: pairs.len(),
        false_positive_examples: fps.into_iter().take(20).collect(),
        ring_agreement_min: ring_min,
        ring_agreement_mean: ring_sum.into_iter().map(|(r, (s, n))| (r, s / n as f64)).collect(),
        bytes_per_node_s: rec.total_bytes as f64 / node_s,
        idle_bytes_per_node_s_by_layer: {
            let from = converged_at + 10.0;
            let to = rec.applied.iter().map(|a| a.t).fold(simulated_s, f64::min);
            let a = rec.layer_bytes.iter().find(|(t, _, _)| *t > from);
            let b = rec.layer_bytes.iter().rev().find(|(t, _, _)| *t <= to);
            match (a, b) {
                (Some((ta, na, va)), Some((tb, _, vb))) if tb > ta && *na > 0 => crate::runner::LAYERS
                    .iter()
                    .zip(va.iter().zip(vb))
                    .map(|(l, (x, y))| (l.to_string(), (y - x) as f64 / (tb - ta) / *na as f64))
                    .collect(),
                _ => BTreeMap::new(),
            }
        },
        idle_bytes_per_node_s: idle_mean(rec, converged_at, simulated_s, |(_, b, _)| *b),
        idle_datagrams_per_node_s: idle_mean(rec, converged_at, simulated_s, |(_, _, d)| *d),
        idle_wire_bytes_per_node_s: idle_mean(rec, converged_at, simulated_s, |(_, b, d)| b + IP_UDP_HEADERS * d),
        bytes_per_node_s_by_layer: rec.bytes_by_layer.iter().map(|(k, v)| (k.clone(), *v as f64 / node_s)).collect(),
        datagrams_per_node_s: rec.total_datagrams as f64 / node_s,
    }
}

/// IPv4 (20) and UDP (8) header bytes per datagram.
const IP_UDP_HEADERS: f64 = 28.0;

/// The mean of a traffic sample's figure while nothing happens: from 10 s after the start
/// converged until the first event (or the end). None if there is no such span.
fn idle_mean(rec: &Recording, converged_at: f64, end: f64, f: impl Fn(&(f64, f64, f64)) -> f64) -> Option<f64> {
    let from = converged_at + 10.0;
    let to = rec.applied.iter().map(|a| a.t).fold(end, f64::min);
    let idle: Vec<f64> = rec.traffic.iter().filter(|(t, _, _)| *t > from && *t <= to).map(f).collect();
    (!idle.is_empty()).then(|| idle.iter().sum::<f64>() / idle.len() as f64)
}

fn secs(v: Option<f64>) -> String {
    v.map(|s| format!("{s:.2} s")).unwrap_or_else(|| "never".into())
}

pub fn summary(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "scenario {} (seed {}): {:.0} s simulated in {:.1} s of wall time, up to {} nodes",
        r.scenario, r.seed, r.simulated_s, r.wall_s, r.max_nodes
    );
    if !r.description.is_empty() {
        let _ = writeln!(out, "  {}", r.description.trim());
    }
    let _ = writeln!(out, "  start: every agent saw every node alive after {}", secs(r.initial_convergence_s));
    for e in &r.events {
        let what = if e.detail.is_empty() { e.action.clone() } else { format!("{} {}", e.action, e.detail) };
        match e.action.as_str() {
            "loss" => {
                let _ = writeln!(out, "  t={:>6.1}s {what}", e.t);
            }
            "heal" => {
                let _ = writeln!(
                    out,
                    "  t={:>6.1}s {what}: every agent sees every running node alive after {}",
                    e.t,
                    secs(e.all_s)
                );
            }
            _ => {
                let moved = match (e.sessions_moved, e.sessions_moved_ideal) {
                    (Some(m), Some(i)) => format!("; sessions moved {:.1}% (ideal {:.1}%)", m * 100.0, i * 100.0),
                    _ => String::new(),
                };
                let moved = match e.all_in_region_s {
                    Some(r) => format!("; by all of its region after {r:.2} s{moved}"),
                    None => moved,
                };
                let moved = match e.gateway_replaced_s {
                    Some(g) => format!("{moved}; it was a gateway, replaced after {g:.2} s"),
                    None => moved,
                };
                let _ = writeln!(
                    out,
                    "  t={:>6.1}s {what}: seen {} by the first agent after {}, by all after {} ({}/{} agents){moved}",
                    e.t,
                    e.seen_as,
                    secs(e.first_s),
                    secs(e.all_s),
                    e.seen_by,
                    e.observers
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "  false positives (running, reachable nodes marked dead): {} ({} observer/subject pairs)",
        r.false_positives, r.false_positive_pairs
    );
    let agreement: Vec<String> = r
        .ring_agreement_min
        .iter()
        .map(|(k, v)| format!("{k} min {:.0}% mean {:.0}%", v * 100.0, r.ring_agreement_mean[k] * 100.0))
        .collect();
    let _ = writeln!(out, "  ring agreement within each region, after the start converged: {}", agreement.join("; "));
    if let Some(idle) = r.idle_bytes_per_node_s {
        let layers: Vec<String> = r.idle_bytes_per_node_s_by_layer.iter().map(|(k, v)| format!("{k} {v:.0}")).collect();
        let _ = writeln!(
            out,
            "  idle gossip per node (before the first event): {idle:.0} B/s sealed, {:.0} B/s with IP/UDP headers, {:.1} datagrams/s; by layer: {}",
            r.idle_wire_bytes_per_node_s.unwrap_or(0.0),
            r.idle_datagrams_per_node_s.unwrap_or(0.0),
            layers.join(", ")
        );
    }
    let _ = writeln!(
        out,
        "  gossip per node: {:.0} B/s, {:.1} datagrams/s (sealed, on the simulated wire); by layer: {}",
        r.bytes_per_node_s,
        r.datagrams_per_node_s,
        r.bytes_per_node_s_by_layer.iter().map(|(k, v)| format!("{k} {v:.0}")).collect::<Vec<_>>().join(", ")
    );
    out
}

/// A plain SVG line chart: one line per series, event times as vertical marks.
pub fn line_chart(
    title: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    marks: &[(f64, String)],
    x_max: f64,
) -> String {
    const W: f64 = 980.0;
    const L: f64 = 70.0;
    const R: f64 = 240.0;
    const T: f64 = 40.0;
    const B: f64 = 40.0;
    // Tall enough for one legend line per series.
    let h: f64 = (T + 24.0 + 16.0 * series.len() as f64).max(360.0);
    let palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"];
    // Past eight series, hues spread around the wheel so that no two lines share a colour.
    let colors: Vec<String> = if series.len() <= palette.len() {
        palette.iter().map(|c| c.to_string()).collect()
    } else {
        (0..series.len())
            .map(|k| format!("hsl({:.0}, 70%, {}%)", 360.0 * k as f64 / series.len() as f64, 35 + 10 * (k % 2)))
            .collect()
    };
    let y_max = series.iter().flat_map(|(_, pts)| pts.iter().map(|p| p.1)).fold(0.0f64, f64::max).max(1e-9) * 1.1;
    let x = |v: f64| L + v / x_max.max(1e-9) * (W - L - R);
    let y = |v: f64| h - B - v / y_max * (h - T - B);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{L}" y="22" font-size="15">{title}</text>"#
    );
    let _ = write!(s, r#"<line x1="{L}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#, h - B, W - R, h - B);
    let _ = write!(s, r#"<line x1="{L}" y1="{T}" x2="{L}" y2="{}" stroke="black"/>"#, h - B);
    for i in 0..=4 {
        let v = y_max / 1.1 * i as f64 / 4.0;
        let _ = write!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end">{}</text><line x1="{L}" y1="{}" x2="{}" y2="{}" stroke="#eee"/>"##,
            L - 6.0,
            y(v) + 4.0,
            fmt_num(v),
            y(v),
            W - R,
            y(v)
        );
        let xv = x_max * i as f64 / 4.0;
        let _ = write!(s, r#"<text x="{}" y="{}" text-anchor="middle">{:.0} s</text>"#, x(xv), h - B + 16.0, xv);
    }
    let _ = write!(
        s,
        r#"<text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">{y_label}</text>"#,
        h / 2.0,
        h / 2.0
    );
    for (t, label) in marks {
        let _ = write!(
            s,
            r##"<line x1="{0}" y1="{T}" x2="{0}" y2="{1}" stroke="#999" stroke-dasharray="4 3"/><text x="{2}" y="{3}" fill="#555" font-size="10">{4}</text>"##,
            x(*t),
            h - B,
            x(*t) + 3.0,
            T + 10.0,
            xml(label)
        );
    }
    for (k, (name, pts)) in series.iter().enumerate() {
        let color = &colors[k % colors.len()];
        // At most about 600 points per line: keep the file small, keep the steps visible.
        let stride = pts.len().div_ceil(600).max(1);
        let path: Vec<String> = pts
            .iter()
            .enumerate()
            .filter(|(i, _)| i % stride == 0 || *i + 1 == pts.len())
            .map(|(_, (a, b))| format!("{:.1},{:.1}", x(*a), y(*b)))
            .collect();
        let _ = write!(s, r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#, path.join(" "));
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" fill="{color}">{}</text>"#,
            W - R + 8.0,
            T + 14.0 + 16.0 * k as f64,
            xml(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn fmt_num(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The three plots of a run: members seen alive per region, ring agreement, traffic.
pub fn plots(rec: &Recording, simulated_s: f64) -> Vec<(&'static str, String)> {
    let marks: Vec<(f64, String)> = rec.applied.iter().map(|a| (a.t, format!("{} {}", a.action, a.detail))).collect();
    let mut alive: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    // Up to four regions, one line per (observed, observing) pair; past that (a hundred lines
    // at ten regions), per region: seen from inside it, seen from the others on average.
    let pairwise = rec.regions.len() <= 4;
    let seen_from = |region: &str, from: &str| -> Vec<(f64, f64)> {
        rec.seen_alive
            .iter()
            .filter(|(_, f, r, _, _)| r == region && f == from)
            .map(|(t, _, _, m, _)| (*t, *m))
            .collect()
    };
    for region in &rec.regions {
        if pairwise {
            for from in &rec.regions {
                alive.push((format!("{region} seen from {from}"), seen_from(region, from)));
            }
        } else {
            alive.push((format!("{region} seen from inside"), seen_from(region, region)));
            let mut others: BTreeMap<u64, (f64, usize)> = BTreeMap::new();
            for (t, _, _, m, _) in rec.seen_alive.iter().filter(|(_, f, r, _, _)| r == region && f != region) {
                let e = others.entry(t.to_bits()).or_default();
                e.0 += m;
                e.1 += 1;
            }
            let mut others: Vec<(f64, f64)> =
                others.into_iter().map(|(t, (sum, n))| (f64::from_bits(t), sum / n as f64)).collect();
            others.sort_by(|a, b| a.0.total_cmp(&b.0));
            alive.push((format!("{region} seen from elsewhere"), others));
        }
        let mut truth: Vec<(f64, f64)> = rec
            .seen_alive
            .iter()
            .filter(|(_, _, r, _, _)| r == region)
            .map(|(t, _, _, _, a)| (*t, *a as f64))
            .collect();
        truth.dedup_by(|a, b| a.0 == b.0);
        alive.push((format!("{region} running"), truth));
    }
    let agreement: Vec<(String, Vec<(f64, f64)>)> = rec
        .regions
        .iter()
        .map(|r| {
            (
                r.clone(),
                rec.ring_agreement.iter().filter(|(_, rr, _)| rr == r).map(|(t, _, v)| (*t, v * 100.0)).collect(),
            )
        })
        .collect();
    let traffic = vec![("bytes/s per node".to_string(), rec.traffic.iter().map(|(t, b, _)| (*t, *b)).collect())];
    vec![
        (
            "members-alive.svg",
            line_chart(
                "Members seen alive per region (mean over running agents) and running",
                "members",
                &alive,
                &marks,
                simulated_s,
            ),
        ),
        (
            "ring-agreement.svg",
            line_chart(
                "Ring agreement: % of sampled keys on which every agent of a region picks the same instance",
                "% of keys",
                &agreement,
                &marks,
                simulated_s,
            ),
        ),
        (
            "traffic.svg",
            line_chart("Gossip bytes per running node per second (sealed)", "bytes/s", &traffic, &marks, simulated_s),
        ),
    ]
}

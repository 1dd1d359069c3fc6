//! `sim netns`: the scenario's timeline on real `agent` processes, one per Linux network
//! namespace. Each region is a bridge in a hub namespace that routes between regions; the
//! partitions and loss between regions are nftables rules in the hub (this kernel has no netem,
//! so there is no added latency). Every node fronts a small HTTP app and, through its upstream
//! port, calls the service; requests are sent all along and failures are counted per event.
//! Needs root; removes every namespace, rule and process it made.
//!
//! Real processes run in wall-clock time, so this module reads `std::time::Instant`.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::scenario::{Scenario, parse_duration};

const HUB: &str = "gvhub";
const TABLE: &str = "gvsim";

fn run(cmd: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().with_context(|| format!("running {}", cmd.join(" ")))?;
    if !out.status.success() {
        bail!("{} failed: {}", cmd.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_with_input(cmd: &[&str], input: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", cmd.join(" ")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{} failed: {}", cmd.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn ns_name(region: usize, index: usize) -> String {
    format!("gv{region}n{index}")
}

fn ip_of(region: usize, index: usize) -> String {
    format!("10.{}.0.{}", region + 1, index + 1)
}

struct NsNode {
    id: String,
    ns: String,
    region: usize,
    index: usize,
    agent: Option<Child>,
    app: Option<Child>,
    argv: Vec<String>,
}

/// What one request through the data plane did.
#[derive(Debug, Clone, Serialize)]
pub struct EventTraffic {
    pub t: f64,
    pub action: String,
    pub detail: String,
    /// Requests sent from the event until the next one, and how many failed.
    pub requests: usize,
    pub failed: usize,
}

#[derive(Debug, Serialize)]
pub struct NetnsReport {
    pub scenario: String,
    pub nodes: usize,
    pub baseline_requests: usize,
    pub baseline_failed: usize,
    pub events: Vec<EventTraffic>,
    /// (t, observer, member, state) whenever an agent's view changed.
    pub transitions: Vec<(f64, String, String, String)>,
}

/// Whether a namespace is one this mode makes: the hub or `gv<R>n<I>`.
fn ours(name: &str) -> bool {
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|c| c.is_ascii_digit());
    name == HUB
        || name.strip_prefix("gv").and_then(|rest| rest.split_once('n')).is_some_and(|(r, i)| digits(r) && digits(i))
}

/// Kills every process in a namespace, until none is left (or 5 s have passed).
fn kill_all_in(ns: &str) {
    for _ in 0..50 {
        let pids = run(&["ip", "netns", "pids", ns]).unwrap_or_default();
        let pids: Vec<&str> = pids.split_whitespace().collect();
        if pids.is_empty() {
            return;
        }
        let _ = Command::new("kill").arg("-KILL").args(&pids).stderr(Stdio::null()).status();
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Deletes everything this mode may have created (also from an earlier, interrupted run):
/// every process in its namespaces, then the namespaces, whose nftables rules go with the hub.
pub fn cleanup() {
    let listed = run(&["ip", "netns", "list"]).unwrap_or_default();
    let mut names: Vec<&str> = listed.lines().filter_map(|l| l.split_whitespace().next()).filter(|n| ours(n)).collect();
    // The hub last: the nodes' veth peers live there.
    names.sort_by_key(|n| *n == HUB);
    for ns in names {
        kill_all_in(ns);
        let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
    }
    // An agent of an older run whose namespace was deleted without it.
    let _ = Command::new("pkill").args(["-KILL", "-f", "gvsim-agent-marker"]).status();
}

pub fn run_netns(scenario: &Scenario, agent_bin: &Path, out: &Path) -> anyhow::Result<NetnsReport> {
    if run(&["id", "-u"]).map(|s| s.trim() != "0").unwrap_or(true) {
        bail!("sim netns creates network namespaces and nftables rules: run it as root");
    }
    for tool in ["ip", "nft", "curl", "python3"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            bail!("sim netns needs `{tool}` (apt-get install iproute2 nftables curl python3)");
        }
    }
    let regions: Vec<(String, usize)> = scenario.regions.iter().map(|r| (r.name.clone(), r.nodes.min(8))).collect();
    if regions.len() > 8 {
        bail!("sim netns supports up to 8 regions");
    }
    cleanup();
    std::fs::create_dir_all(out)?;
    let work = out.to_path_buf();
    let result = (|| -> anyhow::Result<NetnsReport> {
        build_topology(&regions)?;
        let pki = work.join("pki");
        let key = work.join("cluster.key");
        std::fs::write(&key, run(&[agent_bin.to_str().unwrap_or("agent"), "keygen"])?)?;
        if !pki.join("ca.key").exists() {
            run(&[agent_bin.to_str().unwrap_or("agent"), "ca", "init", "--out", pki.to_str().unwrap_or("pki")])?;
        }
        let mut nodes = Vec::new();
        let seeds: Vec<String> = (0..regions.len()).map(|r| format!("{}:7946", ip_of(r, 0))).collect();
        for (r, (name, count)) in regions.iter().enumerate() {
            for i in 0..*count {
                let id = format!("{name}-{}", i + 1);
                run(&[
                    agent_bin.to_str().unwrap_or("agent"),
                    "cert",
                    "issue",
                    "--ca",
                    pki.to_str().unwrap_or(""),
                    "--node",
                    &id,
                    "--out",
                    pki.to_str().unwrap_or(""),
                ])?;
                let ip = ip_of(r, i);
                let mut argv: Vec<String> = vec![
                    agent_bin.display().to_string(),
                    "run".into(),
                    "--node-id".into(),
                    id.clone(),
                    "--region".into(),
                    name.clone(),
                    "--cluster".into(),
                    "gvsim-agent-marker".into(),
                    "--cluster-key-file".into(),
                    key.display().to_string(),
                    "--ca-file".into(),
                    pki.join("ca.pem").display().to_string(),
                    "--cert-file".into(),
                    pki.join(format!("{id}.pem")).display().to_string(),
                    "--key-file".into(),
                    pki.join(format!("{id}.key")).display().to_string(),
                    "--gossip-addr".into(),
                    format!("{ip}:7946"),
                    "--data-addr".into(),
                    format!("{ip}:7947"),
                    "--admin-addr".into(),
                    "127.0.0.1:7070".into(),
                    "--data-dir".into(),
                    work.join(&id).display().to_string(),
                    "--service".into(),
                    "web=8080".into(),
                    "--upstream".into(),
                    "web=127.0.0.1:9000".into(),
                ];
                for (k, v) in scenario.setting_strings() {
                    argv.extend([format!("--{}", k.replace('_', "-")), v]);
                }
                for s in &seeds {
                    if *s != format!("{ip}:7946") {
                        argv.extend(["--join".into(), s.clone()]);
                    }
                }
                let ns = ns_name(r, i);
                let app = spawn_in(
                    &ns,
                    &[
                        "python3",
                        "-m",
                        "http.server",
                        "8080",
                        "--bind",
                        "127.0.0.1",
                        "--directory",
                        work.to_str().unwrap_or("."),
                    ],
                    &work.join(format!("{id}.app.log")),
                )?;
                nodes.push(NsNode { id, ns, region: r, index: i, agent: None, app: Some(app), argv });
            }
        }
        for n in &mut nodes {
            let args: Vec<&str> = n.argv.iter().map(String::as_str).collect();
            n.agent = Some(spawn_in(&n.ns, &args, &work.join(format!("{}.log", n.id)))?);
        }
        let mut rules =
            Rules { global: (scenario.network.loss.unwrap_or(0.0) * 100.0).round() as u32, ..Rules::default() };
        rules.apply()?;
        // On an error, `nodes` is dropped on the way out, and each node kills its processes.
        let report = drive(scenario, &regions, &mut nodes, &mut rules)?;
        drop(nodes);
        Ok(report)
    })();
    cleanup();
    result
}

impl Drop for NsNode {
    /// Every process a node started dies with it, on every path out of `run_netns`.
    fn drop(&mut self) {
        for c in [self.agent.take(), self.app.take()].into_iter().flatten() {
            kill(c);
        }
    }
}

fn kill(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

fn spawn_in(ns: &str, argv: &[&str], log: &Path) -> anyhow::Result<Child> {
    let file = std::fs::File::create(log)?;
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(argv)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting {} in {ns}", argv[0]))
}

fn build_topology(regions: &[(String, usize)]) -> anyhow::Result<()> {
    if let Err(e) = run(&["ip", "netns", "add", HUB]) {
        bail!(
            "cannot create network namespaces: sim netns needs root with CAP_SYS_ADMIN and CAP_NET_ADMIN \
             (in a container, run it privileged, e.g. docker run --privileged) [{e:#}]"
        );
    }
    run(&["ip", "-n", HUB, "link", "set", "lo", "up"])?;
    run(&["ip", "netns", "exec", HUB, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    // With br_netfilter loaded, bridged IPv4 would also pass the inet hooks, and a rule on a link
    // inside a region would apply twice. The setting is per namespace; without the module there
    // is nothing to turn off.
    let _ = run(&["ip", "netns", "exec", HUB, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0"]);
    for (r, (_, count)) in regions.iter().enumerate() {
        let br = format!("br{r}");
        run(&["ip", "-n", HUB, "link", "add", &br, "type", "bridge"])?;
        run(&["ip", "-n", HUB, "addr", "add", &format!("10.{}.0.254/24", r + 1), "dev", &br])?;
        run(&["ip", "-n", HUB, "link", "set", &br, "up"])?;
        for i in 0..*count {
            let ns = ns_name(r, i);
            let (inside, outside) = (format!("{ns}a"), format!("{ns}b"));
            run(&["ip", "netns", "add", &ns])?;
            run(&["ip", "link", "add", &inside, "type", "veth", "peer", "name", &outside])?;
            run(&["ip", "link", "set", &inside, "netns", &ns])?;
            run(&["ip", "link", "set", &outside, "netns", HUB])?;
            run(&["ip", "-n", HUB, "link", "set", &outside, "master", &br])?;
            run(&["ip", "-n", HUB, "link", "set", &outside, "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            run(&["ip", "-n", &ns, "addr", "add", &format!("{}/24", ip_of(r, i)), "dev", &inside])?;
            run(&["ip", "-n", &ns, "link", "set", &inside, "up"])?;
            run(&["ip", "-n", &ns, "route", "add", "default", "via", &format!("10.{}.0.254", r + 1)])?;
        }
    }
    Ok(())
}

/// One end of a cut or a lossy link: a whole region's subnet or one node's address.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    Region(usize),
    Node { region: usize, index: usize },
}

impl End {
    fn addr(&self) -> String {
        match self {
            End::Region(r) => format!("10.{}.0.0/24", r + 1),
            End::Node { region, index } => ip_of(*region, *index),
        }
    }
}

/// The hub's filtering as state: cuts, per-link loss and the loss everywhere else. Every change
/// re-renders the whole ruleset, so a loss event keeps an active cut and a heal keeps the loss.
#[derive(Debug, Default)]
struct Rules {
    /// Traffic from the first end to the second is dropped.
    cuts: Vec<(End, End)>,
    /// Traffic from the first end to the second is lost with this percentage, instead of the
    /// global rate.
    links: Vec<(End, End, u32)>,
    /// Percentage lost everywhere else.
    global: u32,
}

impl Rules {
    fn cut(&mut self, a: &[End], b: &[End], one_way: bool) {
        for x in a {
            for y in b {
                self.cuts.push((x.clone(), y.clone()));
                if !one_way {
                    self.cuts.push((y.clone(), x.clone()));
                }
            }
        }
    }

    /// Sets the loss on the links between the two sides, replacing earlier rates on them.
    fn link_loss(&mut self, a: &[End], b: &[End], pct: u32, one_way: bool) {
        let mut set = |from: &End, to: &End| {
            self.links.retain(|(f, t, _)| !(f == from && t == to));
            self.links.push((from.clone(), to.clone(), pct));
        };
        for x in a {
            for y in b {
                set(x, y);
                if !one_way {
                    set(y, x);
                }
            }
        }
    }

    /// The rules of one forward chain, in order: cuts, then each lossy link (its own rate, then
    /// an accept so that the global rate does not apply to it too), then the global rate.
    fn chain(&self, ip_only: &str) -> Vec<String> {
        let mut rules = Vec::new();
        for (from, to) in &self.cuts {
            rules.push(format!("ip saddr {} ip daddr {} drop", from.addr(), to.addr()));
        }
        for (from, to, pct) in &self.links {
            let link = format!("ip saddr {} ip daddr {}", from.addr(), to.addr());
            if *pct > 0 {
                rules.push(format!("{link} {}drop", random_below(*pct)));
            }
            rules.push(format!("{link} accept"));
        }
        if self.global > 0 {
            rules.push(format!("{ip_only} {}drop", random_below(self.global)));
        }
        rules
    }

    /// The whole nftables script for the hub. Traffic between regions is routed and passes the
    /// `inet` forward hook only; traffic inside a region is bridged and passes the `bridge`
    /// forward hook only (with bridge-nf-call-iptables off, see `build_topology`). Both chains
    /// get the same rules: each matches only the traffic its hook sees.
    fn render(&self) -> String {
        let mut out = String::new();
        for (family, ip_only) in [("inet", "meta nfproto ipv4"), ("bridge", "ether type ip")] {
            // Declaring then deleting the table makes the replacement atomic, whether it existed or not.
            out.push_str(&format!("table {family} {TABLE}\ndelete table {family} {TABLE}\n"));
            out.push_str(&format!(
                "table {family} {TABLE} {{\n  chain gvforward {{\n    type filter hook forward priority 0; policy accept;\n"
            ));
            for rule in self.chain(ip_only) {
                out.push_str(&format!("    {rule}\n"));
            }
            out.push_str("  }\n}\n");
        }
        out
    }

    fn apply(&self) -> anyhow::Result<()> {
        run_with_input(&["ip", "netns", "exec", HUB, "nft", "-f", "-"], &self.render())
            .context("loading the nftables rules")
    }
}

/// An nftables match true for `pct` percent of packets (all of them from 100).
fn random_below(pct: u32) -> String {
    if pct >= 100 { String::new() } else { format!("numgen random mod 100 < {pct} ") }
}

/// The ends one side of `between` names: each name is a region if there is one by that name,
/// else a node id.
fn resolve(names: &[String], regions: &[(String, usize)], nodes: &[NsNode]) -> Vec<End> {
    names
        .iter()
        .filter_map(|name| {
            if let Some(r) = regions.iter().position(|(n, _)| n == name) {
                Some(End::Region(r))
            } else {
                nodes.iter().find(|n| &n.id == name).map(|n| End::Node { region: n.region, index: n.index })
            }
        })
        .collect()
}

/// Applies the timeline, sends requests, and samples every agent's view.
fn drive(
    scenario: &Scenario,
    regions: &[(String, usize)],
    nodes: &mut [NsNode],
    rules: &mut Rules,
) -> anyhow::Result<NetnsReport> {
    let start = Instant::now();
    let duration = scenario.duration();
    let mut events: Vec<(Duration, crate::scenario::EventSpec)> =
        scenario.events.iter().map(|e| (parse_duration("event.at", &e.at).unwrap_or_default(), e.clone())).collect();
    events.sort_by_key(|(t, _)| *t);
    let mut report = NetnsReport {
        scenario: scenario.name.clone(),
        nodes: nodes.len(),
        baseline_requests: 0,
        baseline_failed: 0,
        events: Vec::new(),
        transitions: Vec::new(),
    };
    let mut views: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut next = 0;
    let mut last_poll = Instant::now() - Duration::from_secs(10);
    while start.elapsed() < duration {
        let t = start.elapsed();
        while next < events.len() && events[next].0 <= t {
            let e = &events[next].1;
            let mut detail = e.node.clone().or(e.region.clone()).unwrap_or_default();
            match e.action.as_str() {
                "crash" | "leave" | "restart" => {
                    if let Some(n) = nodes.iter_mut().find(|n| Some(&n.id) == e.node.as_ref()) {
                        if let Some(mut c) = n.agent.take() {
                            if e.action == "leave" {
                                let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
                                let _ = c.wait();
                            } else {
                                kill(c);
                            }
                        }
                        if e.action == "restart" {
                            let args: Vec<&str> = n.argv.iter().map(String::as_str).collect();
                            n.agent = Some(spawn_in(&n.ns, &args, Path::new("/dev/null"))?);
                        }
                    }
                }
                "partition" => {
                    let (a, b) = e.between.clone().unwrap_or_default();
                    let (ea, eb) = (resolve(&a, regions, nodes), resolve(&b, regions, nodes));
                    rules.cut(&ea, &eb, e.one_way);
                    rules.apply()?;
                    detail = format!("{} {} {}", a.join("+"), if e.one_way { "->" } else { "<->" }, b.join("+"));
                }
                "heal" => {
                    rules.cuts.clear();
                    rules.apply()?;
                }
                "loss" => {
                    let pct = (e.rate.unwrap_or(0.0) * 100.0).round() as u32;
                    match &e.between {
                        Some((a, b)) => {
                            let (ea, eb) = (resolve(a, regions, nodes), resolve(b, regions, nodes));
                            rules.link_loss(&ea, &eb, pct, e.one_way);
                            detail = format!(
                                "{pct}% on {} {} {}",
                                a.join("+"),
                                if e.one_way { "->" } else { "<->" },
                                b.join("+")
                            );
                        }
                        None => {
                            rules.global = pct;
                            detail = format!("{pct}% everywhere else");
                        }
                    }
                    rules.apply()?;
                }
                other => tracing::warn!(action = other, "not supported by sim netns; skipped"),
            }
            report.events.push(EventTraffic {
                t: t.as_secs_f64(),
                action: e.action.clone(),
                detail,
                requests: 0,
                failed: 0,
            });
            next += 1;
        }
        // One request per region, from its first running node, through its upstream port.
        for (r, _) in regions.iter().enumerate() {
            let Some(n) = nodes.iter().find(|n| n.region == r && n.agent.is_some()) else { continue };
            let ok = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &n.ns,
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-m",
                    "3",
                    "-w",
                    "%{http_code}",
                    "http://127.0.0.1:9000/",
                ])
                .output()
                .map(|o| o.stdout == b"200")
                .unwrap_or(false);
            match report.events.last_mut() {
                Some(e) => {
                    e.requests += 1;
                    e.failed += usize::from(!ok);
                }
                None => {
                    report.baseline_requests += 1;
                    report.baseline_failed += usize::from(!ok);
                }
            }
        }
        if last_poll.elapsed() >= Duration::from_millis(500) {
            last_poll = Instant::now();
            for n in nodes.iter().filter(|n| n.agent.is_some()) {
                let Ok(text) = run(&[
                    "ip",
                    "netns",
                    "exec",
                    &n.ns,
                    &n.argv[0],
                    "members",
                    "--json",
                    "--admin-addr",
                    "127.0.0.1:7070",
                ]) else {
                    continue;
                };
                let Ok(members) = serde_json::from_str::<Vec<serde_json::Value>>(&text) else { continue };
                let view = views.entry(n.id.clone()).or_default();
                for m in members {
                    let (id, state) =
                        (m["id"].as_str().unwrap_or("").to_string(), m["state"].as_str().unwrap_or("").to_string());
                    if id != n.id && view.get(&id) != Some(&state) {
                        report.transitions.push((
                            start.elapsed().as_secs_f64(),
                            n.id.clone(),
                            id.clone(),
                            state.clone(),
                        ));
                        view.insert(id, state);
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(report)
}

pub fn summary(r: &NetnsReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "netns scenario {}: {} real agents, HTTP through each region's upstream port",
        r.scenario, r.nodes
    );
    let _ = writeln!(out, "  before the first event: {} requests, {} failed", r.baseline_requests, r.baseline_failed);
    for (k, e) in r.events.iter().enumerate() {
        let until = r.events.get(k + 1).map(|n| n.t).unwrap_or(f64::INFINITY);
        let dead_seen = r
            .transitions
            .iter()
            .filter(|(t, _, _, s)| *t >= e.t && *t < until && s == "dead")
            .map(|(t, ..)| t - e.t)
            .fold(f64::NAN, f64::min);
        let _ = writeln!(
            out,
            "  t={:>5.1}s {} {}: {} requests until the next event, {} failed{}",
            e.t,
            e.action,
            e.detail,
            e.requests,
            e.failed,
            if dead_seen.is_nan() {
                String::new()
            } else {
                format!("; first member marked dead {dead_seen:.1} s later")
            }
        );
    }
    out
}

/// The output directory for a netns run.
pub fn default_out(name: &str) -> PathBuf {
    PathBuf::from("sim-out").join(format!("{name}-netns"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_compose_cuts_link_loss_and_global_loss() {
        let mut rules = Rules { global: 5, ..Rules::default() };
        rules.cut(&[End::Region(0)], &[End::Node { region: 1, index: 2 }], false);
        rules.link_loss(&[End::Region(0)], &[End::Region(1)], 20, true);
        rules.link_loss(&[End::Region(0)], &[End::Region(1)], 30, true);
        let chain = rules.chain("ether type ip");
        assert_eq!(
            chain,
            [
                "ip saddr 10.1.0.0/24 ip daddr 10.2.0.3 drop",
                "ip saddr 10.2.0.3 ip daddr 10.1.0.0/24 drop",
                "ip saddr 10.1.0.0/24 ip daddr 10.2.0.0/24 numgen random mod 100 < 30 drop",
                "ip saddr 10.1.0.0/24 ip daddr 10.2.0.0/24 accept",
                "ether type ip numgen random mod 100 < 5 drop",
            ]
        );
        // A heal clears the cuts and keeps the loss.
        rules.cuts.clear();
        assert_eq!(rules.chain("x").len(), 3);
        let script = rules.render();
        assert!(script.contains("table inet gvsim {") && script.contains("table bridge gvsim {"));
        assert_eq!(random_below(100), "");
    }

    #[test]
    fn cleanup_takes_only_its_own_namespaces() {
        assert!(ours("gvhub") && ours("gv0n7") && ours("gv12n3"));
        assert!(!ours("gvn1") && !ours("gv0n") && !ours("gv0x1") && !ours("other") && !ours("gv1n2b"));
    }
}

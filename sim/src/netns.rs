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

/// At most this many regions, and nodes in each, run as namespaces.
const MAX_REGIONS: usize = 8;
const MAX_PER_REGION: usize = 8;
/// How long an agent told to leave may take to go before it is killed.
const LEAVE_GRACE: Duration = Duration::from_secs(15);
/// How often every running agent's view is read.
const POLL_EVERY: Duration = Duration::from_millis(500);
/// How often each region sends a request through its upstream port.
const REQUEST_EVERY: Duration = Duration::from_millis(100);
/// The service every node fronts. The check follows the app: stopping the app (`unhealthy`)
/// fails it, starting the app again (`healthy`) passes it.
const SERVICE: &str = "web=8080,check=http://127.0.0.1:8080/,interval=1s,timeout=500ms,rise=2,fall=2";

/// Prints a warning where it is seen whatever the log level, and keeps it for the report.
fn warn(warnings: &mut Vec<String>, message: String) {
    eprintln!("sim netns: warning: {message}");
    warnings.push(message);
}

/// A region as run here.
#[derive(Debug, Clone)]
struct RegionPlan {
    name: String,
    /// Nodes present from the start.
    initial: usize,
    /// Namespaces made for it: `initial`, then those its join events bring in, within the cap.
    slots: usize,
}

/// The regions to run, capped at MAX_PER_REGION nodes each (with a visible warning).
fn plan(scenario: &Scenario, warnings: &mut Vec<String>) -> anyhow::Result<Vec<RegionPlan>> {
    if scenario.regions.len() > MAX_REGIONS {
        bail!("sim netns supports up to {MAX_REGIONS} regions; the scenario has {}", scenario.regions.len());
    }
    let mut plans = Vec::new();
    for r in &scenario.regions {
        let joins: usize = scenario
            .events
            .iter()
            .filter(|e| e.action == "join" && e.region.as_deref() == Some(r.name.as_str()))
            .map(|e| e.count.unwrap_or(0))
            .sum();
        let initial = r.nodes.min(MAX_PER_REGION);
        if r.nodes > MAX_PER_REGION {
            warn(
                warnings,
                format!(
                    "region {} has {} nodes; sim netns runs at most {MAX_PER_REGION} per region, so only {}-1 to {}-{MAX_PER_REGION} \
                     run, and events naming the others are skipped",
                    r.name, r.nodes, r.name, r.name
                ),
            );
        }
        let slots = (r.nodes + joins).min(MAX_PER_REGION).max(initial);
        if joins > slots - initial {
            warn(
                warnings,
                format!(
                    "join events add {joins} nodes to region {}; only {} fit under the cap of {MAX_PER_REGION} per region",
                    r.name,
                    slots - initial
                ),
            );
        }
        plans.push(RegionPlan { name: r.name.clone(), initial, slots });
    }
    Ok(plans)
}

/// One node: a namespace, its agent and its app.
struct NsNode {
    id: String,
    ns: String,
    region: usize,
    index: usize,
    /// The agent's command line, and the app's.
    argv: Vec<String>,
    app_argv: Vec<String>,
    log: PathBuf,
    app_log: PathBuf,
    agent: Option<Child>,
    app: Option<Child>,
    /// An agent told to leave, until it exits (it is killed after LEAVE_GRACE).
    leaving: Option<(Child, Instant)>,
    /// Whether its agent was ever started: false for a node no join has brought in yet.
    started: bool,
}

impl NsNode {
    fn running(&self) -> bool {
        self.agent.is_some()
    }

    /// Starts the agent, killing a running one first (a restart).
    fn start_agent(&mut self) -> anyhow::Result<()> {
        self.stop_agent();
        self.agent = Some(spawn_in(&self.ns, &self.argv, &self.log)?);
        self.started = true;
        Ok(())
    }

    /// Kills the agent (a crash), and one still leaving.
    fn stop_agent(&mut self) {
        for c in [self.agent.take(), self.leaving.take().map(|(c, _)| c)].into_iter().flatten() {
            kill(c);
        }
    }

    /// Asks the agent to leave the cluster (SIGTERM); `reap` collects it.
    fn leave(&mut self) {
        if let Some(c) = self.agent.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            self.leaving = Some((c, Instant::now()));
        }
    }

    /// Collects an agent that has left, or kills it once LEAVE_GRACE is over.
    fn reap(&mut self) {
        let over = match &mut self.leaving {
            Some((c, since)) => !matches!(c.try_wait(), Ok(None)) || since.elapsed() > LEAVE_GRACE,
            None => false,
        };
        if over && let Some((c, _)) = self.leaving.take() {
            kill(c);
        }
    }

    fn start_app(&mut self) -> anyhow::Result<()> {
        if self.app.is_none() {
            self.app = Some(spawn_in(&self.ns, &self.app_argv, &self.app_log)?);
        }
        Ok(())
    }

    fn stop_app(&mut self) {
        if let Some(c) = self.app.take() {
            kill(c);
        }
    }
}

impl Drop for NsNode {
    /// Every process a node started dies with it, on every path out of `run_netns`.
    fn drop(&mut self) {
        self.stop_agent();
        self.stop_app();
    }
}

/// One event as applied (or skipped), and the requests sent until the next one.
#[derive(Debug, Clone, Serialize)]
pub struct EventTraffic {
    pub t: f64,
    pub action: String,
    pub detail: String,
    /// Why the event was not applied; `None` when it was.
    pub skipped: Option<String>,
    /// The nodes it crashed, stopped, restarted, started or flipped.
    pub subjects: Vec<String>,
    /// The agents running after it, other than the subjects.
    pub observers: Vec<String>,
    /// For a partition: the (observer, member) pairs it cut apart.
    pub cut: Vec<(String, String)>,
    /// The states (or, for unhealthy/healthy, the health) in which an observer has seen it.
    pub seen_as: Vec<String>,
    /// Requests sent from the event until the next one, and how many failed.
    pub requests: usize,
    pub failed: usize,
}

/// (t, observer, member, state, generation): an agent's view of a member changed at sample t.
pub type Sample = (f64, String, String, String, u64);

#[derive(Debug, Serialize)]
pub struct NetnsReport {
    pub scenario: String,
    /// Wall-clock seconds run.
    pub duration: f64,
    /// The agents started at the beginning.
    pub nodes: Vec<String>,
    pub baseline_requests: usize,
    pub baseline_failed: usize,
    /// (t sent, region) of every request that failed.
    pub failures: Vec<(f64, String)>,
    pub events: Vec<EventTraffic>,
    /// Every change in an agent's view of a member's state or generation, sampled every
    /// POLL_EVERY.
    pub transitions: Vec<Sample>,
    /// Every change in an agent's view of a member's `web` instance: state `healthy` or
    /// `unhealthy`, generation 0.
    pub health: Vec<Sample>,
    /// Rounds of sampling every agent's view (one every POLL_EVERY at best).
    pub poll_rounds: usize,
    /// What was left out or skipped, also printed on stderr as it happened.
    pub warnings: Vec<String>,
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
    let mut warnings = Vec::new();
    let regions = plan(scenario, &mut warnings)?;
    if scenario.network.pairs.iter().any(|p| p.latency.is_some())
        || scenario.network.remote.is_some()
        || scenario.network.local.is_some()
    {
        warn(&mut warnings, "latency settings in [network] are ignored: this kernel has no netem".into());
    }
    cleanup();
    std::fs::create_dir_all(out)?;
    let work = out.to_path_buf();
    let result = (|| -> anyhow::Result<NetnsReport> {
        build_topology(&regions)?;
        let agent = agent_bin.display().to_string();
        let pki = work.join("pki");
        let key = work.join("cluster.key");
        std::fs::write(&key, run(&[&agent, "keygen"])?)?;
        if !pki.join("ca.key").exists() {
            run(&[&agent, "ca", "init", "--out", pki.to_str().unwrap_or("pki")])?;
        }
        // Every node joins through the first two nodes of each region (those present from the start).
        let seeds: Vec<String> = regions
            .iter()
            .enumerate()
            .flat_map(|(r, plan)| (0..plan.initial.min(2)).map(move |i| format!("{}:7946", ip_of(r, i))))
            .collect();
        // On an error, `nodes` is dropped on the way out, and each node kills its processes.
        let mut nodes = Vec::new();
        for (r, plan) in regions.iter().enumerate() {
            for i in 0..plan.slots {
                let id = format!("{}-{}", plan.name, i + 1);
                run(&[
                    &agent,
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
                    agent.clone(),
                    "run".into(),
                    "--node-id".into(),
                    id.clone(),
                    "--region".into(),
                    plan.name.clone(),
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
                    SERVICE.into(),
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
                let app_argv: Vec<String> = [
                    "python3",
                    "-m",
                    "http.server",
                    "8080",
                    "--bind",
                    "127.0.0.1",
                    "--directory",
                    work.to_str().unwrap_or("."),
                ]
                .map(String::from)
                .into();
                let mut node = NsNode {
                    ns: ns_name(r, i),
                    region: r,
                    index: i,
                    argv,
                    app_argv,
                    log: work.join(format!("{id}.log")),
                    app_log: work.join(format!("{id}.app.log")),
                    agent: None,
                    app: None,
                    leaving: None,
                    started: false,
                    id,
                };
                for log in [&node.log, &node.app_log] {
                    std::fs::write(log, "")?;
                }
                node.start_app()?;
                nodes.push(node);
            }
        }
        for n in nodes.iter_mut().filter(|n| n.index < regions[n.region].initial) {
            n.start_agent()?;
        }
        let mut rules =
            Rules { global: (scenario.network.loss.unwrap_or(0.0) * 100.0).round() as u32, ..Rules::default() };
        for p in &scenario.network.pairs {
            let (Some(rate), Some(a), Some(b)) =
                (p.loss, regions.iter().position(|r| r.name == p.a), regions.iter().position(|r| r.name == p.b))
            else {
                continue;
            };
            rules.link_loss(&[End::Region(a)], &[End::Region(b)], (rate * 100.0).round() as u32, false);
        }
        rules.apply()?;
        let mut report = NetnsReport {
            scenario: scenario.name.clone(),
            duration: 0.0,
            nodes: nodes.iter().filter(|n| n.running()).map(|n| n.id.clone()).collect(),
            baseline_requests: 0,
            baseline_failed: 0,
            failures: Vec::new(),
            events: Vec::new(),
            transitions: Vec::new(),
            health: Vec::new(),
            poll_rounds: 0,
            warnings: std::mem::take(&mut warnings),
        };
        drive(scenario, &agent, &regions, &mut nodes, &mut rules, &mut report)?;
        drop(nodes);
        Ok(report)
    })();
    cleanup();
    result
}

fn kill(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// Starts a command in a namespace, appending its output to `log`. `ip netns exec` execs the
/// command, so the child is the command itself.
fn spawn_in(ns: &str, argv: &[String], log: &Path) -> anyhow::Result<Child> {
    let file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(argv)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting {} in {ns}", argv[0]))
}

fn build_topology(regions: &[RegionPlan]) -> anyhow::Result<()> {
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
    for (r, plan) in regions.iter().enumerate() {
        let br = format!("br{r}");
        run(&["ip", "-n", HUB, "link", "add", &br, "type", "bridge"])?;
        run(&["ip", "-n", HUB, "addr", "add", &format!("10.{}.0.254/24", r + 1), "dev", &br])?;
        run(&["ip", "-n", HUB, "link", "set", &br, "up"])?;
        for i in 0..plan.slots {
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

    fn contains(&self, region: usize, index: usize) -> bool {
        match self {
            End::Region(r) => *r == region,
            End::Node { region: r, index: i } => *r == region && *i == index,
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
    /// an accept so that the global rate does not apply to it too), then the global rate. Each
    /// counts what it matched (`nft list ruleset` in the hub shows it).
    fn chain(&self, ip_only: &str) -> Vec<String> {
        let mut rules = Vec::new();
        for (from, to) in &self.cuts {
            rules.push(format!("ip saddr {} ip daddr {} counter drop", from.addr(), to.addr()));
        }
        for (from, to, pct) in &self.links {
            let link = format!("ip saddr {} ip daddr {}", from.addr(), to.addr());
            if *pct > 0 {
                rules.push(format!("{link} {}counter drop", random_below(*pct)));
            }
            rules.push(format!("{link} counter accept"));
        }
        if self.global > 0 {
            rules.push(format!("{ip_only} {}counter drop", random_below(self.global)));
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
/// else a node id. Also the names that are neither here.
fn resolve(names: &[String], regions: &[RegionPlan], nodes: &[NsNode]) -> (Vec<End>, Vec<String>) {
    let mut ends = Vec::new();
    let mut unknown = Vec::new();
    for name in names {
        if let Some(r) = regions.iter().position(|plan| &plan.name == name) {
            ends.push(End::Region(r));
        } else if let Some(n) = nodes.iter().find(|n| &n.id == name) {
            ends.push(End::Node { region: n.region, index: n.index });
        } else {
            unknown.push(name.clone());
        }
    }
    (ends, unknown)
}

/// A request through a region's upstream port, in flight.
struct Request {
    child: Child,
    /// The event it counts for (`None`: before the first).
    event: Option<usize>,
    launched: Instant,
}

impl Request {
    fn launch(ns: &str, event: Option<usize>) -> anyhow::Result<Request> {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "curl", "-s", "-o", "/dev/null", "-m", "3", "-w", "%{http_code}"])
            .arg("http://127.0.0.1:9000/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting curl")?;
        Ok(Request { child, event, launched: Instant::now() })
    }

    /// Whether it succeeded, once it is over.
    fn outcome(&mut self) -> Option<bool> {
        use std::io::Read as _;
        match self.child.try_wait() {
            Ok(None) if self.launched.elapsed() < Duration::from_secs(5) => None,
            Ok(Some(status)) => {
                let mut code = String::new();
                if let Some(mut out) = self.child.stdout.take() {
                    let _ = out.read_to_string(&mut code);
                }
                Some(status.success() && code == "200")
            }
            _ => Some(false),
        }
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every given agent's `members --json` (id, output), asked of all at once; an agent that has
/// not answered within 3 s is left out.
fn poll_views(agent: &str, targets: &[(String, String)]) -> Vec<(String, String)> {
    let mut children: Vec<(String, Child)> = targets
        .iter()
        .filter_map(|(id, ns)| {
            Command::new("ip")
                .args(["netns", "exec", ns, agent, "members", "--json", "--admin-addr", "127.0.0.1:7070"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .ok()
                .map(|c| (id.clone(), c))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && children.iter_mut().any(|(_, c)| matches!(c.try_wait(), Ok(None))) {
        std::thread::sleep(Duration::from_millis(10));
    }
    children
        .into_iter()
        .filter_map(|(id, mut c)| {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let out = c.wait_with_output().ok()?;
            out.status.success().then(|| (id, String::from_utf8_lossy(&out.stdout).into_owned()))
        })
        .collect()
}

/// A round of `poll_views` in its own thread: (agent id, output).
type PollRound = std::thread::JoinHandle<Vec<(String, String)>>;

/// Views as last sampled: observer -> member -> (state, generation).
type Views = BTreeMap<String, BTreeMap<String, (String, u64)>>;

/// Adds what changed in one round of samples taken at `t`.
fn record(report: &mut NetnsReport, views: &mut Views, health: &mut Views, t: f64, answers: Vec<(String, String)>) {
    report.poll_rounds += 1;
    for (observer, text) in answers {
        let Ok(members) = serde_json::from_str::<Vec<serde_json::Value>>(&text) else { continue };
        for m in members {
            let id = m["id"].as_str().unwrap_or("").to_string();
            if id.is_empty() || id == observer {
                continue;
            }
            let seen = (m["state"].as_str().unwrap_or("").to_string(), m["generation"].as_u64().unwrap_or(0));
            let view = views.entry(observer.clone()).or_default();
            if view.get(&id) != Some(&seen) {
                report.transitions.push((t, observer.clone(), id.clone(), seen.0.clone(), seen.1));
                view.insert(id.clone(), seen);
            }
            let web = m["services"].as_array().and_then(|s| s.iter().find(|s| s["name"] == "web"));
            if let Some(healthy) = web.and_then(|w| w["healthy"].as_bool()) {
                let seen = (if healthy { "healthy" } else { "unhealthy" }.to_string(), 0);
                let view = health.entry(observer.clone()).or_default();
                if view.get(&id) != Some(&seen) {
                    report.health.push((t, observer.clone(), id.clone(), seen.0.clone(), 0));
                    view.insert(id, seen);
                }
            }
        }
    }
}

/// Applies the timeline, sends requests, and samples every agent's view.
fn drive(
    scenario: &Scenario,
    agent: &str,
    regions: &[RegionPlan],
    nodes: &mut [NsNode],
    rules: &mut Rules,
    report: &mut NetnsReport,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let duration = scenario.duration();
    let mut events: Vec<(Duration, crate::scenario::EventSpec)> =
        scenario.events.iter().map(|e| (parse_duration("event.at", &e.at).unwrap_or_default(), e.clone())).collect();
    events.sort_by_key(|(t, _)| *t);
    let mut next = 0;
    let mut requests: Vec<Option<Request>> = regions.iter().map(|_| None).collect();
    let mut last_request: Vec<Option<Instant>> = vec![None; regions.len()];
    let mut poll: Option<(f64, PollRound)> = None;
    let mut last_poll: Option<Instant> = None;
    let (mut views, mut health) = (Views::new(), Views::new());
    while start.elapsed() < duration {
        let t = start.elapsed();
        while next < events.len() && events[next].0 <= t {
            let applied = apply_event(&events[next].1, t, regions, nodes, rules, &mut report.warnings)?;
            report.events.push(applied);
            next += 1;
        }
        for n in nodes.iter_mut() {
            n.reap();
        }
        // One request at a time per region, from its first running node, through its upstream port.
        for (r, slot) in requests.iter_mut().enumerate() {
            if let Some(ok) = slot.as_mut().and_then(Request::outcome)
                && let Some(q) = slot.take()
            {
                if !ok {
                    report.failures.push((q.launched.duration_since(start).as_secs_f64(), regions[r].name.clone()));
                }
                let counted = match q.event {
                    Some(k) => {
                        let e = &mut report.events[k];
                        (&mut e.requests, &mut e.failed)
                    }
                    None => (&mut report.baseline_requests, &mut report.baseline_failed),
                };
                *counted.0 += 1;
                *counted.1 += usize::from(!ok);
            }
            if slot.is_none()
                && last_request[r].is_none_or(|l| l.elapsed() >= REQUEST_EVERY)
                && let Some(n) = nodes.iter().find(|n| n.region == r && n.running())
            {
                *slot = Some(Request::launch(&n.ns, report.events.len().checked_sub(1))?);
                last_request[r] = Some(Instant::now());
            }
        }
        if poll.as_ref().is_some_and(|(_, h)| h.is_finished())
            && let Some((at, h)) = poll.take()
        {
            record(report, &mut views, &mut health, at, h.join().unwrap_or_default());
        }
        if poll.is_none() && last_poll.is_none_or(|l| l.elapsed() >= POLL_EVERY) {
            last_poll = Some(Instant::now());
            let targets: Vec<(String, String)> =
                nodes.iter().filter(|n| n.running()).map(|n| (n.id.clone(), n.ns.clone())).collect();
            let agent = agent.to_string();
            poll = Some((start.elapsed().as_secs_f64(), std::thread::spawn(move || poll_views(&agent, &targets))));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some((at, h)) = poll.take() {
        record(report, &mut views, &mut health, at, h.join().unwrap_or_default());
    }
    report.duration = start.elapsed().as_secs_f64();
    Ok(())
}

fn arrow(one_way: bool) -> &'static str {
    if one_way { "->" } else { "<->" }
}

/// Applies one event; what it cannot apply it skips, with a visible warning.
fn apply_event(
    e: &crate::scenario::EventSpec,
    t: Duration,
    regions: &[RegionPlan],
    nodes: &mut [NsNode],
    rules: &mut Rules,
    warnings: &mut Vec<String>,
) -> anyhow::Result<EventTraffic> {
    let mut ev = EventTraffic {
        t: t.as_secs_f64(),
        action: e.action.clone(),
        detail: e.node.clone().or(e.region.clone()).unwrap_or_default(),
        skipped: None,
        subjects: Vec::new(),
        observers: Vec::new(),
        cut: Vec::new(),
        seen_as: Vec::new(),
        requests: 0,
        failed: 0,
    };
    let region = e.region.as_ref().and_then(|name| regions.iter().position(|r| &r.name == name));
    let node = e.node.as_ref().and_then(|id| nodes.iter().position(|n| &n.id == id));
    let seen_as = |states: &[&str]| states.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut skipped = None;
    match (e.action.as_str(), e.node.as_ref()) {
        ("crash" | "leave" | "restart" | "unhealthy" | "healthy", Some(id)) => match node {
            None => {
                skipped = Some(format!("no node {id} runs here (at most {MAX_PER_REGION} per region)"));
            }
            Some(i) => {
                let n = &mut nodes[i];
                match e.action.as_str() {
                    "crash" | "leave" if !n.running() => ev.detail.push_str(" (was not running)"),
                    "crash" => {
                        n.stop_agent();
                        ev.subjects.push(n.id.clone());
                        ev.seen_as = seen_as(&["dead", "left"]);
                    }
                    "leave" => {
                        n.leave();
                        ev.subjects.push(n.id.clone());
                        ev.seen_as = seen_as(&["left", "dead"]);
                    }
                    "restart" => {
                        n.start_agent()?;
                        ev.subjects.push(n.id.clone());
                        ev.seen_as = seen_as(&["alive"]);
                    }
                    "unhealthy" => {
                        n.stop_app();
                        ev.subjects.push(n.id.clone());
                        ev.seen_as = seen_as(&["unhealthy"]);
                    }
                    _ => {
                        n.start_app()?;
                        ev.subjects.push(n.id.clone());
                        ev.seen_as = seen_as(&["healthy"]);
                    }
                }
            }
        },
        ("crash", None) => match region {
            None => skipped = Some(format!("no region {:?} here", e.region.clone().unwrap_or_default())),
            Some(r) => {
                for n in nodes.iter_mut().filter(|n| n.region == r && n.running()) {
                    n.stop_agent();
                    ev.subjects.push(n.id.clone());
                }
                ev.detail = format!("region {}: {}", regions[r].name, ev.subjects.join(","));
                // With its gateways gone, other regions see the region unreachable, not dead.
                ev.seen_as = seen_as(&["dead", "left", "unreachable"]);
            }
        },
        ("join", _) => match region {
            None => skipped = Some(format!("no region {:?} here", e.region.clone().unwrap_or_default())),
            Some(r) => {
                let count = e.count.unwrap_or(0);
                let initial = regions[r].initial;
                for n in nodes.iter_mut().filter(|n| n.region == r && n.index >= initial && !n.started).take(count) {
                    n.start_agent()?;
                    ev.subjects.push(n.id.clone());
                }
                ev.seen_as = seen_as(&["alive"]);
                ev.detail = format!("{} nodes in {}: {}", ev.subjects.len(), regions[r].name, ev.subjects.join(","));
                if ev.subjects.is_empty() {
                    skipped = Some(format!("no room for more nodes in {} (at most {MAX_PER_REGION})", regions[r].name));
                } else if ev.subjects.len() < count {
                    warn(
                        warnings,
                        format!(
                            "join at {:.1}s: {} of {count} nodes started in {} (at most {MAX_PER_REGION} per region)",
                            ev.t,
                            ev.subjects.len(),
                            regions[r].name
                        ),
                    );
                }
            }
        },
        ("partition", _) => {
            let (a, b) = e.between.clone().unwrap_or_default();
            ev.detail = format!("{} {} {}", a.join("+"), arrow(e.one_way), b.join("+"));
            let ((ea, ua), (eb, ub)) = (resolve(&a, regions, nodes), resolve(&b, regions, nodes));
            if !ua.is_empty() || !ub.is_empty() {
                let unknown = [ua, ub].concat().join(", ");
                warn(warnings, format!("partition at {:.1}s: no region or node named {unknown} here; left out", ev.t));
            }
            if ea.is_empty() || eb.is_empty() {
                skipped = Some("a side names nothing that runs here".into());
            } else {
                rules.cut(&ea, &eb, e.one_way);
                rules.apply()?;
                let side = |ends: &[End]| -> Vec<String> {
                    nodes
                        .iter()
                        .filter(|n| n.running() && ends.iter().any(|end| end.contains(n.region, n.index)))
                        .map(|n| n.id.clone())
                        .collect()
                };
                // Even one way, a cut stops round trips, so both sides are observers.
                for x in side(&ea) {
                    for y in side(&eb).into_iter().filter(|y| *y != x) {
                        ev.cut.push((x.clone(), y.clone()));
                        ev.cut.push((y, x.clone()));
                    }
                }
                ev.cut.sort();
                ev.cut.dedup();
                ev.seen_as = seen_as(&["unreachable", "dead"]);
            }
        }
        ("heal", _) => {
            rules.cuts.clear();
            rules.apply()?;
        }
        ("loss", _) => {
            let pct = (e.rate.unwrap_or(0.0) * 100.0).round() as u32;
            match &e.between {
                Some((a, b)) => {
                    ev.detail = format!("{pct}% on {} {} {}", a.join("+"), arrow(e.one_way), b.join("+"));
                    let ((ea, ua), (eb, ub)) = (resolve(a, regions, nodes), resolve(b, regions, nodes));
                    if !ua.is_empty() || !ub.is_empty() {
                        let unknown = [ua, ub].concat().join(", ");
                        warn(
                            warnings,
                            format!("loss at {:.1}s: no region or node named {unknown} here; left out", ev.t),
                        );
                    }
                    if ea.is_empty() || eb.is_empty() {
                        skipped = Some("a side names nothing that runs here".into());
                    } else {
                        rules.link_loss(&ea, &eb, pct, e.one_way);
                    }
                }
                None => {
                    ev.detail = format!("{pct}% everywhere else");
                    rules.global = pct;
                }
            }
            rules.apply()?;
        }
        (other, _) => skipped = Some(format!("sim netns does not support {other:?} events")),
    }
    ev.observers = nodes.iter().filter(|n| n.running() && !ev.subjects.contains(&n.id)).map(|n| n.id.clone()).collect();
    if let Some(reason) = &skipped {
        warn(warnings, format!("{} at {:.1}s skipped: {reason}", e.action, ev.t));
    }
    ev.skipped = skipped;
    Ok(ev)
}

/// When `observer` first saw `member` in one of `states` within [from, until), in seconds after
/// `from`; with `newer`, only at a generation above the one it saw at `from` (a restart).
fn first_seen(
    samples: &[Sample],
    observer: &str,
    member: &str,
    states: &[String],
    newer: bool,
    from: f64,
    until: f64,
) -> Option<f64> {
    let pair: Vec<&Sample> = samples.iter().filter(|s| s.1 == observer && s.2 == member && s.0 < until).collect();
    let before = pair.iter().rfind(|s| s.0 < from);
    let matches = |s: &Sample| states.contains(&s.3) && (!newer || before.is_none_or(|b| s.4 > b.4));
    if before.is_some_and(|b| !newer && matches(b)) {
        return Some(0.0);
    }
    pair.iter().find(|s| s.0 >= from && matches(s)).map(|s| s.0 - from)
}

/// How many observers saw every member they were to see, and the first and last of them to.
#[derive(Debug, PartialEq)]
struct Detection {
    seen: usize,
    of: usize,
    first: Option<f64>,
    last: Option<f64>,
    /// Observers left out: they were stopped (crashed, left, restarted) before they saw it.
    stopped: usize,
}

/// Over (observer, member) pairs: an observer has seen once it has seen all its members. An
/// observer in `stopped` is watched only until then, and left out if it had not seen by then.
fn detection(
    samples: &[Sample],
    pairs: &[(String, String)],
    states: &[String],
    newer: bool,
    (from, until): (f64, f64),
    stopped: &BTreeMap<String, f64>,
) -> Detection {
    let mut by_observer: BTreeMap<&str, Option<f64>> = BTreeMap::new();
    for (o, m) in pairs {
        let until = stopped.get(o).map_or(until, |s| s.min(until));
        let t = first_seen(samples, o, m, states, newer, from, until);
        let entry = by_observer.entry(o).or_insert(Some(0.0));
        *entry = match (*entry, t) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
    }
    let left_out =
        by_observer.iter().filter(|(o, t)| t.is_none() && stopped.get(**o).is_some_and(|s| *s < until)).count();
    let times: Vec<f64> = by_observer.values().flatten().copied().collect();
    Detection {
        seen: times.len(),
        of: by_observer.len() - left_out,
        first: times.iter().copied().reduce(f64::min),
        last: times.iter().copied().reduce(f64::max),
        stopped: left_out,
    }
}

/// Seconds after `from` until every one of `running` saw every other in `state` (`alive`, or
/// `healthy` in the health samples), within [from, until); else how many of the (observer,
/// member) pairs were so at `until`.
fn all_seen_after(
    samples: &[Sample],
    running: &[String],
    state: &str,
    (from, until): (f64, f64),
) -> Result<f64, (usize, usize)> {
    let pairs: Vec<(&str, &str)> = running
        .iter()
        .flat_map(|o| running.iter().filter(move |m| *m != o).map(move |m| (o.as_str(), m.as_str())))
        .collect();
    let mut view: BTreeMap<(&str, &str), &str> = BTreeMap::new();
    let alive = |view: &BTreeMap<(&str, &str), &str>| pairs.iter().filter(|p| view.get(p) == Some(&state)).count();
    for s in samples.iter().take_while(|s| s.0 < from) {
        view.insert((&s.1, &s.2), &s.3);
    }
    if alive(&view) == pairs.len() {
        return Ok(0.0);
    }
    for s in samples.iter().filter(|s| s.0 >= from && s.0 < until) {
        view.insert((&s.1, &s.2), &s.3);
        if alive(&view) == pairs.len() {
            return Ok(s.0 - from);
        }
    }
    Err((alive(&view), pairs.len()))
}

/// Until when an event's effect is looked for: the next event that undoes or overrides it (a
/// heal after a partition, a restart of a crashed node, anything after a heal), else the end.
fn window_end(r: &NetnsReport, k: usize) -> f64 {
    let e = &r.events[k];
    r.events[k + 1..]
        .iter()
        .filter(|n| n.skipped.is_none())
        .find(|n| match e.action.as_str() {
            "partition" => n.action == "heal",
            "crash" | "leave" | "restart" | "join" | "unhealthy" | "healthy" => {
                n.subjects.iter().any(|s| e.subjects.contains(s))
            }
            _ => true,
        })
        .map(|n| n.t)
        .unwrap_or(r.duration)
}

fn describe(what: &str, d: &Detection, window: f64) -> String {
    let stopped =
        if d.stopped > 0 { format!(" ({} more were stopped before they saw it)", d.stopped) } else { String::new() };
    let seen = match (d.first, d.last) {
        _ if d.of == 0 => format!("{what}: no agent to see it"),
        (Some(first), Some(last)) if d.seen == d.of => {
            format!("{what} by all {} agents: the first after {first:.1} s, the last after {last:.1} s", d.of)
        }
        (Some(first), Some(last)) => format!(
            "{what} by {} of {} agents within {window:.0} s: the first after {first:.1} s, the last of them after {last:.1} s",
            d.seen, d.of
        ),
        _ => format!("{what} by none of {} agents within {window:.0} s", d.of),
    };
    seen + &stopped
}

pub fn summary(r: &NetnsReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "netns scenario {}: {} real agents at the start, HTTP through each region's upstream port; every agent's view read \
         every {:.1} s on average (times below are when a reading first showed it)",
        r.scenario,
        r.nodes.len(),
        r.duration / r.poll_rounds.max(1) as f64
    );
    let first_event = r.events.first().map(|e| e.t).unwrap_or(r.duration);
    let converged = match (
        all_seen_after(&r.transitions, &r.nodes, "alive", (0.0, first_event)),
        all_seen_after(&r.health, &r.nodes, "healthy", (0.0, first_event)),
    ) {
        (Ok(alive), Ok(healthy)) => {
            let early = r.failures.iter().filter(|(at, _)| *at <= healthy.max(alive)).count();
            format!(
                "every agent saw all {} alive after {alive:.1} s and every web instance healthy after {healthy:.1} s \
                 ({early} of the failures were before then)",
                r.nodes.len()
            )
        }
        (Err((alive, of)), _) => format!("not converged: {alive} of {of} (observer, member) pairs alive"),
        (_, Err((healthy, of))) => format!("not converged: {healthy} of {of} web instances seen healthy"),
    };
    let _ = writeln!(
        out,
        "  before the first event: {} requests, {} failed; {converged}",
        r.baseline_requests, r.baseline_failed
    );
    for (k, e) in r.events.iter().enumerate() {
        let until = window_end(r, k);
        let window = until - e.t;
        let _ = writeln!(
            out,
            "  t={:>5.1}s {}{}: {}{} requests until the next event, {} failed",
            e.t,
            e.action,
            if e.detail.is_empty() { String::new() } else { format!(" {}", e.detail) },
            if e.skipped.is_some() { "SKIPPED; " } else { "" },
            e.requests,
            e.failed
        );
        if let Some(reason) = &e.skipped {
            let _ = writeln!(out, "           skipped: {reason}");
            continue;
        }
        // When each observer was itself stopped after the event, if it was.
        let mut stopped: BTreeMap<String, f64> = BTreeMap::new();
        for later in r.events[k + 1..].iter().filter(|n| n.skipped.is_none()) {
            if matches!(later.action.as_str(), "crash" | "leave" | "restart") {
                for s in &later.subjects {
                    stopped.entry(s.clone()).or_insert(later.t);
                }
            }
        }
        let pairs = |members: &[String]| -> Vec<(String, String)> {
            e.observers.iter().flat_map(|o| members.iter().map(move |m| (o.clone(), m.clone()))).collect()
        };
        let line = match e.action.as_str() {
            "crash" | "leave" | "restart" | "join" if !e.subjects.is_empty() => {
                let newer = e.action == "restart";
                let d = detection(&r.transitions, &pairs(&e.subjects), &e.seen_as, newer, (e.t, until), &stopped);
                let what = if newer {
                    "seen alive at a new generation".to_string()
                } else {
                    format!("seen {}", e.seen_as.join(" or "))
                };
                Some(describe(&what, &d, window))
            }
            "unhealthy" | "healthy" => {
                let d = detection(&r.health, &pairs(&e.subjects), &e.seen_as, false, (e.t, until), &stopped);
                Some(describe(&format!("its web instance seen {}", e.action), &d, window))
            }
            "partition" if !e.cut.is_empty() => {
                let d = detection(&r.transitions, &e.cut, &e.seen_as, false, (e.t, until), &stopped);
                // The state each cut pair ended the window in.
                let mut ended: BTreeMap<&str, usize> = BTreeMap::new();
                for (o, m) in &e.cut {
                    let last = r.transitions.iter().rfind(|s| s.0 < until && &s.1 == o && &s.2 == m);
                    *ended.entry(last.map(|s| s.3.as_str()).unwrap_or("unknown")).or_default() += 1;
                }
                let ended: Vec<String> = ended.iter().map(|(s, n)| format!("{n} {s}")).collect();
                Some(format!(
                    "{}; the {} cut (observer, member) pairs at the end: {}",
                    describe("the other side seen unreachable or dead", &d, window),
                    e.cut.len(),
                    ended.join(", ")
                ))
            }
            "heal" => {
                let running: Vec<String> = e.observers.clone();
                Some(match all_seen_after(&r.transitions, &running, "alive", (e.t, until)) {
                    Ok(t) => format!("every agent saw every running member alive again after {t:.1} s"),
                    Err((alive, of)) => {
                        format!("not whole again within {window:.0} s: {alive} of {of} (observer, member) pairs alive")
                    }
                })
            }
            _ => None,
        };
        if let Some(line) = line {
            let _ = writeln!(out, "           {line}");
        }
    }
    if !r.warnings.is_empty() {
        let _ = writeln!(out, "  warnings:");
        for w in &r.warnings {
            let _ = writeln!(out, "    {w}");
        }
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
                "ip saddr 10.1.0.0/24 ip daddr 10.2.0.3 counter drop",
                "ip saddr 10.2.0.3 ip daddr 10.1.0.0/24 counter drop",
                "ip saddr 10.1.0.0/24 ip daddr 10.2.0.0/24 numgen random mod 100 < 30 counter drop",
                "ip saddr 10.1.0.0/24 ip daddr 10.2.0.0/24 counter accept",
                "ether type ip numgen random mod 100 < 5 counter drop",
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

    fn sample(t: f64, o: &str, m: &str, state: &str, generation: u64) -> Sample {
        (t, o.into(), m.into(), state.into(), generation)
    }

    #[test]
    fn detection_takes_each_observer_when_it_has_seen_all_its_members() {
        let samples = vec![
            sample(1.0, "a", "c", "alive", 1),
            sample(1.0, "b", "c", "alive", 1),
            sample(11.0, "a", "c", "suspect", 1),
            sample(12.5, "a", "c", "dead", 1),
            sample(13.0, "b", "c", "dead", 1),
            sample(20.0, "b", "c", "alive", 2),
        ];
        let pairs = [("a".to_string(), "c".to_string()), ("b".to_string(), "c".to_string())];
        let dead = ["dead".to_string(), "left".to_string()];
        let none = BTreeMap::new();
        let d = detection(&samples, &pairs, &dead, false, (10.0, 30.0), &none);
        assert_eq!(d, Detection { seen: 2, of: 2, first: Some(2.5), last: Some(3.0), stopped: 0 });
        // Only b sees c at a new generation after a restart at 15 s.
        let alive = ["alive".to_string()];
        let d = detection(&samples, &pairs, &alive, true, (15.0, 30.0), &none);
        assert_eq!(d, Detection { seen: 1, of: 2, first: Some(5.0), last: Some(5.0), stopped: 0 });
        // Outside the window it does not count.
        assert_eq!(detection(&samples, &pairs, &dead, false, (10.0, 12.9), &none).seen, 1);
        // An observer stopped before it saw is left out; one stopped after it saw still counts.
        let b_stopped = BTreeMap::from([("b".to_string(), 12.8)]);
        let d = detection(&samples, &pairs, &dead, false, (10.0, 30.0), &b_stopped);
        assert_eq!(d, Detection { seen: 1, of: 1, first: Some(2.5), last: Some(2.5), stopped: 1 });
        let b_later = BTreeMap::from([("b".to_string(), 14.0)]);
        assert_eq!(detection(&samples, &pairs, &dead, false, (10.0, 30.0), &b_later).seen, 2);
    }

    #[test]
    fn whole_again_when_every_agent_sees_every_other_alive() {
        let running = ["a".to_string(), "b".to_string()];
        let samples = vec![
            sample(1.0, "a", "b", "alive", 1),
            sample(1.5, "b", "a", "alive", 1),
            sample(5.0, "a", "b", "unreachable", 1),
            sample(10.5, "a", "b", "alive", 1),
        ];
        assert_eq!(all_seen_after(&samples, &running, "alive", (0.0, 4.0)), Ok(1.5));
        assert_eq!(all_seen_after(&samples, &running, "alive", (10.0, 20.0)), Ok(0.5));
        assert_eq!(all_seen_after(&samples, &running, "alive", (6.0, 10.0)), Err((1, 2)));
    }
}

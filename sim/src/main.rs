//! The `sim` binary: parse the command line, run, write the report.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use grapevine_sim::{report, runner, scenario};

#[derive(Debug, Parser)]
#[command(name = "sim", version, about = "Rehearse partitions, loss and crashes on Grapevine's real membership code")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a scenario in simulated time and report what membership went through.
    Run {
        /// The scenario file (see sim/scenarios/).
        scenario: PathBuf,
        /// Seed for the timeline, losses and jitter [default: the scenario's].
        #[arg(long)]
        seed: Option<u64>,
        /// Directory for report.json and the SVG plots [default: sim-out/NAME].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Repeat over this many seeds (seed, seed+1, ...) and report medians and spreads.
        #[arg(long, default_value_t = 1)]
        runs: u64,
        /// An agent setting for this run, over the scenario's `[settings]`, such as
        /// `--set probe_interval=1s` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_setting)]
        settings: Vec<(String, String)>,
    },
    /// Run a scenario's timeline on real `agent` processes in network namespaces (root only).
    Netns {
        /// The scenario file; at most 8 regions of at most 8 nodes are used.
        scenario: PathBuf,
        /// Directory for logs, keys and report.json [default: sim-out/NAME-netns].
        #[arg(long)]
        out: Option<PathBuf>,
        /// The agent binary [default: the `agent` beside this `sim`].
        #[arg(long)]
        agent: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SIM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run { scenario, seed, out, runs, settings } => run_command(&scenario, seed, out, runs, &settings),
        Command::Netns { scenario, out, agent } => netns_command(&scenario, out, agent),
    }
}

fn netns_command(path: &std::path::Path, out: Option<PathBuf>, agent: Option<PathBuf>) -> ExitCode {
    let scenario = match scenario::Scenario::load(path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sim: {e:#}");
            return ExitCode::from(2);
        }
    };
    let agent = agent
        .or_else(|| {
            std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join("agent"))).filter(|p| p.exists())
        })
        .unwrap_or_else(|| PathBuf::from("agent"));
    let out = out.unwrap_or_else(|| grapevine_sim::netns::default_out(&scenario.name));
    let _ = std::fs::create_dir_all(&out);
    let out = std::fs::canonicalize(&out).unwrap_or(out);
    match grapevine_sim::netns::run_netns(&scenario, &agent, &out) {
        Ok(r) => {
            print!("{}", grapevine_sim::netns::summary(&r));
            let _ = std::fs::write(out.join("report.json"), serde_json::to_string_pretty(&r).unwrap_or_default());
            println!("wrote {}", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sim netns: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_setting(text: &str) -> Result<(String, String), String> {
    let (k, v) = text.split_once('=').ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    Ok((k.trim().to_string(), v.trim().to_string()))
}

fn run_command(
    scenario: &std::path::Path,
    seed: Option<u64>,
    out: Option<PathBuf>,
    runs: u64,
    settings: &[(String, String)],
) -> ExitCode {
    let loaded = scenario::Scenario::load(scenario).and_then(|mut s| {
        for (k, v) in settings {
            s.settings.insert(k.clone(), toml::Value::String(v.clone()));
        }
        s.gossip_settings()?;
        Ok(s)
    });
    let scenario = match loaded {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sim: {e:#}");
            return ExitCode::from(2);
        }
    };
    let out = out.unwrap_or_else(|| PathBuf::from("sim-out").join(&scenario.name));
    let first_seed = seed.unwrap_or(scenario.seed);
    let mut reports = Vec::new();
    for k in 0..runs.max(1) {
        let seed = first_seed + k;
        match run_once(&scenario, seed, &out.join(if runs > 1 { format!("seed-{seed}") } else { String::new() })) {
            Ok(r) => {
                print!("{}", report::summary(&r));
                reports.push(r);
            }
            Err(e) => {
                eprintln!("sim: seed {seed}: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    if reports.len() > 1 {
        print!("{}", spreads(&reports, &out));
    }
    ExitCode::SUCCESS
}

fn run_once(scenario: &scenario::Scenario, seed: u64, out: &std::path::Path) -> anyhow::Result<report::Report> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build()?;
    let rec = runtime.block_on(runner::run(scenario, seed))?;
    let simulated = scenario.duration().as_secs_f64();
    let r = report::build(&rec, scenario, seed, simulated);
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("report.json"), serde_json::to_string_pretty(&r)?)?;
    for (name, svg) in report::plots(&rec, simulated) {
        std::fs::write(out.join(name), svg)?;
    }
    println!("wrote {}", out.display());
    Ok(r)
}

/// Every figure of a set of runs, by name, one value per run that had it.
fn figures(reports: &[report::Report]) -> Vec<(String, Vec<f64>)> {
    let mut f: Vec<(String, Vec<f64>)> = Vec::new();
    let mut add = |name: String, values: Vec<f64>| f.push((name, values));
    add("start convergence (s)".into(), reports.iter().filter_map(|r| r.initial_convergence_s).collect());
    for (i, e) in reports[0].events.iter().enumerate() {
        let figure = |get: fn(&report::EventFigure) -> Option<f64>| -> Vec<f64> {
            reports.iter().filter_map(|r| r.events.get(i).and_then(get)).collect()
        };
        let event = format!("t={:.0}s {} {}", e.t, e.action, e.detail);
        add(format!("{event}: first (s)"), figure(|e| e.first_s));
        add(format!("{event}: all (s)"), figure(|e| e.all_s));
        add(format!("{event}: all of its region (s)"), figure(|e| e.all_in_region_s));
        add(format!("{event}: gateway replaced (s)"), figure(|e| e.gateway_replaced_s));
        add(format!("{event}: sessions moved (%)"), figure(|e| e.sessions_moved.map(|m| m * 100.0)));
        add(format!("{event}: sessions moved, ideal (%)"), figure(|e| e.sessions_moved_ideal.map(|m| m * 100.0)));
    }
    add("false positives".into(), reports.iter().map(|r| r.false_positives as f64).collect());
    add(
        "false positive (observer, subject) pairs".into(),
        reports.iter().map(|r| r.false_positive_pairs as f64).collect(),
    );
    for region in reports[0].ring_agreement_min.keys() {
        add(
            format!("ring agreement in {region}, lowest (%)"),
            reports.iter().filter_map(|r| r.ring_agreement_min.get(region)).map(|v| v * 100.0).collect(),
        );
    }
    add("bytes per node per second".into(), reports.iter().map(|r| r.bytes_per_node_s).collect());
    add("datagrams per node per second".into(), reports.iter().map(|r| r.datagrams_per_node_s).collect());
    add(
        "idle bytes per node per second, with IP/UDP headers".into(),
        reports.iter().filter_map(|r| r.idle_wire_bytes_per_node_s).collect(),
    );
    add("wall time (s)".into(), reports.iter().map(|r| r.wall_s).collect());
    f.retain(|(_, v)| !v.is_empty());
    f
}

/// Medians and ranges over runs, printed and as `runs.json` beside the runs' directories:
/// chitchat picks gossip peers with an RNG we cannot seed, so runs with different seeds
/// differ in detail.
fn spreads(reports: &[report::Report], out: &std::path::Path) -> String {
    use std::fmt::Write as _;
    let mut text = String::new();
    let _ = writeln!(text, "over {} runs (median, range):", reports.len());
    let mut json = serde_json::Map::new();
    for (name, mut v) in figures(reports) {
        v.sort_by(f64::total_cmp);
        let median = v[v.len() / 2];
        let _ = writeln!(text, "  {name}: {median:.2}, {:.2}-{:.2}", v[0], v[v.len() - 1]);
        json.insert(name, serde_json::json!({ "median": median, "min": v[0], "max": v[v.len() - 1], "values": v }));
    }
    let doc = serde_json::json!({
        "scenario": reports[0].scenario,
        "seeds": reports.iter().map(|r| r.seed).collect::<Vec<_>>(),
        "figures": json,
    });
    match serde_json::to_string_pretty(&doc) {
        Ok(s) if std::fs::write(out.join("runs.json"), &s).is_ok() => {
            let _ = writeln!(text, "wrote {}", out.join("runs.json").display());
        }
        _ => {
            let _ = writeln!(text, "could not write {}", out.join("runs.json").display());
        }
    }
    text
}

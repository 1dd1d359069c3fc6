//! Scenario files: regions and their sizes, the network (latency, jitter, loss), gossip
//! settings, and a timeline of faults.

use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    /// What a user learns from it.
    #[serde(default)]
    pub description: String,
    /// Simulated time to run.
    pub duration: String,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// The agent's gossip settings, by their configuration keys (`probe_interval = "500ms"`,
    /// `gossip_interval = "1s"`, ...); unset ones take the agent's defaults.
    #[serde(default)]
    pub settings: std::collections::BTreeMap<String, toml::Value>,
    #[serde(rename = "region")]
    pub regions: Vec<RegionSpec>,
    #[serde(default)]
    pub network: NetworkSpec,
    #[serde(default, rename = "event")]
    pub events: Vec<EventSpec>,
}

fn default_seed() -> u64 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionSpec {
    pub name: String,
    /// Nodes present from the start.
    pub nodes: usize,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// One-way latency inside a region (default 1ms).
    pub local: Option<String>,
    /// One-way latency between regions unless a pair says otherwise (default 40ms).
    pub remote: Option<String>,
    /// Jitter as a fraction of the latency, uniform in ±jitter (default 0.1).
    pub jitter: Option<f64>,
    /// Probability that a datagram is lost, on every link a pair does not set (default 0).
    pub loss: Option<f64>,
    #[serde(default, rename = "pair")]
    pub pairs: Vec<PairSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairSpec {
    pub a: String,
    pub b: String,
    /// One-way latency between the two regions (a region paired with itself: inside it).
    #[serde(default)]
    pub latency: Option<String>,
    /// Loss on the links between the two regions, both ways, over `network.loss`.
    #[serde(default)]
    pub loss: Option<f64>,
}

/// One fault or change on the timeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSpec {
    pub at: String,
    /// `crash`, `restart`, `leave`, `join`, `partition`, `heal`, `loss`, `unhealthy`, `healthy`.
    pub action: String,
    /// A node id (`crash`, `restart`, `leave`, `unhealthy`, `healthy`), such as `us-east-3`.
    #[serde(default)]
    pub node: Option<String>,
    /// Region for `join` (new nodes) and `crash` of a whole region.
    #[serde(default)]
    pub region: Option<String>,
    /// How many nodes `join` adds.
    #[serde(default)]
    pub count: Option<usize>,
    /// `partition` and `loss`: the two sides, each a list of region names and node ids
    /// (`[["us-east"], ["us-west", "eu-central-2"]]`).
    #[serde(default)]
    pub between: Option<(Vec<String>, Vec<String>)>,
    /// `partition`, `loss`: only traffic from the first side to the second.
    #[serde(default)]
    pub one_way: bool,
    /// `loss`: the new loss rate; on the links `between` names, or else on every other link.
    #[serde(default)]
    pub rate: Option<f64>,
}

impl Scenario {
    pub fn load(path: &std::path::Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Scenario::from_toml(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_toml(text: &str) -> anyhow::Result<Scenario> {
        let s: Scenario = toml::from_str(text).context("parsing the scenario")?;
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.regions.is_empty() {
            bail!("a scenario needs at least one [[region]]");
        }
        parse_duration("duration", &self.duration)?;
        for p in &self.network.pairs {
            if p.latency.is_none() && p.loss.is_none() {
                bail!("network.pair {} / {} sets neither latency nor loss", p.a, p.b);
            }
            if let Some(l) = &p.latency {
                parse_duration("network.pair.latency", l)?;
            }
            if p.loss.is_some_and(|r| !(0.0..=1.0).contains(&r)) {
                bail!("network.pair {} / {}: loss must be from 0 to 1", p.a, p.b);
            }
        }
        for e in &self.events {
            parse_duration("event.at", &e.at)?;
            match e.action.as_str() {
                "crash" | "restart" | "leave" | "unhealthy" | "healthy" => {
                    if e.node.is_none() && !(e.action == "crash" && e.region.is_some()) {
                        bail!("event {} at {} needs node = \"REGION-N\"", e.action, e.at);
                    }
                }
                "join" => {
                    if e.region.is_none() || e.count.is_none() {
                        bail!("event join at {} needs region and count", e.at);
                    }
                }
                "partition" => {
                    if e.between.is_none() {
                        bail!("event partition at {} needs between = [[...], [...]]", e.at);
                    }
                }
                "heal" => {}
                "loss" => {
                    if !e.rate.is_some_and(|r| (0.0..=1.0).contains(&r)) {
                        bail!("event loss at {} needs rate from 0 to 1", e.at);
                    }
                }
                other => bail!(
                    "unknown event action {other:?}: crash, restart, leave, join, partition, heal, loss, unhealthy, healthy"
                ),
            }
        }
        Ok(())
    }

    pub fn duration(&self) -> Duration {
        parse_duration("duration", &self.duration).unwrap_or_default()
    }
}

pub fn parse_duration(what: &str, text: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(text).with_context(|| format!("{what} = {text:?} is not a duration such as 500ms or 2m"))
}

impl Scenario {
    /// The settings as strings, the way a config file would give them to the agent.
    pub fn setting_strings(&self) -> Vec<(String, String)> {
        self.settings
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect()
    }

    /// The agent's gossip settings for this scenario.
    pub fn gossip_settings(&self) -> anyhow::Result<grapevine_agent::config::GossipSettings> {
        let mut layer = grapevine_agent::config::Layer::default();
        for (k, v) in self.setting_strings() {
            if !grapevine_agent::config::SCALAR_SETTINGS.iter().any(|(name, _)| *name == k) {
                bail!("settings.{k}: not an agent setting");
            }
            layer.set_scalar(&k, v);
        }
        layer.gossip_settings().map_err(|e| anyhow::anyhow!("settings: {e}"))
    }
}

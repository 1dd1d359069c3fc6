//! The services this agent fronts: those in its configuration and those apps registered
//! through the admin API (kept in `data_dir/services.json`, so they survive a restart), with
//! their health (checked with hysteresis), load and drain state.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::cluster::snapshot::ServiceRecord;
use crate::config::{ConfigError, ServiceConfig, ServiceLayer};

/// Where a service came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Config,
    Api,
}

#[derive(Debug, Clone)]
struct Entry {
    config: ServiceConfig,
    source: Source,
    /// As given to the API, for persisting.
    layer: Option<ServiceLayer>,
    healthy: bool,
    /// Consecutive check results in the current direction.
    passes: u32,
    failures: u32,
    /// No check result yet: the first pass makes it healthy at once.
    fresh: bool,
    load: u64,
    draining: bool,
}

/// What a health-check result changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthChange {
    Unchanged,
    BecameHealthy,
    BecameUnhealthy,
}

/// The local services; every change bumps a watch counter the publisher follows.
#[derive(Debug)]
pub struct LocalServices {
    entries: Mutex<BTreeMap<String, Entry>>,
    changed: watch::Sender<u64>,
    persist_path: Option<PathBuf>,
}

impl LocalServices {
    /// Configured services first; API registrations from `data_dir` are added unless the
    /// configuration declares the same name (the file wins).
    pub fn new(configured: Vec<ServiceConfig>, data_dir: Option<&std::path::Path>) -> anyhow::Result<LocalServices> {
        let persist_path = data_dir.map(|d| d.join("services.json"));
        let mut entries = BTreeMap::new();
        for c in configured {
            entries.insert(c.name.clone(), Entry::new(c, Source::Config, None));
        }
        if let Some(path) = &persist_path
            && path.exists()
        {
            let text = std::fs::read_to_string(path)?;
            let saved: Vec<ServiceLayer> = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{} is not a valid registration file: {e}", path.display()))?;
            for layer in saved {
                if entries.contains_key(&layer.name) {
                    continue;
                }
                match crate::config::resolve_service(layer.clone()) {
                    Ok(c) => {
                        entries.insert(c.name.clone(), Entry::new(c, Source::Api, Some(layer)));
                    }
                    Err(e) => tracing::warn!(error = %e, "ignoring a saved registration"),
                }
            }
        }
        let (changed, _) = watch::channel(0);
        Ok(LocalServices { entries: Mutex::new(entries), changed, persist_path })
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers (or replaces) a service on behalf of the app, and persists it.
    pub fn register(&self, layer: ServiceLayer) -> Result<ServiceConfig, ConfigError> {
        let config = crate::config::resolve_service(layer.clone())?;
        {
            let mut entries = self.lock();
            if entries.get(&config.name).is_some_and(|e| e.source == Source::Config) {
                return Err(ConfigError {
                    setting: "service.name".into(),
                    value: config.name.clone(),
                    allowed: "a name not already declared in this agent's configuration".into(),
                });
            }
            entries.insert(config.name.clone(), Entry::new(config.clone(), Source::Api, Some(layer)));
        }
        self.persist();
        self.notify();
        Ok(config)
    }

    /// Deregisters a service; false if there was none by that name.
    pub fn deregister(&self, name: &str) -> bool {
        let removed = self.lock().remove(name).is_some();
        if removed {
            self.persist();
            self.notify();
        }
        removed
    }

    fn persist(&self) {
        let Some(path) = &self.persist_path else { return };
        let saved: Vec<ServiceLayer> = self.lock().values().filter_map(|e| e.layer.clone()).collect();
        let text = serde_json::to_string_pretty(&saved).unwrap_or_default();
        let tmp = path.with_extension("json.tmp");
        if let Err(e) = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, path)) {
            tracing::error!(path = %path.display(), error = %e, "could not save service registrations");
        }
    }

    /// Applies one health-check result with hysteresis: `fall` failures in a row make a
    /// healthy instance unhealthy, `rise` passes in a row make it healthy again.
    pub fn record_check(&self, name: &str, passed: bool) -> HealthChange {
        let change = {
            let mut entries = self.lock();
            let Some(e) = entries.get_mut(name) else { return HealthChange::Unchanged };
            let Some(check) = e.config.check.clone() else { return HealthChange::Unchanged };
            if passed {
                e.passes += 1;
                e.failures = 0;
            } else {
                e.failures += 1;
                e.passes = 0;
            }
            let was = e.healthy;
            if passed && !was && (e.fresh || e.passes >= check.rise) {
                e.healthy = true;
            } else if !passed && was && e.failures >= check.fall {
                e.healthy = false;
            }
            e.fresh = false;
            match (was, e.healthy) {
                (false, true) => HealthChange::BecameHealthy,
                (true, false) => HealthChange::BecameUnhealthy,
                _ => HealthChange::Unchanged,
            }
        };
        if change != HealthChange::Unchanged {
            self.notify();
        }
        change
    }

    /// Sets a service's load (open connections); true if it changed.
    pub fn set_load(&self, name: &str, load: u64) -> bool {
        let changed = match self.lock().get_mut(name) {
            Some(e) if e.load != load => {
                e.load = load;
                true
            }
            _ => false,
        };
        if changed {
            self.notify();
        }
        changed
    }

    /// Marks every service draining (no new work).
    pub fn drain_all(&self) {
        for e in self.lock().values_mut() {
            e.draining = true;
        }
        self.notify();
    }

    /// The announcement of each service.
    pub fn records(&self) -> Vec<ServiceRecord> {
        self.lock().values().map(Entry::record).collect()
    }

    /// The announcement of one service (the data plane's check on every forwarded stream).
    pub fn record(&self, name: &str) -> Option<ServiceRecord> {
        self.lock().get(name).map(Entry::record)
    }

    /// The services with a health check, for the check supervisor.
    pub fn configs(&self) -> Vec<ServiceConfig> {
        self.lock().values().map(|e| e.config.clone()).collect()
    }

    pub fn get(&self, name: &str) -> Option<(ServiceConfig, Source)> {
        self.lock().get(name).map(|e| (e.config.clone(), e.source))
    }
}

impl Entry {
    fn record(&self) -> ServiceRecord {
        ServiceRecord {
            name: self.config.name.clone(),
            port: self.config.port,
            weight: self.config.weight,
            healthy: self.healthy,
            load: self.load,
            pinned: self.config.pinned_to_region,
            draining: self.draining,
        }
    }

    fn new(config: ServiceConfig, source: Source, layer: Option<ServiceLayer>) -> Entry {
        // Without a check, a registered service is healthy; with one, it waits for a pass.
        let healthy = config.check.is_none();
        Entry { config, source, layer, healthy, passes: 0, failures: 0, fresh: true, load: 0, draining: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CheckLayer;

    fn layer(name: &str, with_check: bool) -> ServiceLayer {
        ServiceLayer {
            name: name.into(),
            port: 3000,
            check: with_check.then(|| CheckLayer { http: Some("http://127.0.0.1:3000/".into()), ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn health_has_hysteresis() {
        let s = LocalServices::new(vec![], None).unwrap();
        s.register(layer("web", true)).unwrap();
        assert!(!s.records()[0].healthy, "a checked service waits for its first pass");
        assert_eq!(s.record_check("web", true), HealthChange::BecameHealthy);
        assert_eq!(s.record_check("web", false), HealthChange::Unchanged);
        assert_eq!(s.record_check("web", false), HealthChange::BecameUnhealthy);
        assert_eq!(s.record_check("web", true), HealthChange::Unchanged);
        assert_eq!(s.record_check("web", true), HealthChange::BecameHealthy);
    }

    #[test]
    fn a_registration_needs_a_name_dns_can_answer_for() {
        let s = LocalServices::new(vec![], None).unwrap();
        let e = s.register(layer("api.v2", false)).unwrap_err();
        assert_eq!((e.setting.as_str(), e.value.as_str()), ("service.name", "api.v2"));
        assert!(e.allowed.contains("one DNS label"), "{e}");
        assert!(s.records().is_empty());
    }

    #[test]
    fn registrations_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalServices::new(vec![], Some(dir.path())).unwrap();
        s.register(layer("a", false)).unwrap();
        s.register(layer("b", true)).unwrap();
        assert!(s.deregister("a"));
        assert!(!s.deregister("a"));
        let again = LocalServices::new(vec![], Some(dir.path())).unwrap();
        let names: Vec<_> = again.records().into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["b"]);
        assert_eq!(again.get("b").unwrap().1, Source::Api);
    }
}

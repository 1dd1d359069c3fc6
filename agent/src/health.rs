//! Health checks of the services this agent fronts: HTTP GET expecting a 2xx, or a TCP
//! connect, on an interval with a timeout. Results go to [`LocalServices`], which applies the
//! hysteresis and triggers a new announcement when health flips.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::config::{Check, CheckTarget};
use crate::metrics::{CheckLabel, Metrics, ServiceLabel};
use crate::services::{HealthChange, LocalServices};
#[cfg(test)]
use std::time::Duration;

/// Runs one check once.
pub async fn probe(client: &reqwest::Client, check: &Check) -> Result<(), String> {
    match &check.target {
        CheckTarget::Http(url) => {
            let resp = client.get(url).timeout(check.timeout).send().await.map_err(|e| e.to_string())?;
            if resp.status().is_success() { Ok(()) } else { Err(format!("HTTP {}", resp.status().as_u16())) }
        }
        CheckTarget::Tcp(addr) => match tokio::time::timeout(check.timeout, tokio::net::TcpStream::connect(addr)).await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no connection within {}", humantime::format_duration(check.timeout))),
        },
    }
}

/// Keeps one check task per checked service, following registrations as they change.
pub async fn supervise(services: Arc<LocalServices>, metrics: Arc<Metrics>) {
    let client = reqwest::Client::builder().no_proxy().build().unwrap_or_default();
    let mut running: BTreeMap<String, (Check, JoinHandle<()>)> = BTreeMap::new();
    let mut changes = services.subscribe();
    loop {
        let wanted: BTreeMap<String, Check> =
            services.configs().into_iter().filter_map(|c| c.check.map(|chk| (c.name, chk))).collect();
        running.retain(|name, (check, task)| {
            let keep = wanted.get(name) == Some(check);
            if !keep {
                task.abort();
            }
            keep
        });
        for (name, check) in wanted {
            if running.contains_key(&name) {
                continue;
            }
            let task =
                tokio::spawn(run_check(name.clone(), check.clone(), services.clone(), metrics.clone(), client.clone()));
            running.insert(name, (check, task));
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

async fn run_check(
    name: String,
    check: Check,
    services: Arc<LocalServices>,
    metrics: Arc<Metrics>,
    client: reqwest::Client,
) {
    let mut tick = tokio::time::interval(check.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = probe(&client, &check).await;
        let passed = result.is_ok();
        metrics
            .health_checks
            .get_or_create(&CheckLabel { service: name.clone(), result: if passed { "pass" } else { "fail" } })
            .inc();
        match services.record_check(&name, passed) {
            HealthChange::BecameHealthy => {
                tracing::info!(service = %name, "service is healthy");
                metrics.service_healthy.get_or_create(&ServiceLabel { service: name.clone() }).set(1);
            }
            HealthChange::BecameUnhealthy => {
                tracing::warn!(service = %name, reason = %result.unwrap_err(), "service is unhealthy; taken out of rotation");
                metrics.service_healthy.get_or_create(&ServiceLabel { service: name.clone() }).set(0);
            }
            HealthChange::Unchanged => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn http_and_tcp_probes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = [0u8; 1024];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let req = String::from_utf8_lossy(&buf[..n]);
                    let status = if req.starts_with("GET /ok") { "200 OK" } else { "503 Service Unavailable" };
                    let _ = s
                        .write_all(
                            format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes(),
                        )
                        .await;
                });
            }
        });
        let client = reqwest::Client::new();
        let check = |target| Check {
            target,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 1,
            fall: 1,
        };
        assert!(probe(&client, &check(CheckTarget::Http(format!("http://{addr}/ok")))).await.is_ok());
        let err = probe(&client, &check(CheckTarget::Http(format!("http://{addr}/bad")))).await.unwrap_err();
        assert!(err.contains("503"), "{err}");
        assert!(probe(&client, &check(CheckTarget::Tcp(addr.to_string()))).await.is_ok());
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert!(probe(&client, &check(CheckTarget::Tcp(closed.to_string()))).await.is_err());
    }
}

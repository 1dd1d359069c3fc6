//! The client commands (`status`, `members`, `services`, `route`, `event`, `keys`, `leave`,
//! `reload`): they ask a running agent's admin API and print a table, or the JSON document with
//! `--json`.

use std::fmt::Write as _;

use anyhow::{Context, anyhow};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use crate::api::{EndpointDoc, ErrorDoc, FireRequest, KeyOpDoc, KeyRequest, KeysDoc, ServiceDoc, StatusDoc};
use crate::cli::{ClientArgs, KeyArgs};
use crate::cluster::routing::Route;
use crate::cluster::snapshot::{MemberState, MemberView};
use crate::config::{DEFAULT_ADMIN_ADDR, Env};
use crate::dataplane::Reloaded;
use crate::membership::keyring::KeyAction;

/// A failure the user must see: printed as is, exit code 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientError(pub String);

/// Bad usage: an argument the command or the agent refused as malformed. Printed as is, exit
/// code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The agent's admin API at one address.
#[derive(Debug)]
pub struct AdminClient {
    base: String,
    /// HOST:PORT, as messages show it.
    addr: String,
    http: reqwest::Client,
}

/// `--admin-addr` (or `AGENT_ADMIN_ADDR`) as HOST:PORT: `http://` and a trailing `/` are
/// allowed, since the API is plain HTTP; anything else that is no HOST:PORT is bad usage.
pub fn parse_admin_addr(given: &str) -> Result<String, UsageError> {
    let bad = |why: &str| {
        UsageError(format!("--admin-addr / AGENT_ADMIN_ADDR {given:?}: {why}, such as {DEFAULT_ADMIN_ADDR}"))
    };
    let text = given.trim();
    if text.starts_with("https://") {
        return Err(bad("the admin API is plain HTTP (no TLS); give HOST:PORT"));
    }
    let text = text.strip_prefix("http://").unwrap_or(text);
    let text = text.strip_suffix('/').unwrap_or(text);
    if text.contains("://") || text.contains('/') {
        return Err(bad("HOST:PORT of the agent's admin API, without a scheme or a path"));
    }
    match text.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => Ok(text.to_string()),
        _ => Err(bad("HOST:PORT with a port from 1 to 65535")),
    }
}

/// The innermost cause of an error: what actually went wrong.
fn root_cause<'e>(e: &'e (dyn std::error::Error + 'static)) -> &'e (dyn std::error::Error + 'static) {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause
}

/// What a request that got an error status means: the agent's own error (a failure at run time:
/// the commands check their arguments' form before asking), or, when the body is no agent's
/// error document, a sign that no grapevine agent is listening there.
pub fn answer_error(addr: &str, request: &str, status: u16, body: &str) -> anyhow::Error {
    match serde_json::from_str::<ErrorDoc>(body) {
        Ok(e) => ClientError(format!("the agent at {addr} answered {status}: {}", e.error)).into(),
        Err(_) => not_an_agent(addr, &format!("{request} answered {status}, not with the agent's JSON")),
    }
}

fn not_an_agent(addr: &str, why: &str) -> anyhow::Error {
    ClientError(format!(
        "what answers at {addr} does not look like a grapevine agent's admin API ({why}); \
         point --admin-addr / AGENT_ADMIN_ADDR at an agent's admin_addr"
    ))
    .into()
}

impl AdminClient {
    pub fn new(args: &ClientArgs, env: &dyn Env) -> Result<AdminClient, UsageError> {
        let given = args
            .admin_addr
            .clone()
            .or_else(|| env.var("AGENT_ADMIN_ADDR"))
            .unwrap_or_else(|| DEFAULT_ADMIN_ADDR.to_string());
        let addr = parse_admin_addr(&given)?;
        let http = reqwest::Client::builder().no_proxy().build().unwrap_or_default();
        Ok(AdminClient { base: format!("http://{addr}"), addr, http })
    }

    /// Why a request got no answer: nothing listening, a name that does not resolve, a timeout,
    /// or something there that is no HTTP server.
    async fn unreachable(&self, e: &reqwest::Error) -> anyhow::Error {
        let cause = root_cause(e);
        let refused =
            cause.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused);
        let why = if e.is_timeout() {
            "timed out".to_string()
        } else if refused {
            "connection refused".to_string()
        } else if e.is_connect() {
            let host = self.addr.rsplit_once(':').map_or(self.addr.as_str(), |(h, _)| h);
            let is_ip = host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok();
            match tokio::net::lookup_host(&self.addr).await {
                Err(e) if !is_ip => format!("{host} does not resolve: {e}"),
                _ => cause.to_string(),
            }
        } else {
            return not_an_agent(&self.addr, &format!("it does not speak HTTP: {cause}"));
        };
        ClientError(format!(
            "could not reach the agent's admin API at {} ({why}).\n\
             Start an agent with `agent run --dev` (or `agent run --config agent.toml`), \
             or point --admin-addr / AGENT_ADMIN_ADDR at a running one.",
            self.addr
        ))
        .into()
    }

    async fn send(&self, request: &str, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return Err(self.unreachable(&e).await),
        };
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        Err(answer_error(&self.addr, request, status, &text))
    }

    /// The answer's JSON document; an answer that is no JSON means no agent answered.
    async fn document<T: DeserializeOwned>(&self, request: &str, resp: reqwest::Response) -> anyhow::Result<T> {
        let json = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| self.not_answered(request, &e))?;
        match serde_json::from_slice(&bytes) {
            Ok(doc) => Ok(doc),
            Err(e) if json => Err(ClientError(format!(
                "the agent at {} answered {request} with JSON this command does not understand \
                 (an agent of another version?): {e}",
                self.addr
            ))
            .into()),
            Err(_) => Err(not_an_agent(&self.addr, &format!("{request} answered {status}, not with JSON"))),
        }
    }

    fn not_answered(&self, request: &str, e: &reqwest::Error) -> anyhow::Error {
        ClientError(format!("the agent at {} stopped answering {request}: {}", self.addr, root_cause(e))).into()
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let request = format!("GET {path}");
        let resp = self.send(&request, self.http.get(format!("{}{path}", self.base))).await?;
        self.document(&request, resp).await
    }

    pub async fn post<T: DeserializeOwned>(&self, path: &str, body: &impl serde::Serialize) -> anyhow::Result<T> {
        let request = format!("POST {path}");
        let resp = self.send(&request, self.http.post(format!("{}{path}", self.base)).json(body)).await?;
        self.document(&request, resp).await
    }
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Left-aligned columns separated by two spaces.
pub fn table(rows: &[Vec<String>], indent: &str) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::from(indent);
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn rtt(m: &MemberView) -> String {
    m.rtt_ms.map(|r| format!("{r:.1}ms")).unwrap_or_else(|| "-".into())
}

/// `agent status`.
pub fn render_status(s: &StatusDoc) -> String {
    let mut out = String::new();
    let n = &s.node;
    let _ = writeln!(
        out,
        "node {}  region {}  zone {}  cluster {}  role {}  version {}",
        n.id, n.region, n.zone, n.cluster, n.role, n.version
    );
    let c = &s.cluster;
    let _ = writeln!(
        out,
        "members {}: {} alive, {} suspect, {} dead, {} left, {} unreachable; regions: {}",
        c.members,
        c.alive,
        c.suspect,
        c.dead,
        c.left,
        c.unreachable,
        c.regions.join(", ")
    );
    for region in &c.regions {
        match c.region_info.get(region) {
            Some(info) => {
                let gateways =
                    if info.gateways.is_empty() { "none known".to_string() } else { info.gateways.join(", ") };
                let mut in_region = s.members.iter().filter(|m| &m.region == region).peekable();
                let gone = in_region.peek().is_some()
                    && in_region.all(|m| matches!(m.state, MemberState::Left | MemberState::Dead));
                let reach = if region == &n.region {
                    "this region"
                } else if gone {
                    // Nobody is left to be heard from: that is not a cut.
                    "every member left or dead"
                } else if info.reachable {
                    "reachable"
                } else {
                    "UNREACHABLE"
                };
                let _ = writeln!(out, "\nregion {region}  ({reach}; gateways: {gateways})");
            }
            None => {
                let _ = writeln!(out, "\nregion {region}");
            }
        }
        let mut rows = vec![["ID", "ZONE", "GOSSIP", "STATE", "SERVICES", "LOAD", "RTT"].map(String::from).to_vec()];
        for m in s.members.iter().filter(|m| &m.region == region) {
            let me = if m.id == n.id { " *" } else { "" };
            let services: Vec<String> = m
                .services
                .iter()
                .map(|i| {
                    if i.draining || m.draining {
                        format!("{}(draining)", i.name)
                    } else if i.healthy {
                        i.name.clone()
                    } else {
                        format!("{}(unhealthy)", i.name)
                    }
                })
                .collect();
            let load: u64 = m.services.iter().map(|i| i.load).sum();
            rows.push(vec![
                format!("{}{me}", m.id),
                m.zone.clone(),
                m.gossip_addr.to_string(),
                m.state.as_str().to_string(),
                if services.is_empty() { "-".into() } else { services.join(",") },
                load.to_string(),
                rtt(m),
            ]);
        }
        out.push_str(&table(&rows, "  "));
    }
    if !s.services.is_empty() {
        let _ = writeln!(out, "\nservices");
        let mut rows = vec![["NAME", "HEALTHY", "BY REGION", "PINNED"].map(String::from).to_vec()];
        for svc in &s.services {
            let by: Vec<String> = svc.healthy_by_region.iter().map(|(r, n)| format!("{r} {n}")).collect();
            rows.push(vec![
                svc.name.clone(),
                format!("{}/{}", svc.healthy, svc.instances),
                if by.is_empty() { "-".into() } else { by.join(", ") },
                if svc.pinned { "yes".into() } else { "no".into() },
            ]);
        }
        out.push_str(&table(&rows, "  "));
    }
    out
}

pub fn render_members(members: &[MemberView]) -> String {
    let mut rows = vec![["ID", "REGION", "ZONE", "GOSSIP", "DATA", "STATE", "GEN", "RTT"].map(String::from).to_vec()];
    for m in members {
        rows.push(vec![
            m.id.clone(),
            m.region.clone(),
            m.zone.clone(),
            m.gossip_addr.to_string(),
            m.data_addr.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
            m.state.as_str().into(),
            m.generation.to_string(),
            rtt(m),
        ]);
    }
    table(&rows, "")
}

/// An instance's health as the tables show it.
fn health_label(e: &EndpointDoc) -> &'static str {
    if e.draining {
        "draining"
    } else if e.healthy {
        "healthy"
    } else {
        "unhealthy"
    }
}

pub fn render_services(services: &[ServiceDoc]) -> String {
    let mut rows = vec![
        ["SERVICE", "NODE", "REGION", "ZONE", "STATE", "HEALTH", "LOAD", "WEIGHT", "PORT"].map(String::from).to_vec(),
    ];
    for s in services {
        for e in &s.endpoints {
            let health = health_label(e);
            rows.push(vec![
                s.name.clone(),
                e.node.clone(),
                e.region.clone(),
                e.zone.clone(),
                e.state.as_str().into(),
                health.into(),
                e.load.to_string(),
                e.weight.to_string(),
                e.port.to_string(),
            ]);
        }
    }
    table(&rows, "")
}

pub fn render_route(r: &Route) -> String {
    let mut out = String::new();
    let key = r.key.as_deref().map(|k| format!(" key {k:?}")).unwrap_or_else(|| " (no key: less loaded of two)".into());
    let pinned = if r.pinned { ", pinned to its region" } else { "" };
    let _ = writeln!(out, "{}{key} from {}; regions in order: {}{pinned}", r.service, r.from, r.regions.join(" → "));
    let mut rows = Vec::new();
    match &r.chosen {
        Some(t) => rows.push(vec![
            "chosen".into(),
            t.node.clone(),
            t.region.clone(),
            t.zone.clone(),
            format!("load {}", t.load),
        ]),
        None => rows.push(vec!["chosen".into(), "none: no instance may take this request".into()]),
    }
    for t in &r.failover {
        rows.push(vec![
            "failover".into(),
            t.node.clone(),
            t.region.clone(),
            t.zone.clone(),
            format!("load {}", t.load),
        ]);
    }
    for row in rows.iter_mut().filter(|row| row.len() > 2 && r.ejected.contains(&row[1])) {
        row.push("ejected here: tried after the others".into());
    }
    out.push_str(&table(&rows, "  "));
    out
}

/// Every instance of the service by region, in the route's region order: where it stands and
/// whether this route may use it.
pub fn render_instances(r: &Route, doc: &ServiceDoc) -> String {
    let in_route: Vec<&str> = r.chosen.iter().chain(&r.failover).map(|t| t.node.as_str()).collect();
    let rank = |region: &str| r.regions.iter().position(|x| x == region).unwrap_or(usize::MAX);
    let mut endpoints: Vec<_> = doc.endpoints.iter().collect();
    endpoints.sort_by(|a, b| (rank(&a.region), &a.region, &a.node).cmp(&(rank(&b.region), &b.region, &b.node)));
    let mut rows = vec![["REGION", "NODE", "STATE", "HEALTH", "LOAD", "ROUTE"].map(String::from).to_vec()];
    for e in endpoints {
        let health = health_label(e);
        let route = if r.ejected.contains(&e.node) {
            "yes, but ejected here for now (it failed): tried after the others"
        } else if in_route.contains(&e.node.as_str()) {
            "yes"
        } else if rank(&e.region) == usize::MAX {
            "no (region not considered)"
        } else if e.data_addr.is_none() && e.healthy && !e.draining && e.state.is_up() {
            "no (its agent has no data plane)"
        } else {
            "no"
        };
        rows.push(vec![
            e.region.clone(),
            e.node.clone(),
            e.state.as_str().to_string(),
            health.to_string(),
            e.load.to_string(),
            route.to_string(),
        ]);
    }
    format!("instances of {} by region, nearest first:\n{}", r.service, table(&rows, "  "))
}

pub async fn status(args: &ClientArgs, env: &dyn Env) -> anyhow::Result<()> {
    let doc: StatusDoc = AdminClient::new(args, env)?.get("/v1/status").await?;
    if args.json {
        print_json(&doc)
    } else {
        print!("{}", render_status(&doc))
    }
    Ok(())
}

pub async fn members(args: &ClientArgs, env: &dyn Env) -> anyhow::Result<()> {
    let doc: Vec<MemberView> = AdminClient::new(args, env)?.get("/v1/members").await?;
    if args.json {
        print_json(&doc)
    } else {
        print!("{}", render_members(&doc))
    }
    Ok(())
}

pub async fn services(args: &ClientArgs, env: &dyn Env) -> anyhow::Result<()> {
    let doc: Vec<ServiceDoc> = AdminClient::new(args, env)?.get("/v1/services").await?;
    if args.json {
        print_json(&doc)
    } else {
        print!("{}", render_services(&doc))
    }
    Ok(())
}

pub async fn route(service: &str, key: Option<&str>, args: &ClientArgs, env: &dyn Env) -> anyhow::Result<()> {
    let mut path = format!("/v1/route/{}", urlencode(service));
    if let Some(k) = key {
        path.push_str(&format!("?key={}", urlencode(k)));
    }
    let client = AdminClient::new(args, env)?;
    let doc: Route = client.get(&path).await?;
    if args.json {
        print_json(&doc)
    } else {
        print!("{}", render_route(&doc));
        let instances: ServiceDoc = client.get(&format!("/v1/services/{}", urlencode(service))).await?;
        print!("{}", render_instances(&doc, &instances));
    }
    Ok(())
}

pub async fn fire(name: &str, payload: Option<&str>, args: &ClientArgs, env: &dyn Env) -> anyhow::Result<()> {
    crate::events::check_event_name(name).map_err(|e| UsageError(e.to_string()))?;
    let req = FireRequest { name: name.to_string(), payload: payload.map(str::to_string) };
    let doc: serde_json::Value = AdminClient::new(args, env)?.post("/v1/events", &req).await?;
    if args.json {
        print_json(&doc)
    } else {
        println!("fired event {name} ({})", doc["id"].as_str().unwrap_or("?"));
    }
    Ok(())
}

/// Prints each event as one JSON line until the agent goes away.
pub async fn watch(name: Option<&str>, args: &ClientArgs, env: &dyn Env) -> anyhow::Result<()> {
    let client = AdminClient::new(args, env)?;
    let mut url = format!("{}/v1/events", client.base);
    if let Some(n) = name {
        url.push_str(&format!("?name={}", urlencode(n)));
    }
    let resp = client.send("GET /v1/events", client.http.get(&url)).await?;
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    while let Some(chunk) = stream.next().await {
        // The agent stopped (it left, or was killed) without ending the stream cleanly.
        let chunk =
            chunk.map_err(|_| anyhow!("the agent at {} closed the event stream: it left or stopped", client.addr))?;
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            let mut kind = "message";
            let mut data = String::new();
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    kind = if v.trim() == "lagged" { "lagged" } else { "event" };
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if kind == "lagged" {
                eprintln!("warning: this watcher fell behind and missed {data} events");
            } else if !data.is_empty() {
                println!("{data}");
            }
        }
    }
    Err(ClientError(format!("the agent at {} closed the event stream", client.addr)).into())
}

/// `agent keys list`.
pub async fn keys_list(args: &ClientArgs, env: &dyn Env) -> anyhow::Result<()> {
    let doc: KeysDoc = AdminClient::new(args, env)?.get("/v1/keys").await?;
    if args.json {
        print_json(&doc)
    } else {
        print!("{}", render_keys(&doc));
    }
    Ok(())
}

pub fn render_keys(doc: &KeysDoc) -> String {
    let reporting = doc.members - doc.not_reporting.len();
    let mut rows = vec![vec!["KEY".into(), "INSTALLED".into(), "PRIMARY".into(), "HERE".into(), "MISSING ON".into()]];
    for k in &doc.keys {
        rows.push(vec![
            k.fingerprint.clone(),
            format!("{}/{reporting}", k.installed),
            format!("{}/{reporting}", k.primary),
            k.here.clone().unwrap_or_else(|| "-".into()),
            if k.missing_on.is_empty() { "-".into() } else { k.missing_on.join(",") },
        ]);
    }
    let mut out = table(&rows, "");
    if !doc.not_reporting.is_empty() {
        let _ =
            writeln!(out, "not reporting a keyring (unreachable, or an older agent): {}", doc.not_reporting.join(", "));
    }
    if !doc.unsaved.is_empty() {
        let _ = writeln!(
            out,
            "could not write their keyring file (a restart brings back the old keys): {}",
            doc.unsaved.join(", ")
        );
    }
    out
}

/// `agent keys install|use|remove`.
pub async fn keys_change(
    action: KeyAction,
    key: &KeyArgs,
    env: &dyn Env,
    stdin: &mut dyn std::io::BufRead,
) -> anyhow::Result<()> {
    let text = if key.key == "-" {
        if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            eprint!("key (base64, as `agent keygen` prints it): ");
        }
        let mut line = String::new();
        stdin.read_line(&mut line).context("reading the key from standard input")?;
        line.trim().to_string()
    } else {
        key.key.clone()
    };
    // A malformed key is bad usage, found before asking the agent (which checks it again).
    crate::keys::key_argument(action, &text).map_err(|e| UsageError(e.to_string()))?;
    let req = KeyRequest {
        action,
        key: text,
        force: key.force,
        wait_ms: Some(u64::try_from(key.wait.as_millis()).unwrap_or(u64::MAX)),
    };
    let started = tokio::time::Instant::now();
    let doc: KeyOpDoc = AdminClient::new(&key.client, env)?.post("/v1/keys", &req).await?;
    if key.client.json {
        print_json(&doc);
    }
    let (verb, fp) = (render_action(action), &doc.fingerprint);
    if !doc.unsaved.is_empty() {
        eprintln!(
            "warning: {} could not write their keyring file; a restart brings back the keys in it \
             (update those files before restarting them)",
            doc.unsaved.join(", ")
        );
    }
    if doc.pending.is_empty() {
        if !key.client.json {
            println!("{verb} key {fp} on {} of {} members", doc.done.len(), doc.members);
        }
        return Ok(());
    }
    let waited = std::time::Duration::from_secs(started.elapsed().as_secs());
    Err(ClientError(format!(
        "{verb} key {fp} on {} of {} members after {}; not yet on: {} (`agent keys list` shows where things stand)",
        doc.done.len(),
        doc.members,
        humantime::format_duration(waited),
        doc.pending.join(", ")
    ))
    .into())
}

fn render_action(action: KeyAction) -> &'static str {
    match action {
        KeyAction::Install => "installed",
        KeyAction::Use => "now sealing with",
        KeyAction::Remove => "removed",
    }
}

pub async fn leave(args: &ClientArgs, env: &dyn Env) -> anyhow::Result<()> {
    let client = AdminClient::new(args, env)?;
    let _: serde_json::Value = client.post("/v1/leave", &serde_json::json!({})).await?;
    println!("the agent at {} is leaving the cluster", client.addr);
    Ok(())
}

/// `agent reload`.
pub async fn reload(args: &ClientArgs, env: &dyn Env) -> anyhow::Result<()> {
    let client = AdminClient::new(args, env)?;
    let done: Reloaded = client.post("/v1/reload", &serde_json::json!({})).await?;
    if args.json {
        print_json(&done);
        return Ok(());
    }
    let cas = if done.cas == 1 { "1 CA".to_string() } else { format!("{} CAs", done.cas) };
    let closed = match done.closed {
        0 => String::new(),
        1 => "; closed 1 connection whose peer's certificate it no longer trusts".into(),
        n => format!("; closed {n} connections whose peers' certificates it no longer trusts"),
    };
    let until = done
        .not_after
        .and_then(|s| u64::try_from(s).ok())
        .map(|s| {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(s);
            format!("; its certificate is good until {}", &humantime::format_rfc3339_seconds(at).to_string()[..10])
        })
        .unwrap_or_default();
    println!("the agent at {} reloaded its certificates: it trusts {cas}{closed}{until}", client.addr);
    Ok(())
}

/// Percent-encodes a path segment or query value.
fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::cluster::routing::Target;

    #[test]
    fn a_route_lists_every_instance_by_region_nearest_first() {
        let t = |node: &str, region: &str| Target {
            node: node.into(),
            region: region.into(),
            zone: "z".into(),
            healthy: true,
            load: 1,
        };
        let route = Route {
            service: "web".into(),
            key: Some("alice".into()),
            from: "east-1".into(),
            pinned: false,
            chosen: Some(t("east-2", "us-east")),
            failover: vec![t("west-1", "us-west")],
            regions: vec!["us-east".into(), "us-west".into()],
            ejected: vec!["west-1".into()],
        };
        let e = |node: &str, region: &str, healthy: bool, draining: bool| {
            serde_json::json!({"node": node, "region": region, "zone": "z", "state": "alive", "healthy": healthy,
                "draining": draining, "load": 3, "weight": 100, "port": 80, "data_addr": null})
        };
        let doc: ServiceDoc = serde_json::from_value(serde_json::json!({
            "name": "web", "instances": 4, "healthy": 2, "pinned": false,
            "endpoints": [e("west-1", "us-west", true, false), e("east-1", "us-east", false, false),
                          e("east-2", "us-east", true, false), e("west-2", "us-west", true, true)]
        }))
        .unwrap();
        let text = render_instances(&route, &doc);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "instances of web by region, nearest first:");
        let rows: Vec<Vec<&str>> = lines[2..].iter().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(rows[0], ["us-east", "east-1", "alive", "unhealthy", "3", "no"]);
        assert_eq!(rows[1], ["us-east", "east-2", "alive", "healthy", "3", "yes"]);
        assert_eq!(rows[2][..6], ["us-west", "west-1", "alive", "healthy", "3", "yes,"]);
        assert!(lines[4].contains("ejected here for now"), "{text}");
        assert_eq!(rows[3], ["us-west", "west-2", "alive", "draining", "3", "no"]);
        assert!(render_route(&route).lines().any(|l| l.contains("west-1") && l.contains("ejected here")));
    }

    #[test]
    fn the_keys_table_counts_over_the_members_that_report() {
        let doc: KeysDoc = serde_json::from_value(serde_json::json!({
            "members": 3,
            "keys": [
                {"fingerprint": "00aa00aa00aa00aa", "installed": 2, "primary": 1, "here": "primary"},
                {"fingerprint": "11bb11bb11bb11bb", "installed": 1, "primary": 1, "here": null, "missing_on": ["a"]}
            ],
            "not_reporting": ["c"],
            "unsaved": ["b"]
        }))
        .unwrap();
        let text = render_keys(&doc);
        let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(lines[0], ["KEY", "INSTALLED", "PRIMARY", "HERE", "MISSING", "ON"]);
        assert_eq!(lines[1], ["00aa00aa00aa00aa", "2/2", "1/2", "primary", "-"]);
        assert_eq!(lines[2], ["11bb11bb11bb11bb", "1/2", "1/2", "-", "a"]);
        assert!(text.contains("older agent): c\n"), "{text}");
        assert!(text.contains("old keys): b\n"), "{text}");
    }

    #[test]
    fn admin_addresses_are_host_and_port_with_an_optional_http_scheme() {
        for (given, addr) in [
            ("127.0.0.1:7070", "127.0.0.1:7070"),
            ("http://127.0.0.1:7070", "127.0.0.1:7070"),
            ("http://localhost:7070/", "localhost:7070"),
            ("[::1]:7070", "[::1]:7070"),
            (" agent.local:1 ", "agent.local:1"),
        ] {
            assert_eq!(parse_admin_addr(given).map_err(|e| e.to_string()).as_deref(), Ok(addr), "{given}");
        }
        for (given, why) in [
            ("https://127.0.0.1:7070", "plain HTTP"),
            ("127.0.0.1", "with a port"),
            ("127.0.0.1:0", "with a port"),
            ("127.0.0.1:70000", "with a port"),
            (":7070", "with a port"),
            ("http://127.0.0.1:7070/v1", "without a scheme or a path"),
            ("ftp://x:1", "without a scheme or a path"),
        ] {
            let e = parse_admin_addr(given).unwrap_err().to_string();
            assert!(e.contains(&format!("{given:?}")) && e.contains(why), "{given}: {e}");
        }
    }

    #[test]
    fn an_error_answer_is_the_agents_or_a_sign_of_something_else_there() {
        let e = answer_error("a:1", "GET /v1/route/x", 404, &serde_json::json!({"error": "no service"}).to_string());
        assert!(e.downcast_ref::<ClientError>().is_some(), "{e}");
        assert_eq!(e.to_string(), "the agent at a:1 answered 404: no service");
        let e = answer_error("a:1", "GET /v1/status", 404, "<html>Not Found</html>");
        assert!(e.to_string().contains("a:1 does not look like a grapevine agent"), "{e}");
    }

    #[tokio::test]
    async fn malformed_arguments_are_bad_usage_before_the_agent_is_asked() {
        // Nothing listens on port 9 of 127.0.0.1; a check that asked the agent would fail to
        // reach it instead.
        let client = ClientArgs { admin_addr: Some("127.0.0.1:9".into()), json: false };
        let key =
            |k: &str| KeyArgs { key: k.into(), force: false, wait: std::time::Duration::ZERO, client: client.clone() };
        let env = BTreeMap::new();
        for (action, k, why) in [
            (KeyAction::Install, "notakey", "neither a key"),
            (KeyAction::Install, "0123456789abcdef", "install needs the key itself"),
            (KeyAction::Remove, "0123", "neither a key"),
        ] {
            let e = keys_change(action, &key(k), &env, &mut std::io::empty()).await.unwrap_err();
            assert!(e.downcast_ref::<UsageError>().is_some() && e.to_string().contains(why), "{k}: {e}");
        }
        let e = fire("bad name", None, &client, &env).await.unwrap_err();
        assert!(e.downcast_ref::<UsageError>().is_some() && e.to_string().contains("invalid event name"), "{e}");
        let e = fire("_agent", None, &client, &env).await.unwrap_err();
        assert!(e.downcast_ref::<UsageError>().is_some(), "{e}");
        let e = keys_change(KeyAction::Remove, &key("0123456789abcdef"), &env, &mut std::io::empty()).await;
        assert!(e.unwrap_err().to_string().contains("could not reach"), "a well-formed fingerprint is sent");
    }

    #[tokio::test]
    async fn an_answer_that_is_no_json_is_not_from_an_agent() {
        let args = ClientArgs { admin_addr: Some("127.0.0.1:9".into()), json: false };
        let client = AdminClient::new(&args, &BTreeMap::new()).unwrap();
        let html =
            axum::http::Response::builder().header("content-type", "text/html").body("<html>hello</html>").unwrap();
        let e = client.document::<StatusDoc>("GET /v1/status", html.into()).await.unwrap_err().to_string();
        assert!(e.contains("127.0.0.1:9 does not look like a grapevine agent"), "{e}");
        assert!(e.contains("GET /v1/status answered 200, not with JSON"), "{e}");
        let json = axum::http::Response::builder()
            .header("content-type", "application/json")
            .body(r#"{"something": "else"}"#)
            .unwrap();
        let e = client.document::<StatusDoc>("GET /v1/status", json.into()).await.unwrap_err().to_string();
        assert!(e.contains("JSON this command does not understand"), "{e}");
    }

    #[test]
    fn tables_align() {
        let t = table(&[vec!["A".into(), "BB".into(), "C".into()], vec!["aaa".into(), "b".into(), "c".into()]], "  ");
        assert_eq!(t, "  A    BB  C\n  aaa  b   c\n");
        assert_eq!(urlencode("a b/ü"), "a%20b%2F%C3%BC");
    }
}

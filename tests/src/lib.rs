//! The harness for end-to-end tests: real `agent` processes on 127.0.0.1, each with its own
//! data dir under one temporary directory, killed when dropped.
//!
//! Agents bind port 0 and log JSON; the harness reads the "agent ready" line for the addresses
//! they actually bound, so tests never race for free ports.
//!
//! Wall-clock time is right here (these are real processes, not paused-clock tests), so the
//! workspace ban on `std::time::Instant::now` is lifted for this crate.
#![allow(clippy::disallowed_methods)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `agent` binary built by `cargo build -p grapevine-agent` (what `make test` does first),
/// or the one named by `GRAPEVINE_AGENT_BIN`.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GRAPEVINE_AGENT_BIN") {
        return PathBuf::from(p);
    }
    // The test binary lives in target/<profile>/deps/; the agent in target/<profile>/.
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe.parent().and_then(Path::parent).map(|d| d.join("agent")).expect("target dir");
    assert!(bin.exists(), "{} is missing: run `cargo build -p grapevine-agent` first (make test does)", bin.display());
    bin
}

/// Makes the child get SIGKILL when the thread that started it exits, so that a test killed by
/// nextest's timeout (whose `Drop`s never run) leaves no agent behind.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the parent;
    // it is the only call made between fork and exec.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Polls `cond` every 100 ms until it holds or `within` passes; panics with `what` on timeout.
pub fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        if start.elapsed() > within {
            panic!("timed out after {within:?} waiting until {what}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Options for one agent.
#[derive(Debug, Clone)]
pub struct AgentOpts {
    pub node_id: String,
    pub region: String,
    pub join: Vec<SocketAddr>,
    pub services: Vec<String>,
    pub extra: Vec<String>,
    pub key_file: Option<PathBuf>,
    /// Another CA directory (for a peer the cluster must refuse).
    pub pki: Option<PathBuf>,
}

impl AgentOpts {
    pub fn new(node_id: &str, region: &str) -> AgentOpts {
        AgentOpts {
            node_id: node_id.into(),
            region: region.into(),
            join: vec![],
            services: vec![],
            extra: vec![],
            key_file: None,
            pki: None,
        }
    }

    pub fn join(mut self, seed: SocketAddr) -> Self {
        self.join.push(seed);
        self
    }

    pub fn service(mut self, spec: &str) -> Self {
        self.services.push(spec.into());
        self
    }

    pub fn arg(mut self, a: &str) -> Self {
        self.extra.push(a.into());
        self
    }

    pub fn args(mut self, a: &[&str]) -> Self {
        self.extra.extend(a.iter().map(|s| s.to_string()));
        self
    }
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    pub id: String,
    pub admin: SocketAddr,
    pub gossip: SocketAddr,
    /// DNS, UDP and TCP on the same port.
    pub dns: SocketAddr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    opts: AgentOpts,
    child: Option<Child>,
}

/// A temporary directory with a cluster key, holding agents' data dirs and logs.
#[derive(Debug)]
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub key_file: PathBuf,
    /// The cluster CA (`agent ca init`); each agent gets a certificate from it.
    pub pki: PathBuf,
    /// Gossip interval for every agent: short, so tests run in seconds.
    pub gossip_interval: String,
}

impl Cluster {
    pub fn new() -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let key_file = dir.path().join("cluster.key");
        let key = Command::new(agent_bin()).arg("keygen").output().expect("agent keygen");
        assert!(key.status.success());
        std::fs::write(&key_file, &key.stdout).expect("write key");
        let pki = dir.path().join("pki");
        let out = Command::new(agent_bin()).args(["ca", "init", "--out"]).arg(&pki).output().expect("agent ca init");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Cluster { dir, key_file, pki, gossip_interval: "200ms".into() }
    }

    /// Starts an agent and waits until it reports ready.
    pub fn start(&self, opts: AgentOpts) -> Agent {
        let data_dir = self.dir.path().join(&opts.node_id);
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let log = self.dir.path().join(format!("{}.log", opts.node_id));
        let pki = opts.pki.clone().unwrap_or_else(|| self.pki.clone());
        let cert = pki.join(format!("{}.pem", opts.node_id));
        if !cert.exists() {
            let out = Command::new(agent_bin())
                .args(["cert", "issue", "--node", &opts.node_id, "--ca"])
                .arg(&pki)
                .arg("--out")
                .arg(&pki)
                .output()
                .expect("agent cert issue");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        let mut cmd = Command::new(agent_bin());
        cmd.args(["run", "--log-format", "json", "--log-level", "info"])
            .args(["--node-id", &opts.node_id, "--region", &opts.region])
            .args(["--gossip-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--dns-addr", "127.0.0.1:0"])
            .args(["--gossip-interval", &self.gossip_interval])
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--cluster-key-file")
            .arg(opts.key_file.as_ref().unwrap_or(&self.key_file))
            .args(["--data-addr", "127.0.0.1:0", "--ca-file"])
            .arg(pki.join("ca.pem"))
            .arg("--cert-file")
            .arg(&cert)
            .arg("--key-file")
            .arg(pki.join(format!("{}.key", opts.node_id)));
        for j in &opts.join {
            cmd.args(["--join", &j.to_string()]);
        }
        for s in &opts.services {
            cmd.args(["--service", s]);
        }
        cmd.args(&opts.extra);
        cmd.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().expect("spawn agent");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel::<Value>();
        let log_path = log.clone();
        // Copy every log line to the agent's log file; hand the "agent ready" line over.
        thread::spawn(move || {
            let mut file = std::fs::File::create(&log_path).expect("log file");
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(file, "{line}");
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["message"] == "agent ready"
                {
                    let _ = tx.send(v);
                }
            }
        });
        let ready = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(v) => v,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "agent {} did not become ready; log:\n{}",
                    opts.node_id,
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let addr = |k: &str| ready[k].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{k} in {ready}"));
        Agent {
            id: opts.node_id.clone(),
            admin: addr("admin_addr"),
            gossip: addr("gossip_advertise"),
            dns: addr("dns_addr"),
            data_dir,
            log,
            opts,
            child: Some(child),
        }
    }

    /// Starts `n` agents named `{prefix}{i}` in `region`, each joining the first.
    pub fn start_many(&self, prefix: &str, region: &str, n: usize, seed: Option<SocketAddr>) -> Vec<Agent> {
        let mut agents: Vec<Agent> = Vec::new();
        for i in 1..=n {
            let mut opts = AgentOpts::new(&format!("{prefix}{i}"), region);
            if let Some(s) = seed.or_else(|| agents.first().map(|a| a.gossip)) {
                opts = opts.join(s);
            }
            agents.push(self.start(opts));
        }
        agents
    }

    /// Runs `agent ARGS` to completion.
    pub fn agent_cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new(agent_bin())
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .output()
            .expect("run agent")
    }
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster::new()
    }
}

impl Agent {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// GET an admin API path as JSON.
    pub fn get(&self, path: &str) -> Value {
        let mut resp = ureq::get(&self.url(path)).call().unwrap_or_else(|e| panic!("GET {path} on {}: {e}", self.id));
        resp.body_mut().read_json().expect("JSON")
    }

    /// GET that may fail (for polling while an agent starts or stops).
    pub fn try_get(&self, path: &str) -> Option<Value> {
        let mut resp = ureq::get(&self.url(path)).config().http_status_as_error(false).build().call().ok()?;
        if resp.status().as_u16() != 200 {
            return None;
        }
        resp.body_mut().read_json().ok()
    }

    /// POST JSON; returns the status code and the body.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let mut resp =
            ureq::post(&self.url(path)).config().http_status_as_error(false).build().send_json(body).expect("POST");
        (resp.status().as_u16(), resp.body_mut().read_json().unwrap_or(Value::Null))
    }

    /// PUT JSON; returns the status code and the body.
    pub fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        let mut resp =
            ureq::put(&self.url(path)).config().http_status_as_error(false).build().send_json(body).expect("PUT");
        (resp.status().as_u16(), resp.body_mut().read_json().unwrap_or(Value::Null))
    }

    /// This agent's view: member id → state.
    pub fn states(&self) -> std::collections::BTreeMap<String, String> {
        let Some(members) = self.try_get("/v1/members") else { return Default::default() };
        members
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| (m["id"].as_str().unwrap_or("").to_string(), m["state"].as_str().unwrap_or("").to_string()))
            .collect()
    }

    /// The state this agent gives `id`, if it knows it.
    pub fn state_of(&self, id: &str) -> Option<String> {
        self.states().get(id).cloned()
    }

    /// One counter from `/metrics`, summed over label sets that contain `labels`.
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        let text = ureq::get(&self.url("/metrics"))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM without waiting (the agent drains, then leaves).
    pub fn sigterm(&self) {
        let _ = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status();
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.sigterm();
        self.wait_exit(Duration::from_secs(20))
    }

    /// Waits for an agent that was told to leave (`agent leave`, SIGTERM) to exit.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status;
            }
            if start.elapsed() > within {
                let _ = c.kill();
                panic!("agent {} did not exit within {within:?}", self.id);
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The options it was started with (to restart it the same way).
    pub fn opts(&self) -> AgentOpts {
        self.opts.clone()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A tiny HTTP backend on 127.0.0.1: answers `GET` with its name, echoes `POST` bodies, and
/// answers `/healthz` with 503 while `healthy` is false. One request per connection.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    pub healthy: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Backend {
    pub fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind backend");
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let healthy = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s, name) = (healthy.clone(), stop.clone(), name.to_string());
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (h, name) = (h.clone(), name.clone());
                        thread::spawn(move || serve_one(conn, &h, &name));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Backend { addr, healthy, stop }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

fn serve_one(mut conn: std::net::TcpStream, healthy: &AtomicBool, name: &str) {
    use std::io::Read;
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut first = String::new();
    if reader.read_line(&mut first).is_err() {
        return;
    }
    let mut length = 0usize;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) <= 2 {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
            headers.push(format!("{}: {}", k.trim().to_ascii_lowercase(), v.trim()));
        }
    }
    let mut body = vec![0u8; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let (status, reply): (&str, Vec<u8>) = if first.contains("/healthz") && !healthy.load(Ordering::Relaxed) {
        ("503 Service Unavailable", b"unhealthy".to_vec())
    } else if first.starts_with("POST") {
        ("200 OK", body)
    } else if first.contains("/headers") {
        ("200 OK", headers.join("\n").into_bytes())
    } else {
        ("200 OK", name.as_bytes().to_vec())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\nx-backend: {name}\r\n\r\n",
        reply.len()
    );
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(&reply);
}

/// A WebSocket echo server on 127.0.0.1 (tungstenite), for ingress tests.
#[derive(Debug)]
pub struct WsBackend {
    pub addr: SocketAddr,
}

impl WsBackend {
    pub fn start() -> WsBackend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind ws backend");
        let addr = listener.local_addr().expect("addr");
        thread::spawn(move || {
            for conn in listener.incoming().map_while(Result::ok) {
                thread::spawn(move || {
                    let Ok(mut ws) = tungstenite::accept(conn) else { return };
                    while let Ok(msg) = ws.read() {
                        if msg.is_close() || ws.send(msg).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        WsBackend { addr }
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; fine for listeners the agent binds at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// One HTTP/1.1 request over a fresh connection: (status, headers, body).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String, Vec<u8>)> {
    use std::io::Read;
    let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    conn.set_read_timeout(Some(Duration::from_secs(15)))?;
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    conn.write_all(req.as_bytes())?;
    conn.write_all(body)?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw)?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| std::io::Error::other("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, head, raw[split + 4..].to_vec()))
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

//! The data plane end to end: real agents forwarding over QUIC with mutual TLS on 127.0.0.1.
//! Wall-clock timing of real processes, so the ban on `Instant::now` does not apply here.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use grapevine_tests::{Agent, AgentOpts, Backend, Cluster, WsBackend, free_port, http, wait_until};
use hickory_server::proto::op::{Message, Query, ResponseCode};
use hickory_server::proto::rr::{Name, RecordType};

const CONVERGE: Duration = Duration::from_secs(20);

fn healthy(a: &Agent, service: &str) -> u64 {
    a.try_get(&format!("/v1/services/{service}")).and_then(|s| s["healthy"].as_u64()).unwrap_or(0)
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn check(b: &Backend) -> String {
    format!("check=http://{}/healthz,interval=200ms,timeout=150ms,rise=1,fall=1", b.addr)
}

/// Sends the first half of a 10-byte echo request through the listener on `port`.
fn half_a_request(port: u16) -> std::net::TcpStream {
    use std::io::Write;
    let mut conn = std::net::TcpStream::connect(addr(port)).unwrap();
    conn.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\nconnection: close\r\n\r\nhello").unwrap();
    conn
}

/// Sends the rest of the request and reads the whole reply.
fn the_other_half(mut conn: std::net::TcpStream) -> String {
    use std::io::{Read, Write};
    conn.write_all(b"world").unwrap();
    let mut reply = String::new();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    conn.read_to_string(&mut reply).unwrap();
    reply
}

#[test]
fn http_and_1mb_bodies_cross_regions_through_an_upstream_listener() {
    let cluster = Cluster::new();
    let backend = Backend::start("west-app");
    let port = free_port();
    let a = cluster.start(AgentOpts::new("east-1", "us-east").args(&["--upstream", &format!("web=127.0.0.1:{port}")]));
    let b =
        cluster.start(AgentOpts::new("west-1", "us-west").join(a.gossip).service(&format!("web={}", backend.port())));
    wait_until("east-1 sees the west instance", CONVERGE, || healthy(&a, "web") == 1);
    let (status, _, body) = http(addr(port), "GET", "/", &[], b"").unwrap();
    assert_eq!((status, body.as_slice()), (200, &b"west-app"[..]));
    // 1 MB up and 1 MB back, byte for byte.
    let payload: Vec<u8> = (0..1_048_576u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let (status, _, body) = http(addr(port), "POST", "/echo", &[], &payload).unwrap();
    assert_eq!(status, 200);
    assert_eq!(body.len(), payload.len());
    assert!(body == payload, "the 1 MB body came back altered");
    assert!(b.metric("grapevine_dataplane_streams_total", "direction=\"in\",result=\"accepted\"") >= 2.0);
}

#[test]
fn websocket_echo_through_ingress_across_agents_closed_once_idle() {
    let cluster = Cluster::new();
    let ws = WsBackend::start();
    let port = free_port();
    let a = cluster.start(AgentOpts::new("edge", "us-east").args(&[
        "--ingress-listen",
        &format!("127.0.0.1:{port}"),
        "--ingress-route",
        "path_prefix=/,service=chat",
        "--idle-timeout",
        "1s",
    ]));
    // The far agent runs the work-stealing scheduler (the edge the default, current-thread one).
    let _b = cluster.start(
        AgentOpts::new("chat-1", "us-west")
            .join(a.gossip)
            .service(&format!("chat={}", ws.addr.port()))
            .args(&["--worker-threads", "2"]),
    );
    wait_until("the edge sees the chat instance", CONVERGE, || healthy(&a, "chat") == 1);
    let (mut socket, resp) =
        tungstenite::connect(format!("ws://127.0.0.1:{port}/socket")).expect("websocket through ingress");
    assert_eq!(resp.status().as_u16(), 101);
    socket.send(tungstenite::Message::text("hello over quic")).unwrap();
    assert_eq!(socket.read().unwrap().into_text().unwrap().as_str(), "hello over quic");
    let big = vec![7u8; 200_000];
    socket.send(tungstenite::Message::binary(big.clone())).unwrap();
    assert_eq!(socket.read().unwrap().into_data().as_ref(), big.as_slice());
    // A message every 300 ms keeps the socket open past the 1 s idle_timeout...
    for i in 0..8 {
        std::thread::sleep(Duration::from_millis(300));
        socket.send(tungstenite::Message::text(format!("tick {i}"))).unwrap();
        assert_eq!(socket.read().unwrap().into_text().unwrap().as_str(), format!("tick {i}"));
    }
    assert_eq!(a.metric("grapevine_dataplane_idle_closed_total", ""), 0.0);
    // ...and then silence closes it.
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = socket.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    let start = std::time::Instant::now();
    let ended = socket.read();
    assert!(
        matches!(ended, Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::Protocol(_))),
        "the idle socket was not closed: {ended:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(5), "closed after {:?}", start.elapsed());
    assert_eq!(a.metric("grapevine_dataplane_idle_closed_total", ""), 1.0);
}

#[test]
fn the_same_cookie_reaches_the_same_instance_through_any_agent() {
    let cluster = Cluster::new();
    let backends: Vec<Backend> = (0..3).map(|i| Backend::start(&format!("app-{i}"))).collect();
    let mut agents: Vec<Agent> = Vec::new();
    let mut ingress = Vec::new();
    for (i, b) in backends.iter().enumerate() {
        let port = free_port();
        ingress.push(port);
        let mut opts = AgentOpts::new(&format!("n{i}"), "eu").service(&format!("web={}", b.port())).args(&[
            "--ingress-listen",
            &format!("127.0.0.1:{port}"),
            "--ingress-route",
            "path_prefix=/,service=web",
            "--ingress-affinity-cookie",
            "meteor_login_token",
        ]);
        if let Some(first) = agents.first() {
            opts = opts.join(first.gossip);
        }
        agents.push(cluster.start(opts));
    }
    wait_until("every agent sees three instances", CONVERGE, || agents.iter().all(|a| healthy(a, "web") == 3));
    let mut spread = BTreeMap::new();
    for user in 0..12 {
        let cookie = format!("theme=dark; meteor_login_token=user-{user}");
        let answers: Vec<String> = ingress
            .iter()
            .map(|p| {
                let (status, _, body) = http(addr(*p), "GET", "/", &[("cookie", &cookie)], b"").unwrap();
                assert_eq!(status, 200);
                String::from_utf8(body).unwrap()
            })
            .collect();
        assert!(answers.iter().all(|x| *x == answers[0]), "user-{user} reached {answers:?}");
        *spread.entry(answers[0].clone()).or_insert(0) += 1;
    }
    assert!(spread.len() >= 2, "sessions should spread over instances: {spread:?}");
    // X-Forwarded-For and -Proto reach the app.
    let (_, _, body) = http(addr(ingress[0]), "GET", "/headers", &[], b"").unwrap();
    let headers = String::from_utf8(body).unwrap();
    assert!(headers.contains("x-forwarded-for: 127.0.0.1") && headers.contains("x-forwarded-proto: http"), "{headers}");
}

#[test]
fn adding_an_instance_moves_only_a_fraction_of_the_keys() {
    let cluster = Cluster::new();
    let mut agents = cluster.start_many("n", "eu", 3, None);
    let regs: Vec<_> = agents.iter().map(|a| a.put("/v1/services/web", &serde_json::json!({"port": 1}))).collect();
    assert!(regs.iter().all(|(c, _)| *c == 200));
    wait_until("three instances", CONVERGE, || healthy(&agents[0], "web") == 3);
    let keys: Vec<String> = (0..200).map(|i| format!("k{i}")).collect();
    let owners = |a: &Agent| -> Vec<String> {
        keys.iter()
            .map(|k| a.get(&format!("/v1/route/web?key={k}"))["chosen"]["node"].as_str().unwrap().to_string())
            .collect()
    };
    let before = owners(&agents[0]);
    agents.push(cluster.start(AgentOpts::new("n4", "eu").join(agents[0].gossip)));
    assert_eq!(agents[3].put("/v1/services/web", &serde_json::json!({"port": 1})).0, 200);
    wait_until("four instances", CONVERGE, || healthy(&agents[0], "web") == 4);
    let after = owners(&agents[0]);
    let moved: Vec<_> = before.iter().zip(&after).filter(|(b, a)| b != a).collect();
    assert!(
        moved.iter().all(|(_, a)| *a == "n4"),
        "keys moved between old instances: {moved:?}\n{}",
        agents[0].get("/v1/services/web")
    );
    let share = moved.len() as f64 / keys.len() as f64;
    assert!((0.1..0.45).contains(&share), "moved {share:.2} of the keys (ideal 0.25)");
}

#[test]
fn after_kill_9_of_an_instance_requests_succeed_on_the_others() {
    let cluster = Cluster::new();
    let backends: Vec<Backend> = (0..2).map(|i| Backend::start(&format!("app-{i}"))).collect();
    let port = free_port();
    let a = cluster.start(AgentOpts::new("client", "eu").args(&["--upstream", &format!("web=127.0.0.1:{port}")]));
    let mut b =
        cluster.start(AgentOpts::new("s0", "eu").join(a.gossip).service(&format!("web={}", backends[0].port())));
    let _c = cluster.start(AgentOpts::new("s1", "eu").join(a.gossip).service(&format!("web={}", backends[1].port())));
    wait_until("two instances", CONVERGE, || healthy(&a, "web") == 2);
    for _ in 0..6 {
        assert_eq!(http(addr(port), "GET", "/", &[], b"").unwrap().0, 200);
    }
    b.kill();
    // Every request still succeeds: a dead instance costs at most a retry.
    let start = std::time::Instant::now();
    let mut slowest = Duration::ZERO;
    let mut slow = 0;
    for _ in 0..20 {
        let t = std::time::Instant::now();
        let (status, _, body) = http(addr(port), "GET", "/", &[], b"").expect("request after the kill");
        assert_eq!((status, body.as_slice()), (200, &b"app-1"[..]));
        slowest = slowest.max(t.elapsed());
        // The request that finds the peer silent waits at least 2 s (a timeout); 1.8 s leaves
        // room for an ordinary request on a loaded machine.
        slow += usize::from(t.elapsed() > Duration::from_millis(1800));
    }
    assert!(slowest < Duration::from_secs(5), "slowest request {slowest:?}");
    // The one that found the dead peer silent waited; the dead instance was ejected then, so no
    // later request waits for it while membership makes up its mind.
    assert!(slow <= 1, "{slow} requests took over 1.8 s");
    assert!(start.elapsed() < Duration::from_secs(30));
}

#[test]
fn region_failover_when_the_local_region_has_no_healthy_instance_and_back() {
    let cluster = Cluster::new();
    let east_app = Backend::start("east-app");
    let west_app = Backend::start("west-app");
    let port = free_port();
    let a =
        cluster.start(AgentOpts::new("east-client", "us-east").args(&["--upstream", &format!("web=127.0.0.1:{port}")]));
    let _e = cluster.start(AgentOpts::new("east-1", "us-east").join(a.gossip).service(&format!(
        "web={},{}",
        east_app.port(),
        check(&east_app)
    )));
    let _w = cluster.start(AgentOpts::new("west-1", "us-west").join(a.gossip).service(&format!(
        "web={},{}",
        west_app.port(),
        check(&west_app)
    )));
    wait_until("two healthy instances", CONVERGE, || healthy(&a, "web") == 2);
    let get =
        || http(addr(port), "GET", "/", &[], b"").map(|(_, _, b)| String::from_utf8(b).unwrap()).unwrap_or_default();
    for _ in 0..5 {
        assert_eq!(get(), "east-app", "traffic stays in its region");
    }
    east_app.healthy.store(false, Ordering::Relaxed);
    wait_until("traffic fails over to us-west", CONVERGE, || get() == "west-app");
    east_app.healthy.store(true, Ordering::Relaxed);
    wait_until("traffic comes back to us-east", CONVERGE, || get() == "east-app");
}

#[test]
fn a_pinned_service_answers_503_instead_of_failing_over() {
    let cluster = Cluster::new();
    let east_app = Backend::start("east-app");
    let west_app = Backend::start("west-app");
    let port = free_port();
    let a = cluster.start(AgentOpts::new("edge", "us-east").args(&[
        "--ingress-listen",
        &format!("127.0.0.1:{port}"),
        "--ingress-route",
        "path_prefix=/,service=ledger",
    ]));
    let _e = cluster.start(AgentOpts::new("east-1", "us-east").join(a.gossip).service(&format!(
        "ledger={},pinned=true,{}",
        east_app.port(),
        check(&east_app)
    )));
    let _w = cluster.start(AgentOpts::new("west-1", "us-west").join(a.gossip).service(&format!(
        "ledger={},pinned=true,{}",
        west_app.port(),
        check(&west_app)
    )));
    wait_until("two healthy instances", CONVERGE, || healthy(&a, "ledger") == 2);
    assert_eq!(http(addr(port), "GET", "/", &[], b"").unwrap().2, b"east-app");
    east_app.healthy.store(false, Ordering::Relaxed);
    wait_until("the east instance is out, the west one still in", CONVERGE, || {
        a.try_get("/v1/services/ledger").is_some_and(|s| {
            let healthy = |node: &str| {
                s["endpoints"].as_array().unwrap().iter().any(|e| e["node"] == node && e["healthy"] == true)
            };
            !healthy("east-1") && healthy("west-1")
        })
    });
    let (status, _, body) = http(addr(port), "GET", "/", &[], b"").unwrap();
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("in us-east, and ledger is pinned to its region"), "the 503 says why: {body}");
    assert_eq!(a.get("/v1/route/ledger")["chosen"], serde_json::Value::Null);
}

#[test]
fn a_peer_holding_a_certificate_from_another_ca_is_refused() {
    let cluster = Cluster::new();
    let rogue_pki = cluster.dir.path().join("rogue-pki");
    assert!(cluster.agent_cmd(&["ca", "init", "--out", rogue_pki.to_str().unwrap()]).status.success());
    let app = Backend::start("rogue-app");
    let port = free_port();
    let a = cluster.start(AgentOpts::new("client", "eu").args(&["--upstream", &format!("web=127.0.0.1:{port}")]));
    // Same gossip key (so it is a member), certificate from another CA.
    let mut opts = AgentOpts::new("rogue", "eu").join(a.gossip).service(&format!("web={}", app.port()));
    opts.pki = Some(rogue_pki);
    let rogue = cluster.start(opts);
    wait_until("the client sees the rogue's instance", CONVERGE, || healthy(&a, "web") == 1);
    let result = http(addr(port), "GET", "/", &[], b"");
    assert!(result.map(|(_, _, b)| b.is_empty()).unwrap_or(true), "the request must not reach the rogue's app");
    wait_until("the rogue refused the handshake", CONVERGE, || {
        rogue.metric("grapevine_dataplane_peers_refused_total", "handshake") >= 1.0
    });
    assert!(a.metric("grapevine_dataplane_streams_total", "result=\"retried\"") >= 1.0);
}

#[test]
fn sigterm_drains_open_connections_before_leaving() {
    let cluster = Cluster::new();
    let app = Backend::start("slow-app");
    let port = free_port();
    let a = cluster.start(AgentOpts::new("client", "eu").args(&["--upstream", &format!("web=127.0.0.1:{port}")]));
    let mut b = cluster.start(
        AgentOpts::new("server", "eu")
            .join(a.gossip)
            .service(&format!("web={}", app.port()))
            .args(&["--drain-timeout", "10s"]),
    );
    wait_until("one instance", CONVERGE, || healthy(&a, "web") == 1);
    // Open a connection and send half a request; finish it after the SIGTERM.
    let conn = half_a_request(port);
    std::thread::sleep(Duration::from_millis(300));
    b.sigterm();
    wait_until("the instance drains out of every route", CONVERGE, || healthy(&a, "web") == 0);
    let reply = the_other_half(conn);
    assert!(reply.ends_with("helloworld"), "the open connection finished: {reply:?}");
    let status = b.wait_exit(Duration::from_secs(20));
    assert!(status.success());
    wait_until("the others see it left", CONVERGE, || a.state_of("server").as_deref() == Some("left"));
}

#[test]
fn a_connection_to_the_instance_on_the_same_host_counts_as_load_and_holds_up_the_drain() {
    let cluster = Cluster::new();
    let app = Backend::start("local-app");
    let port = free_port();
    let mut solo = cluster.start(AgentOpts::new("solo", "eu").service(&format!("web={}", app.port())).args(&[
        "--upstream",
        &format!("web=127.0.0.1:{port}"),
        "--drain-timeout",
        "10s",
    ]));
    wait_until("the instance is healthy", CONVERGE, || healthy(&solo, "web") == 1);
    // Spliced straight to the app on this host, never over QUIC.
    let conn = half_a_request(port);
    let load = |a: &Agent| a.try_get("/v1/services/web").and_then(|s| s["endpoints"][0]["load"].as_u64()).unwrap_or(0);
    wait_until("the open connection is announced as load", CONVERGE, || load(&solo) == 1);
    solo.sigterm();
    std::thread::sleep(Duration::from_millis(500));
    let reply = the_other_half(conn);
    assert!(reply.ends_with("helloworld"), "the drain waited for the local connection: {reply:?}");
    assert!(solo.wait_exit(Duration::from_secs(20)).success());
}

/// Asks `server` one DNS question over UDP (or TCP, with its two-byte length prefix).
fn dns(server: SocketAddr, name: &str, kind: RecordType, tcp: bool) -> Message {
    let mut q = Message::query();
    q.metadata.id = 7;
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
    let bytes = q.to_vec().unwrap();
    let reply = if tcp {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(server).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&(bytes.len() as u16).to_be_bytes()).unwrap();
        s.write_all(&bytes).unwrap();
        let mut len = [0u8; 2];
        s.read_exact(&mut len).unwrap();
        let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut body).unwrap();
        body
    } else {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.send_to(&bytes, server).unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.recv(&mut buf).unwrap();
        buf.truncate(n);
        buf
    };
    Message::from_vec(&reply).unwrap()
}

fn rdata(m: &Message) -> Vec<String> {
    m.answers.iter().map(|r| r.data.to_string()).collect()
}

/// A negative answer from the zone: `code`, authoritative, no records, the zone's SOA as authority.
fn assert_negative(m: &Message, code: ResponseCode, what: &str) {
    assert_eq!(m.metadata.response_code, code, "{what}");
    assert!(m.metadata.authoritative, "{what}: AA");
    assert!(m.answers.is_empty(), "{what}: {:?}", rdata(m));
    assert_eq!(m.authorities.len(), 1, "{what}: {:?}", m.authorities);
    assert_eq!(
        (m.authorities[0].record_type(), m.authorities[0].name.to_string()),
        (RecordType::SOA, "grapevine.".into())
    );
}

#[test]
fn an_app_finds_services_and_its_upstream_port_by_dns() {
    let cluster = Cluster::new();
    let app = Backend::start("web-app");
    let port = free_port();
    let a = cluster.start(AgentOpts::new("caller", "us-east").args(&["--upstream", &format!("web=127.0.0.1:{port}")]));
    let b = cluster.start(
        AgentOpts::new("web-1", "us-west")
            .join(a.gossip)
            .service(&format!("web={},{}", app.port(), check(&app)))
            .service(&format!("vault={},pinned=true", app.port())),
    );
    wait_until("the caller sees the web and vault instances healthy", CONVERGE, || {
        healthy(&a, "web") == 1 && healthy(&a, "vault") == 1
    });

    // The instance: its host's address, and by SRV its port and node, in both transports.
    for tcp in [false, true] {
        let m = dns(a.dns, "web.service.grapevine.", RecordType::A, tcp);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative, "AA");
        assert_eq!(rdata(&m), ["127.0.0.1"], "tcp: {tcp}");
    }
    let srv = dns(a.dns, "web.service.grapevine.", RecordType::SRV, false);
    let answers = rdata(&srv);
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert!(answers[0].contains(&format!(" {} web-1.node.grapevine.", app.port())), "{answers:?}");
    assert_eq!(srv.additionals.len(), 1, "the target's address comes along");
    // Any case, answered in the case asked.
    let mixed = dns(a.dns, "WEB.Service.US-West.GrapeVine.", RecordType::A, false);
    assert_eq!(rdata(&mixed), ["127.0.0.1"]);
    assert_eq!(mixed.answers[0].name.to_string(), "WEB.Service.US-West.GrapeVine.");
    // The upstream listener: where the app should connect.
    let up = dns(a.dns, "web.upstream.grapevine.", RecordType::SRV, false);
    assert!(rdata(&up)[0].contains(&format!(" {port} ")), "{:?}", rdata(&up));

    // The apex: SOA, and NS naming the DNS listener.
    let soa = dns(a.dns, "grapevine.", RecordType::SOA, false);
    assert_eq!((soa.metadata.response_code, soa.metadata.authoritative), (ResponseCode::NoError, true));
    assert_eq!(soa.answers.len(), 1, "{:?}", rdata(&soa));
    assert!(rdata(&soa)[0].starts_with("ns.grapevine. hostmaster.grapevine. "), "{:?}", rdata(&soa));
    let ns = dns(a.dns, "grapevine.", RecordType::NS, true);
    assert_eq!(rdata(&ns), ["ns.grapevine."]);
    assert_eq!(ns.additionals.iter().map(|r| r.data.to_string()).collect::<Vec<_>>(), [a.dns.ip().to_string()]);
    // Names with names below them exist (NODATA), whatever is asked of them.
    for empty in [
        "grapevine.",
        "service.grapevine.",
        "node.grapevine.",
        "upstream.grapevine.",
        "us-west.grapevine.",
        "service.us-west.grapevine.",
    ] {
        assert_negative(&dns(a.dns, empty, RecordType::A, false), ResponseCode::NoError, empty);
    }
    // A pinned service in another region: no records, as its traffic from here would get 503,
    // even when the region is named; its own region lists it.
    for name in ["vault.service.grapevine.", "vault.service.us-west.grapevine."] {
        assert_negative(&dns(a.dns, name, RecordType::A, false), ResponseCode::NoError, name);
        assert_eq!(rdata(&dns(b.dns, name, RecordType::A, false)), ["127.0.0.1"], "{name} from us-west");
    }
    // No such service; not our zone.
    for missing in ["nope.service.grapevine.", "web.service.mars.grapevine.", "mars.grapevine."] {
        assert_negative(&dns(a.dns, missing, RecordType::A, false), ResponseCode::NXDomain, missing);
    }
    let refused = dns(a.dns, "example.com.", RecordType::A, false);
    assert_eq!((refused.metadata.response_code, refused.metadata.authoritative), (ResponseCode::Refused, false));

    // An instance failing its check leaves the answer within seconds.
    app.healthy.store(false, Ordering::Relaxed);
    wait_until("the unhealthy instance leaves the DNS answer", CONVERGE, || {
        dns(a.dns, "web.service.grapevine.", RecordType::A, false).answers.is_empty()
    });
    assert!(a.metric("grapevine_dns_queries_total", "kind=\"answered\"") >= 3.0);
}

#[test]
fn certificates_rotate_to_a_new_ca_on_a_running_cluster() {
    let cluster = Cluster::new();
    let app = Backend::start("app");
    let port = free_port();
    let a = cluster.start(AgentOpts::new("a", "eu").args(&["--upstream", &format!("web=127.0.0.1:{port}")]));
    let b = cluster.start(AgentOpts::new("b", "eu").join(a.gossip).service(&format!("web={}", app.port())));
    wait_until("a sees b's instance", CONVERGE, || healthy(&a, "web") == 1);
    let works = || http(addr(port), "GET", "/", &[], b"").is_ok_and(|(s, _, body)| s == 200 && body == b"app");
    assert!(works());

    let pki = &cluster.pki;
    let new = cluster.dir.path().join("new-pki");
    let path = |dir: &std::path::Path, f: &str| dir.join(f).to_str().unwrap().to_string();
    assert!(cluster.agent_cmd(&["ca", "init", "--out", &path(&new, "")]).status.success());
    for node in ["a", "b"] {
        let out =
            cluster.agent_cmd(&["cert", "issue", "--ca", &path(&new, ""), "--node", node, "--out", &path(&new, "")]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let read = |dir: &std::path::Path, f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let (old_ca, new_ca) = (read(pki, "ca.pem"), read(&new, "ca.pem"));
    let reload = |agent: &Agent| {
        let out = cluster.agent_cmd(&["reload", "--json", "--admin-addr", &agent.admin.to_string()]);
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    let hup_reloads = |agent: &Agent| agent.log_text().matches("reloaded the certificates").count();
    let sighup = |agent: &Agent| {
        let before = hup_reloads(agent);
        assert!(
            std::process::Command::new("kill").args(["-HUP", &agent.pid().to_string()]).status().unwrap().success()
        );
        wait_until("the agent reloads on SIGHUP", CONVERGE, || hup_reloads(agent) > before);
    };

    // A certificate from a CA the agent does not trust yet is refused, and nothing changes.
    let old_a = (read(pki, "a.pem"), read(pki, "a.key"));
    std::fs::write(pki.join("a.pem"), read(&new, "a.pem")).unwrap();
    std::fs::write(pki.join("a.key"), read(&new, "a.key")).unwrap();
    let (code, text) = reload(&a);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("kept the certificates in use") && text.contains("not signed by a CA in ca_file"), "{text}");
    std::fs::write(pki.join("a.pem"), &old_a.0).unwrap();
    std::fs::write(pki.join("a.key"), &old_a.1).unwrap();
    assert!(works());

    // 1. Every agent trusts both CAs (`agent reload` on a, SIGHUP on b).
    std::fs::write(pki.join("ca.pem"), format!("{old_ca}{new_ca}")).unwrap();
    let (code, text) = reload(&a);
    assert_eq!(code, Some(0), "{text}");
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!((doc["cas"].as_u64(), doc["closed"].as_u64()), (Some(2), Some(0)), "{text}");
    sighup(&b);
    assert!(works());
    // 2. Every agent gets a certificate from the new CA.
    for node in ["a", "b"] {
        for ext in ["pem", "key"] {
            std::fs::write(pki.join(format!("{node}.{ext}")), read(&new, &format!("{node}.{ext}"))).unwrap();
        }
    }
    assert_eq!(reload(&a).0, Some(0));
    sighup(&b);
    assert!(works());
    // 3. The old CA goes. a's connection to b was made with b's old certificate: a closes it,
    // and the next request dials b again under the new CA.
    std::fs::write(pki.join("ca.pem"), &new_ca).unwrap();
    let (code, text) = reload(&a);
    assert_eq!(code, Some(0), "{text}");
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!((doc["cas"].as_u64(), doc["closed"].as_u64()), (Some(1), Some(1)), "{text}");
    sighup(&b);
    wait_until("requests flow under the new CA", CONVERGE, works);
    assert!(a.metric("grapevine_dataplane_peers_refused_total", "untrusted") >= 1.0);

    // An agent still on the old CA is refused.
    let old_pki = cluster.dir.path().join("old-pki");
    std::fs::create_dir_all(&old_pki).unwrap();
    std::fs::write(old_pki.join("ca.pem"), &old_ca).unwrap();
    std::fs::copy(pki.join("ca.key"), old_pki.join("ca.key")).unwrap();
    let stale_app = Backend::start("stale-app");
    let mut opts = AgentOpts::new("stale", "eu").join(a.gossip).service(&format!("web={}", stale_app.port()));
    opts.pki = Some(old_pki);
    let _stale = cluster.start(opts);
    wait_until("a sees the stale agent's instance", CONVERGE, || healthy(&a, "web") == 2);
    for _ in 0..10 {
        let (status, _, body) = http(addr(port), "GET", "/", &[], b"").unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"app"[..]), "a request reached the stale agent's app");
    }
}

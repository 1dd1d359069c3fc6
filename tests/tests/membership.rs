//! Membership, health, events and the CLI, end to end with real agents on 127.0.0.1.

use std::net::UdpSocket;
use std::time::Duration;

use grapevine_tests::{AgentOpts, Backend, Cluster, wait_until};
use serde_json::json;

const CONVERGE: Duration = Duration::from_secs(20);

fn all_alive(agents: &[grapevine_tests::Agent], n: usize) -> bool {
    agents.iter().all(|a| {
        let s = a.states();
        s.len() == n && s.values().all(|v| v == "alive")
    })
}

#[test]
fn five_agents_converge_then_see_a_crash_and_a_leave() {
    let cluster = Cluster::new();
    let mut agents = cluster.start_many("n", "us-east", 3, None);
    let seed = agents[0].gossip;
    agents.extend(cluster.start_many("w", "us-west", 2, Some(seed)));
    wait_until("all five see five alive", CONVERGE, || all_alive(&agents, 5));
    let status = agents[4].get("/v1/status");
    assert_eq!(status["cluster"]["alive"], 5);
    assert_eq!(status["cluster"]["regions"], json!(["us-east", "us-west"]));
    // Each region's first two members by id are its gateways; a member of either region sees
    // both regions' gateways, and the other region as reachable.
    wait_until("us-west sees us-east's gateways", CONVERGE, || {
        let s = agents[4].get("/v1/status");
        s["cluster"]["region_info"]["us-east"] == json!({"gateways": ["n1", "n2"], "reachable": true})
            && s["cluster"]["region_info"]["us-west"]["gateways"] == json!(["w1", "w2"])
    });
    assert_eq!(agents[0].get("/v1/status")["node"]["role"], "gateway");
    assert_eq!(agents[2].get("/v1/status")["node"]["role"], "member");

    // kill -9: every survivor marks it dead.
    let crashed = agents.remove(1);
    let crashed_id = crashed.id.clone();
    drop(crashed);
    wait_until("every survivor marks the crashed agent dead", CONVERGE, || {
        agents.iter().all(|a| a.state_of(&crashed_id).as_deref() == Some("dead"))
    });
    // It was a gateway: the next member by id takes its place, and the other region hears it.
    wait_until("us-west sees the new us-east gateway", CONVERGE, || {
        agents[3].get("/v1/status")["cluster"]["region_info"]["us-east"]["gateways"] == json!(["n1", "n3"])
    });
    // What happened shows in the metrics: SWIM probing and suspecting the crashed member, the
    // pools' sizes, the new gateway's promotion, and the hints that carried the change.
    let n3 = &agents[1];
    assert_eq!(n3.id, "n3");
    assert!(n3.metric("grapevine_swim_probes_total", "kind=\"direct\"") > 0.0);
    assert!(agents.iter().map(|a| a.metric("grapevine_swim_suspicions_total", "")).sum::<f64>() >= 1.0);
    assert!(agents.iter().map(|a| a.metric("grapevine_swim_probes_total", "kind=\"indirect\"")).sum::<f64>() >= 1.0);
    assert_eq!(n3.metric("grapevine_pool_members", "kind=\"region\""), 3.0, "n1, n2 (dead, still listed) and n3");
    assert!(n3.metric("grapevine_gateway_changes_total", "kind=\"promoted\"") >= 1.0);
    // The other region may have heard of n3 through n1 before n3's own WAN pool met it.
    wait_until("n3's WAN pool meets a us-west gateway", CONVERGE, || {
        n3.metric("grapevine_pool_members", "kind=\"wan\"") >= 2.0
    });
    assert!(agents.iter().map(|a| a.metric("grapevine_version_hints_total", "")).sum::<f64>() >= 1.0);

    // SIGTERM: the others see `left`, not a failure, and it exits 0.
    let mut leaver = agents.remove(3);
    let status = leaver.terminate();
    assert!(status.success(), "SIGTERM exit: {status:?}");
    wait_until("every survivor sees the leaver as left", CONVERGE, || {
        agents.iter().all(|a| a.state_of(&leaver.id).as_deref() == Some("left"))
    });
    assert!(leaver.log_text().contains("SIGTERM"));
}

#[test]
fn the_last_members_of_a_region_leaving_show_as_left_in_the_others() {
    let cluster = Cluster::new();
    let mut agents = cluster.start_many("e", "eu", 2, None);
    let seed = agents[0].gossip;
    let mut region = cluster.start_many("a", "ap", 2, Some(seed));
    agents.extend(cluster.start_many("w", "us", 1, Some(seed)));
    wait_until("all five see five alive", CONVERGE, || {
        agents.iter().chain(&region).all(|a| a.states().len() == 5 && a.states().values().all(|s| s == "alive"))
    });
    // ap's two gateways leave one after the other, the smaller id first; then us's only one.
    let mut a2 = region.pop().unwrap();
    let mut a1 = region.pop().unwrap();
    assert!(a1.terminate().success());
    wait_until("the others see a1 left", CONVERGE, || {
        agents.iter().all(|a| a.state_of("a1").as_deref() == Some("left"))
    });
    assert!(a2.terminate().success());
    let mut w1 = agents.pop().unwrap();
    assert!(w1.terminate().success());
    let gone = ["a1", "a2", "w1"];
    wait_until("eu sees them all left", CONVERGE, || {
        agents.iter().all(|a| gone.iter().all(|id| a.state_of(id).as_deref() == Some("left")))
    });
    // Their regions' WAN heartbeats have stopped for good: they stay left, not unreachable.
    std::thread::sleep(Duration::from_secs(5));
    for a in &agents {
        for id in gone {
            assert_eq!(a.state_of(id).as_deref(), Some("left"), "{id} on {}", a.id);
        }
        assert_eq!(a.get("/v1/status")["cluster"]["unreachable"], 0);
    }
    let out = cluster.agent_cmd(&["status", "--admin-addr", &agents[0].admin.to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("region ap  (every member left") && text.contains("region us  (every member left"), "{text}");
}

#[test]
fn agent_leave_command_leaves_and_exits() {
    let cluster = Cluster::new();
    let mut agents = cluster.start_many("n", "eu", 3, None);
    wait_until("three alive", CONVERGE, || all_alive(&agents, 3));
    let out = cluster.agent_cmd(&["leave", "--admin-addr", &agents[2].admin.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status = agents[2].wait_exit(Duration::from_secs(20));
    assert!(status.success());
    let id = agents[2].id.clone();
    wait_until("the others see it left", CONVERGE, || {
        agents[..2].iter().all(|a| a.state_of(&id).as_deref() == Some("left"))
    });
}

#[test]
fn a_node_with_another_key_never_joins_and_is_counted() {
    let cluster = Cluster::new();
    let agents = cluster.start_many("n", "eu", 2, None);
    wait_until("two alive", CONVERGE, || all_alive(&agents, 2));
    let other_key = cluster.dir.path().join("other.key");
    std::fs::write(&other_key, cluster.agent_cmd(&["keygen"]).stdout).unwrap();
    let mut opts = AgentOpts::new("intruder", "eu").join(agents[0].gossip);
    opts.key_file = Some(other_key);
    let intruder = cluster.start(opts);
    wait_until("the seed counts unauthenticated datagrams", CONVERGE, || {
        agents[0].metric("grapevine_gossip_dropped_total", "unauthenticated") >= 3.0
    });
    std::thread::sleep(Duration::from_secs(2));
    for a in &agents {
        assert_eq!(a.state_of("intruder"), None, "{} lists the intruder", a.id);
        assert_eq!(a.states().len(), 2);
    }
    assert_eq!(intruder.states().len(), 1, "the intruder sees only itself");
    // The seed drops it without a word; the intruder says so itself, about 10 s in.
    wait_until("the intruder warns that no seed answers", CONVERGE, || {
        intruder.log_text().contains("no seed has answered")
    });
    assert!(agents.iter().all(|a| !a.log_text().contains("no seed has answered")));
}

#[test]
fn random_and_oversized_datagrams_change_nothing() {
    let cluster = Cluster::new();
    let agents = cluster.start_many("n", "eu", 3, None);
    wait_until("three alive", CONVERGE, || all_alive(&agents, 3));
    let target = agents[0].gossip;
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..800usize {
        if i % 50 == 0 {
            std::thread::sleep(Duration::from_millis(20)); // stay under the socket buffer
        }
        let len = [0, 1, 41, 42, 43, 100, 1400, 9000][i % 8];
        let mut buf = vec![0u8; len];
        for b in &mut buf {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        if i % 3 == 0 && len > 2 {
            buf[0] = 0xA2; // looks like our envelope's version byte
        }
        let _ = sock.send_to(&buf, target);
    }
    // The largest datagram UDP can carry (65,507 bytes over IPv4).
    let _ = sock.send_to(&vec![0xA2u8; 65_507], target);
    wait_until("the garbage is counted", CONVERGE, || {
        let dropped = agents[0].metric("grapevine_gossip_dropped_total", "reason");
        dropped >= 700.0
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(all_alive(&agents, 3), "membership changed: {:?}", agents[0].states());
    assert_eq!(agents[0].get("/v1/status")["cluster"]["alive"], 3);
    assert!(
        agents[0].metric("grapevine_gossip_dropped_total", "oversized")
            + agents[0].metric("grapevine_gossip_dropped_total", "unauthenticated")
            >= 1.0
    );
}

#[test]
fn a_restart_with_the_same_id_rejoins_with_a_new_generation() {
    let cluster = Cluster::new();
    let mut agents = cluster.start_many("n", "eu", 3, None);
    wait_until("three alive", CONVERGE, || all_alive(&agents, 3));
    let generation = |a: &grapevine_tests::Agent, id: &str| -> u64 {
        a.get("/v1/members")
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .map(|m| m["generation"].as_u64().unwrap())
            .unwrap_or(0)
    };
    let before = generation(&agents[0], "n3");
    let mut restarted = agents.remove(2);
    let opts = restarted.opts();
    restarted.kill();
    let again = cluster.start(opts);
    wait_until("the restarted node is alive again with a newer generation", CONVERGE, || {
        agents.iter().all(|a| a.state_of("n3").as_deref() == Some("alive") && generation(a, "n3") > before)
    });
    assert_eq!(again.states().len(), 3);
}

#[test]
fn a_failing_health_check_takes_the_instance_out_of_routes() {
    let cluster = Cluster::new();
    let backends: Vec<Backend> = (0..3).map(|i| Backend::start(&format!("b{i}"))).collect();
    let mut agents = Vec::new();
    for (i, b) in backends.iter().enumerate() {
        let spec =
            format!("web={},check=http://{}/healthz,interval=200ms,timeout=150ms,rise=2,fall=2", b.port(), b.addr);
        let mut opts = AgentOpts::new(&format!("n{i}"), "eu").service(&spec);
        if let Some(first) = agents.first() {
            let first: &grapevine_tests::Agent = first;
            opts = opts.join(first.gossip);
        }
        agents.push(cluster.start(opts));
    }
    let healthy =
        |a: &grapevine_tests::Agent| a.try_get("/v1/services/web").and_then(|s| s["healthy"].as_u64()).unwrap_or(0);
    wait_until("three healthy instances everywhere", CONVERGE, || agents.iter().all(|a| healthy(a) == 3));
    // Keys owned by n1 go elsewhere once its backend fails its check.
    let keys: Vec<String> = (0..60).map(|i| format!("user-{i}")).collect();
    let chosen = |a: &grapevine_tests::Agent, k: &str| {
        a.get(&format!("/v1/route/web?key={k}"))["chosen"]["node"].as_str().unwrap_or("").to_string()
    };
    let owned_by_n1: Vec<&String> = keys.iter().filter(|k| chosen(&agents[0], k) == "n1").collect();
    assert!(!owned_by_n1.is_empty());
    backends[1].healthy.store(false, std::sync::atomic::Ordering::Relaxed);
    let took = wait_until("every agent routes around the failing instance", CONVERGE, || {
        agents.iter().all(|a| healthy(a) == 2)
    });
    assert!(took < Duration::from_secs(10), "took {took:?}");
    for k in &keys {
        for a in &agents {
            assert_ne!(chosen(a, k), "n1");
        }
    }
    // The CLI agrees.
    let out = cluster.agent_cmd(&[
        "route",
        "web",
        "--key",
        owned_by_n1[0],
        "--json",
        "--admin-addr",
        &agents[2].admin.to_string(),
    ]);
    let route: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(route["chosen"]["node"], "n1");
    assert_eq!(route["service"], "web");
    // It comes back when it recovers.
    backends[1].healthy.store(true, std::sync::atomic::Ordering::Relaxed);
    wait_until("the instance returns to rotation", CONVERGE, || agents.iter().all(|a| healthy(a) == 3));
    assert_eq!(chosen(&agents[2], owned_by_n1[0]), "n1");
    assert!(agents[1].metric("grapevine_health_checks_total", "result=\"fail\"") >= 2.0);
    agents.clear();
}

#[test]
fn an_event_reaches_every_member_once() {
    let cluster = Cluster::new();
    let agents = cluster.start_many("n", "eu", 4, None);
    wait_until("four alive", CONVERGE, || all_alive(&agents, 4));
    // One watcher per agent, through the CLI.
    let watchers: Vec<std::process::Child> = agents
        .iter()
        .map(|a| {
            std::process::Command::new(grapevine_tests::agent_bin())
                .args(["event", "watch", "deploy", "--admin-addr", &a.admin.to_string()])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (code, body) = agents[1].post("/v1/events", &json!({"name": "deploy", "payload": "v42"}));
    assert_eq!(code, 200, "{body}");
    let out = cluster.agent_cmd(&["event", "fire", "other", "x", "--admin-addr", &agents[2].admin.to_string()]);
    assert!(out.status.success());
    // An oversized payload is refused.
    let (code, _) = agents[0].post("/v1/events", &json!({"name": "big", "payload": "x".repeat(600)}));
    assert_eq!(code, 413);
    wait_until("every agent delivered the event", CONVERGE, || {
        agents.iter().all(|a| a.metric("grapevine_events_total", "kind=\"delivered\"") >= 2.0)
    });
    std::thread::sleep(Duration::from_secs(2));
    for mut w in watchers {
        let _ = w.kill();
        let out = w.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "exactly one deploy event: {lines:?}");
        let ev: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(ev["payload"], "v42");
        assert_eq!(ev["origin"], "n2");
    }
}

#[test]
fn api_registrations_survive_a_restart() {
    let cluster = Cluster::new();
    let mut a = cluster.start(AgentOpts::new("solo", "eu"));
    let (code, body) = a.put("/v1/services/profile", &json!({"port": 3000, "weight": 50}));
    assert_eq!(code, 200, "{body}");
    let (code, body) = a.put("/v1/services/bad", &json!({"port": 0}));
    assert_eq!(code, 400);
    assert!(body["error"].as_str().unwrap().contains("service[bad].port"), "{body}");
    // Every error is JSON, a method an endpoint does not take too.
    let (code, body) = a.post("/v1/status", &json!({}));
    assert_eq!(code, 405, "{body}");
    assert!(body["error"].as_str().unwrap().contains("/v1/status does not take POST"), "{body}");
    // DNS answers for SERVICE.service.grapevine: a name with a dot could never be found.
    let (code, body) = a.put("/v1/services/api.v2", &json!({"port": 3000}));
    assert_eq!(code, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("one DNS label"), "{body}");
    wait_until("the registration shows", CONVERGE, || a.try_get("/v1/services/profile").is_some());
    let opts = a.opts();
    a.kill();
    let b = cluster.start(opts);
    wait_until("the registration is back after a restart", CONVERGE, || {
        b.try_get("/v1/services/profile").is_some_and(|s| s["endpoints"][0]["weight"] == 50)
    });
}

#[test]
fn bad_configuration_exits_2_naming_the_setting() {
    let cluster = Cluster::new();
    let file = cluster.dir.path().join("agent.toml");
    std::fs::write(
        &file,
        "region = \"us-east\"\ngossip_interval = \"often\"\n[security]\ncluster_key_file = \"/nonexistent\"\n",
    )
    .unwrap();
    let out = cluster.agent_cmd(&["run", "--config", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gossip_interval") && err.contains("often") && err.contains("duration"), "{err}");
    // A misspelt key: named with its value, a close match and where it is in the file.
    std::fs::write(&file, "region = \"us-east\"\nprobe_intervall = \"1s\"\n").unwrap();
    let out = cluster.agent_cmd(&["run", "--config", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let at = format!("({}, line 2, column 1)", file.display());
    assert!(err.contains("probe_intervall = \"1s\": no such setting; did you mean probe_interval?"), "{err}");
    assert!(err.contains(&at), "{err}");
    let out = cluster.agent_cmd(&["run", "--region", "eu"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cluster_key_file"));
    let out = cluster.agent_cmd(&["run", "--dev", "--gossip-addr", "nowhere"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("gossip_addr"));
    // `agent cert issue` refuses the node ids `agent run` refuses.
    let out =
        cluster.agent_cmd(&["cert", "issue", "--ca", cluster.pki.to_str().unwrap(), "--node", "42", "--out", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--node = \"42\""), "{out:?}");
    // A certificate from a CA that ca_file does not hold: every peer would refuse it.
    let other = cluster.dir.path().join("other-pki");
    let other = other.to_str().unwrap();
    assert!(cluster.agent_cmd(&["ca", "init", "--out", other]).status.success());
    assert!(cluster.agent_cmd(&["cert", "issue", "--ca", other, "--node", "n1", "--out", other]).status.success());
    let key = cluster.key_file.to_str().unwrap();
    let ca = cluster.pki.join("ca.pem");
    let (cert, node_key) = (format!("{other}/n1.pem"), format!("{other}/n1.key"));
    let out = cluster.agent_cmd(&[
        "run",
        "--region",
        "eu",
        "--node-id",
        "n1",
        "--cluster-key-file",
        key,
        "--ca-file",
        ca.to_str().unwrap(),
        "--cert-file",
        &cert,
        "--key-file",
        &node_key,
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cert_file") && err.contains("not signed by a CA in ca_file"), "{err}");
    // Some of the three files: the message says which are missing.
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--region", "eu", "--node-id", "n1", "--cluster-key-file", key];
        args.extend_from_slice(extra);
        let out = cluster.agent_cmd(&args);
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run(&["--ca-file", ca.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("ca_file = ") && err.contains("missing cert_file and key_file"), "{err}");
    // A file that is no CA certificate is the CA file's fault, not the certificate's.
    let (code, err) = run(&["--ca-file", key, "--cert-file", &cert, "--key-file", &node_key]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&format!("invalid setting ca_file = {key:?}")) && err.contains("no PEM certificate"), "{err}");
}

#[test]
fn a_busy_port_exits_1_saying_so_once() {
    let cluster = Cluster::new();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = busy.local_addr().unwrap().to_string();
    let free = ["--gossip-addr", "127.0.0.1:0", "--data-addr", "127.0.0.1:0", "--dns-addr", "127.0.0.1:0"];
    for log in [&["--log-format", "text"][..], &["--log-format", "json"], &["--log-level", "grapevine_agent=debug"]] {
        let mut args = vec!["run", "--dev", "--admin-addr", &admin];
        args.extend_from_slice(&free);
        args.extend_from_slice(log);
        let out = cluster.agent_cmd(&args);
        assert_eq!(out.status.code(), Some(1), "{log:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.matches(&format!("cannot bind admin_addr {admin}")).count(), 1, "{log:?}: {err}");
    }
}

#[test]
fn client_commands_end_quietly_when_their_reader_is_gone() {
    // `agent keygen | head -0`: the pipe's reader is closed before anything is written.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(grapevine_tests::agent_bin())
        .arg("keygen")
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "", "no panic, no message");
}

#[test]
fn client_commands_say_where_they_looked() {
    let cluster = Cluster::new();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let out = cluster.agent_cmd(&["status", "--admin-addr", &closed.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&closed.to_string()) && err.contains("agent run"), "{err}");
    let a = cluster.start(AgentOpts::new("solo", "eu").service("web=3000"));
    let admin = a.admin.to_string();
    wait_until("ready", CONVERGE, || a.try_get("/v1/services/web").is_some());
    let out = cluster.agent_cmd(&["status", "--admin-addr", &admin]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("region eu") && text.contains("solo *") && text.contains("web"), "{text}");
    let out = cluster.agent_cmd(&["route", "nope", "--admin-addr", &admin]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no service named"));
    let run = |args: &[&str]| {
        let out = cluster.agent_cmd(args);
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // The API is plain HTTP, so an http:// prefix names the same agent.
    let out = cluster.agent_cmd(&["members", "--admin-addr", &format!("http://{admin}")]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("solo"), "{out:?}");
    let (code, err) = run(&["members", "--admin-addr", &format!("https://{admin}")]);
    assert!(code == Some(2) && err.contains("plain HTTP"), "{err}");
    let (code, err) = run(&["status", "--admin-addr", "nothost.invalid:1"]);
    assert!(code == Some(1) && err.contains("nothost.invalid does not resolve"), "{err}");
    // An HTTP server that is no agent.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other_addr = other.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for mut conn in other.incoming().flatten() {
            use std::io::{Read, Write};
            let _ = conn.read(&mut [0; 4096]);
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 6\r\n\r\n<html>");
        }
    });
    let (code, err) = run(&["status", "--admin-addr", &other_addr]);
    assert!(code == Some(1) && err.contains("does not look like a grapevine agent"), "{err}");
    // A malformed argument the agent refuses is bad usage.
    let (code, err) = run(&["keys", "install", "notakey", "--admin-addr", &admin]);
    assert!(code == Some(2) && err.contains("neither a key"), "{err}");
}

/// `agent keys ARGS` asked of `a`: the exit code, and stdout then stderr.
fn agent_keys(cluster: &Cluster, a: &grapevine_tests::Agent, args: &[&str]) -> (Option<i32>, String) {
    let admin = a.admin.to_string();
    let mut argv = vec!["keys"];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["--admin-addr", &admin]);
    let out = cluster.agent_cmd(&argv);
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// A new cluster key from `agent keygen`.
fn keygen(cluster: &Cluster) -> String {
    String::from_utf8(cluster.agent_cmd(&["keygen"]).stdout).unwrap().trim().to_string()
}

/// The non-comment lines of a keyring file.
fn keys_in(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

#[test]
fn agent_keys_rotates_a_running_cluster_across_regions() {
    let cluster = Cluster::new();
    let old_key = keys_in(&cluster.key_file).remove(0);
    // Each agent owns its keyring file, as each host does.
    let start = |id: &str, region: &str, seed: Option<std::net::SocketAddr>, key: &str| {
        let file = cluster.dir.path().join(format!("{id}.key"));
        std::fs::write(&file, format!("{key}\n")).unwrap();
        let mut opts = AgentOpts::new(id, region);
        opts.key_file = Some(file.clone());
        if let Some(s) = seed {
            opts = opts.join(s);
        }
        (cluster.start(opts), file)
    };
    let (e1, e1_file) = start("e1", "us-east", None, &old_key);
    let seed = Some(e1.gossip);
    let (e2, e2_file) = start("e2", "us-east", seed, &old_key);
    let (w1, w1_file) = start("w1", "us-west", seed, &old_key);
    let agents = [e1, e2, w1];
    wait_until("three alive everywhere", CONVERGE, || all_alive(&agents, 3));
    let keys = |a: &grapevine_tests::Agent, args: &[&str]| agent_keys(&cluster, a, args);
    let new_key = keygen(&cluster);

    // A key cannot seal before it is installed, nor the primary be removed.
    let (code, text) = keys(&agents[0], &["use", &new_key]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("no member holds key"), "{text}");
    let (code, text) = keys(&agents[0], &["remove", &old_key]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("is primary on"), "{text}");

    // Asked in one region, the install reaches the other.
    let (code, text) = keys(&agents[2], &["install", &new_key]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("on 3 of 3 members"), "{text}");
    // Run back to back from any agent, as an operator would: each waits for the last to be seen.
    let (code, text) = keys(&agents[1], &["use", &new_key]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("now sealing with key") && text.contains("on 3 of 3 members"), "{text}");
    let list = agents[0].get("/v1/keys");
    let old_fp = list["keys"].as_array().unwrap().iter().find(|k| k["here"] == "installed").unwrap()["fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, text) = keys(&agents[0], &["remove", &old_fp]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(&format!("removed key {old_fp} on 3 of 3 members")), "{text}");

    // Every keyring file now holds the new key alone, so restarts keep the rotation.
    for f in [&e1_file, &e2_file, &w1_file] {
        wait_until("the keyring file is rewritten", CONVERGE, || keys_in(f) == [new_key.clone()]);
    }
    wait_until("w1 sees one key left on every member", CONVERGE, || {
        agents[2].get("/v1/keys")["keys"].as_array().is_some_and(|k| k.len() == 1 && k[0]["primary"] == 3)
    });
    let (code, text) = keys(&agents[2], &["list"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(text.lines().count(), 2, "{text}");
    let row: Vec<&str> = text.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[1..], ["3/3", "3/3", "primary", "-"], "{text}");

    // A newcomer with only the new key joins; one with only the old key is refused.
    let (late, _) = start("late", "us-west", seed, &new_key);
    let mut all: Vec<&grapevine_tests::Agent> = agents.iter().collect();
    all.push(&late);
    wait_until("four alive everywhere", CONVERGE, || {
        all.iter().all(|a| {
            let s = a.states();
            s.len() == 4 && s.values().all(|v| v == "alive")
        })
    });
    let before = agents[0].metric("grapevine_gossip_dropped_total", "unauthenticated");
    let (stale, _) = start("stale", "us-east", seed, &old_key);
    wait_until("e1 drops the old key's datagrams", CONVERGE, || {
        agents[0].metric("grapevine_gossip_dropped_total", "unauthenticated") >= before + 3.0
    });
    assert_eq!(agents[0].state_of("stale"), None);
    assert_eq!(stale.states().len(), 1, "the agent with the old key sees only itself");
    // The operations were the agent's own events: counted, never shown as users' events.
    assert!(agents[2].metric("grapevine_events_total", "internal") >= 3.0);
    assert_eq!(agents[2].metric("grapevine_events_total", "received"), 0.0);
}

#[test]
fn agent_keys_will_not_remove_a_key_a_member_could_not_write_until_its_file_catches_up() {
    let cluster = Cluster::new();
    let old_key = keys_in(&cluster.key_file).remove(0);
    let a = cluster.start(AgentOpts::new("a", "eu"));
    // b's keyring file sits in a directory that is gone by the time keys change.
    let dir = cluster.dir.path().join("b-secrets");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("cluster.key"), format!("{old_key}\n")).unwrap();
    let mut opts = AgentOpts::new("b", "eu").join(a.gossip);
    opts.key_file = Some(dir.join("cluster.key"));
    let b = cluster.start(opts);
    let agents = [a, b];
    wait_until("two alive", CONVERGE, || all_alive(&agents, 2));
    std::fs::remove_dir_all(&dir).unwrap();
    let keys = |args: &[&str]| agent_keys(&cluster, &agents[0], args);
    let new_key = keygen(&cluster);
    let (code, text) = keys(&["install", &new_key]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("on 2 of 2 members"), "{text}");
    wait_until("a lists b as unsaved", CONVERGE, || agents[0].get("/v1/keys")["unsaved"] == json!(["b"]));
    let (code, text) = keys(&["list"]);
    assert!(code == Some(0) && text.contains("could not write their keyring file") && text.contains(": b"), "{text}");
    let (code, text) = keys(&["use", &new_key]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("warning: b could not write"), "{text}");
    // Removing the old key would leave b, restarted, with that key alone.
    let (code, text) = keys(&["remove", &old_key, "--wait", "1s"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("b could not write their keyring file"), "{text}");
    assert_eq!(agents[1].get("/v1/keys")["keys"].as_array().map(Vec::len), Some(2), "nothing was removed");
    // The operator puts the new key in b's file (as into a read-only secret): b notices, and
    // the old key goes without --force.
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("cluster.key"), format!("{new_key}\n")).unwrap();
    wait_until("b's file no longer lags", CONVERGE, || agents[0].get("/v1/keys")["unsaved"] == json!([]));
    let (code, text) = keys(&["remove", &old_key]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("removed key") && text.contains("on 2 of 2 members"), "{text}");
    assert_eq!(keys_in(&dir.join("cluster.key")), std::slice::from_ref(&new_key));
    // A mistyped fingerprint is an error, not a success.
    let (code, text) = keys(&["remove", "0123456789abcdef"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("no member holds key 0123456789abcdef"), "{text}");
}

//! Two QUIC endpoints in one process: a real `DataPlane` and a hand-driven client, so a test can
//! send what no agent would (garbage headers, a certificate naming someone else).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use grapevine_agent::cluster::snapshot::{Lifecycle, Liveness, LocalNode, MemberRecord, Snapshot};
use grapevine_agent::config::ServiceLayer;
use grapevine_agent::dataplane::header::{self, Answer, StreamHeader};
use grapevine_agent::dataplane::pki::{Ca, NodeCredentials};
use grapevine_agent::dataplane::{DataPlane, tls};
use grapevine_agent::metrics::Metrics;
use grapevine_agent::services::LocalServices;

fn member(id: &str, data_addr: SocketAddr) -> MemberRecord {
    MemberRecord {
        id: id.into(),
        generation: 1,
        region: "eu".into(),
        zone: "eu-a".into(),
        gossip_addr: data_addr,
        data_addr: Some(data_addr),
        version: "test".into(),
        liveness: Liveness::Alive,
        lifecycle: Lifecycle::Active,
        services: vec![],
        keyring: Default::default(),
    }
}

/// An echo app on 127.0.0.1.
async fn echo_app() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

struct Setup {
    server_addr: SocketAddr,
    metrics: Arc<Metrics>,
    dp: Arc<DataPlane>,
}

/// A data plane named "server" fronting "echo", whose view lists `listed` at `client_addr`.
async fn server(ca: &Ca, listed: &str, client_addr: SocketAddr) -> Setup {
    let socket = DataPlane::bind_socket("127.0.0.1:0".parse().unwrap()).unwrap();
    let server_addr = socket.local_addr().unwrap();
    let local = LocalNode {
        id: "server".into(),
        region: "eu".into(),
        zone: "eu-a".into(),
        version: "test".into(),
        cluster: "t".into(),
    };
    let snap = Snapshot::build(local, vec![member("server", server_addr), member(listed, client_addr)], &|_| None, 1);
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(snap));
    std::mem::forget(_tx);
    let services = Arc::new(LocalServices::new(vec![], None).unwrap());
    services.register(ServiceLayer { name: "echo".into(), port: echo_app().await, ..Default::default() }).unwrap();
    let metrics = Arc::new(Metrics::new());
    let creds = ca.credentials_for("server").unwrap();
    let dp = DataPlane::start(
        socket,
        tls::Trust::new(&creds, "server").unwrap(),
        "server",
        rx,
        services,
        metrics.clone(),
        None,
    )
    .unwrap();
    tokio::spawn(dp.clone().serve());
    Setup { server_addr, metrics, dp }
}

fn client(creds: &NodeCredentials) -> quinn::Endpoint {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(tls::client_config(creds).unwrap());
    ep
}

async fn answer(recv: &mut quinn::RecvStream) -> Option<Answer> {
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(5), recv.read_exact(&mut b)).await.ok()?.ok()?;
    Answer::from_byte(b[0])
}

#[tokio::test]
async fn a_garbage_header_is_refused_and_other_streams_on_the_connection_carry_on() {
    let ca = Ca::generate("t").unwrap();
    let creds = ca.credentials_for("client").unwrap();
    let ep = client(&creds);
    let s = server(&ca, "client", ep.local_addr().unwrap()).await;
    let conn = ep.connect(s.server_addr, "server").unwrap().await.unwrap();

    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0, 6, 0xde, 0xad, 0xbe, 0xef, 0, 1]).await.unwrap();
    assert_eq!(answer(&mut recv).await, Some(Answer::BadHeader));

    let (mut send2, mut recv2) = conn.open_bi().await.unwrap();
    let h = StreamHeader {
        version: header::VERSION,
        service: "echo".into(),
        target: "server".into(),
        affinity_key: None,
        client_addr: None,
    };
    header::write_header(&mut send2, &h).await.unwrap();
    assert_eq!(answer(&mut recv2).await, Some(Answer::Accepted));
    send2.write_all(b"still here").await.unwrap();
    send2.finish().unwrap();
    let echoed = recv2.read_to_end(1024).await.unwrap();
    assert_eq!(echoed, b"still here");

    // Refusals name their reason: another node's stream, an unknown service.
    for (target, service, want) in
        [("elsewhere", "echo", Answer::WrongTarget), ("server", "nope", Answer::UnknownService)]
    {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let h = StreamHeader {
            version: header::VERSION,
            service: service.into(),
            target: target.into(),
            affinity_key: None,
            client_addr: None,
        };
        header::write_header(&mut send, &h).await.unwrap();
        assert_eq!(answer(&mut recv).await, Some(want));
    }
    assert!(s.metrics.render().contains("result=\"bad_header\"} 1"));
}

#[tokio::test]
async fn a_certificate_naming_another_member_is_refused() {
    let ca = Ca::generate("t").unwrap();
    // A valid cluster certificate, but for "impostor", while membership lists "client" here.
    let creds = ca.credentials_for("impostor").unwrap();
    let ep = client(&creds);
    let s = server(&ca, "client", ep.local_addr().unwrap()).await;
    let conn = ep.connect(s.server_addr, "server").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let h = StreamHeader {
        version: header::VERSION,
        service: "echo".into(),
        target: "server".into(),
        affinity_key: None,
        client_addr: None,
    };
    let _ = header::write_header(&mut send, &h).await;
    assert_eq!(answer(&mut recv).await, None, "the connection is closed, not answered");
    assert!(s.metrics.render().contains("reason=\"identity\"} 1"));

    // A certificate from another CA does not even complete the handshake.
    let other = Ca::generate("other").unwrap().credentials_for("client").unwrap();
    let ep2 = client(&other);
    let result = match ep2.connect(s.server_addr, "server").unwrap().await {
        Err(_) => true,
        // TLS 1.3: the client may think it is connected until the first use.
        Ok(c) => match c.open_bi().await {
            Err(_) => true,
            Ok((mut send, mut recv)) => {
                let _ = send.write_all(b"x").await;
                answer(&mut recv).await.is_none()
            }
        },
    };
    assert!(result);
}

#[tokio::test]
async fn a_peer_may_hold_open_more_streams_than_its_first_credit() {
    // Each held stream is a TCP connection to the echo app here, two descriptors in all.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let ca = Ca::generate("t").unwrap();
    let creds = ca.credentials_for("client").unwrap();
    let ep = client(&creds);
    let s = server(&ca, "client", ep.local_addr().unwrap()).await;
    let conn = ep.connect(s.server_addr, "server").unwrap().await.unwrap();
    let h = StreamHeader {
        version: header::VERSION,
        service: "echo".into(),
        target: "server".into(),
        affinity_key: None,
        client_addr: None,
    };
    // Without the receiver raising the credit, stream INITIAL_STREAMS + 1 would wait forever.
    let n = tls::INITIAL_STREAMS as usize * 3 / 2;
    let mut held = Vec::with_capacity(n);
    let opened = tokio::time::timeout(Duration::from_secs(60), async {
        while held.len() < n {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            header::write_header(&mut send, &h).await.unwrap();
            assert_eq!(answer(&mut recv).await, Some(Answer::Accepted), "stream {}", held.len());
            held.push((send, recv));
        }
    })
    .await;
    assert!(opened.is_ok(), "only {} of {n} streams were opened within 60 s", held.len());
    // The first and the last still carry data both ways.
    for i in [0, n - 1] {
        let (send, recv) = &mut held[i];
        send.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), recv.read_exact(&mut back)).await.unwrap().unwrap();
        assert_eq!(&back, b"ping", "stream {i}");
    }
}

fn echo_header() -> StreamHeader {
    StreamHeader {
        version: header::VERSION,
        service: "echo".into(),
        target: "server".into(),
        affinity_key: None,
        client_addr: None,
    }
}

/// A connection to the server presenting `creds`, or None if the handshake fails (under TLS 1.3
/// a refused client may only learn it on first use, which [`echoes`] then reports).
async fn connect(ep: &quinn::Endpoint, addr: SocketAddr, creds: &NodeCredentials) -> Option<quinn::Connection> {
    let connecting = ep.connect_with(tls::client_config(creds).unwrap(), addr, "server").ok()?;
    tokio::time::timeout(Duration::from_secs(5), connecting).await.ok()?.ok()
}

/// Whether a new stream for "echo" on `conn` is accepted and carries bytes there and back.
async fn echoes(conn: &quinn::Connection) -> bool {
    let Ok(Ok((mut send, mut recv))) = tokio::time::timeout(Duration::from_secs(5), conn.open_bi()).await else {
        return false;
    };
    if header::write_header(&mut send, &echo_header()).await.is_err()
        || answer(&mut recv).await != Some(Answer::Accepted)
    {
        return false;
    }
    let mut back = [0u8; 4];
    send.write_all(b"ping").await.is_ok()
        && tokio::time::timeout(Duration::from_secs(5), recv.read_exact(&mut back)).await.is_ok_and(|r| r.is_ok())
        && &back == b"ping"
}

/// Credentials for `node` from `issuer`, trusting `cas`.
fn creds(issuer: &Ca, node: &str, cas: &[&Ca]) -> NodeCredentials {
    let mut c = issuer.credentials_for(node).unwrap();
    c.cas = cas.iter().map(|ca| ca.credentials_for("x").unwrap().cas[0].clone()).collect();
    c
}

#[tokio::test]
async fn a_reload_swaps_the_ca_and_closes_the_connections_it_no_longer_vouches_for() {
    let (old, new) = (Ca::generate("old").unwrap(), Ca::generate("new").unwrap());
    // One client endpoint (the address membership lists for "client"), presenting one
    // certificate or another in each handshake.
    let (on_old, on_new) = (creds(&old, "client", &[&old, &new]), creds(&new, "client", &[&old, &new]));
    let ep = client(&on_old);
    let s = server(&old, "client", ep.local_addr().unwrap()).await;
    let under_old = connect(&ep, s.server_addr, &on_old).await.expect("handshake under the old CA");
    assert!(echoes(&under_old).await);
    let refused = connect(&ep, s.server_addr, &on_new).await;
    assert!(!matches!(refused, Some(c) if echoes(&c).await), "a certificate from a CA not yet trusted got in");

    // Step 1: every node trusts both CAs. Nothing open is closed.
    let done = s.dp.reload(&creds(&old, "server", &[&old, &new])).await.unwrap();
    assert_eq!((done.cas, done.closed), (2, 0));
    assert!(echoes(&under_old).await, "a connection both bundles vouch for stays open");
    // Step 2 (on the client): its certificate from the new CA is let in.
    let under_new = connect(&ep, s.server_addr, &on_new).await.expect("handshake with a new-CA certificate");
    assert!(echoes(&under_new).await, "a certificate from the second CA of the bundle is accepted");

    // Step 3: the old CA is dropped (the server's own certificate is from the new one now).
    let done = s.dp.reload(&creds(&new, "server", &[&new])).await.unwrap();
    assert_eq!((done.cas, done.closed), (1, 1), "the connection made with the old-CA certificate is closed");
    let reason = tokio::time::timeout(Duration::from_secs(5), under_old.closed()).await.unwrap();
    assert!(
        matches!(&reason, quinn::ConnectionError::ApplicationClosed(c) if u64::from(c.error_code) == 2),
        "{reason:?}"
    );
    assert!(s.metrics.render().contains("reason=\"untrusted\"} 1"), "the close is counted");
    assert!(echoes(&under_new).await, "the new-CA connection carries on");
    // The old-CA certificate cannot come back.
    let again = connect(&ep, s.server_addr, &on_old).await;
    assert!(!matches!(again, Some(c) if echoes(&c).await), "an old-CA certificate got back in");
}

#[tokio::test]
async fn a_reload_that_would_cut_the_node_off_is_refused_and_changes_nothing() {
    let (ca, other) = (Ca::generate("t").unwrap(), Ca::generate("other").unwrap());
    let mine = creds(&ca, "client", &[&ca]);
    let ep = client(&mine);
    let s = server(&ca, "client", ep.local_addr().unwrap()).await;
    let conn = connect(&ep, s.server_addr, &mine).await.unwrap();
    assert!(echoes(&conn).await);

    let refused = |r: Result<_, grapevine_agent::dataplane::ReloadError>| match r {
        Ok(done) => panic!("reloaded: {done:?}"),
        Err(e) => e.to_string(),
    };
    // Its own certificate is from a CA the new bundle lacks: every peer would refuse it.
    let why = refused(s.dp.reload(&creds(&ca, "server", &[&other])).await);
    assert!(why.contains("not signed by a CA in ca_file"), "{why}");
    // A certificate for another node.
    let why = refused(s.dp.reload(&creds(&ca, "someone-else", &[&ca])).await);
    assert!(why.contains("does not name this node"), "{why}");
    // A key that is not the certificate's.
    let mut mismatched = creds(&ca, "server", &[&ca]);
    mismatched.identity.key = ca.credentials_for("server").unwrap().identity.key;
    let why = refused(s.dp.reload(&mismatched).await);
    assert!(why.contains("do not match"), "{why}");

    assert!(echoes(&conn).await, "the open connection is untouched");
    let fresh = connect(&ep, s.server_addr, &mine).await.unwrap();
    assert!(echoes(&fresh).await, "new handshakes still use the old credentials");
    assert!(s.metrics.render().contains("reason=\"untrusted\"} 0"), "nothing was closed");
}

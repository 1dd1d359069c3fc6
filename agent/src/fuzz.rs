//! Entry points for `make fuzz` (the `fuzz/` crate): each takes bytes as they would arrive and
//! runs the agent's own decoding of them, with no socket and nothing sent anywhere. A panic, a
//! hang or unbounded memory here is a bug an attacker (or a buggy peer) could trigger.
//!
//! Who can send what: anyone can reach the gossip socket, but only datagrams that open under
//! the keyring get further ([`gossip_datagram`]); what a key holder sends is decoded by
//! [`gossip_frame`] and [`gossip_value`]; a QUIC peer with a cluster certificate sends stream
//! headers ([`stream_header`]); any client of the ingress sends request heads, whose host, path
//! and headers the agent reads itself ([`ingress_request`]; hyper parses the bytes).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::cluster::snapshot::{KeyringView, MemberView, ServiceRecord};
use crate::events::EventBody;
use crate::membership::keyring::{KeyAction, Keyring};
use crate::membership::swim::{Hint, Swim, SwimId, SwimSettings};
use crate::membership::transport::{
    DatagramSocket, FRAME_GOSSIP, FRAME_HINT, FRAME_JOIN, FRAME_JOIN_REPLY, FRAME_SWIM, FRAME_WAN, Wire,
};
use crate::metrics::Metrics;

/// A datagram on the gossip socket: opened under a fixed keyring. Also checks that whatever
/// is sealed opens to itself.
pub fn gossip_datagram(data: &[u8]) {
    let ring = Keyring::from_keys(vec![[7; 32], [9; 32]]);
    let _ = ring.open(b"fuzz", data);
    let mut sealed = Vec::new();
    ring.seal(b"fuzz", data, &mut sealed);
    assert_eq!(ring.open(b"fuzz", &sealed).ok().as_deref(), Some(data));
}

/// An opened datagram: the frame kind, then its body, decoded as the receive path does
/// (chitchat messages for the region and WAN pools, SWIM through a real foca instance, join
/// requests and replies, version hints).
pub fn gossip_frame(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else { return };
    match kind {
        FRAME_GOSSIP | FRAME_WAN => drop(crate::membership::transport::decode_gossip(body)),
        FRAME_SWIM => swim(body),
        FRAME_HINT => {
            let _ = postcard::from_bytes::<Hint>(body);
        }
        FRAME_JOIN => drop(serde_json::from_slice::<crate::membership::JoinRequest>(body)),
        FRAME_JOIN_REPLY => drop(serde_json::from_slice::<crate::membership::JoinReply>(body)),
        _ => {}
    }
}

/// A value another member put in its gossip state, by the key it sits under.
pub fn gossip_value(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(body) else { return };
    match which % 7 {
        0 => drop(serde_json::from_str::<ServiceRecord>(text)),
        1 => drop(serde_json::from_str::<MemberView>(text)),
        2 => drop(serde_json::from_str::<KeyringView>(text)),
        3 => {
            let hub = crate::events::EventHub::new(Arc::new(Metrics::new()), 512, Duration::from_secs(60), 0);
            let _ = serde_json::from_str::<EventBody>(text);
            hub.accept("n.1.1", text, "n");
        }
        5 => {
            drop(serde_json::from_str::<std::collections::BTreeMap<String, crate::cluster::snapshot::RegionInfo>>(text))
        }
        6 => {
            // An event under a key of the sender's choosing: the first line is its id.
            let (id, body) = text.split_once('\n').unwrap_or((text, ""));
            let hub = crate::events::EventHub::new(Arc::new(Metrics::new()), 512, Duration::from_secs(60), 0);
            hub.accept(id, body, crate::membership::origin_of(id));
        }
        _ => {
            // A `_keyring` operation, applied to a ring holding two keys.
            let ring = Keyring::from_keys(vec![[1; 32], [2; 32]]);
            if let Ok(op) = serde_json::from_str::<crate::keys::KeyOp>(text)
                && let Ok(Some(next)) = crate::keys::apply(&ring, &op)
            {
                assert!(!next.fingerprints().is_empty(), "a keyring never loses its last key");
                if op.action != KeyAction::Use {
                    assert_eq!(next.fingerprints()[0], ring.fingerprints()[0], "only `use` changes the primary");
                }
            }
        }
    }
}

/// A stream header's body, as a QUIC peer sends it after the length.
pub fn stream_header(data: &[u8]) {
    if let Ok(h) = crate::dataplane::header::decode(data) {
        assert_eq!(crate::dataplane::header::decode(&crate::dataplane::header::encode(&h)).as_ref(), Ok(&h));
    }
}

/// A request head as the ingress reads it once hyper has parsed it: the first line is the
/// host, the second the path, then `name: value` headers. Routing, the affinity key under
/// each way of configuring it, and X-Forwarded-For.
pub fn ingress_request(data: &[u8]) {
    use crate::config::{Affinity, IngressConfig, IngressRoute};
    use crate::dataplane::ingress::{affinity_key, forwarded_for, pick_service};
    use hyper::header::{HeaderMap, HeaderName, HeaderValue};
    let mut lines = data.split(|b| *b == b'\n');
    let host = lines.next().and_then(|l| std::str::from_utf8(l).ok());
    let path = lines.next().and_then(|l| std::str::from_utf8(l).ok()).unwrap_or("/");
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else { continue };
        let value = line[colon + 1..].trim_ascii();
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(&line[..colon]), HeaderValue::from_bytes(value)) {
            headers.append(name, value);
        }
    }
    let route = |host: Option<&str>, prefix: Option<&str>, service: &str| IngressRoute {
        host: host.map(str::to_string),
        path_prefix: prefix.map(str::to_string),
        service: service.to_string(),
    };
    let routes = vec![
        route(Some("api.example.com"), Some("/v2"), "api"),
        route(None, Some("/chat"), "chat"),
        route(None, None, "web"),
    ];
    let client = SocketAddr::from(([203, 0, 113, 9], 5555));
    for (cookie, header, fallback) in [
        (Some("meteor_login_token"), Some("x-user"), None),
        (None, Some("x-user"), None),
        (Some("sid"), None, Some("none")),
    ] {
        let affinity = Affinity {
            cookie: cookie.map(str::to_string),
            header: header.map(str::to_string),
            fallback: fallback.map(str::to_string),
        };
        let config = IngressConfig { listen: client, routes: routes.clone(), affinity };
        assert!(pick_service(&config, host, path).is_some(), "the last route takes anything");
        match affinity_key(&config, &headers, client) {
            Some(key) => assert!(!key.is_empty(), "an affinity key is never empty"),
            None => assert_eq!(fallback, Some("none"), "only `fallback = none` gives no key"),
        }
    }
    assert!(forwarded_for(headers.get("x-forwarded-for"), client).is_some(), "X-Forwarded-For is always set");
}

/// A socket that never receives and keeps what is sent (to nobody).
#[derive(Debug, Default)]
struct Nowhere {
    sent: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl Nowhere {
    fn keep(&self, buf: &[u8]) -> std::io::Result<usize> {
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        if sent.len() < 64 {
            sent.push(buf.to_vec());
        }
        Ok(buf.len())
    }
}

#[async_trait::async_trait]
impl DatagramSocket for Arc<Nowhere> {
    async fn recv_from(&self, _: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        std::future::pending().await
    }
    async fn send_to(&self, buf: &[u8], _: SocketAddr) -> std::io::Result<usize> {
        self.keep(buf)
    }
    fn try_send_to(&self, buf: &[u8], _: SocketAddr) -> std::io::Result<usize> {
        self.keep(buf)
    }
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(SocketAddr::from(([127, 0, 0, 1], 7946)))
    }
}

const FUZZ_KEY: [u8; 32] = [7; 32];

fn swim_settings() -> SwimSettings {
    SwimSettings {
        probe_interval: Duration::from_secs(1),
        probe_timeout: Duration::from_millis(500),
        indirect_probes: 3,
        suspicion: Duration::from_secs(5),
        remember_down: Duration::from_secs(60),
    }
}

fn swim_at(port: u16, socket: Arc<Nowhere>) -> Arc<Swim> {
    let metrics = Arc::new(Metrics::new());
    let wire = Wire::new(socket, Keyring::from_keys(vec![FUZZ_KEY]), "fuzz", metrics.clone());
    let me = SwimId { addr: SocketAddr::from(([127, 0, 0, 1], port)), generation: 1, bump: 0 };
    Swim::new(me, "fuzz", &swim_settings(), wire, metrics)
}

/// Starting inputs for each target (`make fuzz` writes them into its corpus): real encodings
/// of what each decoder takes, so the fuzzer starts past the first byte of every format.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use crate::dataplane::header::{StreamHeader, VERSION, encode};
    let mut out = Vec::new();
    let header = StreamHeader {
        version: VERSION,
        service: "profile".into(),
        target: "web-2".into(),
        affinity_key: Some("session=abc".into()),
        client_addr: Some("10.0.0.7:5555".parse().unwrap_or(SocketAddr::from(([10, 0, 0, 7], 5555)))),
    };
    out.push(("stream_header", encode(&header)));
    out.push(("stream_header", encode(&StreamHeader { affinity_key: None, client_addr: None, ..header })));

    let ring = Keyring::from_keys(vec![FUZZ_KEY]);
    let mut sealed = Vec::new();
    ring.seal(b"fuzz", &[FRAME_HINT, 1, 2, 3], &mut sealed);
    out.push(("gossip_datagram", sealed));

    // SWIM: two members meeting; every datagram they send, opened, is a frame.
    if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_time().build() {
        rt.block_on(async {
            let (sa, sb) = (Arc::new(Nowhere::default()), Arc::new(Nowhere::default()));
            let (a, b) = (swim_at(7946, sa.clone()), swim_at(7947, sb.clone()));
            a.announce(SocketAddr::from(([127, 0, 0, 1], 7947)));
            for _ in 0..3 {
                for (from, to) in [(&sa, &b), (&sb, &a)] {
                    let sent: Vec<Vec<u8>> = std::mem::take(&mut *from.sent.lock().unwrap_or_else(|e| e.into_inner()));
                    for datagram in sent {
                        if let Ok(frame) = ring.open(b"fuzz", &datagram) {
                            if let Some(body) = frame.strip_prefix(&[FRAME_SWIM]) {
                                to.handle(body);
                            }
                            out.push(("gossip_frame", frame));
                        }
                    }
                }
            }
            a.stop();
            b.stop();
        });
    }
    for body in crate::membership::transport::gossip_seeds() {
        out.push(("gossip_frame", [&[FRAME_GOSSIP][..], &body].concat()));
    }
    let hint =
        Hint { node: "web-1".into(), generation: 7, version: 42, addr: SocketAddr::from(([127, 0, 0, 1], 7946)) };
    out.push(("gossip_frame", [&[FRAME_HINT][..], &postcard::to_stdvec(&hint).unwrap_or_default()].concat()));
    out.push(("gossip_frame", [&[FRAME_JOIN][..], br#"{"region":"us-east"}"#].concat()));
    out.push((
        "gossip_frame",
        [&[FRAME_JOIN_REPLY][..], br#"{"members":["127.0.0.1:7946"],"gateways":["10.0.1.1:7946"]}"#].concat(),
    ));

    let values: [(u8, &str); 5] = [
        (0, r#"{"name":"profile","port":3000,"weight":100,"healthy":true,"load":3,"pinned":false,"draining":false}"#),
        (
            1,
            r#"{"id":"w-1","region":"west","zone":"west-a","gossip_addr":"10.0.1.1:7946","data_addr":null,"state":"alive","generation":3,"version":"0.1.0","draining":false,"services":[{"name":"web","healthy":true,"load":0,"weight":100,"port":80,"pinned":false,"draining":false}],"rtt_ms":null,"keyring":{"keys":["00aa00aa00aa00aa"]}}"#,
        ),
        (2, r#"{"keys":["00aa00aa00aa00aa","11bb11bb11bb11bb"],"unsaved":true}"#),
        (3, r#"{"name":"deploy","payload":"v42","at":1000}"#),
        (4, r#"{"action":"use","fingerprint":"00aa00aa00aa00aa"}"#),
    ];
    for (which, json) in values {
        out.push(("gossip_value", [&[which][..], json.as_bytes()].concat()));
    }
    out.push(("gossip_value", [&[5][..], br#"{"us-west":{"gateways":["w-1","w-2"],"reachable":true}}"#].concat()));
    out.push(("gossip_value", [&[6][..], b"web-1.17.3\n", br#"{"name":"deploy","payload":"v42","at":1000}"#].concat()));
    out.push((
        "ingress_request",
        b"api.example.com:8080\n/v2/users\ncookie: theme=dark; meteor_login_token=tok123\nx-user: u1\nx-forwarded-for: 10.0.0.1".to_vec(),
    ));
    out.push(("ingress_request", b"example.com\n/chat/room\nx-forwarded-for: 10.0.0.1, 10.0.0.2".to_vec()));
    out
}

/// A SWIM datagram handed to a fresh foca instance (its timers die with the runtime).
fn swim(body: &[u8]) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_time().build() else { return };
    rt.block_on(async {
        let swim = swim_at(7946, Arc::new(Nowhere::default()));
        // The region tag is the first bytes of every SWIM body: a body from our own region is
        // what a fuzzer cannot guess, so both the raw body and one behind our tag are tried.
        swim.handle(body);
        swim.handle(&[swim.region_tag(), body].concat());
        let _ = swim.take_hints();
        swim.stop();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every seed is a real encoding its decoder accepts (so the fuzzer starts past the
    /// format's first bytes); `GRAPEVINE_FUZZ_SEEDS=DIR` also writes them to `DIR/TARGET/`.
    #[test]
    fn seeds_are_real_encodings_and_pass_their_targets() {
        let seeds = seeds();
        let frames: Vec<&Vec<u8>> = seeds.iter().filter(|(t, _)| *t == "gossip_frame").map(|(_, s)| s).collect();
        assert!(frames.iter().filter(|f| f[0] == FRAME_SWIM).count() >= 2, "SWIM seeds from two members meeting");
        for (target, data) in &seeds {
            match *target {
                "stream_header" => assert!(crate::dataplane::header::decode(data).is_ok()),
                "gossip_datagram" => {
                    assert!(Keyring::from_keys(vec![FUZZ_KEY]).open(b"fuzz", data).is_ok());
                    gossip_datagram(data);
                }
                "ingress_request" => ingress_request(data),
                "gossip_frame" => {
                    if matches!(data[0], FRAME_GOSSIP | FRAME_WAN) {
                        assert!(crate::membership::transport::decode_gossip(&data[1..]).is_some());
                    }
                    gossip_frame(data)
                }
                _ => gossip_value(data),
            }
        }
        let swim = swim_at(7946, Arc::new(Nowhere::default()));
        for f in frames.iter().filter(|f| f[0] == FRAME_SWIM) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            rt.block_on(async { assert!(swim.handle(&f[1..]), "a SWIM seed decodes") });
        }
        if let Some(dir) = std::env::var_os("GRAPEVINE_FUZZ_SEEDS") {
            for (i, (target, data)) in seeds.iter().enumerate() {
                let dir = std::path::Path::new(&dir).join(target);
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join(format!("seed-{i}")), data).unwrap();
            }
        }
    }
}

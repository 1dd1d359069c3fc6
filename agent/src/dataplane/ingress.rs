//! Ingress (L7): HTTP/1.1 with keep-alive and WebSocket upgrades. Requests are routed by host
//! and path prefix to a service; the affinity key comes from a configured cookie or header,
//! else the client address; each request goes to its instance over its own connection or
//! stream, with `X-Forwarded-For` and `X-Forwarded-Proto` added. 503 when no instance may take
//! the request, 502 when every instance tried failed, 504 when the instance is too slow.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use super::splice::IdleLimit;
use super::{BackendStream, DataPlane, ForwardError};
use crate::config::IngressConfig;

const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

type Body = BoxBody<Bytes, hyper::Error>;

fn text(status: StatusCode, msg: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(msg + "\n")).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// Serves the ingress listener until the task is aborted.
pub async fn serve(listener: TcpListener, config: Arc<IngressConfig>, dp: Arc<DataPlane>) {
    loop {
        let (tcp, client) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "ingress accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (config, dp) = (config.clone(), dp.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (config, dp) = (config.clone(), dp.clone());
                async move { Ok::<_, Infallible>(handle(req, client, &config, &dp).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .keep_alive(true)
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!(%client, error = %e, "ingress connection ended with an error");
            }
        });
    }
}

/// Splices an upgraded connection (a WebSocket, say) for the rest of its life. hyper hands
/// back the sockets it was given, with whatever it had read past the upgrade, so the
/// connection is spliced as an upstream connection is: under the idle limit, holding no
/// buffer while idle (a WebSocket through the ingress is mostly idle).
async fn splice_upgraded(
    client: hyper::upgrade::Upgraded,
    backend: hyper::upgrade::Upgraded,
    idle: Option<&Arc<IdleLimit>>,
) {
    use super::splice::{QuicEnd, Splice};
    // The ingress made both from exactly these types, so the downcasts cannot fail; if a
    // change to the ingress ever broke that, the connection is closed and says why rather
    // than copied without the idle limit.
    let (Ok(client), Ok(backend)) =
        (client.downcast::<TokioIo<TcpStream>>(), backend.downcast::<TokioIo<BackendStream>>())
    else {
        tracing::error!("an upgraded connection is not of the type the ingress made; closing it");
        return;
    };
    let (tcp, to_backend) = (client.io.into_inner(), client.read_buf);
    match backend.io.into_inner() {
        BackendStream::Tcp(app, _active) => {
            Splice::with_pending(tcp, app, to_backend, backend.read_buf).idle_limit(idle).await
        }
        BackendStream::Quic(q) => {
            let (recv, send) = q.into_inner();
            Splice::with_pending(tcp, QuicEnd::new(send, recv), to_backend, backend.read_buf).idle_limit(idle).await
        }
    }
}

/// The service for a request: the first route whose host and path prefix match.
pub fn pick_service<'a>(config: &'a IngressConfig, host: Option<&str>, path: &str) -> Option<&'a str> {
    // The port and a trailing dot (`example.com.`, the fully qualified form) do not count.
    let host = host.map(|h| {
        let name = h
            .rsplit_once(':')
            .map_or(h, |(name, port)| if port.chars().all(|c| c.is_ascii_digit()) { name } else { h });
        name.strip_suffix('.').unwrap_or(name)
    });
    config
        .routes
        .iter()
        .find(|r| {
            r.host
                .as_deref()
                .is_none_or(|want| host.is_some_and(|h| h.eq_ignore_ascii_case(want.strip_suffix('.').unwrap_or(want))))
                && r.path_prefix.as_deref().is_none_or(|p| prefix_matches(p, path))
        })
        .map(|r| r.service.as_str())
}

/// A path prefix matches whole path segments, as Gateway API's `PathPrefix` does: `/login`
/// matches `/login` and `/login/x`, not `/loginx`; a prefix ending in `/` matches what is
/// below it.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The affinity key: the configured cookie, else the configured header, else the client's IP
/// (unless the fallback is `none`).
pub fn affinity_key(config: &IngressConfig, headers: &hyper::HeaderMap, client: SocketAddr) -> Option<String> {
    if let Some(name) = &config.affinity.cookie {
        for value in headers.get_all(header::COOKIE) {
            let Ok(v) = value.to_str() else { continue };
            for pair in v.split(';') {
                if let Some((k, val)) = pair.trim().split_once('=')
                    && k == name
                    && !val.is_empty()
                {
                    return Some(val.to_string());
                }
            }
        }
    }
    if let Some(name) = &config.affinity.header
        && let Some(v) = headers.get(name.as_str()).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty())
    {
        return Some(v.to_string());
    }
    match config.affinity.fallback.as_deref() {
        Some("none") => None,
        _ => Some(client.ip().to_string()),
    }
}

/// X-Forwarded-For: this client appended to whatever a proxy in front already added (a value
/// that is not text is replaced).
pub fn forwarded_for(prev: Option<&HeaderValue>, client: SocketAddr) -> Option<HeaderValue> {
    let xff = match prev.and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {}", client.ip()),
        None => client.ip().to_string(),
    };
    HeaderValue::from_str(&xff).ok()
}

async fn handle(
    mut req: Request<Incoming>,
    client: SocketAddr,
    config: &IngressConfig,
    dp: &DataPlane,
) -> Response<Body> {
    let host =
        req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).or_else(|| req.uri().host()).map(str::to_string);
    let Some(service) = pick_service(config, host.as_deref(), req.uri().path()).map(str::to_string) else {
        dp.metrics.ingress("404");
        return text(StatusCode::NOT_FOUND, "no ingress route for this host and path".into());
    };
    let key = affinity_key(config, req.headers(), client);
    let super::Forwarded { stream, node } = match dp.connect(&service, key.as_deref(), Some(client)).await {
        Ok(f) => f,
        Err(e @ (ForwardError::NoInstance(_) | ForwardError::Pinned { .. } | ForwardError::NoSuchService(_))) => {
            dp.metrics.ingress("503");
            return text(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
        }
        Err(e) => {
            dp.metrics.ingress("502");
            return text(StatusCode::BAD_GATEWAY, e.to_string());
        }
    };
    if let Some(v) = forwarded_for(req.headers().get("x-forwarded-for"), client) {
        req.headers_mut().insert("x-forwarded-for", v);
    }
    req.headers_mut().insert("x-forwarded-proto", HeaderValue::from_static("http"));
    let wants_upgrade = req.headers().contains_key(header::UPGRADE);
    let client_upgrade = wants_upgrade.then(|| hyper::upgrade::on(&mut req));

    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
        Ok(x) => x,
        Err(e) => {
            dp.metrics.ingress("502");
            return text(StatusCode::BAD_GATEWAY, format!("instance {node}: {e}"));
        }
    };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut resp = match tokio::time::timeout(REQUEST_TIMEOUT, sender.send_request(req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            dp.metrics.ingress("502");
            return text(StatusCode::BAD_GATEWAY, format!("instance {node}: {e}"));
        }
        Err(_) => {
            dp.metrics.ingress("504");
            return text(
                StatusCode::GATEWAY_TIMEOUT,
                format!("instance {node} did not answer within {}s", REQUEST_TIMEOUT.as_secs()),
            );
        }
    };
    dp.metrics.ingress(resp.status().as_str());
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let backend_upgrade = hyper::upgrade::on(&mut resp);
        let idle = dp.idle.clone();
        tokio::spawn(async move {
            if let (Ok(a), Ok(b)) = (client_upgrade.await, backend_upgrade.await) {
                splice_upgraded(a, b, idle.as_ref()).await;
            }
        });
    }
    resp.map(|b| b.boxed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Affinity, IngressRoute};

    fn config(routes: &[(Option<&str>, Option<&str>, &str)], affinity: Affinity) -> IngressConfig {
        IngressConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            routes: routes
                .iter()
                .map(|(host, path, service)| IngressRoute {
                    host: host.map(str::to_string),
                    path_prefix: path.map(str::to_string),
                    service: service.to_string(),
                })
                .collect(),
            affinity,
        }
    }

    #[test]
    fn the_first_route_matching_host_and_path_prefix_wins() {
        let c = config(
            &[
                (Some("api.example.com"), Some("/v2"), "api-v2"),
                (Some("api.example.com"), None, "api"),
                (None, Some("/chat"), "chat"),
                (None, Some("/"), "web"),
            ],
            Affinity::default(),
        );
        assert_eq!(pick_service(&c, Some("api.example.com"), "/v2/users"), Some("api-v2"));
        assert_eq!(pick_service(&c, Some("API.example.com:8443"), "/v1"), Some("api"), "case and port ignored");
        assert_eq!(pick_service(&c, Some("www.example.com"), "/chat/room"), Some("chat"));
        assert_eq!(pick_service(&c, None, "/profile"), Some("web"), "no Host header: host routes never match");
        let only_host = config(&[(Some("a.example"), None, "a")], Affinity::default());
        assert_eq!(pick_service(&only_host, Some("b.example"), "/"), None, "no route: the ingress answers 404");
        assert_eq!(pick_service(&only_host, Some("a.example."), "/"), Some("a"), "a fully qualified host");
        assert_eq!(pick_service(&only_host, Some("A.example.:80"), "/"), Some("a"));
    }

    #[test]
    fn a_path_prefix_matches_whole_segments() {
        let c = config(&[(None, Some("/login"), "login"), (None, Some("/api/"), "api")], Affinity::default());
        for (path, want) in [
            ("/login", Some("login")),
            ("/login/", Some("login")),
            ("/login/oauth/callback", Some("login")),
            ("/loginx", None),
            ("/log", None),
            ("/api/v1", Some("api")),
            ("/api/", Some("api")),
            ("/api", None),
        ] {
            assert_eq!(pick_service(&c, None, path), want, "{path}");
        }
    }

    #[test]
    fn the_affinity_key_is_the_cookie_else_the_header_else_the_client_address() {
        let client: SocketAddr = "203.0.113.9:50000".parse().unwrap();
        let both = config(
            &[],
            Affinity { cookie: Some("meteor_login_token".into()), header: Some("x-user".into()), fallback: None },
        );
        let mut h = hyper::HeaderMap::new();
        assert_eq!(affinity_key(&both, &h, client).as_deref(), Some("203.0.113.9"), "client IP, not its port");
        h.insert("x-user", "alice".parse().unwrap());
        assert_eq!(affinity_key(&both, &h, client).as_deref(), Some("alice"));
        h.append(header::COOKIE, "theme=dark".parse().unwrap());
        h.append(header::COOKIE, "a=1; meteor_login_token=tok123; b=2".parse().unwrap());
        assert_eq!(affinity_key(&both, &h, client).as_deref(), Some("tok123"), "the cookie wins, in any Cookie header");
        let mut empty = hyper::HeaderMap::new();
        empty.insert(header::COOKIE, "meteor_login_token=".parse().unwrap());
        assert_eq!(affinity_key(&both, &empty, client).as_deref(), Some("203.0.113.9"), "an empty cookie is no key");
        let none = config(&[], Affinity { cookie: Some("sid".into()), header: None, fallback: Some("none".into()) });
        assert_eq!(affinity_key(&none, &hyper::HeaderMap::new(), client), None, "fallback none: no key at all");
    }
}

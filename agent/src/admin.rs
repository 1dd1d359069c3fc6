//! The admin HTTP API (loopback by default). It reads snapshots and sends commands; it owns no
//! cluster state. JSON documents are the ones in `api.rs`, shared with the client commands.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_stream::wrappers::BroadcastStream;

use crate::api::{self, ErrorDoc, FireRequest};
use crate::cluster::routing;
use crate::cluster::snapshot::Snapshot;
use crate::config::ServiceLayer;
use crate::dataplane::{DataPlane, ReloadError};
use crate::events::EventHub;
use crate::membership::Membership;
use crate::metrics::Metrics;
use crate::services::LocalServices;

/// What the handlers need.
#[derive(Clone, Debug)]
pub struct AdminState {
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub membership: Arc<Membership>,
    pub events: Arc<EventHub>,
    pub services: Arc<LocalServices>,
    pub metrics: Arc<Metrics>,
    /// Set to true to ask the agent to leave and exit.
    pub leave: watch::Sender<bool>,
    /// For `POST /v1/reload`; `None` when the data plane is off.
    pub dataplane: Option<Arc<DataPlane>>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/members", get(members))
        .route("/v1/services", get(services))
        .route("/v1/services/{name}", get(service).put(register).delete(deregister))
        .route("/v1/route/{service}", get(route))
        .route("/v1/events", get(watch_events).post(fire_event))
        .route("/v1/keys", get(keys).post(change_keys))
        .route("/v1/reload", post(reload))
        .route("/v1/leave", post(leave))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint; see README, \"Admin HTTP API\"") })
        .layer(DefaultBodyLimit::max(64 * 1024))
        .layer(axum::middleware::from_fn(json_errors))
        .with_state(state)
}

/// Makes every error answer JSON `{"error": ...}`, as the handlers' own are: axum answers a
/// method a route does not take with an empty 405, and a bad query or an oversized body with
/// plain text.
async fn json_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let resp = next.run(req).await;
    let status = resp.status();
    let json = resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let message = if status == StatusCode::METHOD_NOT_ALLOWED {
        // axum adds the Allow header after this layer.
        format!("{path} does not take {method} (the Allow header lists the methods it takes)")
    } else {
        // Axum's rejections are short texts; a body too large to read says nothing more.
        let text = axum::body::to_bytes(resp.into_body(), 4096).await.unwrap_or_default();
        let text = String::from_utf8_lossy(&text).trim().to_string();
        if text.is_empty() { status.canonical_reason().unwrap_or("error").to_lowercase() } else { text }
    };
    error(status, message)
}

/// Serves the API until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(ErrorDoc { error: message.into() })).into_response()
}

fn snap(s: &AdminState) -> Arc<Snapshot> {
    s.snapshots.borrow().clone()
}

async fn status(State(s): State<AdminState>) -> Json<api::StatusDoc> {
    Json(api::StatusDoc::from_snapshot(&snap(&s)))
}

async fn members(State(s): State<AdminState>) -> Json<Vec<crate::cluster::snapshot::MemberView>> {
    Json(snap(&s).members.clone())
}

async fn services(State(s): State<AdminState>) -> Json<Vec<api::ServiceDoc>> {
    let snap = snap(&s);
    Json(snap.services.keys().filter_map(|name| api::ServiceDoc::from_snapshot(&snap, name)).collect())
}

async fn service(State(s): State<AdminState>, Path(name): Path<String>) -> Response {
    match api::ServiceDoc::from_snapshot(&snap(&s), &name) {
        Some(doc) => Json(doc).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no service named {name:?} in the cluster")),
    }
}

/// `PUT /v1/services/{name}`: the body is a `[[service]]` table as JSON, without the name.
async fn register(State(s): State<AdminState>, Path(name): Path<String>, body: axum::body::Bytes) -> Response {
    let mut value: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("body is not JSON: {e}")),
    };
    if let Some(obj) = value.as_object_mut() {
        obj.insert("name".into(), serde_json::Value::String(name.clone()));
    }
    let layer: ServiceLayer = match serde_json::from_value(value) {
        Ok(l) => l,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid registration: {e} (fields: port, weight, pinned_to_region, check)"),
            );
        }
    };
    match s.services.register(layer) {
        Ok(c) => {
            tracing::info!(service = %c.name, port = c.port, "service registered through the API");
            (StatusCode::OK, Json(serde_json::json!({ "registered": c.name }))).into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

async fn deregister(State(s): State<AdminState>, Path(name): Path<String>) -> Response {
    if s.services.deregister(&name) {
        tracing::info!(service = %name, "service deregistered through the API");
        Json(serde_json::json!({ "deregistered": name })).into_response()
    } else {
        error(StatusCode::NOT_FOUND, format!("this agent fronts no service named {name:?}"))
    }
}

#[derive(Deserialize)]
struct RouteQuery {
    key: Option<String>,
}

async fn route(State(s): State<AdminState>, Path(service): Path<String>, Query(q): Query<RouteQuery>) -> Response {
    let snap = snap(&s);
    let mut rng = rand::rng();
    let mut pick = |n: usize| rand::RngExt::random_range(&mut rng, 0..n);
    match routing::route(&snap, &service, q.key.as_deref(), &mut pick) {
        Ok(mut r) => {
            if let Some(dp) = &s.dataplane {
                let nodes = r.chosen.iter().chain(&r.failover).map(|t| t.node.as_str());
                r.ejected = dp.ejected_now(&service, nodes);
            }
            Json(r).into_response()
        }
        Err(e) => error(StatusCode::NOT_FOUND, e.to_string()),
    }
}

#[derive(Deserialize)]
struct EventQuery {
    name: Option<String>,
}

/// `GET /v1/events`: server-sent events, one per cluster event (optionally one name only).
async fn watch_events(
    State(s): State<AdminState>,
    Query(q): Query<EventQuery>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let stream = BroadcastStream::new(s.events.subscribe()).filter_map(move |item| {
        let wanted = q.name.clone();
        async move {
            match item {
                Ok(ev) if wanted.as_ref().is_none_or(|n| *n == ev.name) => Some(Ok(SseEvent::default()
                    .event(ev.name.clone())
                    .id(ev.id.clone())
                    .data(serde_json::to_string(&ev).unwrap_or_default()))),
                Ok(_) => None,
                // A watcher too slow to keep up skips what it missed and is told so.
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                    Some(Ok(SseEvent::default().event("lagged").data(n.to_string())))
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn fire_event(State(s): State<AdminState>, body: axum::body::Bytes) -> Response {
    let req: FireRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(StatusCode::BAD_REQUEST, format!("body must be {{\"name\": ..., \"payload\": ...}}: {e}"));
        }
    };
    let payload = req.payload.unwrap_or_default();
    if let Err(e) = s.events.validate(&req.name, &payload) {
        let status = match e {
            crate::events::EventError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        return error(status, e.to_string());
    }
    let id = s.membership.fire_event(&req.name, &payload).await;
    Json(serde_json::json!({ "id": id })).into_response()
}

/// `GET /v1/keys`: the gossip keys across the cluster.
async fn keys(State(s): State<AdminState>) -> Json<api::KeysDoc> {
    Json(crate::keys::status(&snap(&s), &s.membership.wire.keyring()))
}

/// `POST /v1/keys`: install, use or remove a key on every member; answers once every member
/// announces the change or `wait_ms` has passed.
async fn change_keys(State(s): State<AdminState>, body: axum::body::Bytes) -> Response {
    let req: api::KeyRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("body must be {{\"action\": \"install\"|\"use\"|\"remove\", \"key\": ...}}: {e}"),
            );
        }
    };
    let wait = req.wait_ms.map_or(crate::keys::DEFAULT_WAIT, std::time::Duration::from_millis);
    let op = match crate::keys::prepare_when_safe(&req, || s.membership.wire.keyring(), s.snapshots.clone(), wait).await
    {
        Ok(op) => op,
        Err(e @ crate::keys::RequestError::Invalid(_)) => return error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e) => return error(StatusCode::CONFLICT, e.to_string()),
    };
    Json(crate::keys::run(&s.membership, s.snapshots.clone(), op, wait).await).into_response()
}

async fn reload(State(s): State<AdminState>) -> Response {
    let Some(dp) = &s.dataplane else {
        return error(StatusCode::CONFLICT, "the data plane is off (no [security] certificates): nothing to reload");
    };
    match dp.reload_files().await {
        Ok(done) => Json(done).into_response(),
        Err(e @ ReloadError::InMemory) => error(StatusCode::CONFLICT, e.to_string()),
        Err(e @ ReloadError::Invalid(_)) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

async fn leave(State(s): State<AdminState>) -> Response {
    let _ = s.leave.send(true);
    (StatusCode::ACCEPTED, Json(serde_json::json!({ "leaving": true }))).into_response()
}

async fn metrics(State(s): State<AdminState>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.metrics.render())
        .into_response()
}

async fn ready(State(s): State<AdminState>) -> Response {
    if snap(&s).epoch > 0 {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        error(StatusCode::SERVICE_UNAVAILABLE, "membership has not started yet")
    }
}

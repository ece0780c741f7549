//! The agent's HTTP endpoints: `/metrics`, `/healthz`, `/readyz`,
//! `/api/v1/flows`, `/api/v1/readiness`. Handlers only read the shared view
//! and never touch the BPF maps or a remote API.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use crate::{
    metrics::{endpoint_labels, remote_name},
    model::{EndpointDirectory, FlowRecord, Verdict},
    state::SharedView,
};

/// Builds the readiness report on request (`/api/v1/readiness`).
/// None until the first evaluation.
pub type ReadinessFn = Arc<dyn Fn(Option<&str>) -> Option<serde_json::Value> + Send + Sync>;

#[derive(Clone)]
pub struct HttpState {
    pub view: SharedView,
    pub registry: Arc<Registry>,
    pub directory: Arc<dyn EndpointDirectory>,
    pub readiness: Option<ReadinessFn>,
    /// `/healthz` fails when the map reader has not read for this long.
    pub stale_after: Duration,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/v1/flows", get(flows))
        .route("/api/v1/readiness", get(readiness))
        .with_state(state)
}

async fn metrics(State(s): State<HttpState>) -> Response {
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics failed: {e}")).into_response();
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body).into_response()
}

async fn healthz(State(s): State<HttpState>) -> Response {
    let view = s.view.read().unwrap_or_else(|e| e.into_inner());
    let age = view.last_read.map(|t| t.elapsed());
    let fresh = match age {
        Some(age) => age <= s.stale_after,
        // Not read yet: healthy during the first interval only.
        None => view.started.elapsed().unwrap_or_default() <= s.stale_after,
    };
    if fresh {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("map reader stalled: last read {age:?} ago\n")).into_response()
    }
}

async fn readyz(State(s): State<HttpState>) -> Response {
    let view = s.view.read().unwrap_or_else(|e| e.into_inner());
    if view.snapshot.is_some() {
        (StatusCode::OK, format!("ready: tap {}\n", view.tap.as_str())).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "maps not read yet\n").into_response()
    }
}

/// Flows a `/api/v1/flows` answer lists unless `limit` says otherwise.
pub const DEFAULT_FLOWS_LIMIT: usize = 1000;
/// The most flows one answer lists: the body stays a few MiB and the
/// agent's memory bounded, however large the flow table.
pub const MAX_FLOWS_LIMIT: usize = 10_000;

#[derive(Deserialize)]
struct FlowQuery {
    endpoint: Option<u16>,
    verdict: Option<Verdict>,
    /// Busiest flows first, at most this many (default 1000, up to 10000).
    limit: Option<usize>,
}

/// One flow as `/api/v1/flows` shows it: the record plus readable names.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FlowView {
    #[serde(flatten)]
    pub flow: FlowRecord,
    pub kind: String,
    pub namespace: String,
    pub pod: String,
    pub remote: String,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct FlowsResponse {
    pub tap: String,
    #[serde(with = "crate::timefmt::rfc3339_opt")]
    pub read_at: Option<SystemTime>,
    /// Flows matching the filters; `flows` holds the busiest `limit` of them.
    pub matched: usize,
    /// True when `matched` exceeds what `flows` lists.
    pub truncated: bool,
    pub flows: Vec<FlowView>,
}

async fn flows(State(s): State<HttpState>, Query(q): Query<FlowQuery>) -> Response {
    let limit = q.limit.unwrap_or(DEFAULT_FLOWS_LIMIT);
    if !(1..=MAX_FLOWS_LIMIT).contains(&limit) {
        return (
            StatusCode::BAD_REQUEST,
            format!("limit must be between 1 and {MAX_FLOWS_LIMIT}; narrow the query with endpoint= or verdict=\n"),
        )
            .into_response();
    }
    let (tap, read_at, all) = {
        let view = s.view.read().unwrap_or_else(|e| e.into_inner());
        (view.tap.as_str().to_string(), view.snapshot.as_ref().map(|s| s.clock.taken_at()), view.flows.clone())
    };
    let mut matching: Vec<&FlowRecord> = all
        .iter()
        .filter(|f| q.endpoint.is_none_or(|e| f.endpoint_id == e))
        .filter(|f| q.verdict.is_none_or(|v| f.verdict == v))
        .collect();
    let matched = matching.len();
    let busiest_first = |a: &&FlowRecord, b: &&FlowRecord| {
        b.notifications.cmp(&a.notifications).then_with(|| flow_order(a).cmp(&flow_order(b)))
    };
    if matched > limit {
        matching.select_nth_unstable_by(limit, busiest_first);
        matching.truncate(limit);
    }
    matching.sort_unstable_by(busiest_first);
    let dir = &*s.directory;
    let flows = matching
        .into_iter()
        .map(|f| {
            let labels = endpoint_labels(dir, f.endpoint_id);
            let get = |k: &str| labels.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()).unwrap_or_default();
            FlowView {
                flow: f.clone(),
                kind: get("kind"),
                namespace: get("namespace"),
                pod: get("pod"),
                remote: remote_name(dir, f.remote_identity),
            }
        })
        .collect();
    Json(FlowsResponse { tap, read_at, matched, truncated: matched > limit, flows }).into_response()
}

/// A total order on flows, so equally busy flows list the same way every time.
fn flow_order(f: &FlowRecord) -> impl Ord + use<> {
    (f.endpoint_id, f.direction, f.remote_identity, f.proto, f.dst_port, f.verdict, f.source, f.reason, f.ipv6)
}

#[derive(Deserialize)]
struct ReadinessQuery {
    endpoint: Option<String>,
}

async fn readiness(State(s): State<HttpState>, Query(q): Query<ReadinessQuery>) -> Response {
    match &s.readiness {
        Some(build) => match build(q.endpoint.as_deref()) {
            Some(report) => Json(report).into_response(),
            None => (StatusCode::SERVICE_UNAVAILABLE, "readiness not evaluated yet; retry in a few seconds\n")
                .into_response(),
        },
        None => (StatusCode::NOT_FOUND, "readiness is not enabled in this agent\n").into_response(),
    }
}

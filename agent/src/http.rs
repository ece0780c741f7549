//! The agent's HTTP endpoints: `/metrics`, `/healthz`, `/readyz`,
//! `/api/v1/flows`, `/api/v1/readiness`. Handlers only read the shared view
//! and never touch the BPF maps or a remote API. How connections are
//! bounded is `server`'s job.
//!
//! Who may read what: `/metrics` and the probes answer anyone who reaches
//! the port (Prometheus, kubelet). `/api/v1/*` names pods, identities,
//! ports and which host ports a policy would cut, so by default it answers
//! only clients on loopback: in a pod that is `kubectl exec ... verdict-agent
//! preflight|suggest` and `kubectl port-forward`, both gated by the
//! Kubernetes RBAC on `pods/exec` and `pods/portforward`. `--api-access any`
//! opens it to the network (then restrict the port with a network policy).

pub mod server;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{
    Json, Router,
    extract::{Query, Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
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
    pub api_access: ApiAccess,
}

/// The default listen address of `verdict-agent run`: loopback, so a
/// hand-started agent is private; the chart listens on the pod IP. Port 9975
/// because Cilium and Hubble use 9962-9966 (docs/operations.md, "Port").
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9975";

/// Who may read `/api/v1/*`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ApiAccess {
    /// Clients on loopback only (kubectl exec, kubectl port-forward, the node itself).
    #[default]
    Local,
    /// Anyone who reaches the port.
    Any,
}

impl ApiAccess {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiAccess::Local => "local",
            ApiAccess::Any => "any",
        }
    }
}

pub fn router(state: HttpState) -> Router {
    let api = Router::new()
        .route("/api/v1/flows", get(flows))
        .route("/api/v1/readiness", get(readiness))
        .route_layer(middleware::from_fn_with_state(state.api_access, api_guard));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(api)
        .with_state(state)
}

/// Serves `writer` (routes that change the node, such as enforcement
/// trials) to loopback peers only, whatever `--api-access` says: reading
/// topology may be opened to the pod network, switching policy never is.
pub fn loopback_only(writer: Router) -> Router {
    writer.route_layer(middleware::from_fn_with_state(ApiAccess::Local, api_guard))
}

/// `/api/v1/*` for loopback peers only, unless `--api-access any`. A request
/// without a known peer (not from `server::serve`) is refused: fail closed.
async fn api_guard(State(access): State<ApiAccess>, req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<server::PeerAddr>().map(|p| p.0);
    let allowed = match access {
        ApiAccess::Any => true,
        // `[::]` listeners see IPv4 peers as ::ffff:a.b.c.d.
        ApiAccess::Local => peer.is_some_and(|p| p.ip().to_canonical().is_loopback()),
    };
    if allowed {
        return next.run(req).await;
    }
    (
        StatusCode::FORBIDDEN,
        "/api/v1 answers only clients on loopback: run `kubectl -n NAMESPACE exec POD -- verdict-agent preflight` \
         or `kubectl port-forward`, or start the agent with --api-access any\n",
    )
        .into_response()
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
        (view.tap.as_str().to_string(), view.snapshot.as_ref().map(|s| s.taken_at), view.flows.clone())
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

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        sync::{Arc, RwLock},
    };

    use axum::body::Body;
    use tower_service::Service as _;

    use super::*;
    use crate::{bpf::loader::TapKind, model::NoDirectory, state::AgentView};

    fn app(api_access: ApiAccess) -> Router {
        let view = Arc::new(RwLock::new(AgentView::new(
            TapKind::Fentry,
            crate::bpf::loader::NotificationRead::ProbeRead,
            Default::default(),
            16,
        )));
        router(HttpState {
            view,
            registry: Arc::new(Registry::default()),
            directory: Arc::new(NoDirectory),
            readiness: None,
            stale_after: Duration::from_secs(60),
            api_access,
        })
    }

    async fn status(app: &Router, path: &str, peer: Option<&str>) -> StatusCode {
        let mut req = axum::http::Request::get(path).body(Body::empty()).unwrap();
        if let Some(p) = peer {
            req.extensions_mut().insert(server::PeerAddr(p.parse::<SocketAddr>().unwrap()));
        }
        app.clone().call(req).await.unwrap().status()
    }

    #[tokio::test]
    async fn api_answers_loopback_only_by_default() {
        let app = app(ApiAccess::default());
        for path in ["/api/v1/flows", "/api/v1/readiness"] {
            for remote in ["10.0.0.7:40000", "[fd00::7]:40000", "[::ffff:10.0.0.7]:40000"] {
                assert_eq!(status(&app, path, Some(remote)).await, StatusCode::FORBIDDEN, "{path} from {remote}");
            }
            assert_eq!(status(&app, path, None).await, StatusCode::FORBIDDEN, "{path}: no known peer fails closed");
            for local in ["127.0.0.1:40000", "[::1]:40000", "[::ffff:127.0.0.1]:40000"] {
                assert_ne!(status(&app, path, Some(local)).await, StatusCode::FORBIDDEN, "{path} from {local}");
            }
        }
        assert_eq!(status(&app, "/api/v1/flows", Some("127.0.0.1:1")).await, StatusCode::OK);
        // Prometheus and kubelet reach these from the pod network.
        for path in ["/metrics", "/healthz"] {
            assert_eq!(status(&app, path, Some("10.0.0.7:40000")).await, StatusCode::OK, "{path}");
        }
        assert_eq!(status(&app, "/readyz", Some("10.0.0.7:40000")).await, StatusCode::SERVICE_UNAVAILABLE);
    }

    /// `preflight` and `suggest` dial the agent's default address.
    #[test]
    fn cli_clients_default_to_the_default_listen_address() {
        assert_eq!(crate::preflight::DEFAULT_AGENT, format!("http://{DEFAULT_LISTEN}"));
    }

    #[tokio::test]
    async fn api_access_any_opens_the_api() {
        let app = app(ApiAccess::Any);
        assert_eq!(status(&app, "/api/v1/flows", Some("10.0.0.7:40000")).await, StatusCode::OK);
    }
}

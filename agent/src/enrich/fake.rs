//! Test doubles: a Cilium agent API on a unix socket and a Kubernetes API
//! server (list + watch) on 127.0.0.1, both serving JSON shaped like the
//! real models (see `tests::fixtures_match_schemas`).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    convert::Infallible,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    body::Body,
    extract::{Path as UrlPath, Query, State},
    http::{StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::get,
};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::{sync::broadcast, task::JoinHandle};

// ---------------- Cilium agent API ----------------

/// How the fake Cilium agent answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// HTTP 500 on every path.
    Error500,
    /// Answer after this delay.
    Slow(Duration),
}

pub struct CiliumData {
    pub endpoints: Value,
    pub identities: HashMap<u32, Value>,
    pub config: Value,
    pub mode: Mode,
    /// Requests per path.
    pub requests: BTreeMap<String, usize>,
}

#[derive(Clone)]
pub struct FakeCilium {
    pub data: Arc<Mutex<CiliumData>>,
    socket: PathBuf,
    server: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl FakeCilium {
    pub fn new(socket: &Path, endpoints: Value, identities: HashMap<u32, Value>, config: Value) -> FakeCilium {
        FakeCilium {
            data: Arc::new(Mutex::new(CiliumData {
                endpoints,
                identities,
                config,
                mode: Mode::Normal,
                requests: BTreeMap::new(),
            })),
            socket: socket.to_owned(),
            server: Arc::default(),
        }
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, CiliumData> {
        self.data.lock().unwrap()
    }

    pub fn set_mode(&self, mode: Mode) {
        self.lock().mode = mode;
    }

    pub fn requests(&self, path: &str) -> usize {
        self.lock().requests.get(path).copied().unwrap_or(0)
    }

    /// Binds the socket and serves until [`FakeCilium::stop`].
    pub fn start(&self) {
        let _ = std::fs::remove_file(&self.socket);
        let listener = tokio::net::UnixListener::bind(&self.socket).expect("bind fake cilium socket");
        let app = Router::new()
            .route("/v1/endpoint", get(cilium_endpoints))
            .route("/v1/identity/{id}", get(cilium_identity))
            .route("/v1/config", get(cilium_config))
            .with_state(Arc::clone(&self.data));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        *self.server.lock().unwrap() = Some(task);
    }

    /// The agent goes away: no listener, no socket file.
    pub fn stop(&self) {
        if let Some(task) = self.server.lock().unwrap().take() {
            task.abort();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

type CiliumState = State<Arc<Mutex<CiliumData>>>;

/// Counts the request and applies the mode; Some(response) short-circuits.
async fn cilium_gate(data: &Arc<Mutex<CiliumData>>, path: String) -> Option<Response> {
    let mode = {
        let mut d = data.lock().unwrap();
        *d.requests.entry(path).or_default() += 1;
        d.mode
    };
    match mode {
        Mode::Normal => None,
        // The API's `Error` model is a JSON string.
        Mode::Error500 => {
            Some((StatusCode::INTERNAL_SERVER_ERROR, Json(json!("endpoint manager unavailable"))).into_response())
        }
        Mode::Slow(d) => {
            tokio::time::sleep(d).await;
            None
        }
    }
}

async fn cilium_endpoints(State(data): CiliumState) -> Response {
    if let Some(r) = cilium_gate(&data, "/v1/endpoint".into()).await {
        return r;
    }
    Json(data.lock().unwrap().endpoints.clone()).into_response()
}

async fn cilium_identity(State(data): CiliumState, UrlPath(id): UrlPath<String>) -> Response {
    if let Some(r) = cilium_gate(&data, format!("/v1/identity/{id}")).await {
        return r;
    }
    let Ok(id) = id.parse::<u32>() else {
        return (StatusCode::BAD_REQUEST, Json(json!("invalid identity"))).into_response();
    };
    match data.lock().unwrap().identities.get(&id) {
        Some(v) => Json(v.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn cilium_config(State(data): CiliumState) -> Response {
    if let Some(r) = cilium_gate(&data, "/v1/config".into()).await {
        return r;
    }
    Json(data.lock().unwrap().config.clone()).into_response()
}

// ---------------- Kubernetes API ----------------

struct KubeResource {
    kind: &'static str,
    api_version: &'static str,
    objects: BTreeMap<String, Value>,
    /// (resourceVersion, event type, object), for watches that resume.
    log: Vec<(u64, &'static str, Value)>,
    tx: broadcast::Sender<(u64, &'static str, Value)>,
}

#[derive(Default)]
struct KubeData {
    rv: u64,
    resources: HashMap<&'static str, KubeResource>,
    forbidden: HashSet<String>,
    requests: BTreeMap<String, usize>,
}

/// A Kubernetes API server for list and watch of a fixed set of resources.
#[derive(Clone)]
pub struct FakeKube {
    data: Arc<Mutex<KubeData>>,
    pub url: String,
    _server: Arc<ServerGuard>,
}

struct ServerGuard(JoinHandle<()>);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// plural, kind, apiVersion
pub const KUBE_RESOURCES: &[(&str, &str, &str)] = &[
    ("nodes", "Node", "v1"),
    ("pods", "Pod", "v1"),
    ("ciliumendpoints", "CiliumEndpoint", "cilium.io/v2"),
    ("ciliumidentities", "CiliumIdentity", "cilium.io/v2"),
    ("ciliumclusterwidenetworkpolicies", "CiliumClusterwideNetworkPolicy", "cilium.io/v2"),
];

fn object_key(obj: &Value) -> String {
    let m = &obj["metadata"];
    match m["namespace"].as_str() {
        Some(ns) => format!("{ns}/{}", m["name"].as_str().unwrap()),
        None => m["name"].as_str().unwrap().to_owned(),
    }
}

impl FakeKube {
    pub async fn start() -> FakeKube {
        let mut data = KubeData::default();
        for (plural, kind, api_version) in KUBE_RESOURCES {
            data.resources.insert(
                plural,
                KubeResource {
                    kind,
                    api_version,
                    objects: BTreeMap::new(),
                    log: Vec::new(),
                    tx: broadcast::channel(1024).0,
                },
            );
        }
        let data = Arc::new(Mutex::new(data));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = Router::new().fallback(kube_handler).with_state(Arc::clone(&data));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeKube { data, url, _server: Arc::new(ServerGuard(task)) }
    }

    /// Creates or replaces an object and notifies watchers.
    pub fn apply(&self, plural: &str, mut obj: Value) {
        let mut d = self.data.lock().unwrap();
        d.rv += 1;
        let rv = d.rv;
        let r = d.resources.get_mut(plural).expect("known resource");
        obj["apiVersion"] = json!(r.api_version);
        obj["kind"] = json!(r.kind);
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = object_key(&obj);
        let kind = if r.objects.insert(key, obj.clone()).is_some() { "MODIFIED" } else { "ADDED" };
        r.log.push((rv, kind, obj.clone()));
        let _ = r.tx.send((rv, kind, obj));
    }

    pub fn delete(&self, plural: &str, key: &str) {
        let mut d = self.data.lock().unwrap();
        d.rv += 1;
        let rv = d.rv;
        let r = d.resources.get_mut(plural).unwrap();
        let mut obj = r.objects.remove(key).expect("object exists");
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        r.log.push((rv, "DELETED", obj.clone()));
        let _ = r.tx.send((rv, "DELETED", obj));
    }

    /// Answers 403 for a resource from now on.
    pub fn forbid(&self, plural: &str) {
        self.data.lock().unwrap().forbidden.insert(plural.to_owned());
    }

    pub fn requests(&self, plural: &str) -> usize {
        self.data.lock().unwrap().requests.get(plural).copied().unwrap_or(0)
    }

    /// A kube client for this server.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url.parse().unwrap());
        super::kubernetes::client_from_config(config).unwrap()
    }
}

/// `a.b=c,d.e=f`, on the JSON paths the fake understands.
fn field_selector_matches(selector: Option<&str>, obj: &Value) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else { return true };
    selector.split(',').all(|term| {
        let Some((path, want)) = term.split_once('=') else { return false };
        let got = path.split('.').try_fold(obj, |v, k| v.get(k));
        got.and_then(Value::as_str) == Some(want)
    })
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code});
    (StatusCode::from_u16(code).unwrap(), Json(body)).into_response()
}

async fn kube_handler(
    State(data): State<Arc<Mutex<KubeData>>>,
    uri: Uri,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    // /api/v1/<plural> or /apis/<group>/<version>/<plural>; all namespaces.
    let plural = uri.path().rsplit('/').next().unwrap_or_default().to_owned();
    let selector = q.get("fieldSelector").cloned();
    let watch = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    let mut d = data.lock().unwrap();
    *d.requests.entry(plural.clone()).or_default() += 1;
    if d.forbidden.contains(&plural) {
        let msg = format!(
            "{plural} is forbidden: User \"system:serviceaccount:kube-system:verdict-agent\" cannot list resource \"{plural}\""
        );
        return status(403, "Forbidden", &msg);
    }
    let rv_now = d.rv;
    let Some(r) = d.resources.get(plural.as_str()) else {
        return status(404, "NotFound", "the server could not find the requested resource");
    };

    if !watch {
        let items: Vec<Value> =
            r.objects.values().filter(|o| field_selector_matches(selector.as_deref(), o)).cloned().collect();
        let list = json!({
            "apiVersion": r.api_version, "kind": format!("{}List", r.kind),
            "metadata": {"resourceVersion": rv_now.to_string()}, "items": items,
        });
        return Json(list).into_response();
    }

    let since: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let line = |kind: &str, obj: &Value| Bytes::from(format!("{}\n", json!({"type": kind, "object": obj})));
    // Backlog and subscription under one lock: no event falls between.
    let backlog: Vec<Result<Bytes, Infallible>> = r
        .log
        .iter()
        .filter(|(rv, _, o)| *rv > since && field_selector_matches(selector.as_deref(), o))
        .map(|(_, kind, o)| Ok(line(kind, o)))
        .collect();
    let rx = r.tx.subscribe();
    drop(d);
    let live = futures::stream::unfold((rx, selector), move |(mut rx, selector)| async move {
        loop {
            match rx.recv().await {
                Ok((_, kind, obj)) if field_selector_matches(selector.as_deref(), &obj) => {
                    return Some((Ok(line(kind, &obj)), (rx, selector)));
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let body = Body::from_stream(futures::stream::iter(backlog).chain(live));
    Response::builder().header("content-type", "application/json").body(body).unwrap()
}

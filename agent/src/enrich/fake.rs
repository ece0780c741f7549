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

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub path: String,
    pub query: HashMap<String, String>,
    pub accept: String,
}

#[derive(Default)]
struct KubeData {
    rv: u64,
    resources: HashMap<&'static str, KubeResource>,
    forbidden: HashSet<String>,
    requests: BTreeMap<String, usize>,
    seen: Vec<SeenRequest>,
}

/// What listens on the fake's port.
enum Listening {
    /// The API; the sender ends every watch and the server.
    Serving {
        task: JoinHandle<()>,
        stop: tokio::sync::watch::Sender<bool>,
    },
    /// Accepts TCP connections and closes them at once, counting them: an
    /// API server that is down behind its address (a kube-apiserver
    /// restarting behind a load balancer); the client sees every attempt fail.
    Refusing {
        task: JoinHandle<()>,
    },
    Nothing,
}

/// A Kubernetes API server for list and watch of a fixed set of resources.
#[derive(Clone)]
pub struct FakeKube {
    data: Arc<Mutex<KubeData>>,
    pub url: String,
    addr: std::net::SocketAddr,
    listening: Arc<Mutex<Listening>>,
    /// Connections the refusing listener closed.
    refused: Arc<std::sync::atomic::AtomicUsize>,
    _guard: Arc<ServerGuard>,
}

/// Stops whatever listens when the last clone goes.
struct ServerGuard(Arc<Mutex<Listening>>);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        match std::mem::replace(&mut *self.0.lock().unwrap(), Listening::Nothing) {
            Listening::Serving { task, .. } | Listening::Refusing { task } => task.abort(),
            Listening::Nothing => {}
        }
    }
}

/// plural, kind, apiVersion
pub const KUBE_RESOURCES: &[(&str, &str, &str)] = &[
    ("nodes", "Node", "v1"),
    ("pods", "Pod", "v1"),
    ("ciliumendpoints", "CiliumEndpoint", "cilium.io/v2"),
    ("ciliumidentities", "CiliumIdentity", "cilium.io/v2"),
    ("ciliumclusterwidenetworkpolicies", "CiliumClusterwideNetworkPolicy", "cilium.io/v2"),
    ("endpointslices", "EndpointSlice", "discovery.k8s.io/v1"),
    ("auditmodetrials", "AuditModeTrial", "verdict-agent.io/v1alpha1"),
];

fn object_key(obj: &Value) -> String {
    let m = &obj["metadata"];
    match m["namespace"].as_str() {
        Some(ns) => format!("{ns}/{}", m["name"].as_str().unwrap()),
        None => m["name"].as_str().unwrap().to_owned(),
    }
}

impl FakeKube {
    /// On an ephemeral loopback port.
    pub async fn start() -> FakeKube {
        FakeKube::start_on(0).await
    }

    /// On 127.0.0.1:`port` (0: any), so that it can stop and come back on
    /// the same address.
    pub async fn start_on(port: u16) -> FakeKube {
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
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind the fake API server");
        let addr = listener.local_addr().unwrap();
        let listening = Arc::new(Mutex::new(Listening::Nothing));
        let fake = FakeKube {
            data: Arc::new(Mutex::new(data)),
            url: format!("http://{addr}"),
            addr,
            listening: Arc::clone(&listening),
            refused: Arc::default(),
            _guard: Arc::new(ServerGuard(listening)),
        };
        fake.serve(listener);
        fake
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let app = Router::new()
            .route("/api/v1/namespaces/{ns}/pods/{pod}/portforward", get(kube_portforward))
            .fallback(kube_handler)
            .with_state(FakeState { data: Arc::clone(&self.data), stopped: stopped.clone() });
        let mut shutdown = stopped;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = shutdown.wait_for(|s| *s).await;
                })
                .await;
        });
        *self.listening.lock().unwrap() = Listening::Serving { task, stop };
    }

    /// The API server goes down: open watches end, and every new connection
    /// is closed as soon as it is accepted (and counted).
    pub async fn refuse(&self) {
        let previous = std::mem::replace(&mut *self.listening.lock().unwrap(), Listening::Nothing);
        if let Listening::Serving { task, stop } = previous {
            let _ = stop.send(true);
            // Graceful shutdown returns once the watches ended and the
            // listener is closed; bounded in case a client holds on.
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        let listener = tokio::net::TcpListener::bind(self.addr).await.expect("rebind the fake API server");
        let refused = Arc::clone(&self.refused);
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                drop(conn);
            }
        });
        *self.listening.lock().unwrap() = Listening::Refusing { task };
    }

    /// The API server is back on the same address, with the same objects.
    pub async fn resume(&self) {
        let previous = std::mem::replace(&mut *self.listening.lock().unwrap(), Listening::Nothing);
        if let Listening::Refusing { task } = previous {
            task.abort();
            let _ = task.await;
        }
        let listener = tokio::net::TcpListener::bind(self.addr).await.expect("rebind the fake API server");
        self.serve(listener);
    }

    /// Connections closed while refusing.
    pub fn refused(&self) -> usize {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every request served so far.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.data.lock().unwrap().seen.clone()
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

    /// The object `key` of `plural` as stored now.
    pub fn get(&self, plural: &str, key: &str) -> Option<Value> {
        self.data.lock().unwrap().resources.get(plural)?.objects.get(key).cloned()
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

/// `k=v,k2=v2` on `metadata.labels` (equality terms only).
fn label_selector_matches(selector: Option<&str>, obj: &Value) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else { return true };
    selector.split(',').all(|term| {
        let Some((key, want)) = term.split_once('=') else { return false };
        obj["metadata"]["labels"][key].as_str() == Some(want)
    })
}

/// What a request selects: namespace (from the path), field and label
/// selectors.
#[derive(Clone)]
struct Selection {
    namespace: Option<String>,
    fields: Option<String>,
    labels: Option<String>,
}

impl Selection {
    fn matches(&self, obj: &Value) -> bool {
        self.namespace.as_deref().is_none_or(|ns| obj["metadata"]["namespace"].as_str() == Some(ns))
            && field_selector_matches(self.fields.as_deref(), obj)
            && label_selector_matches(self.labels.as_deref(), obj)
    }
}

/// What the API server sends for `Accept: ...;as=PartialObjectMetadata[List]`:
/// the metadata alone.
fn as_metadata(obj: &Value) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": obj["metadata"]})
}

#[derive(Clone)]
struct FakeState {
    data: Arc<Mutex<KubeData>>,
    stopped: tokio::sync::watch::Receiver<bool>,
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Which part of an object a PATCH may change, as with a CRD's status
/// subresource: `.../<name>/status` changes `status` only, `.../<name>`
/// everything but `status`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Main,
    Status,
}

/// `PATCH .../<plural>/<name>[/status]` with a JSON merge patch; a
/// `metadata.resourceVersion` in the patch is a precondition (409 Conflict
/// when the object moved on), as the API server treats it.
fn patch_object(
    data: &Mutex<KubeData>,
    plural: &str,
    name: &str,
    part: Part,
    content_type: &str,
    body: &[u8],
) -> Response {
    if !content_type.starts_with("application/merge-patch+json") {
        return status(415, "UnsupportedMediaType", &format!("the fake takes merge patches, not {content_type}"));
    }
    let Ok(patch) = serde_json::from_slice::<Value>(body) else {
        return status(400, "BadRequest", "the patch is not JSON");
    };
    let counted = if part == Part::Status { format!("{plural}/status") } else { format!("{plural}/patch") };
    let mut d = data.lock().unwrap();
    *d.requests.entry(counted.clone()).or_default() += 1;
    if d.forbidden.contains(&counted) {
        return status(403, "Forbidden", &format!("{counted} is forbidden"));
    }
    d.rv += 1;
    let rv = d.rv;
    let Some(r) = d.resources.get_mut(plural) else {
        return status(404, "NotFound", "the server could not find the requested resource");
    };
    let Some(obj) = r.objects.get_mut(name) else {
        return status(404, "NotFound", &format!("{plural} \"{name}\" not found"));
    };
    if let Some(want) = patch["metadata"]["resourceVersion"].as_str()
        && obj["metadata"]["resourceVersion"].as_str() != Some(want)
    {
        return status(
            409,
            "Conflict",
            &format!("Operation cannot be fulfilled on {plural} \"{name}\": the object has been modified"),
        );
    }
    match part {
        Part::Status => {
            if let Some(s) = patch.get("status") {
                merge_patch(&mut obj["status"], s);
            }
        }
        Part::Main => {
            let mut patch = patch.clone();
            if let Some(p) = patch.as_object_mut() {
                p.remove("status");
                if let Some(m) = p.get_mut("metadata").and_then(Value::as_object_mut) {
                    m.remove("resourceVersion");
                }
            }
            merge_patch(obj, &patch);
        }
    }
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    let obj = obj.clone();
    r.log.push((rv, "MODIFIED", obj.clone()));
    let _ = r.tx.send((rv, "MODIFIED", obj.clone()));
    Json(obj).into_response()
}

async fn kube_handler(
    State(state): State<FakeState>,
    method: axum::http::Method,
    uri: Uri,
    headers: axum::http::HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    if method == axum::http::Method::PATCH {
        let segments: Vec<&str> = uri.path().trim_end_matches('/').split('/').collect();
        let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
        return match segments.as_slice() {
            [.., plural, name, "status"] => patch_object(&state.data, plural, name, Part::Status, content_type, &body),
            [.., "namespaces", _, _, _] | [.., "apis", _, _, _, _] | [.., "api", _, _, _] => {
                let (plural, name) = (segments[segments.len() - 2], segments[segments.len() - 1]);
                patch_object(&state.data, plural, name, Part::Main, content_type, &body)
            }
            _ => status(405, "MethodNotAllowed", "the fake patches named objects only"),
        };
    }
    // /api/v1/[namespaces/<ns>/]<plural> or /apis/<group>/<version>/[namespaces/<ns>/]<plural>.
    let path = uri.path().to_owned();
    let plural = path.rsplit('/').next().unwrap_or_default().to_owned();
    let segments: Vec<&str> = path.split('/').collect();
    let namespace = segments.windows(2).find(|w| w[0] == "namespaces" && w[1] != plural).map(|w| w[1].to_owned());
    let selection =
        Selection { namespace, fields: q.get("fieldSelector").cloned(), labels: q.get("labelSelector").cloned() };
    let accept = headers.get("accept").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let metadata_only = accept.contains("as=PartialObjectMetadata");
    let watch = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    let mut d = state.data.lock().unwrap();
    *d.requests.entry(plural.clone()).or_default() += 1;
    d.seen.push(SeenRequest { path: path.clone(), query: q.clone(), accept });
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
    let shape = move |o: &Value| if metadata_only { as_metadata(o) } else { o.clone() };

    if !watch {
        let items: Vec<Value> = r.objects.values().filter(|o| selection.matches(o)).map(shape).collect();
        let (api_version, kind) = if metadata_only {
            ("meta.k8s.io/v1".to_owned(), "PartialObjectMetadataList".to_owned())
        } else {
            (r.api_version.to_owned(), format!("{}List", r.kind))
        };
        let list = json!({
            "apiVersion": api_version, "kind": kind,
            "metadata": {"resourceVersion": rv_now.to_string()}, "items": items,
        });
        return Json(list).into_response();
    }

    let since: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let line = move |kind: &str, obj: &Value| Bytes::from(format!("{}\n", json!({"type": kind, "object": shape(obj)})));
    // Backlog and subscription under one lock: no event falls between.
    let backlog: Vec<Result<Bytes, Infallible>> = r
        .log
        .iter()
        .filter(|(rv, _, o)| *rv > since && selection.matches(o))
        .map(|(_, kind, o)| Ok(line(kind, o)))
        .collect();
    let rx = r.tx.subscribe();
    drop(d);
    let live = futures::stream::unfold((rx, selection), move |(mut rx, selection)| async move {
        loop {
            match rx.recv().await {
                Ok((_, kind, obj)) if selection.matches(&obj) => {
                    return Some((Ok(line(kind, &obj)), (rx, selection)));
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    // A server going down ends its watches.
    let mut stopped = state.stopped.clone();
    let stop = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let body = Body::from_stream(futures::stream::iter(backlog).chain(live).take_until(stop));
    Response::builder().header("content-type", "application/json").body(body).unwrap()
}

/// `pods/{pod}/portforward?ports=P` over a WebSocket (subprotocol
/// `v4.channel.k8s.io`, as the API server answers kube's request): channel
/// 0 carries the port's bytes, channel 1 its errors; each starts with the
/// port number (u16 little-endian). The fake dials the pod's
/// `status.podIP`, as the kubelet dials the pod's loopback.
async fn kube_portforward(
    State(state): State<FakeState>,
    UrlPath((ns, pod)): UrlPath<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> Response {
    let Some(port) = q.get("ports").and_then(|p| p.parse::<u16>().ok()) else {
        return status(400, "BadRequest", "the fake forwards one port: ?ports=P");
    };
    let ip = {
        let mut d = state.data.lock().unwrap();
        *d.requests.entry("pods/portforward".into()).or_default() += 1;
        if d.forbidden.contains("pods/portforward") {
            let msg =
                format!("pods \"{pod}\" is forbidden: User \"tester\" cannot create resource \"pods/portforward\"");
            return status(403, "Forbidden", &msg);
        }
        d.resources["pods"]
            .objects
            .get(&format!("{ns}/{pod}"))
            .and_then(|o| o["status"]["podIP"].as_str().map(str::to_owned))
    };
    let Some(ip) = ip else {
        return status(404, "NotFound", &format!("pods \"{pod}\" not found"));
    };
    ws.protocols(["v4.channel.k8s.io"]).on_upgrade(move |socket| forward_port(socket, ip, port))
}

async fn forward_port(mut socket: axum::extract::ws::WebSocket, ip: String, port: u16) {
    use axum::extract::ws::Message;
    use futures::SinkExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let [lo, hi] = port.to_le_bytes();
    for channel in [0u8, 1] {
        if socket.send(Message::Binary(vec![channel, lo, hi].into())).await.is_err() {
            return;
        }
    }
    let tcp = match tokio::net::TcpStream::connect((ip.as_str(), port)).await {
        Ok(t) => t,
        Err(e) => {
            let mut m = vec![1u8];
            m.extend(format!("error forwarding port {port} to pod: {e}").bytes());
            let _ = socket.send(Message::Binary(m.into())).await;
            let _ = socket.send(Message::Close(None)).await;
            return;
        }
    };
    let (mut rd, mut wr) = tcp.into_split();
    let (mut sink, mut stream) = socket.split();
    let up = async move {
        while let Some(Ok(msg)) = stream.next().await {
            let data = match msg {
                // Channel 0 carries the stream's bytes; 1 (errors) and the
                // port prefix frames carry nothing to forward.
                Message::Binary(b) if b.len() > 1 && b[0] == 0 => b,
                Message::Close(_) => break,
                _ => continue,
            };
            if wr.write_all(&data[1..]).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    };
    let down = async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let mut m = Vec::with_capacity(n + 1);
            m.push(0u8);
            m.extend_from_slice(&buf[..n]);
            if sink.send(Message::Binary(m.into())).await.is_err() {
                break;
            }
        }
        let _ = sink.send(Message::Close(None)).await;
    };
    tokio::join!(up, down);
}

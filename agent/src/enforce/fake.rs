//! Test doubles: the Cilium agent's endpoint-config API on a unix socket
//! (GET and PATCH of `/v1/endpoint/{id}/config`, shaped as
//! `testdata/cilium-endpoint-config-definitions.json`), and a datapath
//! that turns audited flows into denied ones once an endpoint's audit mode
//! is off, as Cilium's would.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use axum::{
    Json, Router,
    extract::{Path as UrlPath, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::cilium_config::{EndpointConfigurationSpec, OptionValue, POLICY_AUDIT_MODE};
use crate::model::{Direction, FlowRecord, NotifySource, Verdict};

/// How the fake answers PATCH (GET always answers, unless `get_fails`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchMode {
    Normal,
    /// 403, as with `--enable-cilium-api-server-access` restricting it.
    Forbidden,
    NotFound,
    RateLimited,
    /// 500 without applying (Cilium's "Update failed").
    Failed,
    /// Applies the change, then answers after this long.
    AppliesThenSlow(Duration),
    /// Answers 200 without applying (a Cilium that ignored the option).
    Ignores,
}

#[derive(Debug)]
pub struct FakeState {
    /// Realized PolicyAuditMode per endpoint; an absent endpoint is a 404.
    pub audit: BTreeMap<u16, OptionValue>,
    pub patch_mode: PatchMode,
    /// Every PATCH that reached the fake: (when, endpoint, value asked for).
    pub patches: Vec<(SystemTime, u16, String)>,
    /// When each endpoint's audit mode last went off (the datapath reads it).
    pub switched_off_at: BTreeMap<u16, SystemTime>,
}

#[derive(Clone)]
pub struct FakeCiliumConfig {
    pub state: Arc<Mutex<FakeState>>,
    socket: PathBuf,
    server: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl FakeCiliumConfig {
    /// Every endpoint in `endpoints` starts in audit mode.
    pub fn new(socket: &Path, endpoints: &[u16]) -> FakeCiliumConfig {
        FakeCiliumConfig {
            state: Arc::new(Mutex::new(FakeState {
                audit: endpoints.iter().map(|&e| (e, OptionValue::Enabled)).collect(),
                patch_mode: PatchMode::Normal,
                patches: Vec::new(),
                switched_off_at: BTreeMap::new(),
            })),
            socket: socket.to_owned(),
            server: Arc::default(),
        }
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }

    pub fn audit(&self, endpoint: u16) -> Option<OptionValue> {
        self.lock().audit.get(&endpoint).copied()
    }

    pub fn set_patch_mode(&self, mode: PatchMode) {
        self.lock().patch_mode = mode;
    }

    pub fn patches(&self) -> Vec<(SystemTime, u16, String)> {
        self.lock().patches.clone()
    }

    pub fn start(&self) {
        let _ = std::fs::remove_file(&self.socket);
        let listener = tokio::net::UnixListener::bind(&self.socket).expect("bind the fake Cilium socket");
        let app = Router::new()
            .route("/v1/endpoint/{id}/config", get(get_config).patch(patch_config))
            .with_state(self.state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        *self.server.lock().unwrap() = Some(task);
    }
}

type Shared = State<Arc<Mutex<FakeState>>>;

/// The realized options as Cilium prints them (`GetMutableModel`): every
/// boolean option "Enabled"/"Disabled"; `immutable` is an empty map.
fn status_json(audit: OptionValue) -> Value {
    json!({
        "realized": {"options": {
            "Conntrack": "Enabled",
            "ConntrackAccounting": "Enabled",
            "Debug": "Disabled",
            "DropNotification": "Enabled",
            "PolicyAuditMode": audit.as_str(),
            "PolicyVerdictNotification": "Enabled",
            "TraceNotification": "Enabled",
        }},
        "immutable": {},
    })
}

async fn get_config(State(s): Shared, UrlPath(id): UrlPath<String>) -> Response {
    let Ok(id) = id.parse::<u16>() else {
        return (StatusCode::NOT_FOUND, Json(json!("no such endpoint"))).into_response();
    };
    match s.lock().unwrap().audit.get(&id) {
        Some(&v) => Json(status_json(v)).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn patch_config(
    State(s): Shared,
    UrlPath(id): UrlPath<String>,
    Json(spec): Json<EndpointConfigurationSpec>,
) -> Response {
    let Ok(id) = id.parse::<u16>() else { return StatusCode::NOT_FOUND.into_response() };
    let asked = spec.options.as_ref().and_then(|o| o.get(POLICY_AUDIT_MODE)).cloned().unwrap_or_default();
    let (mode, exists) = {
        let mut st = s.lock().unwrap();
        st.patches.push((SystemTime::now(), id, asked.clone()));
        (st.patch_mode, st.audit.contains_key(&id))
    };
    if !exists {
        return StatusCode::NOT_FOUND.into_response();
    }
    let apply = |s: &Arc<Mutex<FakeState>>| {
        let value = match asked.as_str() {
            "Enabled" => OptionValue::Enabled,
            "Disabled" => OptionValue::Disabled,
            _ => return false,
        };
        let mut st = s.lock().unwrap();
        st.audit.insert(id, value);
        if value == OptionValue::Disabled {
            st.switched_off_at.insert(id, SystemTime::now());
        }
        true
    };
    match mode {
        PatchMode::Normal => {
            if apply(&s) {
                StatusCode::OK.into_response()
            } else {
                (StatusCode::BAD_REQUEST, Json(json!("invalid option value"))).into_response()
            }
        }
        PatchMode::Forbidden => StatusCode::FORBIDDEN.into_response(),
        PatchMode::NotFound => StatusCode::NOT_FOUND.into_response(),
        PatchMode::RateLimited => StatusCode::TOO_MANY_REQUESTS.into_response(),
        PatchMode::Failed => {
            (StatusCode::INTERNAL_SERVER_ERROR, Json(json!("endpoint regeneration failed"))).into_response()
        }
        PatchMode::AppliesThenSlow(d) => {
            apply(&s);
            tokio::time::sleep(d).await;
            StatusCode::OK.into_response()
        }
        PatchMode::Ignores => StatusCode::OK.into_response(),
    }
}

/// One connection pattern of the datapath: the same remote, port and
/// protocol every time the source is read.
#[derive(Clone, Copy, Debug)]
pub struct Traffic {
    pub endpoint_id: u16,
    pub direction: Direction,
    pub remote_identity: u32,
    pub proto: u8,
    pub dst_port: u16,
    /// Denied by the endpoint's policy (audited while in audit mode).
    pub policy_denies: bool,
}

/// Notifications, first seen, last seen.
type Counted = (u64, SystemTime, SystemTime);

/// What the tap would have counted: per traffic, an audited (or allowed)
/// record while the endpoint is in audit mode, a denied one from the first
/// packet after the switch. Counts grow by one per read.
pub struct Datapath {
    fake: FakeCiliumConfig,
    traffic: Vec<Traffic>,
    started: SystemTime,
    counts: Mutex<BTreeMap<(usize, Verdict), Counted>>,
}

impl Datapath {
    pub fn new(fake: FakeCiliumConfig, traffic: Vec<Traffic>) -> Arc<Datapath> {
        Arc::new(Datapath { fake, traffic, started: SystemTime::now(), counts: Mutex::default() })
    }

    /// One read of the counters.
    pub fn flows(&self) -> Arc<[FlowRecord]> {
        let now = SystemTime::now();
        let mut counts = self.counts.lock().unwrap();
        for (i, t) in self.traffic.iter().enumerate() {
            let enforcing = self.fake.audit(t.endpoint_id) == Some(OptionValue::Disabled);
            let verdict = match (t.policy_denies, enforcing) {
                (false, _) => Verdict::Allowed,
                (true, false) => Verdict::Audited,
                (true, true) => Verdict::Denied,
            };
            let e = counts.entry((i, verdict)).or_insert((0, now, now));
            e.0 += 1;
            e.2 = now;
        }
        counts
            .iter()
            .map(|(&(i, verdict), &(n, first, last))| {
                let t = self.traffic[i];
                FlowRecord {
                    endpoint_id: t.endpoint_id,
                    direction: t.direction,
                    remote_identity: t.remote_identity,
                    proto: t.proto,
                    dst_port: t.dst_port,
                    verdict,
                    match_type: 0,
                    source: NotifySource::PolicyVerdict,
                    reason: if verdict == Verdict::Denied { 133 } else { 0 },
                    ipv6: false,
                    notifications: n,
                    bytes: n * 60,
                    first_seen: first.max(self.started),
                    last_seen: last,
                    remote_addrs: Default::default(),
                    port_aggregate: None,
                }
            })
            .collect()
    }
}

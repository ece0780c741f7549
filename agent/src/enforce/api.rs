//! The daemon's enforcement routes, served next to `/api/v1/readiness` on
//! the agent's loopback listener:
//!
//! - `GET  /api/v1/enforcement/trials`: every recorded trial;
//! - `POST /api/v1/enforcement/trials`: start one ([`TrialRequest`]);
//! - `GET  /api/v1/enforcement/trials/{id}`;
//! - `POST /api/v1/enforcement/trials/{id}/confirm` and `.../abort`
//!   ([`Requester`] as the body).
//!
//! Refusals answer `{"error": "...", "status": N}` with the status of
//! [`TrialError::http_status`].
//!
//! The agent listens on all addresses in its pod (Prometheus scrapes it), so
//! the routes that change a trial answer only requests from loopback: `kubectl
//! exec` into the agent pod or `kubectl port-forward` to it, both of which
//! connect from 127.0.0.1 inside the pod. The server must be started with
//! `into_make_service_with_connect_info::<SocketAddr>()`; without the peer
//! address every change is refused.

use std::{net::SocketAddr, time::SystemTime};

use axum::{
    Json, Router,
    extract::{
        ConnectInfo, Path, State,
        rejection::{ExtensionRejection, JsonRejection},
    },
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize};

use super::{
    SharedTrials,
    record::{Requester, TrialRecord},
    trial::{TrialError, TrialRequest},
    watch::ReadCadence,
};

/// Path prefix of the routes.
pub const TRIALS_PATH: &str = "/api/v1/enforcement/trials";

#[derive(Clone)]
pub struct ApiState {
    pub trials: SharedTrials,
    pub cadence: ReadCadence,
}

/// The routes, with their state applied: merge into the agent's router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route(TRIALS_PATH, get(list).post(start))
        .route(&format!("{TRIALS_PATH}/{{id}}"), get(show))
        .route(&format!("{TRIALS_PATH}/{{id}}/confirm"), post(confirm))
        .route(&format!("{TRIALS_PATH}/{{id}}/abort"), post(abort))
        .with_state(state)
}

/// `GET /api/v1/enforcement/trials`.
#[derive(Debug, Serialize, Deserialize)]
pub struct TrialList {
    /// Whether this agent writes to the Cilium API at all.
    pub enabled: bool,
    pub trials: Vec<TrialRecord>,
}

/// A refusal as the API sends it.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
    pub status: u16,
}

fn refusal(e: &TrialError) -> Response {
    error_response(e.http_status(), e.to_string())
}

fn error_response(status: u16, error: String) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, Json(ApiError { error, status })).into_response()
}

fn bad_body(e: &JsonRejection) -> Response {
    error_response(400, format!("the request body is not what this agent expects: {}", e.body_text()))
}

type Peer = Result<ConnectInfo<SocketAddr>, ExtensionRejection>;

/// Changes only from loopback; None when the request may go on.
fn refuse_remote(peer: &Peer) -> Option<Response> {
    match peer {
        Ok(ConnectInfo(addr)) if addr.ip().is_loopback() => None,
        Ok(ConnectInfo(addr)) => Some(error_response(
            403,
            format!(
                "enforcement trials are changed only from loopback (kubectl exec into the agent pod, or kubectl \
                 port-forward to it); this request came from {addr}"
            ),
        )),
        Err(_) => Some(error_response(
            403,
            "this agent's HTTP server does not report peer addresses, so it cannot tell a loopback request from a \
             remote one; trial changes are refused (serve with into_make_service_with_connect_info)"
                .into(),
        )),
    }
}

async fn list(State(s): State<ApiState>) -> Response {
    let m = s.trials.lock().await;
    Json(TrialList { enabled: m.settings().enabled, trials: m.trials().to_vec() }).into_response()
}

async fn show(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    match s.trials.lock().await.get(&id) {
        Some(t) => Json(t.clone()).into_response(),
        None => refusal(&TrialError::NotFound(id)),
    }
}

async fn start(State(s): State<ApiState>, peer: Peer, body: Result<Json<TrialRequest>, JsonRejection>) -> Response {
    if let Some(r) = refuse_remote(&peer) {
        return r;
    }
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => return bad_body(&e),
    };
    let mut m = s.trials.lock().await;
    let result = m.start(req, SystemTime::now()).await;
    s.cadence.set_fast(m.any_active());
    match result {
        Ok(t) => (StatusCode::CREATED, Json(t)).into_response(),
        Err(e) => refusal(&e),
    }
}

async fn confirm(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    peer: Peer,
    body: Result<Json<Requester>, JsonRejection>,
) -> Response {
    if let Some(r) = refuse_remote(&peer) {
        return r;
    }
    let by = match body {
        Ok(Json(r)) => r,
        Err(e) => return bad_body(&e),
    };
    match s.trials.lock().await.confirm(&id, by, SystemTime::now()).await {
        Ok(t) => Json(t).into_response(),
        Err(e) => refusal(&e),
    }
}

async fn abort(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    peer: Peer,
    body: Result<Json<Requester>, JsonRejection>,
) -> Response {
    if let Some(r) = refuse_remote(&peer) {
        return r;
    }
    let by = match body {
        Ok(Json(r)) => r,
        Err(e) => return bad_body(&e),
    };
    match s.trials.lock().await.abort(&id, by, SystemTime::now()).await {
        Ok(t) => Json(t).into_response(),
        Err(e) => refusal(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_peers_change_trials() {
        let peer = |a: &str| -> Peer { Ok(ConnectInfo(a.parse().unwrap())) };
        assert!(refuse_remote(&peer("127.0.0.1:40000")).is_none());
        assert!(refuse_remote(&peer("[::1]:40000")).is_none());
        let remote = refuse_remote(&peer("10.0.0.7:40000")).unwrap();
        assert_eq!(remote.status(), StatusCode::FORBIDDEN);
    }
}

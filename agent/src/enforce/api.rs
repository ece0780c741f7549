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

use std::time::SystemTime;

use axum::{
    Json, Router,
    extract::{Path, State, rejection::JsonRejection},
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

async fn start(State(s): State<ApiState>, body: Result<Json<TrialRequest>, JsonRejection>) -> Response {
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
    body: Result<Json<Requester>, JsonRejection>,
) -> Response {
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
    body: Result<Json<Requester>, JsonRejection>,
) -> Response {
    let by = match body {
        Ok(Json(r)) => r,
        Err(e) => return bad_body(&e),
    };
    match s.trials.lock().await.abort(&id, by, SystemTime::now()).await {
        Ok(t) => Json(t).into_response(),
        Err(e) => refusal(&e),
    }
}

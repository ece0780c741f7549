//! The Cilium agent's per-endpoint configuration: `GET` and `PATCH
//! /v1/endpoint/{id}/config`, reduced to the one option a trial switches.
//!
//! Models from Cilium's `api/v1/openapi.yaml` (definitions
//! `EndpointConfigurationSpec`, `EndpointConfigurationStatus`,
//! `ConfigurationMap`, `Error`; copied to
//! `testdata/cilium-endpoint-config-definitions.json`, with where they came
//! from). The option's name and its two values are Cilium's
//! `option.PolicyAuditMode` and what `IntOptions.GetMutableModel`
//! (`pkg/option/option.go`) prints for a boolean option: `Enabled` or
//! `Disabled`.
//!
//! GET goes through [`CiliumApiClient`]; that client has no PATCH, so the
//! one PATCH is sent here over the same kind of connection (one HTTP/1.1
//! exchange on the unix socket per request).

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

use crate::enrich::cilium_api::{CiliumApiClient, CiliumApiError};

/// Cilium's `option.PolicyAuditMode`.
pub const POLICY_AUDIT_MODE: &str = "PolicyAuditMode";

/// Answers of the endpoint-config API are a few KiB.
const MAX_BODY: usize = 1 << 20;

/// The value of a boolean endpoint option, as Cilium's API prints it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OptionValue {
    Enabled,
    Disabled,
}

impl OptionValue {
    pub fn as_str(self) -> &'static str {
        match self {
            OptionValue::Enabled => "Enabled",
            OptionValue::Disabled => "Disabled",
        }
    }

    fn parse(s: &str) -> Option<OptionValue> {
        match s {
            "Enabled" => Some(OptionValue::Enabled),
            "Disabled" => Some(OptionValue::Disabled),
            _ => None,
        }
    }
}

/// `EndpointConfigurationSpec` (the PATCH body; `realized` in the status).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointConfigurationSpec {
    /// `ConfigurationMap`: option name to value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<BTreeMap<String, String>>,
}

impl EndpointConfigurationSpec {
    /// `{"options": {"PolicyAuditMode": "<value>"}}`: only the one option, so
    /// nothing else about the endpoint changes.
    pub fn audit_mode(value: OptionValue) -> EndpointConfigurationSpec {
        EndpointConfigurationSpec {
            options: Some(BTreeMap::from([(POLICY_AUDIT_MODE.to_owned(), value.as_str().to_owned())])),
        }
    }
}

/// `EndpointConfigurationStatus` (the GET answer).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointConfigurationStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realized: Option<EndpointConfigurationSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub immutable: Option<BTreeMap<String, String>>,
    /// `Error` is a plain string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl EndpointConfigurationStatus {
    /// The realized PolicyAuditMode; None when absent or not a known value.
    pub fn audit_mode(&self) -> Option<OptionValue> {
        let options = self.realized.as_ref()?.options.as_ref()?;
        OptionValue::parse(options.get(POLICY_AUDIT_MODE)?)
    }
}

/// Why the endpoint's configuration could not be read or changed. Each
/// message names the endpoint and says what to do; none of them means the
/// option is now in an unknown state unless it says so.
#[derive(Debug, thiserror::Error)]
pub enum EndpointConfigError {
    #[error(
        "the Cilium agent API refused {method} /v1/endpoint/{endpoint}/config with HTTP 403: API access is \
         restricted (cilium-agent --enable-cilium-api-server-access); allow the endpoint operations \
         (PatchEndpointIDConfig) or leave enforcement to cilium-dbg"
    )]
    Forbidden { method: &'static str, endpoint: u16 },
    #[error(
        "endpoint {endpoint} does not exist on this node's Cilium agent (HTTP 404); it may have been deleted or \
         recreated with a new ID: check `cilium-dbg endpoint list` and start again"
    )]
    NotFound { endpoint: u16 },
    #[error(
        "the Cilium agent API rate-limited {method} /v1/endpoint/{endpoint}/config (HTTP 429); retry in a few \
         seconds"
    )]
    RateLimited { method: &'static str, endpoint: u16 },
    #[error(
        "{method} /v1/endpoint/{endpoint}/config on {} did not answer within {timeout:?}; cilium-agent may be \
         restarting or regenerating endpoints: check `cilium-dbg status` and retry",
        socket.display()
    )]
    Timeout { method: &'static str, endpoint: u16, socket: PathBuf, timeout: Duration },
    #[error(
        "cannot reach the Cilium agent API at {} for endpoint {endpoint}; check that cilium-agent runs on this \
         node and that its socket is mounted read-write into this pod",
        socket.display()
    )]
    Unreachable {
        endpoint: u16,
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{method} /v1/endpoint/{endpoint}/config: the HTTP exchange with the Cilium agent failed")]
    Http {
        method: &'static str,
        endpoint: u16,
        #[source]
        source: hyper::Error,
    },
    #[error("{method} /v1/endpoint/{endpoint}/config answered HTTP {status}: {body}")]
    Rejected { method: &'static str, endpoint: u16, status: u16, body: String },
    #[error(
        "GET /v1/endpoint/{endpoint}/config is not an EndpointConfigurationStatus; this Cilium version's API \
         may differ from the model verdict-agent reads (api/v1/openapi.yaml)"
    )]
    Decode {
        endpoint: u16,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "endpoint {endpoint} reports no realized PolicyAuditMode option (Enabled or Disabled){}; verdict-agent \
         cannot tell what it would switch",
        error.as_deref().map(|e| format!(" (Cilium says: {e})")).unwrap_or_default()
    )]
    NoAuditOption { endpoint: u16, error: Option<String> },
}

impl EndpointConfigError {
    /// Cilium refused before applying anything: the option is as it was.
    pub fn refused_before_applying(&self) -> bool {
        matches!(
            self,
            EndpointConfigError::Forbidden { .. }
                | EndpointConfigError::NotFound { .. }
                | EndpointConfigError::RateLimited { .. }
                | EndpointConfigError::Unreachable { .. }
                | EndpointConfigError::Rejected { status: 400, .. }
        )
    }

    /// A short, bounded name for metrics and records.
    pub fn kind(&self) -> &'static str {
        match self {
            EndpointConfigError::Forbidden { .. } => "forbidden",
            EndpointConfigError::NotFound { .. } => "not_found",
            EndpointConfigError::RateLimited { .. } => "rate_limited",
            EndpointConfigError::Timeout { .. } => "timeout",
            EndpointConfigError::Unreachable { .. } => "unreachable",
            EndpointConfigError::Http { .. } => "http",
            EndpointConfigError::Rejected { .. } => "rejected",
            EndpointConfigError::Decode { .. } => "decode",
            EndpointConfigError::NoAuditOption { .. } => "no_audit_option",
        }
    }
}

/// Reads and switches one endpoint's PolicyAuditMode.
#[derive(Clone, Debug)]
pub struct EndpointConfigClient {
    api: CiliumApiClient,
    socket: PathBuf,
    timeout: Duration,
}

impl EndpointConfigClient {
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> EndpointConfigClient {
        let socket = socket.into();
        EndpointConfigClient { api: CiliumApiClient::new(socket.clone(), timeout), socket, timeout }
    }

    /// `GET /v1/endpoint/{id}/config`.
    pub async fn status(&self, endpoint: u16) -> Result<EndpointConfigurationStatus, EndpointConfigError> {
        let body =
            self.api.get(&format!("/v1/endpoint/{endpoint}/config")).await.map_err(|e| self.get_error(endpoint, e))?;
        serde_json::from_slice(&body).map_err(|source| EndpointConfigError::Decode { endpoint, source })
    }

    /// The realized PolicyAuditMode of `endpoint`.
    pub async fn audit_mode(&self, endpoint: u16) -> Result<OptionValue, EndpointConfigError> {
        let status = self.status(endpoint).await?;
        status.audit_mode().ok_or(EndpointConfigError::NoAuditOption { endpoint, error: status.error })
    }

    /// `PATCH /v1/endpoint/{id}/config` with only PolicyAuditMode, then the
    /// realized value read back (what the caller must trust, not the 200).
    pub async fn set_audit_mode(&self, endpoint: u16, value: OptionValue) -> Result<OptionValue, EndpointConfigError> {
        let body =
            serde_json::to_vec(&EndpointConfigurationSpec::audit_mode(value)).expect("a map of two strings serializes");
        let path = format!("/v1/endpoint/{endpoint}/config");
        match tokio::time::timeout(self.timeout, self.patch(endpoint, &path, body)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(EndpointConfigError::Timeout {
                    method: "PATCH",
                    endpoint,
                    socket: self.socket.clone(),
                    timeout: self.timeout,
                });
            }
        }
        self.audit_mode(endpoint).await
    }

    async fn patch(&self, endpoint: u16, path: &str, body: Vec<u8>) -> Result<(), EndpointConfigError> {
        let http = |source| EndpointConfigError::Http { method: "PATCH", endpoint, source };
        let stream = UnixStream::connect(&self.socket).await.map_err(|source| EndpointConfigError::Unreachable {
            endpoint,
            socket: self.socket.clone(),
            source,
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http)?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let _abort = AbortOnDrop(conn);
        let req = Request::builder()
            .method(Method::PATCH)
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("static request parts are valid");
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status().as_u16();
        let text = match Limited::new(resp.into_body(), MAX_BODY).collect().await {
            Ok(b) => bounded_text(&b.to_bytes()),
            Err(e) => e.to_string(),
        };
        match status {
            200 => Ok(()),
            other => Err(status_error("PATCH", endpoint, other, text)),
        }
    }

    fn get_error(&self, endpoint: u16, e: CiliumApiError) -> EndpointConfigError {
        match e {
            CiliumApiError::Status { status, body, .. } => status_error("GET", endpoint, status, body),
            CiliumApiError::Timeout { timeout, .. } => {
                EndpointConfigError::Timeout { method: "GET", endpoint, socket: self.socket.clone(), timeout }
            }
            CiliumApiError::Connect { source, .. } => {
                EndpointConfigError::Unreachable { endpoint, socket: self.socket.clone(), source }
            }
            CiliumApiError::Http { source, .. } => EndpointConfigError::Http { method: "GET", endpoint, source },
            CiliumApiError::Body { message, .. } => {
                EndpointConfigError::Rejected { method: "GET", endpoint, status: 200, body: message }
            }
            CiliumApiError::Decode { source, .. } => EndpointConfigError::Decode { endpoint, source },
        }
    }
}

fn status_error(method: &'static str, endpoint: u16, status: u16, body: String) -> EndpointConfigError {
    match status {
        403 => EndpointConfigError::Forbidden { method, endpoint },
        404 => EndpointConfigError::NotFound { endpoint },
        429 => EndpointConfigError::RateLimited { method, endpoint },
        _ => EndpointConfigError::Rejected { method, endpoint, status, body },
    }
}

/// An answer body as one bounded line: Cilium's `Error` is a JSON string.
fn bounded_text(body: &[u8]) -> String {
    let text = match serde_json::from_slice::<String>(body) {
        Ok(s) => s,
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    text.trim().chars().filter(|c| !c.is_control()).take(300).collect()
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

//! Client for the node's Cilium agent API: HTTP/1.1 over the unix socket
//! `cilium-agent` serves (`/var/run/cilium/cilium.sock`, base path `/v1`).
//!
//! One connection per request: requests are rare (one round per refresh
//! interval), and a fresh connection never trips over a socket that the
//! agent closed while restarting.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, de::DeserializeOwned};
use tokio::net::UnixStream;

use crate::cilium::endpoint_list::{ApiEndpoint, ApiIdentity, option_enabled};

/// Where cilium-agent listens by default.
pub const DEFAULT_SOCKET: &str = "/var/run/cilium/cilium.sock";

/// Endpoint lists carry each endpoint's realized policy and can reach
/// megabytes on a busy node; anything beyond this is not an agent answer.
const MAX_BODY: usize = 64 << 20;

/// A failed request to the Cilium agent API.
#[derive(Debug, thiserror::Error)]
pub enum CiliumApiError {
    #[error(
        "cannot connect to the Cilium agent API at {}: {source}; check that cilium-agent runs on this node \
         and that its socket directory (hostPath /var/run/cilium) is mounted into this pod, or pass \
         --cilium-socket",
        socket.display()
    )]
    Connect { socket: PathBuf, source: std::io::Error },
    #[error(
        "GET {path} on {} did not answer within {timeout:?}; cilium-agent may be starting, overloaded \
         or regenerating endpoints; the request is retried with backoff",
        socket.display()
    )]
    Timeout { socket: PathBuf, path: String, timeout: Duration },
    #[error("GET {path} on {}: HTTP exchange failed: {source}", socket.display())]
    Http { socket: PathBuf, path: String, source: hyper::Error },
    #[error("GET {path} on {}: reading the response failed: {message}", socket.display())]
    Body { socket: PathBuf, path: String, message: String },
    #[error("GET {path} on {} answered HTTP {status}: {body}", socket.display())]
    Status { socket: PathBuf, path: String, status: u16, body: String },
    #[error(
        "GET {path} on {}: the response is not a {what}: {source}; this Cilium version's API may differ \
         from the models verdict-agent reads (api/v1/openapi.yaml)",
        socket.display()
    )]
    Decode { socket: PathBuf, path: String, what: &'static str, source: serde_json::Error },
}

impl CiliumApiError {
    /// The agent answered "no such object": a valid answer, not an outage.
    pub fn is_not_found(&self) -> bool {
        matches!(self, CiliumApiError::Status { status: 404, .. })
    }
}

/// Client bound to one socket, with a timeout on every request.
#[derive(Clone, Debug)]
pub struct CiliumApiClient {
    socket: PathBuf,
    timeout: Duration,
}

impl CiliumApiClient {
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> CiliumApiClient {
        CiliumApiClient { socket: socket.into(), timeout }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET /v1/endpoint`: every endpoint of this node.
    pub async fn endpoints(&self) -> Result<Vec<ApiEndpoint>, CiliumApiError> {
        self.get_json("/v1/endpoint", "list of Endpoint").await
    }

    /// `GET /v1/identity/{id}`.
    pub async fn identity(&self, id: u32) -> Result<ApiIdentity, CiliumApiError> {
        self.get_json(&format!("/v1/identity/{id}"), "Identity").await
    }

    /// `GET /v1/config`.
    pub async fn config(&self) -> Result<DaemonConfiguration, CiliumApiError> {
        self.get_json("/v1/config", "DaemonConfiguration").await
    }

    async fn get_json<T: DeserializeOwned>(&self, path: &str, what: &'static str) -> Result<T, CiliumApiError> {
        let body = self.get(path).await?;
        serde_json::from_slice(&body).map_err(|source| CiliumApiError::Decode {
            socket: self.socket.clone(),
            path: path.to_owned(),
            what,
            source,
        })
    }

    /// GET `path`, bounded by the timeout from connect to the last body byte.
    pub async fn get(&self, path: &str) -> Result<Bytes, CiliumApiError> {
        match tokio::time::timeout(self.timeout, self.get_inner(path)).await {
            Ok(r) => r,
            Err(_) => Err(CiliumApiError::Timeout {
                socket: self.socket.clone(),
                path: path.to_owned(),
                timeout: self.timeout,
            }),
        }
    }

    async fn get_inner(&self, path: &str) -> Result<Bytes, CiliumApiError> {
        let http = |source| CiliumApiError::Http { socket: self.socket.clone(), path: path.to_owned(), source };
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|source| CiliumApiError::Connect { socket: self.socket.clone(), source })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http)?;
        // The connection task ends when the response is read and `sender`
        // dropped, or with the timeout's cancellation of this future.
        let conn = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::trace!(error = %e, "cilium API connection closed with an error");
            }
        });
        let _abort = AbortOnDrop(conn);

        // The Go client addresses the socket as host "localhost"; the agent
        // ignores the host but an HTTP/1.1 request must carry one.
        let req = Request::get(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .expect("static request parts are valid");
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY).collect().await.map_err(|e| CiliumApiError::Body {
            socket: self.socket.clone(),
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let body = body.to_bytes();
        if status != StatusCode::OK {
            let text = String::from_utf8_lossy(&body[..body.len().min(512)]).trim().to_owned();
            return Err(CiliumApiError::Status {
                socket: self.socket.clone(),
                path: path.to_owned(),
                status: status.as_u16(),
                body: text,
            });
        }
        Ok(body)
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `DaemonConfiguration`, reduced to the settings that decide whether
/// verdicts are emitted and whether they are audits.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct DaemonConfiguration {
    pub spec: Option<DaemonConfigurationSpec>,
    pub status: Option<DaemonConfigurationStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DaemonConfigurationSpec {
    pub options: Option<BTreeMap<String, serde_json::Value>>,
    pub policy_enforcement: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct DaemonConfigurationStatus {
    pub realized: Option<DaemonConfigurationSpec>,
    /// `option.DaemonConfig` marshalled field by field (Go field names);
    /// its keys vary by release.
    #[serde(rename = "daemonConfigurationMap")]
    pub daemon_configuration_map: Option<BTreeMap<String, serde_json::Value>>,
}

/// Daemon-wide settings relevant to verdicts. `None`: this Cilium version
/// does not report it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DaemonFacts {
    /// `--policy-audit-mode` (every endpoint audits).
    pub policy_audit_mode: Option<bool>,
    /// The mutable daemon option PolicyVerdictNotification (the default for
    /// new endpoints; forced on up to v1.15).
    pub policy_verdict_notification: Option<bool>,
    /// `--bpf-events-policy-verdict-enabled` (v1.16+).
    pub bpf_events_policy_verdict: Option<bool>,
    /// `--bpf-events-drop-enabled` (v1.16+).
    pub bpf_events_drop: Option<bool>,
    /// `--bpf-events-default-rate-limit` / `-burst-limit` (v1.17+; 0 = off).
    pub bpf_events_rate_limit: Option<u64>,
    pub bpf_events_burst_limit: Option<u64>,
    /// `--enable-host-firewall`: host policies are enforced at all.
    pub host_firewall: Option<bool>,
    /// `default`, `always` or `never`.
    pub policy_enforcement: Option<String>,
}

impl DaemonConfiguration {
    pub fn facts(&self) -> DaemonFacts {
        let realized = self.status.as_ref().and_then(|s| s.realized.as_ref());
        let spec = self.spec.as_ref();
        let options = realized.and_then(|r| r.options.as_ref()).or_else(|| spec.and_then(|s| s.options.as_ref()));
        let map = self.status.as_ref().and_then(|s| s.daemon_configuration_map.as_ref());
        let flag = |key: &str| map.and_then(|m| m.get(key)).and_then(|v| v.as_bool());
        let number = |key: &str| map.and_then(|m| m.get(key)).and_then(|v| v.as_u64());
        DaemonFacts {
            policy_audit_mode: flag("PolicyAuditMode").or_else(|| option_enabled(options, "PolicyAuditMode")),
            policy_verdict_notification: option_enabled(options, "PolicyVerdictNotification"),
            bpf_events_policy_verdict: flag("BPFEventsPolicyVerdictEnabled"),
            bpf_events_drop: flag("BPFEventsDropEnabled"),
            bpf_events_rate_limit: number("BPFEventsDefaultRateLimit"),
            bpf_events_burst_limit: number("BPFEventsDefaultBurstLimit"),
            host_firewall: flag("EnableHostFirewall"),
            policy_enforcement: realized
                .and_then(|r| r.policy_enforcement.clone())
                .or_else(|| spec.and_then(|s| s.policy_enforcement.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_facts_tolerate_absence() {
        let empty: DaemonConfiguration = serde_json::from_str("{}").unwrap();
        assert_eq!(empty.facts(), DaemonFacts::default());

        // v1.15 shape: no BPFEvents* keys.
        let v115: DaemonConfiguration = serde_json::from_str(
            r#"{"spec": {"options": {"PolicyAuditMode": "Enabled"}, "policy-enforcement": "default"},
                "status": {"daemonConfigurationMap": {"PolicyAuditMode": true, "EnableHostFirewall": true}}}"#,
        )
        .unwrap();
        let f = v115.facts();
        assert_eq!(f.policy_audit_mode, Some(true));
        assert_eq!(f.host_firewall, Some(true));
        assert_eq!(f.bpf_events_policy_verdict, None);
        assert_eq!(f.policy_enforcement.as_deref(), Some("default"));
    }
}

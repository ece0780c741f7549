//! A loopback door to one agent: every TCP connection to it becomes a
//! port-forward stream through the API server to the pod's own loopback,
//! which is what `kubectl port-forward` does. The agent's API answers
//! loopback peers only (`--api-access local`, and trial writes always), so
//! this is the one way in that needs no wider opening: the caller needs
//! RBAC `create` on `pods/portforward`, as for `kubectl port-forward`.
//!
//! The door lets `preflight` and `enforce` run unchanged, with their own
//! output and exit codes, against an agent on any node.

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

use super::agents::AgentPod;

/// Closes when dropped.
pub struct Door {
    /// `http://127.0.0.1:PORT`, the agent as `--agent` takes it.
    pub url: String,
    task: JoinHandle<()>,
}

impl Drop for Door {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Door {
    pub async fn open(client: &Client, agent: &AgentPod) -> std::io::Result<Door> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let pods: Api<Pod> = Api::namespaced(client.clone(), &agent.namespace);
        let (pod, port, shown) = (agent.pod.clone(), agent.port, agent.display());
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(forward(conn, pods.clone(), pod.clone(), port, shown.clone()));
            }
        });
        Ok(Door { url, task })
    }
}

async fn forward(mut conn: TcpStream, pods: Api<Pod>, pod: String, port: u16, shown: String) {
    let mut forwarder = match pods.portforward(&pod, &[port]).await {
        Ok(f) => f,
        Err(e) => {
            let error = format!(
                "port-forward to pod {shown} port {port} failed (may you create pods/portforward there?): {}",
                crate::errors::chain(&e)
            );
            return refuse(&mut conn, &error).await;
        }
    };
    let Some(mut upstream) = forwarder.take_stream(port) else {
        return refuse(&mut conn, &format!("port-forward to pod {shown} gave no stream for port {port}")).await;
    };
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
    drop(upstream);
    let _ = forwarder.join().await;
}

/// An HTTP answer in the agent's error shape (`{"error": ...}`), so the
/// CLI prints why instead of a dropped connection.
async fn refuse(conn: &mut TcpStream, error: &str) {
    drain_request(conn).await;
    let body = serde_json::json!({ "error": error }).to_string();
    let head = format!(
        "HTTP/1.1 502 Bad Gateway\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(head.as_bytes()).await;
    let _ = conn.write_all(body.as_bytes()).await;
    let _ = conn.shutdown().await;
}

/// Reads the request the client sent (head and `content-length` body, at
/// most 64 KiB, a second at most), so that answering and closing does not
/// reset a connection with unread data.
async fn drain_request(conn: &mut TcpStream) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
    while seen.len() < 64 * 1024 {
        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
            let body_len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if seen.len() >= end + 4 + body_len {
                return;
            }
        }
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
            _ => return,
        }
    }
}

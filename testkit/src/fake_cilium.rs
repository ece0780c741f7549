//! A fake Cilium agent API on a unix socket, std only: `GET` and `PATCH
//! /v1/endpoint/{id}/config` for one endpoint, in the body shapes of
//! Cilium's `EndpointConfigurationStatus` and `EndpointConfigurationSpec`
//! (`realized.options.PolicyAuditMode`, `options.PolicyAuditMode`), every
//! PATCH recorded with the instant it arrived. One request per connection
//! (`Connection: close`).

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::{Context, Result};

#[derive(Default)]
pub struct FakeCiliumState {
    pub audit_mode: String,
    pub patches: Vec<(Instant, String)>,
}

pub struct FakeCilium {
    pub socket: PathBuf,
    pub endpoint: u16,
    pub state: Arc<Mutex<FakeCiliumState>>,
}

impl FakeCilium {
    /// Serves on `socket` (removed first) for endpoint `endpoint`, in audit mode.
    pub fn start(socket: &Path, endpoint: u16) -> Result<FakeCilium> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
        let state = Arc::new(Mutex::new(FakeCiliumState { audit_mode: "Enabled".into(), patches: Vec::new() }));
        let shared = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let _ = serve_one(conn, endpoint, &shared);
                });
            }
        });
        Ok(FakeCilium { socket: socket.to_path_buf(), endpoint, state })
    }

    /// The endpoint's `PolicyAuditMode` as the fake holds it now.
    pub fn audit_mode(&self) -> String {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).audit_mode.clone()
    }

    pub fn patches(&self) -> Vec<(Instant, String)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).patches.clone()
    }

    /// One PATCH round trip from this process: the API's own answer time.
    pub fn patch_round_trip(&self, value: &str) -> Result<std::time::Duration> {
        let started = Instant::now();
        let mut s = UnixStream::connect(&self.socket)?;
        let body = format!("{{\"options\":{{\"PolicyAuditMode\":\"{value}\"}}}}");
        write!(
            s,
            "PATCH /v1/endpoint/{}/config HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.endpoint,
            body.len()
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        anyhow::ensure!(out.starts_with("HTTP/1.1 200"), "fake Cilium answered {out:?}");
        Ok(started.elapsed())
    }
}

fn serve_one(conn: UnixStream, endpoint: u16, state: &Mutex<FakeCiliumState>) -> Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    let arrived = Instant::now();
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let ours = path == format!("/v1/endpoint/{endpoint}/config");
    let (status, answer) = match (method, ours) {
        ("GET", true) => {
            let mode = state.lock().unwrap_or_else(|e| e.into_inner()).audit_mode.clone();
            (
                "200 OK",
                format!("{{\"realized\":{{\"options\":{{\"PolicyAuditMode\":\"{mode}\"}}}},\"immutable\":{{}}}}"),
            )
        }
        ("PATCH", true) => {
            let spec: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let mode = spec["options"]["PolicyAuditMode"].as_str().unwrap_or_default().to_owned();
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            s.patches.push((arrived, mode.clone()));
            s.audit_mode = mode;
            ("200 OK", String::new())
        }
        _ => ("404 Not Found", String::new()),
    };
    let mut conn = conn;
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
        answer.len()
    )?;
    Ok(())
}

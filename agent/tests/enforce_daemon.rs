//! The shipped binary as a daemon: a trial handed over its HTTP API, the
//! agent SIGKILLed mid-trial and restarted (it continues, as recorded),
//! then denied verdicts of the forgotten API-server flow replayed through
//! the real BPF counters: the agent puts audit mode back through the
//! (fake) Cilium API within a second, with the configured 2 s read interval
//! shortened for the trial.
//!
//! Needs root and bpffs (the replay tap loads real BPF programs).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use verdict_testkit::{
    fake_cilium::FakeCilium,
    replay::{Replayer, replay_with},
    scenario::{self, DEMO_HOST_ENDPOINT, Layout, api_server_to_host},
};

const ADDR: &str = "127.0.0.1:19821";

/// Removes the pin directory even when an assertion fails.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(args: &[String], log: &Path) -> Agent {
    let logf = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_verdict-agent"))
        .arg("run")
        .args(args)
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .unwrap();
    let agent = Agent(child);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if let Ok((200, _)) = http(reqwest_like::GET, "/readyz", None) {
            return agent;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("agent not ready; log:\n{}", std::fs::read_to_string(log).unwrap_or_default());
}

mod reqwest_like {
    pub const GET: &str = "GET";
    pub const POST: &str = "POST";
}

/// One HTTP/1.1 exchange with the agent (std only: the test must not
/// depend on the code under test to talk to it).
fn http(method: &str, path: &str, body: Option<&Value>) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let addr: SocketAddr = ADDR.parse().unwrap();
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {ADDR}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

#[test]
fn daemon_survives_sigkill_mid_trial_and_reverts_within_a_second_of_the_first_denial() {
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test loads BPF programs: run it as root (cargo test runs as root in CI and the VMs)");
    }
    let dir = tempfile::tempdir().unwrap();
    let pins_guard = Pins(PathBuf::from(format!("/sys/fs/bpf/verdict-enforce-{}", std::process::id())));
    let pins = pins_guard.0.clone();
    let socket = dir.path().join("cilium.sock");
    let fake = FakeCilium::start(&socket, DEMO_HOST_ENDPOINT).unwrap();
    let endpoints = dir.path().join("endpoints.json");
    let sc = scenario::demo(Layout::V1_19);
    std::fs::write(&endpoints, scenario::cilium_endpoint_list(&sc.endpoints).to_string()).unwrap();
    let log = dir.path().join("agent.log");
    let args: Vec<String> = [
        "--listen",
        ADDR,
        "--tap",
        "none",
        "--pin-dir",
        pins.to_str().unwrap(),
        "--poll-interval",
        "2s",
        "--endpoints-file",
        endpoints.to_str().unwrap(),
        "--cilium-socket",
        socket.to_str().unwrap(),
        "--enable-enforcement",
        "--state-dir",
        dir.path().join("state").to_str().unwrap(),
    ]
    .map(str::to_owned)
    .to_vec();

    let agent = start_agent(&args, &log);
    let pipeline = Replayer::load(&pins, verdict_common::maps::DEFAULT_FLOW_TABLE_SIZE)
        .expect("joining the agent's pinned maps with the testkit's replay object");
    // In audit mode the API server's connections to the host are audited.
    replay_with(pipeline.ebpf(), &api_server_to_host(0, true), 20).unwrap();

    let request = json!({
        "endpoint_id": DEMO_HOST_ENDPOINT, "endpoint_name": "host", "endpoint_kind": "host",
        "try_seconds": 120, "strict": false,
        "requested_by": {"who": "test@ci", "reason": "enforce_daemon test"},
        "preflight": {"state": "would_break", "exit_code": 1, "forced": true},
    });
    let (status, body) = http(reqwest_like::POST, "/api/v1/enforcement/trials", Some(&request)).unwrap();
    assert_eq!(status, 201, "{body}");
    let trial: Value = serde_json::from_str(&body).unwrap();
    let id = trial["id"].as_str().unwrap().to_owned();
    assert_eq!(trial["phase"], "switched");
    assert_eq!(fake.audit_mode(), "Disabled");

    // SIGKILL mid-trial; the restarted agent continues it from the record.
    drop(agent);
    let agent = start_agent(&args, &log);
    let (status, body) = http(reqwest_like::GET, &format!("/api/v1/enforcement/trials/{id}"), None).unwrap();
    assert_eq!(status, 200, "{body}");
    let resumed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(resumed["phase"], "switched", "{resumed}");
    assert_eq!(fake.patches().len(), 1, "the restart wrote nothing");
    let (status, body) = http(reqwest_like::POST, "/api/v1/enforcement/trials", Some(&request)).unwrap();
    assert_eq!(status, 409, "a second trial on the host is refused: {body}");

    // Enforcement cuts the API server: denied verdicts, once per packet.
    std::thread::sleep(Duration::from_millis(300));
    let first_denied = Instant::now();
    replay_with(pipeline.ebpf(), &api_server_to_host(-133, false), 3).unwrap();
    let start = Instant::now();
    while fake.patches().len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no revert within 5 s; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (at, value) = fake.patches()[1].clone();
    assert_eq!(value, "Enabled");
    let latency = at.saturating_duration_since(first_denied);
    assert!(latency < Duration::from_secs(1), "revert {latency:?} after the first denied critical verdict");
    println!("time from the first denied critical verdict to the revert PATCH: {latency:?}");

    let (_, body) = http(reqwest_like::GET, &format!("/api/v1/enforcement/trials/{id}"), None).unwrap();
    let ended: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ended["phase"], "reverted", "{ended}");
    let (_, metrics) = http(reqwest_like::GET, "/metrics", None).unwrap();
    assert!(metrics.contains("verdict_agent_enforcement_trials_total{outcome=\"reverted\"} 1"), "{metrics}");
    assert!(metrics.contains("verdict_agent_enforcement_time_to_revert_seconds_count 1"), "{metrics}");
    drop(agent);
    drop(pipeline);
    drop(pins_guard);
}

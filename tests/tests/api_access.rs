//! Who reaches `/api/v1/*` on the real binary: the CLI clients on loopback
//! do (over IPv4 and IPv6, through a dual-stack `[::]` listener), and the
//! `preflight` client is not turned away. A peer that is not on loopback is
//! refused with 403; that case is the router test in `agent/src/http.rs`
//! (this machine's tests may use loopback only).
//!
//! Needs root and bpffs (the agent loads its pipeline in replay mode).

use std::{
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::Command,
};

use verdict_agent_tests::{
    agent_process::{AgentProcess, agent_binary},
    scrape::http_get,
};

struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn loopback_clients_reach_the_api_through_a_dual_stack_listener() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP loopback_clients_reach_the_api_through_a_dual_stack_listener: needs root and bpffs");
        return;
    }
    if TcpListener::bind("[::1]:0").is_err() {
        eprintln!("SKIP loopback_clients_reach_the_api_through_a_dual_stack_listener: no IPv6 loopback here");
        return;
    }
    let port = TcpListener::bind("[::1]:0").and_then(|l| l.local_addr()).unwrap().port();
    let pins = Pins(PathBuf::from(format!("/sys/fs/bpf/verdict-test-access-{}", std::process::id())));
    let log = std::env::temp_dir().join(format!("verdict-test-access-{}.log", std::process::id()));
    let v4: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let v6: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    // Listens on [::]; readiness is polled over IPv4, so this also proves
    // IPV6_V6ONLY is off.
    let agent = AgentProcess::start_on(
        &format!("[::]:{port}"),
        v4,
        &["--tap", "none", "--no-kube", "--pin-dir", pins.0.to_str().unwrap(), "--poll-interval", "200ms"],
        &log,
    )
    .unwrap();
    for addr in [v4, v6] {
        let (status, body) = http_get(addr, "/api/v1/flows").unwrap();
        assert_eq!(status, 200, "/api/v1/flows from {addr}: {body}");
        let (status, _) = http_get(addr, "/metrics").unwrap();
        assert_eq!(status, 200, "/metrics from {addr}");
    }
    let out = Command::new(agent_binary())
        .args(["preflight", "--agent", &format!("http://127.0.0.1:{port}")])
        .output()
        .expect("running verdict-agent preflight");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // Any non-200 answer shows as "the agent at URL answered STATUS: ...".
    assert!(!text.contains(" answered ") && !text.contains("cannot reach"), "preflight did not get the report: {text}");
    drop(agent);
}

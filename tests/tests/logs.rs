//! The shipped binary's logs as `kubectl logs` and log collectors get them:
//! stderr is a pipe, so no ANSI escape may appear in text lines, and with
//! `--log-format json` (or VERDICT_AGENT_LOG_FORMAT=json) every line is one
//! JSON object with a level and a message.

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use verdict_agent_tests::agent_process::agent_binary;

/// Runs `verdict-agent run` until it serves (or exits), then SIGTERM;
/// returns its stderr lines.
fn run_agent(envs: &[(&str, &str)], global: &[&str]) -> Vec<String> {
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).unwrap().port();
    let pins = format!("/sys/fs/bpf/verdict-test-logs-{}-{port}", std::process::id());
    let mut child = Command::new(agent_binary())
        .args(global)
        .args(["run", "--tap", "none", "--no-kube", "--pin-dir", &pins, "--listen", &format!("127.0.0.1:{port}")])
        .envs(envs.iter().copied())
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting verdict-agent (cargo build -p verdict-agent first)");
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || BufReader::new(stderr).lines().map_while(Result::ok).collect::<Vec<_>>());
    // Serving is logged after the pipeline loaded; give it a moment.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() || child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: plain kill(2) on our child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&pins);
    reader.join().unwrap()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn text_logs_to_a_pipe_carry_no_escape_sequences() {
    if !is_root() {
        eprintln!("SKIP text_logs_to_a_pipe_carry_no_escape_sequences: needs root and bpffs (cargo xtask test)");
        return;
    }
    for envs in [&[][..], &[("NO_COLOR", "1")][..]] {
        let lines = run_agent(envs, &[]);
        assert!(lines.iter().any(|l| l.contains("serving /metrics")), "env {envs:?}: {lines:#?}");
        for l in &lines {
            assert!(!l.contains('\u{1b}'), "env {envs:?}: escape byte in {l:?}");
        }
    }
}

fn assert_json_lines(lines: &[String]) {
    assert!(!lines.is_empty());
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "no level or message: {l}");
        assert!(v["timestamp"].is_string(), "no timestamp: {l}");
    }
}

#[test]
fn json_logs_are_one_object_per_line() {
    if !is_root() {
        eprintln!("SKIP json_logs_are_one_object_per_line: needs root and bpffs (cargo xtask test)");
        return;
    }
    let by_flag = run_agent(&[], &["--log-format", "json"]);
    assert!(by_flag.iter().any(|l| l.contains("serving /metrics")), "{by_flag:#?}");
    assert_json_lines(&by_flag);
    assert!(by_flag.iter().any(|l| l.contains(r#""listen":"127.0.0.1:"#)), "fields at the top level: {by_flag:#?}");
    let by_env = run_agent(&[("VERDICT_AGENT_LOG_FORMAT", "json")], &[]);
    assert_json_lines(&by_env);
}

/// The error an agent stops on is a JSON line too (no root needed: the pin
/// directory's parent does not exist, so the pipeline refuses to start).
#[test]
fn a_fatal_error_is_a_json_line() {
    let out = Command::new(agent_binary())
        .args(["--log-format", "json", "run", "--pin-dir", "/nonexistent/verdict-agent", "--listen", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .output()
        .expect("starting verdict-agent (cargo build -p verdict-agent first)");
    assert_eq!(out.status.code(), Some(2));
    let lines: Vec<String> = String::from_utf8_lossy(&out.stderr).lines().map(str::to_owned).collect();
    assert_json_lines(&lines);
    let last: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(last["level"], "ERROR");
    assert!(last["error"].as_str().is_some_and(|e| e.contains("pipeline")), "the cause is in the line: {last}");
}

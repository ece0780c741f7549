//! Pins that cannot be lost (issue 13, item 5): an unopenable pin is an
//! error naming it (its counts survive), a reshaped one is replaced saying
//! so, one agent per pin directory, and a pin directory removed under a
//! running agent fails /healthz and is logged once. The agent runs with
//! `--tap none` (the host kernel allows no hook) and, where root's
//! DAC_OVERRIDE would hide the fault, with the chart's capabilities only.
//! Needs root and bpffs; ports 19100-19109.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use verdict_agent_tests::{agent_process::AgentProcess, pin_dir::PinDir, privileges::PodPrivileges, scrape::http_get};
use verdict_common::maps::{LAYOUT_VERSION, STATS};
use verdict_testkit::{
    replay::Replayer,
    scenario::{Layout, PolicyVerdict},
};

/// One of the agent's pinned maps under `pins`.
fn pinned_map(pins: &PinDir, name: &str) -> PathBuf {
    pins.0.join(LAYOUT_VERSION).join(name)
}

/// A pin directory of its own per test, removed afterwards.
fn pins(name: &str) -> PinDir {
    PinDir::new(&format!("test-pins-{name}"))
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn log(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("verdict-test-pins-{name}-{}.log", std::process::id()))
}

fn args<'a>(pins: &'a PinDir, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["--tap", "none", "--pin-dir", pins.as_str(), "--poll-interval", "100ms"];
    a.extend_from_slice(&["--no-kube", "--no-cilium-api", "--no-events", "--cilium-events-map", "/nonexistent"]);
    a.extend_from_slice(extra);
    a
}

/// The log without its ANSI colours.
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The chart's default set (CAP_BPF, CAP_PERFMON): no DAC_OVERRIDE.
fn chart_privileges() -> PodPrivileges {
    PodPrivileges::parse(0, "BPF,PERFMON").unwrap()
}

fn verdict() -> Vec<u8> {
    PolicyVerdict {
        layout: Layout::V1_19,
        endpoint: 70,
        remote_identity: 2,
        verdict: 0,
        dst_port: 22,
        proto: 6,
        dir: 1,
        ipv6: false,
        match_type: 0,
        audited: true,
        packet_len: 60,
    }
    .encode()
}

#[test]
fn a_second_agent_on_the_same_pins_is_refused_and_names_the_first() {
    let pins = pins("lock");
    let first = AgentProcess::start(addr(19100), &args(&pins, &[]), &log("lock")).unwrap();
    let listen = addr(19101).to_string();
    let (code, text) = AgentProcess::run_to_failure(
        &[&["--listen", &listen], &args(&pins, &[])[..]].concat(),
        None,
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("another verdict-agent already uses the pin directory"), "{text}");
    assert!(text.contains(pins.as_str()), "names the directory: {text}");
    assert!(text.contains(&format!("held by pid {}", first.child.id())), "names the holder: {text}");
    assert!(first.stop().unwrap(), "the first agent is unharmed and exits cleanly");
}

#[test]
fn an_unreadable_pin_is_an_error_and_its_counts_survive() {
    let pins = pins("eacces");
    let agent = AgentProcess::start(addr(19102), &args(&pins, &[]), &log("eacces")).unwrap();
    let replayer = Replayer::load(&pins.0, verdict_common::maps::DEFAULT_FLOW_TABLE_SIZE).unwrap();
    replayer.replay(&verdict()).unwrap();
    replayer.replay(&verdict()).unwrap();
    drop(replayer);
    agent.scrape_until(Duration::from_secs(5), |s| s.counted() == 2.0).unwrap();
    assert!(agent.stop().unwrap());

    let stats = pinned_map(&pins, STATS);
    std::fs::set_permissions(&stats, std::fs::Permissions::from_mode(0o000)).unwrap();
    let listen = addr(19103).to_string();
    let (code, text) = AgentProcess::run_to_failure(
        &[&["--listen", &listen], &args(&pins, &[])[..]].concat(),
        Some(&chart_privileges()),
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains(&format!("cannot open the pinned map {}", stats.display())), "names the pin: {text}");
    assert!(text.contains("Permission denied"), "says why: {text}");
    assert!(stats.exists(), "the pin was not deleted");

    std::fs::set_permissions(&stats, std::fs::Permissions::from_mode(0o600)).unwrap();
    let agent = AgentProcess::start(addr(19104), &args(&pins, &[]), &log("eacces-2")).unwrap();
    let s = agent.scrape_until(Duration::from_secs(5), |s| s.counted() == 2.0).unwrap();
    assert_eq!(s.counted(), 2.0, "the counts in the pin survived");
    assert!(agent.stop().unwrap());
}

#[test]
fn a_reshaped_pin_is_replaced_and_the_log_says_what_was_lost() {
    let pins = pins("reshape");
    let agent = AgentProcess::start(addr(19105), &args(&pins, &["--flow-table-size", "128"]), &log("reshape")).unwrap();
    let replayer = Replayer::load(&pins.0, 128).unwrap();
    for _ in 0..3 {
        replayer.replay(&verdict()).unwrap();
    }
    drop(replayer);
    agent.scrape_until(Duration::from_secs(5), |s| s.counted() == 3.0).unwrap();
    assert!(agent.stop().unwrap());

    let agent =
        AgentProcess::start(addr(19106), &args(&pins, &["--flow-table-size", "256"]), &log("reshape-2")).unwrap();
    let text = plain(&agent.log_text());
    assert!(text.contains("pinned map has another shape"), "{text}");
    assert!(text.contains("map=\"FLOW_TABLE\""), "names the map: {text}");
    let entries = |slots| verdict_agent::bpf::flow_table::table_entries(slots).unwrap();
    assert!(
        text.contains(&format!("pinned_entries={}", entries(128)))
            && text.contains(&format!("wanted_entries={}", entries(256))),
        "says how: {text}"
    );
    assert!(agent.stop().unwrap());
}

#[test]
fn a_pin_directory_removed_under_the_agent_fails_healthz_and_is_logged_once() {
    let pins = pins("vanish");
    let agent = AgentProcess::start(addr(19107), &args(&pins, &[]), &log("vanish")).unwrap();
    assert_eq!(http_get(agent.addr, "/healthz").unwrap().0, 200);
    std::fs::remove_dir_all(&pins.0).unwrap();
    // /healthz goes stale after 3 poll intervals + 5 s.
    let start = Instant::now();
    let status = loop {
        let (status, _) = http_get(agent.addr, "/healthz").unwrap();
        if status != 200 || start.elapsed() > Duration::from_secs(20) {
            break status;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_ne!(status, 200, "/healthz still passes {:?} after the pins vanished", start.elapsed());
    std::thread::sleep(Duration::from_secs(1));
    let text = plain(&agent.log_text());
    assert_eq!(text.matches("pinned maps were removed").count(), 1, "logged exactly once: {text}");
    assert!(text.contains(&Path::new(pins.as_str()).join(LAYOUT_VERSION).display().to_string()), "{text}");
}

//! Evidence under floods, end to end, on the host kernel through the real
//! verifier and BPF_PROG_TEST_RUN (the replay entry feeds the same
//! accounting core as the tap):
//!
//! * a full TCP and UDP port scan from world between two reads goes to the
//!   world-port table: every other flow and the lockout alarm stay, nothing
//!   overflows, and the scan is noise;
//! * a flood of cluster flows larger than the table between two reads
//!   overflows: the kernel counts the overflow exactly, the agent exports it
//!   as unattributed, calls the host `no_evidence` (`evidence_lost`) and its
//!   lockout state `unknown`, never `clear`, also after a restart.
//!
//! Needs root and bpffs; `cargo xtask test` provides both.

use std::{net::SocketAddr, path::Path, time::Duration};

use verdict_agent_tests::{
    agent_process::AgentProcess,
    pin_dir::PinDir,
    scrape::{Scrape, http_get},
};
use verdict_testkit::{
    replay::{Replayer, replay_with},
    scenario::{Layout, PolicyVerdict},
};

/// A pin directory of its own per test, removed afterwards.
fn pins(name: &str) -> PinDir {
    PinDir::new(&format!("test-{name}"))
}

fn load(pins: &Path, flow_table_size: u32) -> Replayer {
    Replayer::load(pins, flow_table_size).expect("loading the replay object (root and bpffs needed)")
}

/// An ingress TCP/UDP verdict on `endpoint` from `remote_identity`: audited
/// (match type none, what enforcement would drop) or allowed by an L4 rule.
fn ingress_verdict(endpoint: u16, remote_identity: u32, port: u16, proto: u8, audited: bool) -> Vec<u8> {
    PolicyVerdict {
        layout: Layout::V1_19,
        endpoint,
        remote_identity,
        verdict: 0,
        dst_port: port,
        proto,
        dir: 1,
        ipv6: false,
        match_type: if audited { 0 } else { 2 },
        audited,
        packet_len: 60,
    }
    .encode()
}

fn audited(endpoint: u16, remote_identity: u32, port: u16) -> Vec<u8> {
    ingress_verdict(endpoint, remote_identity, port, 6, true)
}

fn audited_proto(endpoint: u16, remote_identity: u32, port: u16, proto: u8) -> Vec<u8> {
    ingress_verdict(endpoint, remote_identity, port, proto, true)
}

fn allowed(endpoint: u16, remote_identity: u32, port: u16) -> Vec<u8> {
    ingress_verdict(endpoint, remote_identity, port, 6, false)
}

const HOST: u16 = 60;
const TABLE: u32 = 64;

/// The per-endpoint books balance: every verdict of the exact endpoint
/// totals is either in a flow-derived total or counted as unattributed.
fn assert_books_balance(s: &Scrape, verdict: &str) {
    let ep = format!("endpoint=\"{HOST}\"");
    let class = format!("verdict=\"{verdict}\"");
    let total = s.sum("verdict_agent_endpoint_verdicts_total", &[&ep, &class]);
    let attributed = s.sum("verdict_agent_policy_verdicts_total", &[&ep, &class]);
    let lost = s.sum("verdict_agent_unattributed_verdicts_total", &[&ep, &class]);
    let series: Vec<&String> = s.series.keys().filter(|k| k.contains("unattributed")).collect();
    assert_eq!(
        attributed + lost,
        total,
        "{verdict}: {attributed} attributed + {lost} unattributed != {total} counted ({series:?})"
    );
}

fn agent_args<'a>(pins: &'a PinDir, table: &'a str, host: &'a str) -> Vec<&'a str> {
    vec![
        "--tap",
        "none",
        "--pin-dir",
        pins.0.to_str().unwrap(),
        "--flow-table-size",
        table,
        "--poll-interval",
        "2s",
        "--host-endpoint",
        host,
    ]
}

/// Flows of the agent's `/api/v1/flows` as (remote identity, proto, port).
fn flows(addr: SocketAddr) -> Vec<(u64, u64, u64)> {
    let (status, body) = http_get(addr, "/api/v1/flows").unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (f["remote_identity"].as_u64().unwrap(), f["proto"].as_u64().unwrap(), f["dst_port"].as_u64().unwrap())
        })
        .collect()
}

#[test]
fn a_full_port_scan_between_two_reads_displaces_no_flow_and_no_alarm() {
    let pins = pins("scan");
    let log = std::env::temp_dir().join("verdict-test-scan.log");
    let (host, table) = (HOST.to_string(), TABLE.to_string());
    let addr: SocketAddr = "127.0.0.1:19502".parse().unwrap();
    let agent = AgentProcess::start(addr, &agent_args(&pins, &table, &host), &log).unwrap();
    let p = load(&pins.0, TABLE);
    // The agent tells the kernel the host endpoint and the critical ports
    // after its first evaluation; a world probe counted per port shows it has.
    let world_ports = |s: &Scrape| s.sum("verdict_agent_world_port_verdicts_total", &[]);
    let probes = std::cell::Cell::new(0.0);
    agent
        .scrape_until(Duration::from_secs(20), |s| {
            replay_with(p.ebpf(), &audited(HOST, 2, 1), 1).unwrap();
            probes.set(probes.get() + 1.0);
            world_ports(s) > 0.0
        })
        .expect("the agent never configured the world-port table");
    let probes = probes.get();
    std::thread::sleep(Duration::from_secs(3)); // one read past the probes

    // Between two reads: the flows that matter, then a full scan of every
    // TCP and UDP port from world, at full speed.
    let critical = [(7u32, 6u8, 6443u16), (6, 6, 10250), (2, 6, 22)];
    let ordinary = [(70_001u32, 6u8, 8080u16), (70_002, 17, 5353), (70_003, 6, 9100)];
    // Five connections each: `/api/v1/flows` lists the busiest first.
    for &(remote, proto, port) in critical.iter().chain(&ordinary) {
        replay_with(p.ebpf(), &audited_proto(HOST, remote, port, proto), 5).unwrap();
    }
    for proto in [6u8, 17] {
        for port in 1..=u16::MAX {
            replay_with(p.ebpf(), &audited_proto(HOST, 2, port, proto), 1).unwrap();
        }
    }
    let sent = probes + 30.0 + 2.0 * f64::from(u16::MAX);
    let s = agent.scrape_until(Duration::from_secs(20), |s| s.counted() == sent).unwrap();
    std::thread::sleep(Duration::from_secs(3)); // the read after, and an evaluation
    let s2 = agent.scrape().unwrap();
    for s in [&s, &s2] {
        assert_eq!(s.sum("verdict_agent_flow_table_overflow_verdicts_total", &[]), 0.0, "nothing overflowed");
        assert_eq!(s.sum("verdict_agent_unattributed_verdicts_total", &[]), 0.0, "no evidence lost");
        assert_books_balance(s, "audited");
    }
    let seen = flows(addr);
    for &(remote, proto, port) in critical.iter().chain(&ordinary) {
        assert!(
            seen.contains(&(u64::from(remote), u64::from(proto), u64::from(port))),
            "flow {remote} -> {port}/{proto} gone after the scan"
        );
    }
    let report = agent_readiness(addr);
    let lockout = &report["lockout"];
    let at_risk: Vec<u64> =
        lockout["risk"].as_array().into_iter().flatten().filter_map(|e| e["port"].as_u64()).collect();
    for port in [6443, 10250, 22] {
        assert!(at_risk.contains(&port), "lockout risk lost {port} in the scan: {lockout}");
    }
    // The scan is noise: counted as such and never a would-break flow of
    // the host beyond the real ones.
    let noise = s2.sum("verdict_agent_scan_noise_notifications_total", &[&format!("endpoint=\"{HOST}\"")]);
    assert!(noise >= 2.0 * f64::from(u16::MAX) - 10.0, "the scan is noise: {noise}");
    let endpoint = report["endpoints"]
        .as_array()
        .and_then(|eps| eps.iter().find(|e| e["endpoint_id"] == u64::from(HOST)))
        .unwrap_or_else(|| panic!("host endpoint in {report}"));
    // What may still be would-break: the real flows, world to a port of the
    // critical-flow catalogue (the agent cannot tell the operator's SSH from
    // the scanner's), and the probe port hit by every read above.
    let real: Vec<u64> = critical.iter().chain(&ordinary).map(|f| u64::from(f.2)).collect();
    for f in endpoint["would_deny"].as_array().into_iter().flatten() {
        let port = f["port"].as_u64().unwrap_or(0);
        assert!(
            real.contains(&port) || f.get("service").is_some_and(|s| s.is_string()) || port == 1,
            "a port only the scan touched became a would-break flow: {f}"
        );
    }
    assert!(agent.stop().unwrap());
}

#[test]
fn a_flood_beyond_the_table_is_lost_evidence_never_clear() {
    let pins = pins("evidence");
    let log = std::env::temp_dir().join("verdict-test-evidence.log");
    let (host, table) = (HOST.to_string(), TABLE.to_string());
    let addr: SocketAddr = "127.0.0.1:19501".parse().unwrap();
    let args = agent_args(&pins, &table, &host);
    let agent = AgentProcess::start(addr, &args, &log).unwrap();
    let p = load(&pins.0, TABLE);
    // Let the agent's first read pass, so everything below falls between
    // two reads.
    let _ = agent.scrape_until(Duration::from_secs(10), |s| s.has("verdict_agent_flow_table_entries", &[])).unwrap();

    // Allowed flows from as many cluster identities as eight tables hold,
    // replayed at full speed, fill every bucket with unread counts; then
    // audited ones that find no slot.
    let flooded = 8 * TABLE;
    for i in 0..flooded {
        replay_with(p.ebpf(), &allowed(HOST, 70_000 + i, 30_000), 1).unwrap();
    }
    for i in 0..16 {
        replay_with(p.ebpf(), &audited(HOST, 90_000 + i, 30_000), 1).unwrap();
    }
    let sent = f64::from(flooded + 16);

    // The loss shows one read after the totals that contain it.
    let lost = |s: &Scrape| s.sum("verdict_agent_unattributed_verdicts_total", &[&format!("endpoint=\"{HOST}\"")]);
    let overflow =
        |s: &Scrape| s.sum("verdict_agent_flow_table_overflow_verdicts_total", &[&format!("endpoint=\"{HOST}\"")]);
    let s = agent
        .scrape_until(Duration::from_secs(20), |s| s.counted() == sent && lost(s) > 0.0)
        .unwrap_or_else(|e| panic!("no unattributed verdicts after {flooded} flows into {TABLE} slots: {e}"));
    assert_books_balance(&s, "audited");
    assert_books_balance(&s, "allowed");
    assert_eq!(lost(&s), overflow(&s), "what no flow carries is exactly what the kernel counted as overflow");
    let attributed = s.sum("verdict_agent_policy_verdicts_total", &[&format!("endpoint=\"{HOST}\"")]);
    assert_eq!(attributed + overflow(&s), sent, "kernel totals = flows read + overflow");

    // Readiness of the host: evidence lost, lockout never clear.
    let report = agent_readiness(addr);
    let endpoint = report["endpoints"]
        .as_array()
        .and_then(|eps| eps.iter().find(|e| e["endpoint_id"] == u64::from(HOST)))
        .unwrap_or_else(|| panic!("host endpoint in {report}"));
    assert_eq!(endpoint["state"], "no_evidence", "{endpoint}");
    assert_eq!(endpoint["reason"], "evidence_lost", "{endpoint}");
    let lockout = &report["lockout"];
    assert_eq!(lockout["state"], "unknown", "{lockout}");
    assert!(!lockout["evidence_lost"].as_array().is_none_or(|v| v.is_empty()), "{lockout}");
    drop(p);
    // Let the map reader persist what the engine published.
    std::thread::sleep(Duration::from_secs(5));
    let before = agent.scrape().unwrap();
    assert!(agent.stop().unwrap(), "clean exit on SIGTERM");

    // A restarted agent neither forgets the loss nor dates it anew, and no
    // counter goes down.
    let agent = AgentProcess::start(addr, &args, &log).unwrap();
    let again = agent.scrape_until(Duration::from_secs(20), |s| lost(s) > 0.0).unwrap();
    assert_eq!(lost(&again), lost(&s), "the unattributed total survives the restart unchanged");
    assert_books_balance(&again, "audited");
    // Two more evaluations: the first after a restore is a baseline.
    std::thread::sleep(Duration::from_secs(5));
    let later = agent.scrape().unwrap();
    for next in [&again, &later] {
        assert_monotonic(&before, next);
    }
    assert!(agent.stop().unwrap());
}

use verdict_agent_tests::scrape::PROCESS_SCOPED;

/// Every `_total` series of `old` is at least as large in `new`.
fn assert_monotonic(old: &Scrape, new: &Scrape) {
    for (series, v) in &old.series {
        let name = series.split('{').next().unwrap_or("");
        if !name.ends_with("_total") || PROCESS_SCOPED.contains(&name) {
            continue;
        }
        let now = new.series.get(series).copied().unwrap_or(0.0);
        assert!(now >= *v, "{series} went down from {v} to {now} across a restart");
    }
}

fn agent_readiness(addr: SocketAddr) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = http_get(addr, "/api/v1/readiness").unwrap();
        if status == 200 {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let has_loss = v["endpoints"].as_array().is_some_and(|eps| {
                eps.iter().any(|e| e["endpoint_id"] == u64::from(HOST) && e["reason"] == "evidence_lost")
            });
            if has_loss || std::time::Instant::now() > deadline {
                return v;
            }
        } else if std::time::Instant::now() > deadline {
            panic!("/api/v1/readiness answered {status}: {body}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

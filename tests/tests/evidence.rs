//! Lost evidence end to end, on the host kernel through the real verifier
//! and BPF_PROG_TEST_RUN (the replay entry feeds the same accounting core as
//! the tap): a port scan from world between two reads evicts an audited
//! host flow before any read took its count; the agent must export the
//! loss exactly, call the host's readiness `no_evidence` (`evidence_lost`)
//! and its lockout state anything but `clear`. Needs root and bpffs; `cargo
//! xtask test` provides both.

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

fn audited(endpoint: u16, remote_identity: u32, port: u16) -> Vec<u8> {
    PolicyVerdict {
        layout: Layout::V1_19,
        endpoint,
        remote_identity,
        verdict: 0,
        dst_port: port,
        proto: 6,
        dir: 1,
        ipv6: false,
        match_type: 0,
        audited: true,
        packet_len: 60,
    }
    .encode()
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

#[test]
fn a_scan_between_two_reads_never_leaves_the_host_reported_clear() {
    let pins = pins("evidence");
    let log = std::env::temp_dir().join("verdict-test-evidence.log");
    let host = HOST.to_string();
    let table = TABLE.to_string();
    let addr: SocketAddr = "127.0.0.1:19501".parse().unwrap();
    let args = [
        "--tap",
        "none",
        "--pin-dir",
        pins.0.to_str().unwrap(),
        "--flow-table-size",
        &table,
        "--poll-interval",
        "2s",
        "--host-endpoint",
        &host,
    ];
    let agent = AgentProcess::start(addr, &args, &log).unwrap();
    let p = load(&pins.0, TABLE);
    // Let the agent's first read pass, so everything below falls between
    // two reads.
    let _ = agent.scrape_until(Duration::from_secs(10), |s| s.has("verdict_agent_flow_table_entries", &[])).unwrap();

    // One audited kube-apiserver -> host:6443, then a scan from world of
    // eight times the table, replayed at full speed.
    replay_with(p.ebpf(), &audited(HOST, 7, 6443), 1).unwrap();
    let scanned = 8 * TABLE as u16;
    for port in 0..scanned {
        replay_with(p.ebpf(), &audited(HOST, 2, 20_000 + port), 1).unwrap();
    }
    let sent = 1.0 + f64::from(scanned);

    // The loss shows one read after the totals that contain it.
    let lost = |s: &Scrape| s.sum("verdict_agent_unattributed_verdicts_total", &[&format!("endpoint=\"{HOST}\"")]);
    let s = agent
        .scrape_until(Duration::from_secs(20), |s| s.counted() == sent && lost(s) > 0.0)
        .unwrap_or_else(|e| panic!("no unattributed verdicts after a scan of {scanned} ports into {TABLE} slots: {e}"));
    assert_books_balance(&s, "audited");
    assert!(
        s.sum("verdict_agent_policy_verdicts_total", &[&format!("endpoint=\"{HOST}\"")]) <= TABLE as f64 * 2.0,
        "only the flows the table held at the read are attributed"
    );

    // Readiness of the host: evidence lost, lockout never clear.
    let report = agent_readiness(addr);
    let endpoint = report["endpoints"]
        .as_array()
        .and_then(|eps| eps.iter().find(|e| e["endpoint_id"] == u64::from(HOST)))
        .unwrap_or_else(|| panic!("host endpoint in {report}"));
    assert_eq!(endpoint["state"], "no_evidence", "{endpoint}");
    assert_eq!(endpoint["reason"], "evidence_lost", "{endpoint}");
    let lockout = &report["lockout"];
    assert_ne!(lockout["state"], "clear", "{lockout}");
    let risk_6443 = lockout["risk"].as_array().is_some_and(|r| r.iter().any(|e| e["port"] == 6443));
    if !risk_6443 {
        assert_eq!(lockout["state"], "unknown", "the 6443 flow is gone, so the state must say unknown: {lockout}");
        assert!(!lockout["evidence_lost"].as_array().is_none_or(|v| v.is_empty()), "{lockout}");
    }
    drop(p);
    // The scan is noise, and the engine's counters have counted it.
    let noise = |s: &Scrape| s.sum("verdict_agent_scan_noise_notifications_total", &[&format!("endpoint=\"{HOST}\"")]);
    let before = agent.scrape_until(Duration::from_secs(20), |s| noise(s) > 0.0).unwrap();
    assert!(noise(&before) > 0.0, "the scan is counted as noise");
    // Let the map reader persist what the engine published.
    std::thread::sleep(Duration::from_secs(5));
    let before = agent.scrape().unwrap();
    assert!(agent.stop().unwrap(), "clean exit on SIGTERM");

    // A restarted agent neither forgets the loss nor dates it anew, and no
    // counter goes down.
    let agent = AgentProcess::start(addr, &args, &log).unwrap();
    let again = agent.scrape_until(Duration::from_secs(20), |s| lost(s) > 0.0 && noise(s) >= noise(&before)).unwrap();
    assert_eq!(lost(&again), lost(&s), "the unattributed total survives the restart unchanged");
    assert_books_balance(&again, "audited");
    // Two more evaluations: the first after a restore is a baseline.
    std::thread::sleep(Duration::from_secs(5));
    let later = agent.scrape().unwrap();
    for next in [&again, &later] {
        assert_monotonic(&before, next);
    }
    assert_eq!(noise(&later), noise(&before), "no new noise, and the old is not counted twice");
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

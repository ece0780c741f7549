//! The in-kernel pipeline on the host kernel, through the real verifier and
//! BPF_PROG_TEST_RUN (the testkit's replay entry feeds the same accounting core as the
//! tap, on the maps a `--tap none` agent pins and reads). Needs root and bpffs; `cargo xtask test` provides both.

use std::{net::SocketAddr, path::Path, time::Duration};

use verdict_agent::bpf::snapshot::{CountingMaps, MapSnapshot};
use verdict_agent_tests::{agent_process::AgentProcess, pin_dir::PinDir, scrape::Scrape};
use verdict_common::maps::{ENDPOINT_COUNTERS, FlowKey, STATS, Stat};
use verdict_testkit::{
    replay::{Replayer, replay_with},
    scenario::{Layout, PolicyDrop, PolicyVerdict},
};

/// A pin directory of its own per test, removed afterwards.
fn pins(name: &str) -> PinDir {
    PinDir::new(&format!("test-{name}"))
}

fn load(pins: &Path, flow_table_size: u32) -> Replayer {
    Replayer::load(pins, flow_table_size).expect("loading the replay object (root and bpffs needed)")
}

/// A read that acknowledges nothing: each slot's counts since the start.
fn snapshot(p: &Replayer) -> MapSnapshot {
    let e = p.ebpf();
    MapSnapshot::read(CountingMaps {
        endpoints: e.map(ENDPOINT_COUNTERS).unwrap(),
        tables: p.tables(),
        stats: e.map(STATS).unwrap(),
    })
    .unwrap()
    .0
}

fn verdict(layout: Layout, endpoint: u16, port: u16, verdict: i32, audited: bool) -> PolicyVerdict {
    PolicyVerdict {
        layout,
        endpoint,
        remote_identity: 2,
        verdict,
        dst_port: port,
        proto: 6,
        dir: 1,
        ipv6: false,
        match_type: 3,
        audited,
        packet_len: 60,
    }
}

/// A v1.12–v1.13 policy verdict (P1): 32 bytes, u16 version 1, byte 28 a zero pad.
fn p1(endpoint: u16) -> Vec<u8> {
    verdict(Layout::V1_18, endpoint, 80, 0, false).encode()
}

/// D1 (v1.12, 32 bytes) and D2 (v1.13–v1.17.3, 36 bytes): u16 version 1.
fn drop_v1(size: usize, endpoint: u16, dst_id: u32) -> Vec<u8> {
    let mut b = vec![0u8; size];
    b[0] = 1;
    b[1] = 133;
    b[2..4].copy_from_slice(&endpoint.to_ne_bytes());
    b[8..12].copy_from_slice(&60u32.to_ne_bytes());
    b[14] = 1;
    b[16..20].copy_from_slice(&2u32.to_ne_bytes());
    b[20..24].copy_from_slice(&5000u32.to_ne_bytes());
    b[24..28].copy_from_slice(&dst_id.to_ne_bytes());
    b
}

#[test]
fn every_layout_is_counted_exactly() {
    let pins = pins("layouts");
    let p = load(&pins.0, 1024);
    let mut p3_ext = verdict(Layout::V1_19, 13, 443, 0, false).encode();
    p3_ext[15] = 1; // ext_version: a downstream extension follows
    p3_ext.extend_from_slice(&[0xee; 8]);
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        ("P1 v1.12 verdict", p1(10), 3),
        ("P2 v1.18 audited", verdict(Layout::V1_18, 11, 6443, 0, true).encode(), 5),
        ("P3 v1.19 denied", verdict(Layout::V1_19, 12, 22, -181, false).encode(), 7),
        (
            "P3 + extension redirected",
            {
                let mut b = p3_ext.clone();
                b[20..24].copy_from_slice(&15001i32.to_ne_bytes());
                b
            },
            2,
        ),
        ("D1 v1.12 drop ingress", drop_v1(32, 20, 20), 4),
        ("D2 v1.13 drop egress", drop_v1(36, 21, 0), 6),
        (
            "D3 v1.18 drop",
            PolicyDrop {
                layout: Layout::V1_18,
                endpoint: 22,
                reason: 181,
                src_label: 2,
                dst_label: 5000,
                dst_id: 22,
                packet_len: 60,
            }
            .encode(),
            8,
        ),
        (
            "D4 v1.19 drop",
            PolicyDrop {
                layout: Layout::V1_19,
                endpoint: 23,
                reason: 189,
                src_label: 5000,
                dst_label: 2,
                dst_id: 0,
                packet_len: 60,
            }
            .encode(),
            9,
        ),
    ];
    for (what, bytes, n) in &cases {
        replay_with(p.ebpf(), bytes, *n).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    let s = snapshot(&p);
    let total: u64 = cases.iter().map(|c| c.2 as u64).sum();
    assert_eq!(s.stat(Stat::Counted), total, "stats: {:?}", s.stats);
    let ep =
        |id: u16| s.endpoints.iter().find(|e| e.id == id).unwrap_or_else(|| panic!("endpoint {id} missing")).clone();
    assert_eq!(ep(10).verdicts[0], [3, 0, 0, 0], "P1 allowed ingress");
    assert_eq!(ep(11).verdicts[0], [0, 0, 5, 0], "P2 audited");
    assert_eq!(ep(12).verdicts[0], [0, 7, 0, 0], "P3 denied");
    assert_eq!(ep(13).verdicts[0], [0, 0, 0, 2], "P3+ext redirected");
    assert_eq!(ep(20).policy_drops, [4, 0], "D1: dst_id set = ingress");
    assert_eq!(ep(21).policy_drops, [0, 6], "D2: dst_id 0 = egress");
    assert_eq!(ep(22).policy_drops, [8, 0]);
    assert_eq!(ep(23).policy_drops, [0, 9]);
    let flow = |ep: u16| {
        let slots: Vec<_> = s.flows.iter().filter(|f| f.key.endpoint_id == ep).collect();
        (slots[0].key, slots.iter().map(|f| f.notifications).sum::<u64>())
    };
    let (k, n) = flow(12);
    assert_eq!((k.dst_port, k.proto, k.class, k.reason, k.match_type, k.remote_identity, n), (22, 6, 1, 181, 3, 2, 7));
    let (k, n) = flow(21);
    assert_eq!((k.notify_type, k.remote_identity, k.direction, k.reason, n), (1, 5000, 2, 133, 6));
    let (k, _) = flow(20);
    assert_eq!((k.remote_identity, k.direction), (2, 1), "ingress drop: remote is the source");
}

#[test]
fn malformed_and_foreign_input_is_counted_and_changes_no_flow() {
    let pins = pins("malformed");
    let p = load(&pins.0, 1024);
    replay_with(p.ebpf(), &verdict(Layout::V1_19, 30, 80, 0, false).encode(), 1).unwrap();
    let before = snapshot(&p);

    let good = verdict(Layout::V1_19, 31, 80, 0, false).encode();
    let mut bad_version = good.clone();
    bad_version[14] = 2;
    let mut bad_dir = good.clone();
    bad_dir[27] &= !0x03;
    let mut odd_size = good.clone();
    odd_size.truncate(36);
    let mut trace = good.clone();
    trace[0] = 4;
    let mut non_policy_drop = drop_v1(36, 31, 0);
    non_policy_drop[1] = 130; // not a policy reason
    let mut drop_bad_version = drop_v1(40, 31, 0);
    drop_bad_version[14] = 1; // 40 bytes must be version 2
    let cases: Vec<(Vec<u8>, Stat)> = vec![
        (good[..12].to_vec(), Stat::MalformedTruncated),
        (good[..24].to_vec(), Stat::MalformedTruncated),
        (bad_version, Stat::MalformedVersion),
        (odd_size, Stat::MalformedVersion),
        (drop_bad_version, Stat::MalformedVersion),
        (bad_dir, Stat::MalformedField),
        (trace, Stat::Filtered),
        (non_policy_drop, Stat::Filtered),
    ];
    for (bytes, _) in &cases {
        replay_with(p.ebpf(), bytes, 1).unwrap();
    }
    let after = snapshot(&p);
    for stat in [Stat::MalformedTruncated, Stat::MalformedVersion, Stat::MalformedField, Stat::Filtered] {
        let expected = cases.iter().filter(|(_, s)| *s == stat).count() as u64;
        assert_eq!(after.stat(stat) - before.stat(stat), expected, "{stat:?}");
    }
    assert_eq!(after.stat(Stat::Counted), before.stat(Stat::Counted));
    assert_eq!(after.flows, before.flows, "no flow may change");
    assert!(after.endpoints.iter().all(|e| e.id != 31), "no endpoint total may change");
}

fn addr(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

/// Counters of the agent process itself, which restart with it.
const PROCESS_SCOPED: &[&str] = &["verdict_agent_map_reads_total"];

/// Every `_total` series in `new` is at least its value in `old`.
fn assert_monotonic(old: &Scrape, new: &Scrape) {
    for (series, v) in &old.series {
        let name = series.split('{').next().unwrap_or("");
        if !name.ends_with("_total") || PROCESS_SCOPED.contains(&name) {
            continue;
        }
        let now = new.series.get(series).copied().unwrap_or(0.0);
        assert!(now >= *v, "{series} went down from {v} to {now}");
    }
}

#[test]
fn slot_reuse_and_overflow_never_make_an_exported_counter_go_down_or_lose_a_count() {
    let pins = pins("evict");
    let log = std::env::temp_dir().join("verdict-test-evict.log");
    let agent = AgentProcess::start(
        addr(19981),
        &[
            "--tap",
            "none",
            "--pin-dir",
            pins.0.to_str().unwrap(),
            "--flow-table-size",
            "16",
            "--poll-interval",
            "100ms",
            "--flow-metrics",
        ],
        &log,
    )
    .unwrap();
    let p = load(&pins.0, 16);
    let mut last = agent.scrape().unwrap();
    let mut sent = 0u64;
    for round in 0..6u16 {
        for port in 0..40u16 {
            // Later rounds revisit early ports, so evicted flows come back.
            let port = 1000 + (port + round * 7) % 60;
            replay_with(p.ebpf(), &verdict(Layout::V1_19, 40, port, 0, true).encode(), 1 + (round as u32 % 3)).unwrap();
            sent += 1 + (round as u64 % 3);
        }
        std::thread::sleep(Duration::from_millis(300));
        let now = agent.scrape().unwrap();
        assert_monotonic(&last, &now);
        last = now;
    }
    let s = agent.scrape_until(Duration::from_secs(5), |s| s.counted() == sent as f64).unwrap();
    assert_eq!(
        s.sum("verdict_agent_endpoint_verdicts_total", &["endpoint=\"40\"", "verdict=\"audited\""]),
        sent as f64,
        "endpoint totals are exact"
    );
    assert!(s.sum("verdict_agent_flow_table_evictions_total", &[]) > 0.0, "the 16-slot table must have reused slots");
    let by_flow = s.sum("verdict_agent_policy_verdicts_total", &["endpoint=\"40\""]);
    let overflow = s.sum("verdict_agent_flow_table_overflow_verdicts_total", &["endpoint=\"40\""]);
    assert_eq!(by_flow + overflow, sent as f64, "every verdict is in a flow or counted as overflow");
    let lost = s.sum("verdict_agent_unattributed_verdicts_total", &["endpoint=\"40\""]);
    assert_eq!(lost, overflow, "what no flow carries is exactly the overflow");
}

#[test]
fn restart_continues_the_counts() {
    let pins = pins("restart");
    let args = ["--tap", "none", "--pin-dir", pins.0.to_str().unwrap(), "--poll-interval", "100ms"];
    let log = std::env::temp_dir().join("verdict-test-restart.log");

    let agent = AgentProcess::start(addr(19982), &args, &log).unwrap();
    {
        let p = load(&pins.0, verdict_common::maps::DEFAULT_FLOW_TABLE_SIZE);
        replay_with(p.ebpf(), &verdict(Layout::V1_18, 50, 22, 0, true).encode(), 25).unwrap();
    }
    let first = agent.scrape_until(Duration::from_secs(5), |s| s.counted() == 25.0).unwrap();
    assert_eq!(first.counted(), 25.0);
    assert!(agent.stop().unwrap(), "clean exit on SIGTERM");

    // Verdicts keep arriving while the agent is down: the maps are pinned.
    {
        let p = load(&pins.0, verdict_common::maps::DEFAULT_FLOW_TABLE_SIZE);
        replay_with(p.ebpf(), &verdict(Layout::V1_18, 50, 22, 0, true).encode(), 5).unwrap();
    }
    let agent = AgentProcess::start(addr(19982), &args, &log).unwrap();
    {
        let p = load(&pins.0, verdict_common::maps::DEFAULT_FLOW_TABLE_SIZE);
        replay_with(p.ebpf(), &verdict(Layout::V1_18, 50, 22, 0, true).encode(), 10).unwrap();
    }
    let second = agent.scrape_until(Duration::from_secs(5), |s| s.counted() == 40.0).unwrap();
    assert_eq!(second.counted(), 40.0);
    assert_monotonic(&first, &second);
    assert_eq!(second.sum("verdict_agent_endpoint_verdicts_total", &["endpoint=\"50\"", "verdict=\"audited\""]), 40.0);
}

#[test]
fn flows_api_matches_the_maps() {
    let pins = pins("api");
    let log = std::env::temp_dir().join("verdict-test-api.log");
    let agent = AgentProcess::start(
        addr(19983),
        &["--tap", "none", "--pin-dir", pins.0.to_str().unwrap(), "--poll-interval", "100ms"],
        &log,
    )
    .unwrap();
    let p = load(&pins.0, verdict_common::maps::DEFAULT_FLOW_TABLE_SIZE);
    replay_with(p.ebpf(), &verdict(Layout::V1_19, 60, 10250, 0, true).encode(), 11).unwrap();
    replay_with(p.ebpf(), &verdict(Layout::V1_19, 60, 4240, 0, false).encode(), 3).unwrap();
    agent.scrape_until(Duration::from_secs(5), |s| s.counted() == 14.0).unwrap();
    let (status, body) =
        verdict_agent_tests::scrape::http_get(addr(19983), "/api/v1/flows?endpoint=60&verdict=audited").unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let flows = v["flows"].as_array().unwrap();
    assert_eq!(flows.len(), 1, "{body}");
    assert_eq!(flows[0]["dst_port"], 10250);
    assert_eq!(flows[0]["notifications"], 11);
    assert_eq!(flows[0]["remote"], "world");
    assert_eq!(flows[0]["verdict"], "audited");
    assert_eq!(v["matched"], 1);
    assert_eq!(v["truncated"], false);
    let key: FlowKey = FlowKey { endpoint_id: 60, ..Default::default() };
    assert_eq!(key.endpoint_id, flows[0]["endpoint_id"].as_u64().unwrap() as u16);

    // Bounded: the busiest flows first, and the answer says what it left out.
    let (status, body) =
        verdict_agent_tests::scrape::http_get(addr(19983), "/api/v1/flows?endpoint=60&limit=1").unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["matched"].as_u64(), v["truncated"].as_bool()), (Some(2), Some(true)), "{body}");
    assert_eq!(v["flows"].as_array().unwrap().len(), 1, "{body}");
    assert_eq!(v["flows"][0]["dst_port"], 10250, "the busiest flow first: {body}");
    for bad in ["limit=0", "limit=10001", "limit=many"] {
        let (status, body) =
            verdict_agent_tests::scrape::http_get(addr(19983), &format!("/api/v1/flows?{bad}")).unwrap();
        assert_eq!(status, 400, "{bad}: {body}");
    }
}

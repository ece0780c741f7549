//! The batched read of the flow table (`BPF_MAP_LOOKUP_BATCH`) returns
//! exactly what walking the map key by key returns, across several batches
//! and for per-CPU values written from both CPUs. Needs root and bpffs.

use std::collections::BTreeMap;

use aya::maps::PerCpuHashMap;
use verdict_agent::bpf::batch::{self, Batched};
use verdict_common::maps::{FLOWS, FlowCounters, FlowKey};
use verdict_testkit::{
    replay::Replayer,
    scenario::{Layout, PolicyVerdict},
};

fn verdict(i: u32) -> Vec<u8> {
    PolicyVerdict {
        layout: Layout::V1_19,
        endpoint: 1 + (i % 50) as u16,
        remote_identity: 256 + i,
        verdict: if i.is_multiple_of(3) { -133 } else { 0 },
        dst_port: 1 + (i % 60_000) as u16,
        proto: 6,
        dir: 1 + (i % 2) as u8,
        ipv6: false,
        match_type: 0,
        audited: i % 3 == 1,
        packet_len: 60 + i % 100,
    }
    .encode()
}

#[test]
fn batched_read_equals_a_walk_of_the_map() {
    let dir = format!("/sys/fs/bpf/verdict-batch-{}", std::process::id());
    let _ = std::fs::remove_dir_all(&dir);
    let p =
        Replayer::load(std::path::Path::new(&dir), 16_384).expect("loading the replay object (root and bpffs needed)");
    // 10 000 flows: three batches of 4096. Replayed from two threads so
    // that the per-CPU values differ between CPUs.
    std::thread::scope(|s| {
        for t in 0..2u32 {
            let p = &p;
            s.spawn(move || {
                for i in (t..10_000).step_by(2) {
                    p.replay(&verdict(i)).unwrap();
                    p.replay(&verdict(i / 2)).unwrap();
                }
            });
        }
    });
    let map = p.ebpf().map(FLOWS).unwrap();
    let aya::maps::Map::PerCpuLruHashMap(data) = map else { panic!("FLOWS is not an LRU per-CPU hash: {map:?}") };
    let cpus = aya::util::nr_cpus().unwrap();

    let mut batched: BTreeMap<FlowKey, Vec<FlowCounters>> = BTreeMap::new();
    let outcome = batch::for_each_per_cpu(data, cpus, |k: FlowKey, v: &[FlowCounters]| {
        assert!(batched.insert(k, v.to_vec()).is_none(), "key {k:?} returned twice");
    })
    .unwrap();
    assert_eq!(outcome, Batched::Done, "this kernel supports batch lookups of LRU per-CPU hashes (5.6+)");

    let walk: PerCpuHashMap<_, FlowKey, FlowCounters> = PerCpuHashMap::try_from(map).unwrap();
    let walked: BTreeMap<FlowKey, Vec<FlowCounters>> =
        walk.iter().map(|e| e.unwrap()).map(|(k, v)| (k, v.iter().copied().collect())).collect();

    assert_eq!(walked.len(), 10_000);
    assert_eq!(batched.len(), walked.len());
    assert!(batched == walked, "batched and walked reads differ");
    let total: u64 = batched.values().flatten().map(|c| c.notifications).sum();
    assert_eq!(total, 20_000);
    drop(p);
    std::fs::remove_dir_all(&dir).ok();
}

//! One hand-built v1.19 policy verdict, replayed three times through the
//! testkit's replay entry, reads back from the agent's counting maps.

use verdict_agent::bpf::snapshot::{CountingMaps, MapSnapshot};
use verdict_common::maps::{ENDPOINT_COUNTERS, STATS, Stat};
use verdict_testkit::replay::Replayer;

#[test]
fn smoke() {
    let dir = format!("/sys/fs/bpf/verdict-smoke-{}", std::process::id());
    let p = Replayer::load(std::path::Path::new(&dir), 128).expect("load");
    let mut n = [0u8; 40];
    n[0] = 5;
    n[2..4].copy_from_slice(&7u16.to_ne_bytes());
    n[8..12].copy_from_slice(&60u32.to_ne_bytes());
    n[14] = 1;
    n[16..20].copy_from_slice(&2u32.to_ne_bytes());
    n[24..26].copy_from_slice(&6443u16.to_ne_bytes());
    n[26] = 6;
    n[27] = 1 | 0x40;
    for _ in 0..3 {
        p.replay(&n).unwrap();
    }
    let e = p.ebpf();
    let (s, _) = MapSnapshot::read(CountingMaps {
        endpoints: e.map(ENDPOINT_COUNTERS).unwrap(),
        tables: p.tables(),
        stats: e.map(STATS).unwrap(),
    })
    .unwrap();
    println!("{:?}", s.endpoints);
    println!("{:?}", s.flows);
    println!("{:?}", s.stats);
    assert_eq!(s.stat(Stat::Counted), 3);
    assert_eq!(s.flows.iter().map(|f| f.notifications).sum::<u64>(), 3, "the flow slot holds all three");
    drop(p);
    std::fs::remove_dir_all(&dir).ok();
}

//! The test-support BPF objects built by `build.rs`, embedded here and
//! nowhere else.

/// `replay`, `bench_empty` and `bench_replay_and_emit` over the tap's
/// accounting core and counting maps, plus the benchmark's own maps.
pub static REPLAY_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/verdict-replay"));
/// Cilium-compatible emitter of notifications into a `cilium_events` map.
pub static EMITTER_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cilium-emitter"));

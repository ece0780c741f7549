//! The BPF objects built by `build.rs`, embedded in the binary.

/// Tap, replay and benchmark programs plus the agent's maps.
pub static TAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/verdict-tap"));
/// Test and demo emitter of Cilium-compatible notifications.
pub static EMITTER_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cilium-emitter"));

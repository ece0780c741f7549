//! What the agent knows about Cilium in userspace: identities, the
//! notification decoders (mirroring `pkg/monitor`), and readers of the
//! text and JSON that Cilium's own tools print.
pub mod capture_lines;
pub mod endpoint_list;
pub mod hubble_json;
pub mod identity;
pub mod monitor;
pub mod monitor_text;

/// Golden vectors are test support (`verdict-testkit`); the agent's own unit
/// tests read them under this path.
#[cfg(test)]
pub use verdict_testkit::golden;

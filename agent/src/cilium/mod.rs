//! What the agent knows about Cilium in userspace: identities, the
//! notification decoders (mirroring `pkg/monitor`), and readers of the
//! text and JSON that Cilium's own tools print.
pub mod capture_lines;
pub mod endpoint_list;
pub mod golden;
pub mod hubble_json;
pub mod identity;
pub mod monitor;
pub mod monitor_text;

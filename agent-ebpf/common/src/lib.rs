//! Types shared by the eBPF programs and the userspace agent.
//!
//! Three kinds of things live here, and nothing else:
//! * [`cilium`]: Cilium's wire format (offsets, sizes, enum values) for the
//!   notifications Cilium's datapath writes into `cilium_events`;
//! * [`classify`]: the one decision over those bytes (policy verdict or
//!   policy drop, which layout, which flow key), run by the kernel and by
//!   userspace alike;
//! * [`maps`]: the names, keys and values of the agent's own BPF maps;
//! * [`flow_table`]: the flow and world-port tables' layouts and the
//!   arithmetic the kernel and userspace share on them.
//!
//! Everything is `#[repr(C)]` and `no_std` so the very same definitions are
//! compiled into the BPF object and into the userspace binary.
#![no_std]

pub mod cilium;
pub mod classify;
pub mod flow_table;
pub mod maps;

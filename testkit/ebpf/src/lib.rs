//! Test-support eBPF code of verdict-agent; nothing here ships.
//!
//! `src/bin/verdict-replay.rs` feeds the tap's accounting core
//! (`verdict_agent_ebpf::account::account`, on the very same counting maps
//! declared in `verdict_agent_ebpf::maps`) from packet data, for the tests,
//! the demo and the benchmark; `src/bin/cilium-emitter.rs` writes
//! notifications the way Cilium's datapath does. Both copy their input with
//! [`packet`].
//!
//! On the host target this crate is empty: it exists there only so the
//! testkit crate can depend on it from `build.rs`.
#![no_std]

#[cfg(target_arch = "bpf")]
pub mod packet;

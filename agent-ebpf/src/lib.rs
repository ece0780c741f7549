//! The in-kernel half of verdict-agent.
//!
//! Read top to bottom: [`maps`] declares every map the tap writes,
//! [`account`] turns one Cilium notification into counter increments, and
//! `src/bin/verdict-tap.rs` holds the thin programs (fentry, kprobe) that
//! feed it: the shipped object. Test-support programs (replay, benchmark,
//! a Cilium-compatible emitter) are in `testkit/ebpf`, which links this
//! library for the same maps and the same core.
//!
//! On the host target this crate is empty: it exists there only so the
//! userspace crate can depend on it from `build.rs`.
#![no_std]
// The one BPF atomic add (`account::atomic_add`) is inline assembly, still
// unstable on this architecture; the inner BPF build runs with
// RUSTC_BOOTSTRAP=1 already (see `agent/build.rs`).
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(target_arch = "bpf")]
pub mod account;
#[cfg(target_arch = "bpf")]
pub mod maps;
#[cfg(target_arch = "bpf")]
pub mod tap;

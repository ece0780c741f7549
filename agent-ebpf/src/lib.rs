//! The in-kernel half of verdict-agent.
//!
//! Read top to bottom: [`maps`] declares every map the tap writes,
//! [`account`] turns one Cilium notification into counter increments, and
//! `src/bin/verdict-tap.rs` holds the thin programs (fentry, kprobe, replay)
//! that feed it. `src/bin/cilium-emitter.rs` is a test and demo tool that
//! writes notifications the way Cilium's datapath does.
//!
//! On the host target this crate is empty: it exists there only so the
//! userspace crate can depend on it from `build.rs`.
#![no_std]

#[cfg(target_arch = "bpf")]
pub mod account;
#[cfg(target_arch = "bpf")]
pub mod maps;
#[cfg(target_arch = "bpf")]
pub mod packet;

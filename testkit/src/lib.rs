//! Test support for verdict-agent; nothing here ships in the agent's binary
//! or its BPF object.
//!
//! * [`replay`]: the tap's accounting core fed by BPF_PROG_TEST_RUN on the
//!   agent's pinned counting maps, for kernels that allow no hook (this
//!   host, CI) and for the benchmark;
//! * [`emitter`]: writes notifications into a `cilium_events` map the way
//!   Cilium's datapath does, so the real tap sees them (VMs);
//! * [`scenario`]: notifications encoded byte for byte, and the demo;
//! * [`golden`]: notifications laid out from Cilium's C structs, with the
//!   outcome both classifiers must give.
//!
//! The `verdict-scenario` binary plays a scenario through either path.

pub mod emitter;
pub mod fake_cilium;
pub mod golden;
pub mod objects;
pub mod replay;
pub mod scenario;

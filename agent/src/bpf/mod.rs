//! The userspace side of the in-kernel pipeline: loading and attaching
//! ([`loader`]), following Cilium's map ([`events_map`]), and reading the
//! counters back ([`snapshot`], in batches where the kernel can: [`batch`]).
pub mod batch;
pub mod btf;
pub mod events_map;
pub mod ledger_store;
pub mod loader;
pub mod objects;
pub mod privileges;
pub mod snapshot;

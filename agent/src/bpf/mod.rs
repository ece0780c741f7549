//! The userspace side of the in-kernel pipeline: loading and attaching
//! ([`loader`]; the direct-read tap's kfunc: [`direct_read`]), following Cilium's map ([`events_map`]), and reading the
//! counters back ([`snapshot`]; the flow and world-port tables through a
//! shared mapping: [`flow_table`], [`shared_array`]).
pub mod btf;
pub mod direct_read;
pub mod events_map;
pub mod flow_table;
pub mod ledger_store;
pub mod loader;
pub mod objects;
pub mod privileges;
pub mod shared_array;
pub mod snapshot;

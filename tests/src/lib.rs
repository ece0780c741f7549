//! Helpers shared by the integration tests, the VM driver and the
//! benchmark: talking to a running agent like Prometheus does, and the
//! benchmark's parts (the soak's short form is also a test).

pub mod agent_process;
pub mod bench;
pub mod pin_dir;
pub mod privileges;
pub mod scrape;

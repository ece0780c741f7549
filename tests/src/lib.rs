//! Helpers shared by the integration tests, the VM driver and the
//! benchmark: talking to a running agent like Prometheus does.

pub mod agent_process;
pub mod scrape;

//! The benchmark behind `cargo xtask bench`: every figure verdict-agent
//! publishes comes from here, each beside a baseline measured in the same
//! run, printed with the machine it came from.
//!
//! * [`kernel`]: in-kernel cost per verdict against an empty program;
//! * [`race`]: the loss race against a perf-ring reader;
//! * [`cpu`]: agent CPU against the event rate;
//! * [`scale`]: scrape latency, body size and RSS at 100 k flows;
//! * [`soak`]: long emission with a SIGKILL restart, counts exact, counters monotonic;
//! * [`revert`]: time from the first denied critical verdict to the revert of an enforcement trial.

pub mod common;
pub mod cpu;
pub mod kernel;
pub mod perf_ring;
pub mod race;
pub mod revert;
pub mod scale;
pub mod soak;

/// The printed table (lines go to stdout as they are made) and the JSON
/// summary.
#[derive(Default)]
pub struct Report {
    pub lines: Vec<String>,
    pub json: serde_json::Map<String, serde_json::Value>,
}

impl Report {
    pub fn table(&mut self, line: &str) {
        println!("{line}");
        self.lines.push(line.to_string());
    }

    pub fn set(&mut self, key: &str, value: serde_json::Value) {
        self.json.insert(key.to_string(), value);
    }
}

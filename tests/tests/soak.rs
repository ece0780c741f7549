//! Soak, short form: the benchmark's soak (`verdict_agent_tests::bench::soak`)
//! for 20 seconds. Steady emission into a flow table a quarter the size of
//! the flow set (so slots are reused all along), a scrape every second, the
//! agent killed with SIGKILL and restarted half-way: at the end every
//! emitted verdict is counted, and no exported counter went down between
//! any two scrapes. `cargo xtask bench` runs the 5-minute form. Needs root
//! and bpffs.

use verdict_agent_tests::bench::{Report, soak};

#[test]
fn sigkill_mid_soak_loses_no_count_and_no_counter_goes_down() {
    let mut report = Report::default();
    let outcome = soak::run(&mut report, 20).expect("the soak could not run (root and bpffs needed)");
    assert_eq!(outcome.failed, 0, "soak checks failed:\n{}", report.lines.join("\n"));
}

//! `verdict-bench [all|kernel|loss-race|cpu|scale|revert|soak] [--quick] [--seconds N] [--json PATH]`
//!
//! The benchmark `cargo xtask bench` runs (as root: it loads BPF programs
//! and runs them with BPF_PROG_TEST_RUN, and starts `verdict-agent` from
//! the same target directory). Prints a table; `--json` writes the summary.
//!
//! * `--quick` shrinks every part to a few seconds (a smoke test; its
//!   figures are not to be quoted);
//! * `soak --seconds N` (default 300, 20 in `--quick`) ends with
//!   `soak: N passed, M failed` and exits 1 if any check failed.
//!
//! Figures are never asserted: only the soak's counting properties are.

use std::{path::PathBuf, process::ExitCode, time::Instant};

use anyhow::{Context, Result, bail};

use verdict_agent_tests::bench::{self, Report, common::Machine};

const PARTS: &[&str] = &["kernel", "loss-race", "cpu", "scale", "revert", "soak"];

struct Args {
    parts: Vec<String>,
    quick: bool,
    soak_seconds: Option<u64>,
    json: Option<PathBuf>,
}

fn parse() -> Result<Args> {
    let mut a = Args { parts: Vec::new(), quick: false, soak_seconds: None, json: None };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--seconds" | "--soak-seconds" => {
                a.soak_seconds = Some(it.next().context("--seconds needs a value")?.parse()?)
            }
            "--json" => a.json = Some(it.next().context("--json needs a path")?.into()),
            "-h" | "--help" => {
                println!(
                    "usage: verdict-bench [all|kernel|loss-race|cpu|scale|revert|soak]... [--quick] [--seconds N] [--json PATH]\n\
                     Runs as root. --quick: a few seconds per part (smoke test). --seconds: soak length (default 300).\n\
                     soak exits 1 unless every check passed."
                );
                std::process::exit(0);
            }
            "all" => a.parts.extend(PARTS.iter().map(|p| p.to_string())),
            p if PARTS.contains(&p) => a.parts.push(p.to_string()),
            other => bail!("unknown argument {other:?}; see --help"),
        }
    }
    if a.parts.is_empty() {
        a.parts.extend(PARTS.iter().map(|p| p.to_string()));
    }
    Ok(a)
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("verdict-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<bool> {
    let args = parse()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("verdict-bench loads BPF programs: run it as root");
    }
    let machine = Machine::detect();
    let started = Instant::now();
    let mut report = Report::default();
    report.table(&format!(
        "verdict-agent benchmark on {}{}",
        machine.line(),
        if args.quick { " (--quick)" } else { "" }
    ));
    report.set("machine", machine.json());
    report.set("quick", serde_json::json!(args.quick));
    let mut ok = true;
    let mut errors = Vec::new();
    for part in &args.parts {
        report.table("");
        let r = match part.as_str() {
            "kernel" => bench::kernel::run(&mut report, args.quick),
            "loss-race" => bench::race::run(&mut report, args.quick),
            "cpu" => bench::cpu::run(&mut report, args.quick),
            "scale" => bench::scale::run(&mut report, args.quick),
            "revert" => bench::revert::run(&mut report, args.quick),
            "soak" => {
                let seconds = args.soak_seconds.unwrap_or(if args.quick { 20 } else { 300 });
                bench::soak::run(&mut report, seconds).map(|o| ok &= o.failed == 0)
            }
            _ => unreachable!(),
        };
        if let Err(e) = r {
            ok = false;
            report.table(&format!("{part}: FAILED: {e:#}"));
            errors.push(format!("{part}: {e:#}"));
        }
    }
    report.set("errors", serde_json::json!(errors));
    report.set("bench_seconds", serde_json::json!(started.elapsed().as_secs_f64()));
    if let Some(path) = &args.json {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(&serde_json::Value::Object(report.json.clone()))?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("verdict-bench: wrote {}", path.display());
    }
    Ok(ok)
}

//! `verdict-agent analyze` as shipped: the binary's exit codes and its
//! memory on hostile input, on the capture fixtures in `src/cilium/captures/`.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_verdict-agent")
}

fn capture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cilium/captures").join(name)
}

fn analyze(input: &Path, extra: &[&str]) -> Output {
    Command::new(bin()).arg("analyze").arg("--input").arg(input).args(extra).output().unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// Peak RSS of the children waited for so far, in KiB.
fn children_max_rss_kib() -> i64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct it is given.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) }, 0);
    ru.ru_maxrss
}

/// One test, so the children's peak RSS is this test's alone.
#[test]
fn exit_codes_and_bounds_of_the_shipped_binary() {
    let o = analyze(
        &capture("monitor-wrapped-redacted-v1.16.txt"),
        &["--host-endpoint", "227", "--capture-duration", "48h", "--node", "node-a"],
    );
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("5 verdicts in"), "{table}");
    assert!(table.contains("Warning: 1 verdicts have a redacted address"), "{table}");

    let o = analyze(&capture("monitor-cut-at-end.txt"), &["--host-endpoint", "227", "--output", "json"]);
    assert_eq!(code(&o), 3);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["capture"]["rejected_verdict_lines"], 1);
    assert!(String::from_utf8_lossy(&o.stderr).contains("1 verdict lines could not be read"));

    for f in ["monitor-trace-only.txt", "hubble-trace-only.jsonl"] {
        let o = analyze(&capture(f), &[]);
        assert_eq!(code(&o), 3, "{f}");
        assert!(String::from_utf8_lossy(&o.stderr).contains("no evidence"), "{f}");
    }

    let start = Instant::now();
    let o = analyze(Path::new("/dev/zero"), &[]);
    assert_eq!(code(&o), 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("binary data"));
    assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());

    // 20 MB of junk, half of it verdict-looking: counted, not kept.
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.txt");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&junk).unwrap());
    let mut written = 0;
    let mut i = 0u64;
    while written < 20 << 20 {
        let line = if i.is_multiple_of(2) {
            format!("line {i} of junk that no Cilium tool prints, padded a little further\n")
        } else {
            format!("Policy verdict log: flow 0x{i:x} local EP ID {i}, remote ID not-a-name, proto 6, egress\n")
        };
        written += line.len();
        f.write_all(line.as_bytes()).unwrap();
        i += 1;
    }
    f.flush().unwrap();
    drop(f);
    let o = analyze(&junk, &["--output", "json"]);
    assert_eq!(code(&o), 3, "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["result"], "no_evidence");
    assert_eq!(v["capture"]["rejected_verdict_lines"], i / 2);
    assert!(v["capture"]["rejected"].as_array().unwrap().len() <= 200);
    assert!(v["capture"]["not_understood_examples"].as_array().unwrap().len() <= 20);
    let rss = children_max_rss_kib();
    assert!(rss < 100 * 1024, "analyze peaked at {rss} KiB on 20 MB of junk");
}

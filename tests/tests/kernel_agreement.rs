//! The in-kernel classifier (through the real verifier and
//! BPF_PROG_TEST_RUN) and the userspace decoder must agree on every input:
//! golden vectors laid out from Cilium's C structs, and a seeded corpus of
//! random and mutated notifications. Each input goes through the replay
//! entry (a copy out of the test packet), and through the shipped
//! `try_tap` with each of its readers: the probe read, and the direct
//! loads of `tap_fentry_direct` where the kernel has them (else that case
//! says why it is skipped). Needs root and bpffs.

use std::path::PathBuf;

use aya::maps::PerCpuArray;
use verdict_agent::cilium::monitor::{DecodeErrorKind, expected_flow_key};
use verdict_common::maps::BENCH_FAKE_MAP_ID;
use verdict_common::maps::{FlowKey, STATS, Stat};
use verdict_testkit::{
    golden::golden_notifications,
    replay::{BENCH_TAP, BENCH_TAP_DIRECT, Replayer, direct_read_kfunc, replay_with},
};

/// How an input reaches the accounting core.
#[derive(Clone, Copy, Debug)]
enum Entry {
    /// The replay entry: copied out of the test packet.
    Replay,
    /// The shipped `try_tap` with `tap_fentry`'s probe read.
    TapProbeRead,
    /// The shipped `try_tap` with `tap_fentry_direct`'s direct loads.
    TapDirect,
}

impl Entry {
    /// The kernel can run this entry; else why not.
    fn available(self) -> Result<(), &'static str> {
        match self {
            Entry::TapDirect if direct_read_kfunc().is_none() => {
                Err("this kernel's BTF has no BPF_FEAT_RDONLY_CAST_TO_VOID (Linux < 6.17)")
            }
            _ => Ok(()),
        }
    }
}

/// What the kernel did with one input.
#[derive(Debug, PartialEq, Eq)]
enum KernelOutcome {
    Counted(FlowKey),
    Filtered,
    Malformed(DecodeErrorKind),
    Other(Vec<u64>),
}

struct Kernel {
    pipeline: Replayer,
    pins: PathBuf,
    entry: Entry,
}

impl Kernel {
    fn load(name: &str, entry: Entry) -> Kernel {
        let pins = PathBuf::from(format!("/sys/fs/bpf/verdict-test-{name}-{entry:?}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&pins);
        let extra: &[&str] = match entry {
            Entry::Replay => &[],
            Entry::TapProbeRead => &[BENCH_TAP],
            Entry::TapDirect => &[BENCH_TAP_DIRECT],
        };
        let mut pipeline =
            Replayer::load_with(&pins, 65536, extra).expect("loading the replay object (root and bpffs needed)");
        pipeline.set_tap_config(BENCH_FAKE_MAP_ID, 0).unwrap();
        Kernel { pipeline, pins, entry }
    }

    fn run(&mut self, bytes: &[u8]) {
        let program = match self.entry {
            Entry::Replay => return replay_with(self.pipeline.ebpf(), bytes, 1).unwrap(),
            Entry::TapProbeRead => BENCH_TAP,
            Entry::TapDirect => BENCH_TAP_DIRECT,
        };
        self.pipeline.set_bench_input(bytes).unwrap();
        let prog = self.pipeline.program(program).unwrap();
        aya::programs::TestRun::test_run(
            prog,
            aya::programs::TestRunOptions { data_in: Some(&[0u8; 14]), repeat: 1, ..Default::default() },
        )
        .unwrap();
    }

    fn stats(&self) -> Vec<u64> {
        let arr: PerCpuArray<_, u64> = PerCpuArray::try_from(self.pipeline.ebpf().map(STATS).unwrap()).unwrap();
        (0..Stat::COUNT).map(|i| arr.get(&i, 0).unwrap().iter().sum()).collect()
    }

    fn flow_count(&self, key: &FlowKey) -> u64 {
        // Nothing acknowledges here: each slot holds its count since the start.
        let read = self.pipeline.tables().read_table();
        read.flows.iter().filter(|f| f.key == *key).map(|f| f.notifications).sum()
    }

    /// Replays one input and tells what it changed.
    fn outcome(&mut self, bytes: &[u8], expected_key: Option<&FlowKey>) -> KernelOutcome {
        let before = self.stats();
        let flow_before = expected_key.map(|k| self.flow_count(k));
        self.run(bytes);
        let after = self.stats();
        let delta: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        // Side counters that may move with an outcome: a new flow entry, and
        // an endpoint ID beyond the per-endpoint array.
        let side = [Stat::FlowsCreated as usize, Stat::EndpointOutOfRange as usize];
        let only =
            |s: Stat| delta.iter().enumerate().all(|(i, d)| *d == u64::from(i == s as usize) || side.contains(&i));
        if only(Stat::Counted) {
            return match (expected_key, flow_before) {
                (Some(k), Some(b)) if self.flow_count(k) == b + 1 => KernelOutcome::Counted(*k),
                _ => KernelOutcome::Other(delta),
            };
        }
        for (stat, kind) in [
            (Stat::MalformedTruncated, DecodeErrorKind::Truncated),
            (Stat::MalformedVersion, DecodeErrorKind::UnknownVersion),
            (Stat::MalformedField, DecodeErrorKind::BadField),
        ] {
            if only(stat) {
                return KernelOutcome::Malformed(kind);
            }
        }
        if only(Stat::Filtered) {
            return KernelOutcome::Filtered;
        }
        KernelOutcome::Other(delta)
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

fn userspace(bytes: &[u8]) -> Result<Option<FlowKey>, DecodeErrorKind> {
    expected_flow_key(bytes).map_err(|e| e.kind())
}

fn expected_outcome(u: &Result<Option<FlowKey>, DecodeErrorKind>) -> KernelOutcome {
    match u {
        Ok(Some(k)) => KernelOutcome::Counted(*k),
        Ok(None) => KernelOutcome::Filtered,
        Err(kind) => KernelOutcome::Malformed(*kind),
    }
}

#[test]
fn golden_vectors_kernel_and_userspace_agree() {
    golden_vectors_agree(Entry::Replay);
}

#[test]
fn golden_vectors_the_probe_read_tap_and_userspace_agree() {
    golden_vectors_agree(Entry::TapProbeRead);
}

#[test]
fn golden_vectors_the_direct_read_tap_and_userspace_agree() {
    golden_vectors_agree(Entry::TapDirect);
}

#[test]
fn random_and_mutated_notifications_kernel_and_userspace_agree() {
    random_and_mutated_agree(Entry::Replay);
}

#[test]
fn random_and_mutated_notifications_the_probe_read_tap_and_userspace_agree() {
    random_and_mutated_agree(Entry::TapProbeRead);
}

#[test]
fn random_and_mutated_notifications_the_direct_read_tap_and_userspace_agree() {
    random_and_mutated_agree(Entry::TapDirect);
}

fn golden_vectors_agree(entry: Entry) {
    if let Err(why) = entry.available() {
        eprintln!("skipped ({entry:?}): {why}");
        return;
    }
    let mut kernel = Kernel::load("golden", entry);
    let vectors = golden_notifications();
    assert!(vectors.len() >= 8, "golden table too small");
    for v in &vectors {
        let user = userspace(&v.bytes);
        assert_eq!(user, v.expected, "userspace decoder on golden vector {:?}", v.name);
        let k = kernel.outcome(&v.bytes, user.as_ref().ok().and_then(|o| o.as_ref()));
        assert_eq!(
            k,
            expected_outcome(&v.expected),
            "in-kernel core ({entry:?}) on golden vector {:?} ({})",
            v.name,
            v.cilium_versions
        );
    }
}

/// xorshift64*: a seeded, dependency-free generator, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_and_mutated_agree(entry: Entry) {
    if let Err(why) = entry.available() {
        eprintln!("skipped ({entry:?}): {why}");
        return;
    }
    let mut kernel = Kernel::load("fuzz", entry);
    let golden: Vec<Vec<u8>> = golden_notifications().into_iter().map(|g| g.bytes).collect();
    let seed = std::env::var("VERDICT_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_cafe_u64);
    let mut rng = Rng(seed);
    let sizes = [14usize, 15, 16, 24, 31, 32, 33, 35, 36, 37, 39, 40, 41, 44, 47, 48, 52, 56, 64, 65, 72, 80];
    let mut counted = 0;
    for case in 0..600 {
        let mut bytes = if case % 2 == 0 {
            // Mutate a golden vector: flip bytes, change its length.
            let mut b = golden[rng.below(golden.len() as u64) as usize].clone();
            for _ in 0..rng.below(4) {
                let i = rng.below(b.len() as u64) as usize;
                b[i] = rng.next() as u8;
            }
            if rng.below(4) == 0 {
                b.resize(sizes[rng.below(sizes.len() as u64) as usize], rng.next() as u8);
            }
            b
        } else {
            // Random bytes with a plausible header.
            let mut b: Vec<u8> = (0..sizes[rng.below(sizes.len() as u64) as usize]).map(|_| rng.next() as u8).collect();
            b[0] = [1, 5, 5, 4, 0][rng.below(5) as usize];
            if b.len() > 15 {
                b[14] = rng.below(4) as u8;
                b[15] = if rng.below(2) == 0 { 0 } else { rng.next() as u8 };
            }
            if b[0] == 1 {
                b[1] = [133, 181, 189, 202, 203, 165, 130, 157][rng.below(8) as usize];
            }
            b
        };
        if bytes.len() < 14 {
            bytes.resize(14, 0);
        }
        let user = userspace(&bytes);
        if matches!(user, Ok(Some(_))) {
            counted += 1;
        }
        let k = kernel.outcome(&bytes, user.as_ref().ok().and_then(|o| o.as_ref()));
        assert_eq!(
            k,
            expected_outcome(&user),
            "{entry:?}: case {case} (seed {seed:#x}), {} bytes: {bytes:02x?}",
            bytes.len()
        );
    }
    assert!(counted > 50, "corpus should contain valid notifications too, got {counted}");
}

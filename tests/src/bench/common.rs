//! What every benchmark part shares: the machine's description, the tap
//! object loaded with the benchmark programs, a rate-controlled driver of
//! BPF_PROG_TEST_RUN from one thread per core, and reading a child agent's
//! CPU time and memory from /proc.

use std::{
    net::{SocketAddr, TcpListener},
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use crate::agent_process::AgentProcess;
use anyhow::{Context, Result, bail};
use aya::{
    maps::PerCpuArray,
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use verdict_testkit::{
    replay::{self, Replayer},
    scenario::{Layout, PolicyVerdict},
};

/// Where the figures come from; printed above every table.
#[derive(Clone, Debug)]
pub struct Machine {
    pub cores: usize,
    pub kernel: String,
    pub cpu_model: String,
}

impl Machine {
    pub fn detect() -> Machine {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string()))
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
            cpu_model,
        }
    }

    pub fn line(&self) -> String {
        format!("{} cores ({}), Linux {}", self.cores, self.cpu_model, self.kernel)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({ "nproc": self.cores, "kernel": self.kernel, "cpu_model": self.cpu_model })
    }
}

pub use crate::pin_dir::PinDir;

/// The testkit's replay object on the agent's counting maps (pinned,
/// shared with a running `--tap none` agent using the same pin directory
/// and flow table size) with the benchmark programs loaded.
pub struct Bench {
    pub pipeline: Replayer,
}

pub const REPLAY: &str = replay::REPLAY;
pub const EMPTY: &str = replay::BENCH_EMPTY;
pub const REPLAY_AND_EMIT: &str = replay::BENCH_REPLAY_AND_EMIT;
/// The tap's whole path (every helper call of the shipped `try_tap`).
pub const TAP: &str = replay::BENCH_TAP;
/// The previous design's flow table (LRU per-CPU hash insert), the baseline
/// of the flow table's new-flow cost.
pub const LRU_FLOW: &str = replay::BENCH_LRU_FLOW;
/// The packet copy and one `bpf_probe_read_kernel` of the notification.
pub const PROBE_READ: &str = replay::BENCH_PROBE_READ;
/// Cilium's own notify: a perf output into a ring nobody reads.
pub const NOTIFY: &str = replay::BENCH_NOTIFY;
/// The tap's whole path with direct loads (kernels with the rdonly cast to void).
pub const TAP_DIRECT: &str = replay::BENCH_TAP_DIRECT;
/// The accounting core alone, on the notification in place.
pub const ACCOUNT: &str = replay::BENCH_ACCOUNT;

impl Bench {
    pub fn load(pins: &Path, flow_table_size: u32, extra: &[&str]) -> Result<Bench> {
        let pipeline = Replayer::load_with(pins, flow_table_size, extra).context("loading the replay object")?;
        Ok(Bench { pipeline })
    }

    pub fn prog(&self, name: &str) -> Result<&SchedClassifier> {
        Ok(self.pipeline.program(name)?)
    }

    /// `BENCH_EMITTED` summed over CPUs: [offered, written to the ring, refused].
    pub fn emitted(&self) -> Result<[u64; 3]> {
        let map =
            self.pipeline.ebpf().map("BENCH_EMITTED").context("map BENCH_EMITTED missing: rebuild verdict-testkit")?;
        let arr: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
        let mut out = [0u64; 3];
        for (i, o) in out.iter_mut().enumerate() {
            *o = arr.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(out)
    }

    /// `STATS` summed over CPUs, straight from the (pinned) map.
    pub fn stat(&self, stat: verdict_common::maps::Stat) -> Result<u64> {
        let map = self.pipeline.ebpf().map(verdict_common::maps::STATS).context("STATS")?;
        let arr: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
        Ok(arr.get(&(stat as u32), 0)?.iter().sum())
    }
}

/// One BPF_PROG_TEST_RUN; returns the kernel's mean duration per repetition.
pub fn test_run(prog: &SchedClassifier, data: &[u8], repeat: u32) -> Result<Duration> {
    let r = prog.test_run(TestRunOptions { data_in: Some(data), repeat, ..Default::default() })?;
    Ok(r.duration)
}

/// A 40-byte (Cilium v1.19 layout) audited ingress verdict; `i` picks the
/// flow: distinct `i` below 100 * 1_000_000 give distinct flow keys.
pub fn notification(i: u32) -> Vec<u8> {
    PolicyVerdict {
        layout: Layout::V1_19,
        endpoint: 1 + (i % 100) as u16,
        remote_identity: 256 + i / 100,
        verdict: 0,
        dst_port: 1 + ((i / 100) % 60_000) as u16,
        proto: 6,
        dir: 1,
        ipv6: false,
        match_type: 0,
        audited: true,
        packet_len: 60,
    }
    .encode()
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t filled with the libc macros, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// What a drive achieved.
#[derive(Clone, Copy, Debug, Default)]
pub struct Driven {
    /// Program runs issued (each one notification).
    pub runs: u64,
    pub elapsed: Duration,
}

/// How the emitting threads are scheduled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// Ordinary threads: userspace readers share the CPUs fairly with them.
    Fair,
    /// SCHED_FIFO: like the datapath, which runs in softirq context and is
    /// never preempted by a userspace reader; readers get what is left.
    Datapath,
}

/// Runs `prog` over `inputs` (round robin) from one thread per core, each
/// pinned to its core, for `duration`. With a `target_rate` (total, per
/// second) each thread issues batches (one test run with `repeat` = the
/// batch) to follow its share of the schedule, sleeping when ahead; without
/// one, as fast as it can. `stop` ends the drive early.
pub fn drive(
    prog: &SchedClassifier,
    inputs: &[Vec<u8>],
    target_rate: Option<f64>,
    duration: Duration,
    priority: Priority,
    stop: &AtomicBool,
) -> Result<Driven> {
    let threads = Machine::detect().cores.clamp(1, 2);
    let started = Instant::now();
    let results: Vec<Result<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> Result<u64> {
                    pin_to_cpu(t);
                    if priority == Priority::Datapath {
                        let p = libc::sched_param { sched_priority: 10 };
                        // SAFETY: this thread, a valid sched_param. The
                        // kernel's RT throttling (95 % by default) still
                        // leaves every CPU some time for others.
                        unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) };
                    }
                    let share = target_rate.map(|r| r / threads as f64);
                    // Large enough to amortise the syscall at 1M/s, small
                    // enough that a batch lasts well under a millisecond.
                    let max_batch: u64 = match share {
                        Some(r) if r < 20_000.0 => 16,
                        Some(r) if r < 200_000.0 => 64,
                        _ => 256,
                    };
                    let mut done = 0u64;
                    let mut k = t;
                    loop {
                        let elapsed = started.elapsed();
                        if elapsed >= duration || stop.load(Ordering::Relaxed) {
                            return Ok(done);
                        }
                        let batch = match share {
                            None => max_batch,
                            Some(r) => {
                                let due = (r * elapsed.as_secs_f64()) as u64;
                                if due <= done {
                                    std::thread::sleep(Duration::from_micros(200));
                                    continue;
                                }
                                (due - done).min(max_batch)
                            }
                        };
                        test_run(prog, &inputs[k % inputs.len()], batch as u32)?;
                        done += batch;
                        k += threads;
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("driver panicked")))).collect()
    });
    let elapsed = started.elapsed();
    let mut runs = 0;
    for r in results {
        runs += r?;
    }
    Ok(Driven { runs, elapsed })
}

/// A free TCP port on 127.0.0.1.
pub fn free_addr() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// Starts `verdict-agent run --tap none` on `pins`, without Kubernetes
/// or the Cilium API (nothing to enrich from on a bench machine).
pub fn start_agent(pins: &PinDir, flow_table_size: u32, extra: &[&str], log_name: &str) -> Result<AgentProcess> {
    let addr = free_addr()?;
    let size = flow_table_size.to_string();
    let mut args = vec![
        "--tap",
        "none",
        "--pin-dir",
        pins.as_str(),
        "--flow-table-size",
        &size,
        "--no-kube",
        "--no-cilium-api",
        "--no-events",
    ];
    args.extend_from_slice(extra);
    let log = std::env::temp_dir().join(format!("verdict-bench-{log_name}.log"));
    AgentProcess::start(addr, &args, &log)
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = stat.rsplit_once(')').context("bad /proc/pid/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    if f.len() < 13 {
        bail!("short /proc/{pid}/stat");
    }
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// A `/proc/<pid>/status` field in kB (VmRSS, VmHWM), as MiB.
pub fn status_mib(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with(field)).with_context(|| format!("no {field}"))?;
    let kb: f64 = line.split_whitespace().nth(1).context("bad status line")?.parse()?;
    Ok(kb / 1024.0)
}

/// Nearest-rank percentile of `v` (sorted in place), `p` in 0..=100.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// "10k", "1M", for rates in tables and json keys.
pub fn short_rate(r: f64) -> String {
    if r >= 1e6 && (r / 1e6).fract() == 0.0 {
        format!("{}M", r / 1e6)
    } else if r >= 1e3 && (r / 1e3).fract() == 0.0 {
        format!("{}k", r / 1e3)
    } else {
        format!("{r:.0}")
    }
}

/// Progress to stderr: the table on stdout stays clean.
macro_rules! progress {
    ($($t:tt)*) => { eprintln!("verdict-bench: {}", format!($($t)*)) };
}
pub(crate) use progress;

//! Loading the tap object, pinning its maps, and attaching the tap.
//!
//! The counting maps are pinned under `<pin dir>/<layout version>/` so an
//! agent restart or upgrade continues the same counters. aya reuses a pinned
//! map without checking its shape, so [`check_pins`] does: a map whose shape
//! changed is unpinned with a warning, never silently misread.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, MapData},
    programs::{FEntry, KProbe, SchedClassifier, TestRun, TestRunOptions},
};
use thiserror::Error;
use tracing::{info, warn};
use verdict_common::maps::{
    ENDPOINT_COUNTERS, EndpointCounters, FLOWS, FlowCounters, FlowKey, LAYOUT_VERSION, MAX_ENDPOINTS, STATS, Stat,
    TAP_CONFIG, TapConfig,
};

use super::{btf::KernelBtf, objects::TAP_OBJECT};

/// The kernel function behind `bpf_perf_event_output` in tc programs.
pub const HOOKED_FUNCTION: &str = "bpf_skb_event_output";

/// How notifications reach the accounting core.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TapChoice {
    /// fentry if the kernel can, else kprobe.
    Auto,
    /// BPF trampoline on the function's entry: cheapest (x86-64 kernel >= 5.5 with BTF).
    Fentry,
    /// kprobe on the function: kernels without trampolines (CONFIG_KPROBES).
    Kprobe,
    /// No hook: notifications arrive only through the replay program
    /// (tests, demo, and kernels that allow neither hook).
    Replay,
}

/// The tap that is actually in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TapKind {
    Fentry,
    Kprobe,
    Replay,
}

impl TapKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TapKind::Fentry => "fentry",
            TapKind::Kprobe => "kprobe",
            TapKind::Replay => "replay",
        }
    }
}

#[derive(Debug, Error)]
pub enum LoadError {
    #[error(
        "bpffs is not mounted at {0}; mount it with `mount -t bpf bpf {0}` (in Kubernetes: a hostPath mount of /sys/fs/bpf)"
    )]
    NoBpffs(String),
    #[error("cannot create pin directory {path}: {source}")]
    PinDir { path: String, source: io::Error },
    #[error(
        "loading the tap object failed: {0}; the agent needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN on kernels before 5.8)"
    )]
    Load(#[source] aya::EbpfError),
    #[error("the tap object has no {0}; the binary is broken, rebuild it")]
    MissingInObject(&'static str),
    #[error("BPF map {map}: {source}")]
    Map { map: &'static str, source: aya::maps::MapError },
    #[error("kernel BTF: {0}")]
    Btf(#[from] super::btf::BtfError),
    #[error("could not attach a tap to {HOOKED_FUNCTION}: {0}")]
    Attach(String),
    #[error("replay run failed: {0}")]
    Replay(#[source] aya::programs::ProgramError),
}

/// Settings of the in-kernel pipeline.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    /// bpffs directory for pins (default `/sys/fs/bpf/verdict-agent`).
    pub pin_dir: PathBuf,
    /// Capacity of the flow table.
    pub flow_table_size: u32,
    pub tap: TapChoice,
    /// Kernel BTF, for the `struct bpf_map` layout and the fentry target.
    pub btf_path: PathBuf,
}

impl LoaderConfig {
    /// Where this layout's maps are pinned.
    pub fn pin_path(&self) -> PathBuf {
        self.pin_dir.join(LAYOUT_VERSION)
    }
}

/// The loaded tap object: its maps and, unless replaying, an attached hook.
/// Dropping it detaches the hook; the pinned maps stay.
pub struct Pipeline {
    ebpf: Ebpf,
    tap: TapKind,
    map_id_offset: u32,
}

impl Pipeline {
    /// Loads the object, reusing pinned maps, and attaches the tap.
    pub fn load(config: &LoaderConfig) -> Result<Pipeline, LoadError> {
        let pins = config.pin_path();
        ensure_bpffs(&config.pin_dir)?;
        std::fs::create_dir_all(&pins)
            .map_err(|source| LoadError::PinDir { path: pins.display().to_string(), source })?;
        check_pins(&pins, config.flow_table_size);

        let mut ebpf = EbpfLoader::new()
            .map_pin_path(ENDPOINT_COUNTERS, pins.join(ENDPOINT_COUNTERS))
            .map_pin_path(FLOWS, pins.join(FLOWS))
            .map_pin_path(STATS, pins.join(STATS))
            .map_max_entries(FLOWS, config.flow_table_size)
            .load(TAP_OBJECT)
            .map_err(LoadError::Load)?;

        // The replay entry is always loaded: tests and the demo feed it even
        // when a hook is attached.
        program_mut::<SchedClassifier>(&mut ebpf, "replay")
            .and_then(|p| p.load().map_err(|e| error_chain(&e)))
            .map_err(|e| LoadError::Attach(format!("replay program: {e}")))?;

        let (tap, map_id_offset) = match config.tap {
            TapChoice::Replay => (TapKind::Replay, 0),
            choice => {
                let kernel_btf = KernelBtf::load(&config.btf_path)?;
                if !kernel_btf.has_function(HOOKED_FUNCTION)? {
                    return Err(LoadError::Attach(format!("the kernel's BTF has no function {HOOKED_FUNCTION}")));
                }
                let offset = kernel_btf.member_offset("bpf_map", "id")?;
                (attach(&mut ebpf, choice, &config.btf_path)?, offset)
            }
        };
        let mut pipeline = Pipeline { ebpf, tap, map_id_offset };
        pipeline.set_events_map_id(0)?;
        info!(tap = tap.as_str(), pins = %pins.display(), flow_table_size = config.flow_table_size, "in-kernel pipeline ready");
        Ok(pipeline)
    }

    pub fn tap(&self) -> TapKind {
        self.tap
    }

    /// Tells the tap which map is Cilium's; 0 means none (filter everything).
    pub fn set_events_map_id(&mut self, id: u32) -> Result<(), LoadError> {
        let map = self.ebpf.map_mut(TAP_CONFIG).ok_or(LoadError::MissingInObject(TAP_CONFIG))?;
        let mut config: Array<_, TapConfig> =
            Array::try_from(map).map_err(|source| LoadError::Map { map: TAP_CONFIG, source })?;
        config
            .set(0, TapConfig { events_map_id: id, map_id_offset: self.map_id_offset }, 0)
            .map_err(|source| LoadError::Map { map: TAP_CONFIG, source })
    }

    /// Runs the replay program once on `notification`, exactly as the tap
    /// would account it.
    pub fn replay(&self, notification: &[u8]) -> Result<(), LoadError> {
        replay_with(&self.ebpf, notification, 1)
    }

    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    /// For the benchmark, which loads `bench_empty` beside the replay entry.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

/// Runs the replay program of `ebpf` `repeat` times on one notification.
pub fn replay_with(ebpf: &Ebpf, notification: &[u8], repeat: u32) -> Result<(), LoadError> {
    let prog: &SchedClassifier = ebpf
        .program("replay")
        .ok_or(LoadError::MissingInObject("program replay"))?
        .try_into()
        .map_err(LoadError::Replay)?;
    // BPF_PROG_TEST_RUN wants at least an Ethernet header's worth of data.
    let mut data = notification.to_vec();
    let len = data.len();
    if len < 14 {
        data.resize(14, 0);
    }
    prog.test_run(TestRunOptions { data_in: Some(&data[..len.max(14)]), repeat, ..Default::default() })
        .map_err(LoadError::Replay)?;
    Ok(())
}

fn attach(ebpf: &mut Ebpf, choice: TapChoice, btf_path: &Path) -> Result<TapKind, LoadError> {
    let mut failures = Vec::new();
    if matches!(choice, TapChoice::Auto | TapChoice::Fentry) {
        match attach_fentry(ebpf, btf_path) {
            Ok(()) => return Ok(TapKind::Fentry),
            Err(e) => {
                warn!(error = %e, "fentry tap unavailable");
                failures.push(format!("fentry: {e}"));
            }
        }
    }
    if matches!(choice, TapChoice::Auto | TapChoice::Kprobe) {
        match attach_kprobe(ebpf) {
            Ok(()) => return Ok(TapKind::Kprobe),
            Err(e) => {
                warn!(error = %e, "kprobe tap unavailable");
                failures.push(format!("kprobe: {e}"));
            }
        }
    }
    Err(LoadError::Attach(format!(
        "{}. fentry needs BPF trampolines (x86-64 kernel >= 5.5 with CONFIG_DEBUG_INFO_BTF, not blocked by lockdown); \
         kprobe needs CONFIG_KPROBES and the kprobe PMU. `--tap replay` runs without a hook (tests only).",
        failures.join("; ")
    )))
}

fn attach_fentry(ebpf: &mut Ebpf, btf_path: &Path) -> Result<(), String> {
    let btf = Btf::parse_file(btf_path, aya::Endianness::default()).map_err(|e| format!("BTF: {e}"))?;
    let prog: &mut FEntry = program_mut(ebpf, "tap_fentry")?;
    prog.load(HOOKED_FUNCTION, &btf).map_err(|e| format!("load: {}", error_chain(&e)))?;
    prog.attach().map_err(|e| format!("attach: {}", error_chain(&e)))?;
    Ok(())
}

fn attach_kprobe(ebpf: &mut Ebpf) -> Result<(), String> {
    let prog: &mut KProbe = program_mut(ebpf, "tap_kprobe")?;
    prog.load().map_err(|e| format!("load: {}", error_chain(&e)))?;
    prog.attach(HOOKED_FUNCTION, 0).map_err(|e| format!("attach: {}", error_chain(&e)))?;
    Ok(())
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or_else(|| format!("program {name} missing from the object"))?;
    prog.try_into().map_err(|e: aya::programs::ProgramError| e.to_string())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn ensure_bpffs(pin_dir: &Path) -> Result<(), LoadError> {
    // The pin directory itself may not exist yet: check the nearest parent.
    let mut probe = pin_dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    let c = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()).unwrap_or_default();
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 || st.f_type as i64 != BPF_FS_MAGIC {
        return Err(LoadError::NoBpffs(probe.display().to_string()));
    }
    Ok(())
}

/// Expected shape of each pinned map: (name, key size, value size, entries).
fn expected_shapes(flow_table_size: u32) -> [(&'static str, u32, u32, u32); 3] {
    [
        (ENDPOINT_COUNTERS, 4, size_of::<EndpointCounters>() as u32, MAX_ENDPOINTS),
        (FLOWS, size_of::<FlowKey>() as u32, size_of::<FlowCounters>() as u32, flow_table_size),
        (STATS, 4, 8, Stat::COUNT),
    ]
}

/// Unpins maps whose shape does not match this binary's, so they are
/// recreated instead of misread.
fn check_pins(pins: &Path, flow_table_size: u32) {
    for (name, key, value, entries) in expected_shapes(flow_table_size) {
        let path = pins.join(name);
        if !path.exists() {
            continue;
        }
        let shape =
            MapData::from_pin(&path).and_then(|m| m.info()).map(|i| (i.key_size(), i.value_size(), i.max_entries()));
        match shape {
            Ok(s) if s == (key, value, entries) => {}
            Ok((k, v, e)) => {
                warn!(
                    map = name,
                    pinned_entries = e,
                    wanted_entries = entries,
                    pinned_key = k,
                    pinned_value = v,
                    "pinned map has another shape (resized or upgraded); recreating it, its counts start over"
                );
                let _ = std::fs::remove_file(&path);
            }
            Err(e) => {
                warn!(map = name, error = %e, "pinned map unreadable; recreating it");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

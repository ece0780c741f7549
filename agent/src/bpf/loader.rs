//! Loading the tap object, pinning its maps, and attaching the tap.
//!
//! The counting maps are pinned under `<pin dir>/<layout version>/` so an
//! agent restart or upgrade continues the same counters. aya reuses a pinned
//! map without checking its shape, so [`check_pins`] does: a map whose shape
//! changed is replaced with a warning that says what was lost, never
//! silently misread; a pin that cannot be opened at all stops the agent
//! with the path and the cause (deleting it would lose counts that may be
//! fine). One agent per pin directory: [`PinLock`].
//!
//! Only the tap programs are in the object: nothing loaded here can write
//! the counters except from a notification the hook saw.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, MapData},
    programs::{FEntry, KProbe},
};
use thiserror::Error;
use tracing::{info, warn};
use verdict_common::{
    flow_table::{FlowBucket, FlowConfig, WORLD_PORT_ENTRIES, WorldPortCounters},
    maps::{
        ENDPOINT_COUNTERS, EndpointCounters, FLOW_CONFIG, FLOW_TABLE, LAYOUT_VERSION, MAX_ENDPOINTS, STATS, Stat,
        TAP_CONFIG, TapConfig, WORLD_PORTS,
    },
};

use super::{
    btf::KernelBtf,
    direct_read::{patch_rdonly_cast, rdonly_cast_to_void},
    flow_table::{FlowTables, table_entries},
    objects::TAP_OBJECT,
    privileges,
    shared_array::SharedArrayError,
};

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
    /// No hook: the counting maps are created, pinned and read, but this
    /// agent counts nothing itself; they move only if another program
    /// feeds them (the testkit's replay entry, for demos and tests on
    /// kernels that allow no hook). Shown as `tap="none"` and
    /// `verdict_agent_tap_attached 0`.
    None,
}

/// The tap that is actually in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TapKind {
    Fentry,
    Kprobe,
    /// `--tap none`: no hook attached, counters fed externally.
    None,
}

/// How the tap copies each notification out of the emitter's stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotificationRead {
    /// Plain loads through `bpf_rdonly_cast` (fentry, Linux 6.17+).
    Direct,
    /// One `bpf_probe_read_kernel` per notification.
    ProbeRead,
    /// No tap: nothing is read.
    None,
}

impl NotificationRead {
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationRead::Direct => "direct",
            NotificationRead::ProbeRead => "probe_read",
            NotificationRead::None => "none",
        }
    }
}

impl TapKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TapKind::Fentry => "fentry",
            TapKind::Kprobe => "kprobe",
            TapKind::None => "none",
        }
    }

    /// Whether a hook is in the kernel.
    pub fn attached(self) -> bool {
        !matches!(self, TapKind::None)
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
    #[error("loading the tap object failed: {hint}")]
    Load {
        hint: String,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("the tap object has no {0}; the binary is broken, rebuild it")]
    MissingInObject(&'static str),
    #[error("BPF map {map}: {source}")]
    Map { map: &'static str, source: aya::maps::MapError },
    #[error("kernel BTF: {0}")]
    Btf(#[from] super::btf::BtfError),
    #[error("could not attach a tap to {HOOKED_FUNCTION}: {0}")]
    Attach(String),
    #[error(
        "cannot open the pinned map {path} ({cause}); it may hold this node's counts, so it is not replaced: \
         fix its permissions or ownership, or remove it by hand to start the counts over"
    )]
    PinUnreadable { path: String, cause: String },
    #[error(
        "another verdict-agent already uses the pin directory {path} ({holder}); \
         run one agent per node, or give this one its own --pin-dir"
    )]
    PinDirLocked { path: String, holder: String },
    #[error("cannot map the flow tables of the loaded object")]
    Tables(#[source] SharedArrayError),
    #[error("cannot lock the pin directory {path}")]
    PinLock {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Settings of the in-kernel pipeline.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    /// bpffs directory for pins (default `/sys/fs/bpf/verdict-agent`).
    pub pin_dir: PathBuf,
    /// Flow slots per CPU shard of the flow table (rounded up to whole
    /// buckets of a power-of-two count).
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
    read: NotificationRead,
    map_id_offset: u32,
    tables: FlowTables,
    /// Held while the pipeline lives: one agent per pin directory.
    _lock: PinLock,
}

impl Pipeline {
    /// Loads the object, reusing pinned maps, and attaches the tap.
    pub fn load(config: &LoaderConfig) -> Result<Pipeline, LoadError> {
        let pins = config.pin_path();
        ensure_bpffs(&config.pin_dir)?;
        std::fs::create_dir_all(&pins)
            .map_err(|source| LoadError::PinDir { path: pins.display().to_string(), source })?;
        let lock = PinLock::acquire(&config.pin_dir)?;
        let entries = table_entries(config.flow_table_size)
            .map_err(|source| LoadError::PinDir { path: super::flow_table::POSSIBLE_CPUS.into(), source })?;
        check_pins(&pins, entries)?;
        let memlock = privileges::raise_memlock();
        if let Some(m) = memlock {
            info!(
                memlock_kib = m.soft_bytes.map(|b| b / 1024),
                "kernel charges BPF maps to RLIMIT_MEMLOCK (before 5.11)"
            );
        }

        // The kernel's BTF, when a hook is wanted: the hooked function, the
        // offset of the map ID, and whether the direct-read tap can load.
        let kernel = match config.tap {
            TapChoice::None => None,
            _ => {
                let kernel_btf = KernelBtf::load(&config.btf_path)?;
                if !kernel_btf.has_function(HOOKED_FUNCTION)? {
                    return Err(LoadError::Attach(format!("the kernel's BTF has no function {HOOKED_FUNCTION}")));
                }
                let offset = kernel_btf.member_offset("bpf_map", "id")?;
                Some((offset, rdonly_cast_to_void(&kernel_btf)?))
            }
        };
        let direct = kernel.and_then(|(_, cast)| cast).filter(|_| config.tap != TapChoice::Kprobe);
        let patched = direct.map(|btf_id| patch_rdonly_cast(TAP_OBJECT, btf_id));
        let object = match &patched {
            Some((image, _)) => image.bytes(),
            None => TAP_OBJECT,
        };
        let mut ebpf = EbpfLoader::new()
            .map_pin_path(ENDPOINT_COUNTERS, pins.join(ENDPOINT_COUNTERS))
            .map_pin_path(FLOW_TABLE, pins.join(FLOW_TABLE))
            .map_pin_path(FLOW_CONFIG, pins.join(FLOW_CONFIG))
            .map_pin_path(WORLD_PORTS, pins.join(WORLD_PORTS))
            .map_pin_path(STATS, pins.join(STATS))
            .map_max_entries(FLOW_TABLE, entries)
            .load(object)
            .map_err(|source| LoadError::Load {
                hint: privileges::diagnose(
                    privileges::refused_for_permission(&source),
                    privileges::kernel_version(),
                    privileges::effective_capabilities(),
                    memlock,
                ),
                source: Box::new(source),
            })?;

        let (tap, read, map_id_offset) = match kernel {
            None => {
                warn!(pins = %pins.display(),
                    "--tap none: no hook attached; the counters move only if another program feeds the pinned maps (tests and demos)");
                (TapKind::None, NotificationRead::None, 0)
            }
            Some((offset, _)) => {
                let direct = patched.as_ref().is_some_and(|(_, n)| *n > 0);
                let (tap, read) = attach(&mut ebpf, config.tap, &config.btf_path, direct)?;
                (tap, read, offset)
            }
        };
        let tables = FlowTables::open(&ebpf).map_err(LoadError::Tables)?;
        let mut pipeline = Pipeline { ebpf, tap, read, map_id_offset, tables, _lock: lock };
        pipeline.set_events_map_id(0)?;
        info!(tap = tap.as_str(), read = read.as_str(), pins = %pins.display(), flow_table_size = config.flow_table_size, "in-kernel pipeline ready");
        Ok(pipeline)
    }

    pub fn tap(&self) -> TapKind {
        self.tap
    }

    /// How the attached tap reads each notification.
    pub fn notification_read(&self) -> NotificationRead {
        self.read
    }

    /// Tells the tap which map is Cilium's; 0 means none (filter everything).
    pub fn set_events_map_id(&mut self, id: u32) -> Result<(), LoadError> {
        let map = self.ebpf.map_mut(TAP_CONFIG).ok_or(LoadError::MissingInObject(TAP_CONFIG))?;
        let mut config: Array<_, TapConfig> =
            Array::try_from(map).map_err(|source| LoadError::Map { map: TAP_CONFIG, source })?;
        config
            .set(0, TapConfig { events_map_id: id, map_id_offset: self.map_id_offset, events_map_ptr: 0 }, 0)
            .map_err(|source| LoadError::Map { map: TAP_CONFIG, source })
    }

    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    /// The flow and world-port tables, mapped.
    pub fn tables(&self) -> &FlowTables {
        &self.tables
    }
}

/// Attaches the cheapest tap the kernel takes: fentry with direct reads
/// (when `direct`: the object was patched for this kernel), fentry with a
/// probe read, then kprobe.
fn attach(
    ebpf: &mut Ebpf,
    choice: TapChoice,
    btf_path: &Path,
    direct: bool,
) -> Result<(TapKind, NotificationRead), LoadError> {
    let mut failures = Vec::new();
    if matches!(choice, TapChoice::Auto | TapChoice::Fentry) {
        if direct {
            match attach_fentry(ebpf, btf_path, "tap_fentry_direct") {
                Ok(()) => return Ok((TapKind::Fentry, NotificationRead::Direct)),
                // The probe-read program still may attach: say why, go on.
                Err(e) => warn!(error = %e, "fentry tap with direct reads unavailable; trying the probe-read one"),
            }
        }
        match attach_fentry(ebpf, btf_path, "tap_fentry") {
            Ok(()) => return Ok((TapKind::Fentry, NotificationRead::ProbeRead)),
            Err(e) => {
                warn!(error = %e, "fentry tap unavailable");
                failures.push(format!("fentry: {e}"));
            }
        }
    }
    if matches!(choice, TapChoice::Auto | TapChoice::Kprobe) {
        match attach_kprobe(ebpf) {
            Ok(()) => return Ok((TapKind::Kprobe, NotificationRead::ProbeRead)),
            Err(e) => {
                warn!(error = %e, "kprobe tap unavailable");
                failures.push(format!("kprobe: {e}"));
            }
        }
    }
    let refused = if failures.len() > 1 { "this kernel refused every hook" } else { "the kernel refused the hook" };
    Err(LoadError::Attach(format!(
        "{refused} ({}). fentry needs BPF trampolines (x86-64 kernel >= 5.5, on arm64 Debian's 6.12 attaches it and 5.10 and 6.1 refuse the attach with errno 524; CONFIG_DEBUG_INFO_BTF, not blocked by lockdown); \
         kprobe needs CONFIG_KPROBES and the kprobe PMU. `--tap none` starts without a hook (nothing is counted then).",
        failures.join("; ")
    )))
}

fn attach_fentry(ebpf: &mut Ebpf, btf_path: &Path, program: &str) -> Result<(), String> {
    let btf = Btf::parse_file(btf_path, aya::Endianness::default()).map_err(|e| format!("BTF: {e}"))?;
    let prog: &mut FEntry = program_mut(ebpf, program)?;
    prog.load(HOOKED_FUNCTION, &btf).map_err(|e| format!("load: {}", crate::errors::chain(&e)))?;
    prog.attach().map_err(|e| format!("attach: {}", crate::errors::chain(&e)))?;
    Ok(())
}

fn attach_kprobe(ebpf: &mut Ebpf) -> Result<(), String> {
    let prog: &mut KProbe = program_mut(ebpf, "tap_kprobe")?;
    prog.load().map_err(|e| format!("load: {}", crate::errors::chain(&e)))?;
    prog.attach(HOOKED_FUNCTION, 0).map_err(|e| {
        let mut text = format!("attach: {}", crate::errors::chain(&e));
        if let Some(hint) = privileges::perf_event_hint(&e) {
            text.push_str(" (");
            text.push_str(&hint);
            text.push(')');
        }
        text
    })?;
    Ok(())
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or_else(|| format!("program {name} missing from the object"))?;
    prog.try_into().map_err(|e: aya::programs::ProgramError| e.to_string())
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
fn expected_shapes(table_entries: u32) -> [(&'static str, u32, u32, u32); 5] {
    [
        (ENDPOINT_COUNTERS, 4, size_of::<EndpointCounters>() as u32, MAX_ENDPOINTS),
        (FLOW_TABLE, 4, size_of::<FlowBucket>() as u32, table_entries),
        (FLOW_CONFIG, 4, size_of::<FlowConfig>() as u32, 1),
        (WORLD_PORTS, 4, size_of::<WorldPortCounters>() as u32, WORLD_PORT_ENTRIES),
        (STATS, 4, 8, Stat::COUNT),
    ]
}

/// Replaces pinned maps whose shape does not match this binary's, so they
/// are recreated instead of misread, saying what is lost. A pin that cannot
/// be opened is an error: its counts may be intact.
fn check_pins(pins: &Path, table_entries: u32) -> Result<(), LoadError> {
    for (name, key, value, entries) in expected_shapes(table_entries) {
        let path = pins.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapData::from_pin(&path).and_then(|m| m.info()).map_err(|e| unreadable(&path, &e))?;
        let shape = (info.key_size(), info.value_size(), info.max_entries());
        if shape == (key, value, entries) {
            continue;
        }
        let (k, v, e) = shape;
        warn!(
            map = name,
            path = %path.display(),
            pinned_entries = e,
            wanted_entries = entries,
            pinned_key = k,
            pinned_value = v,
            wanted_key = key,
            wanted_value = value,
            lost = lost_counts(name, &path).as_str(),
            "pinned map has another shape (resized or upgraded); replacing it, the counts it held are lost"
        );
        std::fs::remove_file(&path).map_err(|e| unreadable(&path, &e))?;
    }
    Ok(())
}

/// What a replaced map held, for the warning.
fn lost_counts(name: &str, path: &Path) -> String {
    if name == STATS
        && let Ok(map) = MapData::from_pin(path)
        && let Ok(stats) = aya::maps::PerCpuArray::<_, u64>::try_from(aya::maps::Map::PerCpuArray(map))
        && let Ok(counted) = stats.get(&(Stat::Counted as u32), 0)
    {
        return format!("{} notifications counted so far", counted.iter().sum::<u64>());
    }
    "every count in it".to_string()
}

fn unreadable(path: &Path, e: &(dyn std::error::Error + 'static)) -> LoadError {
    LoadError::PinUnreadable { path: path.display().to_string(), cause: crate::errors::chain(e) }
}

/// An exclusive `flock` on the pin directory, held for the agent's life:
/// two agents counting into (and reading) the same maps would each report
/// the other's verdicts. Released by the kernel when the process exits,
/// however it exits.
pub struct PinLock {
    _dir: std::fs::File,
}

impl PinLock {
    pub fn acquire(pin_dir: &Path) -> Result<PinLock, LoadError> {
        let path = pin_dir.display().to_string();
        let dir = std::fs::File::open(pin_dir).map_err(|source| LoadError::PinLock { path: path.clone(), source })?;
        use std::os::fd::AsRawFd as _;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(PinLock { _dir: dir });
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(LoadError::PinLock { path, source: error });
        }
        let holder = match lock_holder(&dir) {
            Some(pid) => {
                let command = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                    .map(|c| c.replace('\0', " ").trim().escape_debug().to_string())
                    .unwrap_or_default();
                format!("held by pid {pid} {command}").trim_end().to_string()
            }
            None => "held by a process this one cannot see".to_string(),
        };
        Err(LoadError::PinDirLocked { path, holder })
    }
}

/// The pid holding a `flock` on `file`, from `/proc/locks` (pids there are
/// in this process's pid namespace; 0 or absent when not visible).
fn lock_holder(file: &std::fs::File) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = file.metadata().ok()?;
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let inode = meta.ino();
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        // "1: FLOCK  ADVISORY  WRITE 1234 00:1f:5678 0 EOF"
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (kind, pid, id) = (fields.get(1)?, fields.get(4)?, fields.get(5)?);
        let mut parts = id.split(':');
        let (maj, min, ino) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = *kind == "FLOCK"
            && u32::from_str_radix(maj, 16).ok()? == major
            && u32::from_str_radix(min, 16).ok()? == minor
            && ino.parse::<u64>().ok()? == inode;
        let pid: u32 = pid.parse().ok()?;
        (matches && pid != 0 && pid != std::process::id()).then_some(pid)
    })
}

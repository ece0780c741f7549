//! The replay object on the agent's counting maps.
//!
//! [`Replayer::load`] opens the counting maps pinned under
//! `<pin dir>/<layout version>/` (creating and pinning them when no agent
//! made them yet, with the shape the agent would give them) and loads the
//! `replay` program over them. A notification replayed here is accounted by
//! the very code the tap runs (`verdict_agent_ebpf::account::account`), so
//! an agent started with `--tap none` on the same pin directory counts it
//! exactly as it would count one the hook saw.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::MapData,
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use thiserror::Error;
use verdict_agent::bpf::flow_table::{FlowTables, table_entries};
use verdict_common::maps::{
    BENCH_FAKE_MAP_ID, BENCH_TRACE_PAYLOAD_LEN, BenchInput, ENDPOINT_COUNTERS, FLOW_CONFIG, FLOW_TABLE, LAYOUT_VERSION,
    MAX_NOTIFICATION_SIZE, STATS, TAP_CONFIG, TapConfig, WORLD_PORTS,
};

use crate::objects::REPLAY_OBJECT;

/// The replay entry; the benchmark's programs are [`BENCH_EMPTY`] and
/// [`BENCH_REPLAY_AND_EMIT`].
pub const REPLAY: &str = "replay";
pub const BENCH_EMPTY: &str = "bench_empty";
pub const BENCH_REPLAY_AND_EMIT: &str = "bench_replay_and_emit";
/// The shipped tap's whole path after the hook (`try_tap`), on stand-ins.
pub const BENCH_TAP: &str = "bench_tap";
/// Cilium's own notify: a perf output into a ring nobody reads.
pub const BENCH_NOTIFY: &str = "bench_notify";
/// `bench_tap` with direct loads (`DirectRead`): kernels with
/// `BPF_FEAT_RDONLY_CAST_TO_VOID` only ([`direct_read_kfunc`]).
pub const BENCH_TAP_DIRECT: &str = "bench_tap_direct";
/// Only the tap's copy of the notification (one `bpf_probe_read_kernel`).
pub const BENCH_PROBE_READ: &str = "bench_probe_read";
/// The accounting core alone on the notification in `BENCH_INPUT`.
pub const BENCH_ACCOUNT: &str = "bench_account";

/// The running kernel's BTF ID of `bpf_rdonly_cast` when it accepts the
/// cast to `void` (the direct-read tap), else None.
pub fn direct_read_kfunc() -> Option<u32> {
    let btf = verdict_agent::bpf::btf::KernelBtf::load(Path::new("/sys/kernel/btf/vmlinux")).ok()?;
    verdict_agent::bpf::direct_read::rdonly_cast_to_void(&btf).ok().flatten()
}
/// The previous design's flow table (an LRU per-CPU hash), for the ratio.
pub const BENCH_LRU_FLOW: &str = "bench_lru_flow";

#[derive(Debug, Error)]
pub enum ReplayError {
    #[error("cannot map the flow tables of the replay object (rebuild verdict-testkit)")]
    Tables {
        #[source]
        source: Box<verdict_agent::bpf::shared_array::SharedArrayError>,
    },
    #[error("cannot create the pin directory {path}; run as root with bpffs mounted at /sys/fs/bpf")]
    PinDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the replay object on the maps pinned under {path} (root and bpffs needed)")]
    Load {
        path: String,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("the replay object's {TAP_CONFIG} map (rebuild verdict-testkit)")]
    TapConfig {
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("the replay object's BENCH_INPUT map (rebuild verdict-testkit)")]
    BenchInput {
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("replay object program {program} (rebuild verdict-testkit)")]
    Program {
        program: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
}

/// The replay object, loaded on pinned counting maps.
pub struct Replayer {
    ebpf: Ebpf,
    tables: FlowTables,
    pins: PathBuf,
}

impl Replayer {
    /// Loads the replay object on the counting maps pinned under
    /// `pin_dir/<layout version>`; `flow_table_size` (slots per CPU) sizes
    /// the flow table only if no agent pinned one yet (a pinned one is
    /// reused as it is). Writes the table geometry and the epoch into the
    /// flow config, as the agent does; the host endpoint and critical ports
    /// are the agent's (or the test's: [`Replayer::tables`]).
    pub fn load(pin_dir: &Path, flow_table_size: u32) -> Result<Replayer, ReplayError> {
        Replayer::load_with(pin_dir, flow_table_size, &[])
    }

    /// Like [`Replayer::load`], also loading the benchmark programs `extra`.
    pub fn load_with(pin_dir: &Path, flow_table_size: u32, extra: &[&str]) -> Result<Replayer, ReplayError> {
        let pins = pin_dir.join(LAYOUT_VERSION);
        std::fs::create_dir_all(&pins)
            .map_err(|source| ReplayError::PinDir { path: pins.display().to_string(), source })?;
        let pinned_size = MapData::from_pin(pins.join(FLOW_TABLE)).and_then(|m| m.info()).map(|i| i.max_entries()).ok();
        let entries = match pinned_size {
            Some(n) => n,
            None => table_entries(flow_table_size)
                .map_err(|source| ReplayError::PinDir { path: "/sys/devices/system/cpu/possible".into(), source })?,
        };
        // Patched as the agent patches the tap, for `bench_tap_direct`.
        let object =
            direct_read_kfunc().map(|id| verdict_agent::bpf::direct_read::patch_rdonly_cast(REPLAY_OBJECT, id));
        let mut ebpf = EbpfLoader::new()
            .map_pin_path(ENDPOINT_COUNTERS, pins.join(ENDPOINT_COUNTERS))
            .map_pin_path(FLOW_TABLE, pins.join(FLOW_TABLE))
            .map_pin_path(FLOW_CONFIG, pins.join(FLOW_CONFIG))
            .map_pin_path(WORLD_PORTS, pins.join(WORLD_PORTS))
            .map_pin_path(STATS, pins.join(STATS))
            .map_max_entries(FLOW_TABLE, entries)
            .load(object.as_ref().map_or(REPLAY_OBJECT, |(image, _)| image.bytes()))
            .map_err(|source| ReplayError::Load { path: pins.display().to_string(), source: Box::new(source) })?;
        for program in std::iter::once(&REPLAY).chain(extra) {
            program_mut(&mut ebpf, program)?
                .load()
                .map_err(|source| ReplayError::Program { program: program.to_string(), source: Box::new(source) })?;
        }
        let tables = FlowTables::open(&ebpf).map_err(|source| ReplayError::Tables { source: Box::new(source) })?;
        Ok(Replayer { ebpf, tables, pins })
    }

    /// Accounts `notification` once, exactly as the tap would.
    pub fn replay(&self, notification: &[u8]) -> Result<(), ReplayError> {
        replay_with(&self.ebpf, notification, 1)
    }

    /// Writes this object's own (unpinned) `TAP_CONFIG`, which `bench_tap`
    /// reads exactly as the shipped tap reads the agent's.
    pub fn set_tap_config(&mut self, events_map_id: u32, map_id_offset: u32) -> Result<(), ReplayError> {
        let missing = || ReplayError::TapConfig {
            source: Box::new(aya::maps::MapError::InvalidName { name: TAP_CONFIG.into() }),
        };
        let map = self.ebpf.map_mut(TAP_CONFIG).ok_or_else(missing)?;
        let mut config: aya::maps::Array<_, TapConfig> =
            aya::maps::Array::try_from(map).map_err(|source| ReplayError::TapConfig { source: Box::new(source) })?;
        config
            .set(0, TapConfig { events_map_id, map_id_offset, events_map_ptr: 0 }, 0)
            .map_err(|source| ReplayError::TapConfig { source: Box::new(source) })
    }

    /// Writes the input of the `BENCH_INPUT` programs (`bench_account`,
    /// `bench_tap*`, `bench_notify`, `bench_probe_read`): `notification`,
    /// its length, and the stand-in map carrying [`BENCH_FAKE_MAP_ID`].
    pub fn set_bench_input(&mut self, notification: &[u8]) -> Result<(), ReplayError> {
        let error = |source| ReplayError::BenchInput { source: Box::new(source) };
        let map = self
            .ebpf
            .map_mut("BENCH_INPUT")
            .ok_or_else(|| error(aya::maps::MapError::InvalidName { name: "BENCH_INPUT".into() }))?;
        let mut input: aya::maps::Array<_, BenchInput> = aya::maps::Array::try_from(map).map_err(error)?;
        let mut value = BenchInput {
            notification: [0; MAX_NOTIFICATION_SIZE],
            packet: [0; BENCH_TRACE_PAYLOAD_LEN],
            len: notification.len() as u32,
            fake_map: [BENCH_FAKE_MAP_ID, 0],
        };
        let n = notification.len().min(MAX_NOTIFICATION_SIZE);
        value.notification[..n].copy_from_slice(&notification[..n]);
        input.set(0, value, 0).map_err(error)
    }

    /// Where the counting maps are pinned (`<pin dir>/<layout version>`).
    pub fn pins(&self) -> &Path {
        &self.pins
    }

    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    /// The flow and world-port tables of the pinned maps, mapped.
    pub fn tables(&self) -> &FlowTables {
        &self.tables
    }

    /// For the benchmark, which takes `BENCH_EVENTS` out to read it.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// A loaded program of this object, for timing it.
    pub fn program(&self, name: &str) -> Result<&SchedClassifier, ReplayError> {
        let missing = || ReplayError::Program {
            program: name.to_string(),
            source: Box::new(aya::programs::ProgramError::UnexpectedProgramType),
        };
        self.ebpf
            .program(name)
            .ok_or_else(missing)?
            .try_into()
            .map_err(|source| ReplayError::Program { program: name.to_string(), source: Box::new(source) })
    }
}

/// Runs the replay program of `ebpf` `repeat` times on one notification.
pub fn replay_with(ebpf: &Ebpf, notification: &[u8], repeat: u32) -> Result<(), ReplayError> {
    let program_error = |source| ReplayError::Program { program: REPLAY.to_string(), source: Box::new(source) };
    let prog: &SchedClassifier = ebpf
        .program(REPLAY)
        .ok_or_else(|| program_error(aya::programs::ProgramError::UnexpectedProgramType))?
        .try_into()
        .map_err(program_error)?;
    // BPF_PROG_TEST_RUN wants at least an Ethernet header's worth of data.
    let mut data = notification.to_vec();
    let len = data.len();
    if len < 14 {
        data.resize(14, 0);
    }
    prog.test_run(TestRunOptions { data_in: Some(&data[..len.max(14)]), repeat, ..Default::default() })
        .map_err(program_error)?;
    Ok(())
}

fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier, ReplayError> {
    let error = |source| ReplayError::Program { program: name.to_string(), source: Box::new(source) };
    ebpf.program_mut(name)
        .ok_or_else(|| error(aya::programs::ProgramError::UnexpectedProgramType))?
        .try_into()
        .map_err(error)
}

//! Drives the Cilium-compatible emitter (tests, demo, benchmark): loads
//! `cilium-emitter`, pins its `cilium_events` map where Cilium would, and
//! writes notifications through `bpf_perf_event_output` from a tc program,
//! exactly as Cilium's datapath does.

use std::path::Path;

use aya::{
    Ebpf, EbpfLoader,
    maps::PerCpuArray,
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use thiserror::Error;

use crate::objects::EMITTER_OBJECT;

#[derive(Debug, Error)]
pub enum EmitterError {
    #[error("loading the emitter with cilium_events pinned at {path}: {source}")]
    Load { path: String, source: Box<aya::EbpfError> },
    #[error("emitter program {program}: {source}")]
    Program { program: &'static str, source: Box<aya::programs::ProgramError> },
    #[error("emitter map EMITTED: {0}")]
    Map(#[from] aya::maps::MapError),
}

/// Which perf event array a notification goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The map the tap follows.
    CiliumEvents,
    /// Any other map; the tap must ignore it.
    OtherEvents,
}

/// Counts kept by the emitter itself, independent of the agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EmittedCounts {
    /// Outputs attempted into `cilium_events`.
    pub cilium_events: u64,
    /// Of those, delivered to a perf reader (0 when nobody reads).
    pub delivered: u64,
    /// Outputs attempted into `other_events`.
    pub other_events: u64,
}

pub struct Emitter {
    ebpf: Ebpf,
}

impl Emitter {
    /// Loads the emitter; `cilium_events` is pinned at `events_path`
    /// (reused if it exists, so several emitters share one map).
    pub fn load(events_path: &Path) -> Result<Emitter, EmitterError> {
        if let Some(dir) = events_path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let ebpf =
            EbpfLoader::new().map_pin_path("cilium_events", events_path).load(EMITTER_OBJECT).map_err(|source| {
                EmitterError::Load { path: events_path.display().to_string(), source: Box::new(source) }
            })?;
        let mut emitter = Emitter { ebpf };
        for program in ["emit_cilium_events", "emit_other_events"] {
            emitter
                .program_mut(program)?
                .load()
                .map_err(|source| EmitterError::Program { program, source: Box::new(source) })?;
        }
        Ok(emitter)
    }

    fn program_mut(&mut self, program: &'static str) -> Result<&mut SchedClassifier, EmitterError> {
        let p = self.ebpf.program_mut(program).ok_or(EmitterError::Program {
            program,
            source: Box::new(aya::programs::ProgramError::UnexpectedProgramType),
        })?;
        p.try_into().map_err(|source| EmitterError::Program { program, source: Box::new(source) })
    }

    /// Emits `notification` `repeat` times (one BPF_PROG_TEST_RUN).
    pub fn emit(&self, target: Target, notification: &[u8], repeat: u32) -> Result<(), EmitterError> {
        let program = match target {
            Target::CiliumEvents => "emit_cilium_events",
            Target::OtherEvents => "emit_other_events",
        };
        let prog: &SchedClassifier = self
            .ebpf
            .program(program)
            .ok_or(EmitterError::Program {
                program,
                source: Box::new(aya::programs::ProgramError::UnexpectedProgramType),
            })?
            .try_into()
            .map_err(|source| EmitterError::Program { program, source: Box::new(source) })?;
        prog.test_run(TestRunOptions { data_in: Some(notification), repeat, ..Default::default() })
            .map_err(|source| EmitterError::Program { program, source: Box::new(source) })?;
        Ok(())
    }

    pub fn counts(&self) -> Result<EmittedCounts, EmitterError> {
        let map = self.ebpf.map("EMITTED").ok_or(aya::maps::MapError::InvalidName { name: "EMITTED".into() })?;
        let arr: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
        let sum = |i: u32| -> Result<u64, EmitterError> { Ok(arr.get(&i, 0)?.iter().sum()) };
        Ok(EmittedCounts { cilium_events: sum(0)?, delivered: sum(1)?, other_events: sum(2)? })
    }
}

//! Following Cilium's `cilium_events` map by its pin path.
//!
//! The tap filters on the kernel map ID, and Cilium recreates the map (new
//! ID) when its agent restarts or upgrades, so the ID is resolved again on
//! every tick and handed to the tap when it changes.

use std::path::PathBuf;

use aya::maps::{MapData, MapType};
use tracing::{info, warn};

/// Cilium's default pin path (`pkg/maps/eventsmap`, `defaults.TCGlobalsPath`).
pub const DEFAULT_PATH: &str = "/sys/fs/bpf/tc/globals/cilium_events";

/// What the agent currently knows about `cilium_events`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventsMapState {
    pub path: PathBuf,
    /// Kernel map ID, when the pin exists and is a perf event array.
    pub map_id: Option<u32>,
}

pub struct EventsMapFollower {
    state: EventsMapState,
}

impl EventsMapFollower {
    pub fn new(path: PathBuf) -> EventsMapFollower {
        EventsMapFollower { state: EventsMapState { path, map_id: None } }
    }

    pub fn state(&self) -> &EventsMapState {
        &self.state
    }

    /// Resolves the pin again; returns the new ID when it changed.
    pub fn refresh(&mut self) -> Option<Option<u32>> {
        let id = resolve(&self.state.path);
        if id == self.state.map_id {
            return None;
        }
        match id {
            Some(id) => info!(path = %self.state.path.display(), map_id = id, "following cilium_events"),
            None => warn!(path = %self.state.path.display(),
                "cilium_events is not pinned (Cilium not running, or another --cilium-events-map path); nothing is counted until it appears"),
        }
        self.state.map_id = id;
        Some(id)
    }
}

fn resolve(path: &std::path::Path) -> Option<u32> {
    let map = MapData::from_pin(path).ok()?;
    let info = map.info().ok()?;
    match info.map_type() {
        Ok(MapType::PerfEventArray) => Some(info.id()),
        other => {
            warn!(path = %path.display(), map_type = ?other, "pinned cilium_events is not a perf event array; ignoring it");
            None
        }
    }
}

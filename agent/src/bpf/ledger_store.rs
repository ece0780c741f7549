//! Pinned storage of the flow ledger (`FLOW_LEDGER`), so that the bases
//! that keep flow counters monotonic across LRU evictions survive an agent
//! restart, a crash or an upgrade, like the kernel counters themselves.
//! Only changed records are written after each read.

use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, MapError};
use tracing::warn;
use verdict_common::maps::{FLOW_LEDGER, FlowKey, LedgerRecord};

pub struct LedgerStore {
    map: HashMap<MapData, FlowKey, LedgerRecord>,
    path: PathBuf,
    full_warned: bool,
}

impl LedgerStore {
    /// Opens the pinned ledger under `pins`, or creates and pins it. A
    /// pinned ledger of another shape is replaced (its bases start over).
    pub fn open(pins: &Path, capacity: u32) -> Result<LedgerStore, MapError> {
        let path = pins.join(FLOW_LEDGER);
        if path.exists() {
            let shaped = MapData::from_pin(&path).and_then(|m| {
                let i = m.info()?;
                let ok = i.key_size() as usize == size_of::<FlowKey>()
                    && i.value_size() as usize == size_of::<LedgerRecord>()
                    && i.max_entries() == capacity;
                Ok((m, ok))
            });
            match shaped {
                Ok((data, true)) => {
                    let map = HashMap::try_from(Map::HashMap(data))?;
                    return Ok(LedgerStore { map, path, full_warned: false });
                }
                _ => {
                    warn!(path = %path.display(), "pinned flow ledger has another shape (resized?); starting a new one");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let map: HashMap<MapData, FlowKey, LedgerRecord> = HashMap::create(capacity, 0)?;
        // Pinning consumes the handle; reopen through the pin.
        map.pin(&path).map_err(|error| MapError::PinError { name: Some(FLOW_LEDGER.into()), error })?;
        let map = HashMap::try_from(Map::HashMap(MapData::from_pin(&path)?))?;
        Ok(LedgerStore { map, path, full_warned: false })
    }

    pub fn load(&self) -> Vec<(FlowKey, LedgerRecord)> {
        self.map.iter().filter_map(Result::ok).collect()
    }

    /// Writes changed records and removes dropped ones.
    pub fn write(&mut self, changed: &[(FlowKey, LedgerRecord)], removed: &[FlowKey]) {
        for key in removed {
            let _ = self.map.remove(key);
        }
        for (key, record) in changed {
            if let Err(e) = self.map.insert(key, record, 0)
                && !self.full_warned
            {
                warn!(path = %self.path.display(), error = %e,
                    "flow ledger full: bases of some flows will not survive a restart; raise --max-retained-flows");
                self.full_warned = true;
            }
        }
    }
}

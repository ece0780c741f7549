//! Pinned storage of the flow ledger (`FLOW_LEDGER`), so that the bases
//! that keep flow counters monotonic across LRU evictions survive an agent
//! restart, a crash or an upgrade, like the kernel counters themselves.
//! Only changed records are written after each read.

use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, MapError};
use thiserror::Error;
use tracing::warn;
use verdict_common::maps::{FLOW_LEDGER, FlowKey, LedgerRecord};

#[derive(Debug, Error)]
pub enum LedgerStoreError {
    #[error(
        "cannot open the pinned flow ledger {path}; it holds the bases that keep flow counters monotonic, \
         so it is not replaced: fix its permissions, or remove it by hand to start the bases over"
    )]
    Unreadable {
        path: String,
        #[source]
        source: MapError,
    },
    #[error("cannot remove the flow ledger of another shape at {path}; remove it by hand")]
    Replace {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create and pin the flow ledger at {path}")]
    Create {
        path: String,
        #[source]
        source: MapError,
    },
}

pub struct LedgerStore {
    map: HashMap<MapData, FlowKey, LedgerRecord>,
    path: PathBuf,
    full_warned: bool,
}

impl LedgerStore {
    /// Opens the pinned ledger under `pins`, or creates and pins it. A
    /// pinned ledger of another shape is replaced (its bases start over,
    /// and the log says so); one that cannot be opened is an error.
    pub fn open(pins: &Path, capacity: u32) -> Result<LedgerStore, LedgerStoreError> {
        let path = pins.join(FLOW_LEDGER);
        let unreadable = |source| LedgerStoreError::Unreadable { path: path.display().to_string(), source };
        if path.exists() {
            let data = MapData::from_pin(&path).map_err(unreadable)?;
            let i = data.info().map_err(unreadable)?;
            let shape = (i.key_size() as usize, i.value_size() as usize, i.max_entries());
            if shape == (size_of::<FlowKey>(), size_of::<LedgerRecord>(), capacity) {
                let map = HashMap::try_from(Map::HashMap(data)).map_err(unreadable)?;
                return Ok(LedgerStore { map, path, full_warned: false });
            }
            warn!(path = %path.display(), pinned_entries = shape.2, wanted_entries = capacity,
                pinned_key = shape.0, pinned_value = shape.1,
                "pinned flow ledger has another shape (resized?); replacing it: the bases of evicted flows are lost, \
                 their exported flow totals may restart lower");
            std::fs::remove_file(&path)
                .map_err(|source| LedgerStoreError::Replace { path: path.display().to_string(), source })?;
        }
        let create = |source| LedgerStoreError::Create { path: path.display().to_string(), source };
        let map: HashMap<MapData, FlowKey, LedgerRecord> = HashMap::create(capacity, 0).map_err(create)?;
        // Pinning consumes the handle; reopen through the pin.
        map.pin(&path).map_err(|error| create(MapError::PinError { name: Some(FLOW_LEDGER.into()), error }))?;
        let map = HashMap::try_from(Map::HashMap(MapData::from_pin(&path).map_err(create)?)).map_err(create)?;
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

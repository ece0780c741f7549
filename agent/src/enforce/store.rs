//! The trials, durable on the node: one JSON file in the state directory,
//! replaced atomically (temp file, fsync, rename, fsync of the directory),
//! so a restarted agent finds either the old record or the new one, never
//! half of one.

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::record::TrialRecord;

/// File name inside `--state-dir`.
pub const FILE_NAME: &str = "enforcement-trials.json";

/// Finished trials kept for `--status` and audit; active ones are never dropped.
const KEEP_FINISHED: usize = 100;

/// The file's layout version: a newer agent's file is refused, not guessed at.
const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot create the enforcement state directory {}; mount a writable hostPath there (chart: \
         enforcement.stateDir) or pass --state-dir",
        dir.display()
    )]
    CreateDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the trial record {}; enforcement is refused until it can be written", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the trial record {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the trial record {} is not readable as verdict-agent's format {FORMAT}; move it aside only after checking \
         the endpoints it names with `cilium-dbg endpoint config ID`",
        path.display()
    )]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Serialize, Deserialize)]
struct TrialFile {
    format: u32,
    trials: Vec<TrialRecord>,
}

/// The trial file in one state directory.
#[derive(Clone, Debug)]
pub struct TrialStore {
    dir: PathBuf,
}

impl TrialStore {
    pub fn new(dir: impl Into<PathBuf>) -> TrialStore {
        TrialStore { dir: dir.into() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// Every recorded trial; none when the file does not exist yet.
    pub fn load(&self) -> Result<Vec<TrialRecord>, StoreError> {
        let path = self.path();
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        let file: TrialFile =
            serde_json::from_slice(&text).map_err(|source| StoreError::Decode { path: path.clone(), source })?;
        if file.format != FORMAT {
            let source = serde::de::Error::custom(format!("format {} (this agent writes {FORMAT})", file.format));
            return Err(StoreError::Decode { path, source });
        }
        Ok(file.trials)
    }

    /// Replaces the file with `trials` (the oldest finished ones beyond
    /// [`KEEP_FINISHED`] left out).
    pub fn save(&self, trials: &[TrialRecord]) -> Result<(), StoreError> {
        fs::create_dir_all(&self.dir).map_err(|source| StoreError::CreateDir { dir: self.dir.clone(), source })?;
        let finished = trials.iter().filter(|t| !t.is_active()).count();
        let mut skip = finished.saturating_sub(KEEP_FINISHED);
        let kept: Vec<TrialRecord> = trials
            .iter()
            .filter(|t| {
                if skip > 0 && !t.is_active() {
                    skip -= 1;
                    return false;
                }
                true
            })
            .cloned()
            .collect();
        let body =
            serde_json::to_vec_pretty(&TrialFile { format: FORMAT, trials: kept }).expect("trial records serialize");
        let path = self.path();
        write_atomically(&self.dir, &path, &body).map_err(|source| StoreError::Write { path, source })
    }
}

fn write_atomically(dir: &Path, path: &Path, body: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{FILE_NAME}.tmp"));
    {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    // The rename itself is durable only once the directory is synced.
    File::open(dir)?.sync_all()
}

//! A bpffs pin directory of a test's own (per process, so parallel test
//! binaries never share pins), removed when dropped.

use std::path::PathBuf;

pub struct PinDir(pub PathBuf);

impl PinDir {
    /// `/sys/fs/bpf/verdict-NAME-PID`, emptied first.
    pub fn new(name: &str) -> PinDir {
        let p = PathBuf::from(format!("/sys/fs/bpf/verdict-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        PinDir(p)
    }

    pub fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

//! Idempotent installers (in progress).
pub fn setup_all() -> anyhow::Result<()> {
    Ok(())
}

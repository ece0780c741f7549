//! QEMU harness (in progress).
#[derive(clap::Args)]
pub struct VmArgs {}
pub fn run_cli(_: VmArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}

//! deploy/ rendering and checks (in progress).
#[derive(clap::Args)]
pub struct DeployArgs {}
pub fn run_cli(_: DeployArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}

//! `kubectl verdict`: a kubectl plugin (a binary named `kubectl-verdict` on
//! the PATH) for verdict-agent across the cluster; see `verdict_agent::kubectl`.

use std::process::ExitCode;

use clap::Parser as _;
use verdict_agent::kubectl::{self, KubectlArgs};

fn main() -> ExitCode {
    let args = KubectlArgs::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kubectl verdict: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let code = runtime.block_on(async {
        let client = match kubectl::client(args.context.as_deref()).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("kubectl verdict: {}", verdict_agent::errors::chain(&e));
                return 2;
            }
        };
        let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
        kubectl::run_with(args, client, &mut out, &mut err).await
    });
    ExitCode::from(code)
}

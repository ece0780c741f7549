//! Running `verdict-agent run` as a child process, like a DaemonSet would.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{
    privileges::PodPrivileges,
    scrape::{Scrape, http_get, scrape},
};

pub struct AgentProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

/// The `verdict-agent` binary next to the running test binary (cargo puts
/// both in target/<profile>/), or $VERDICT_AGENT_BIN.
pub fn agent_binary() -> PathBuf {
    if let Ok(p) = std::env::var("VERDICT_AGENT_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("verdict-agent")
}

impl AgentProcess {
    /// Starts the agent with `args` (after `run`) listening on `addr`, and
    /// waits until /readyz answers 200.
    pub fn start(addr: SocketAddr, args: &[&str], log: &Path) -> anyhow::Result<AgentProcess> {
        AgentProcess::start_as(&addr.to_string(), addr, args, log, None)
    }

    /// Like `start`, with `--listen listen` (e.g. `[::]:PORT`) and readiness
    /// polled at `addr`.
    pub fn start_on(listen: &str, addr: SocketAddr, args: &[&str], log: &Path) -> anyhow::Result<AgentProcess> {
        AgentProcess::start_as(listen, addr, args, log, None)
    }

    /// Like [`AgentProcess::start_on`], with exactly `privileges` (a pod's
    /// securityContext) instead of this process's.
    pub fn start_as(
        listen: &str,
        addr: SocketAddr,
        args: &[&str],
        log: &Path,
        privileges: Option<&PodPrivileges>,
    ) -> anyhow::Result<AgentProcess> {
        let bin = agent_binary();
        if !bin.exists() {
            bail!(
                "{} does not exist: build it first with `cargo build -p verdict-agent` (cargo xtask test does)",
                bin.display()
            );
        }
        let logf = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new(&bin);
        command.arg("run").arg("--listen").arg(listen).args(args).stdout(Stdio::null()).stderr(logf);
        if let Some(p) = privileges {
            p.apply(&mut command)?;
        }
        let child = command.spawn().with_context(|| format!("starting {}", bin.display()))?;
        let mut agent = AgentProcess { child, addr, log: log.to_path_buf() };
        agent.wait_ready(Duration::from_secs(60))?;
        Ok(agent)
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait()? {
                bail!("agent exited with {status} before becoming ready; log:\n{}", self.log_text());
            }
            if let Ok((200, _)) = http_get(self.addr, "/readyz") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("agent not ready after {timeout:?}; log:\n{}", self.log_text())
    }

    /// Runs `verdict-agent run <args>` expecting it to fail at start:
    /// waits (at most `timeout`) for it to exit and returns its exit code
    /// and stderr. An agent that is still running then is killed and
    /// reported as an error.
    pub fn run_to_failure(
        args: &[&str],
        privileges: Option<&PodPrivileges>,
        timeout: Duration,
    ) -> anyhow::Result<(Option<i32>, String)> {
        let bin = agent_binary();
        let log = std::env::temp_dir().join(format!("verdict-agent-fail-{}.log", std::process::id()));
        let logf = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new(&bin);
        command.arg("run").args(args).stdout(Stdio::null()).stderr(logf);
        if let Some(p) = privileges {
            p.apply(&mut command)?;
        }
        let mut child = command.spawn().with_context(|| format!("starting {}", bin.display()))?;
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the agent kept running for {timeout:?}; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        Ok((status.code(), text))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn scrape(&self) -> anyhow::Result<Scrape> {
        scrape(self.addr)
    }

    /// Scrapes until `pred` holds (the agent reads its maps on an interval).
    pub fn scrape_until(&self, timeout: Duration, pred: impl Fn(&Scrape) -> bool) -> anyhow::Result<Scrape> {
        let start = Instant::now();
        loop {
            let s = self.scrape()?;
            if pred(&s) || start.elapsed() > timeout {
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGTERM and wait; returns whether it exited cleanly.
    pub fn stop(mut self) -> anyhow::Result<bool> {
        // SAFETY: plain kill(2) on our child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait()?;
        Ok(status.success())
    }

    /// SIGKILL, as a crash or an OOM kill would.
    pub fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

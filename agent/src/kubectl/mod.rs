//! `kubectl verdict` (the `kubectl-verdict` binary, a kubectl plugin): the
//! cluster-wide view. Every node's agent is reached through the API server
//! (see [`forward`]), so the plugin needs a kubeconfig, not a shell on a
//! node:
//!
//! - `readiness`: one line per node, and preflight's exit codes for the
//!   cluster (the worst node decides; a node whose agent cannot be asked
//!   is unknown, never safe);
//! - `preflight --node N`, `enforce --node N`: the agent CLI's own
//!   commands, unchanged, against that node's agent (a trial is still run
//!   by the agent on the node, never by this process);
//! - `trials [NAME] [--abort]`: the `AuditModeTrial` rollouts, where each
//!   node stands, and a way to stop one.

pub mod agents;
pub mod forward;
pub mod readiness;
pub mod trials;

use std::{io::Write, time::Duration};

use kube::Client;

use crate::{
    enforce::cli::EnforceArgs,
    preflight::{EXIT_ERROR, PreflightArgs},
};

/// `kubectl verdict`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "kubectl-verdict",
    bin_name = "kubectl verdict",
    version,
    about = "verdict-agent across the cluster: readiness of every node, preflight and enforcement trials on any node, \
             and AuditModeTrial rollouts, through the API server.",
    after_help = "Exit codes (readiness, preflight, enforce): 0 safe or done, 1 something would break, 2 error, \
                  3 not enough evidence (or a node's agent could not be asked). Needs RBAC: list pods in the agent \
                  namespace, create pods/portforward there, list nodes; for trials get/list/patch \
                  auditmodetrials.verdict-agent.io."
)]
pub struct KubectlArgs {
    #[command(subcommand)]
    pub command: KubectlCommand,
    /// The kubeconfig context (default: the current one; KUBECONFIG is honoured).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Where the chart runs the agents.
    #[arg(long, global = true, default_value = agents::DEFAULT_NAMESPACE)]
    pub agent_namespace: String,
    /// Label selector of the agent pods.
    #[arg(long, global = true, default_value = agents::DEFAULT_SELECTOR)]
    pub agent_selector: String,
}

#[derive(Debug, clap::Subcommand)]
pub enum KubectlCommand {
    /// Readiness of every node, one line each; exit codes as preflight's, for the whole cluster.
    Readiness(readiness::ReadinessArgs),
    /// `verdict-agent preflight` against the agent of one node.
    #[command(mut_arg("agent", |a| a.hide(true)))]
    Preflight {
        /// The node whose agent answers.
        #[arg(long)]
        node: String,
        #[command(flatten)]
        args: PreflightArgs,
    },
    /// `verdict-agent enforce` against the agent of one node: the trial runs in that agent, which reverts it by
    /// itself.
    #[command(mut_arg("agent", |a| a.hide(true)))]
    Enforce {
        /// The node whose agent runs the trial.
        #[arg(long)]
        node: String,
        #[command(flatten)]
        args: EnforceArgs,
    },
    /// AuditModeTrial rollouts and each node's phase; --abort NAME stops one.
    Trials(trials::TrialsArgs),
}

#[derive(Debug, thiserror::Error)]
pub enum KubectlError {
    #[error("cannot load the kubeconfig{}; set KUBECONFIG or --context", context.as_deref().map(|c| format!(" (context {c})")).unwrap_or_default())]
    Kubeconfig {
        context: Option<String>,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot open a local port for the port-forward to {agent}")]
    Door {
        agent: String,
        #[source]
        source: std::io::Error,
    },
}

/// A client from the kubeconfig (or the pod's service account).
pub async fn client(context: Option<&str>) -> Result<Client, KubectlError> {
    let wrap = |source: Box<dyn std::error::Error + Send + Sync>| KubectlError::Kubeconfig {
        context: context.map(str::to_owned),
        source,
    };
    let config = match context {
        Some(c) => kube::Config::from_kubeconfig(&kube::config::KubeConfigOptions {
            context: Some(c.to_owned()),
            ..Default::default()
        })
        .await
        .map_err(|e| wrap(Box::new(e)))?,
        None => kube::Config::infer().await.map_err(|e| wrap(Box::new(e)))?,
    };
    crate::enrich::kubernetes::client_from_config(config).map_err(|e| wrap(Box::new(e)))
}

/// Runs `kubectl verdict`; returns the exit code.
pub async fn run_with(args: KubectlArgs, client: Client, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let result = match args.command {
        KubectlCommand::Readiness(r) => {
            return readiness::run(&client, &args.agent_namespace, &args.agent_selector, &r, out, err).await;
        }
        KubectlCommand::Trials(t) => trials::run(&client, &t, out).await.map(|()| 0).map_err(Into::into),
        KubectlCommand::Preflight { node, args: mut pre } => {
            match door(&client, &args.agent_namespace, &args.agent_selector, &node).await {
                Ok(door) => {
                    pre.agent = door.url.clone();
                    return crate::preflight::run_with(pre, out, err).await;
                }
                Err(e) => Err(e),
            }
        }
        KubectlCommand::Enforce { node, args: mut enforce } => {
            match door(&client, &args.agent_namespace, &args.agent_selector, &node).await {
                Ok(door) => {
                    enforce.agent = door.url.clone();
                    enforce.command = format!("kubectl verdict enforce --node {node}");
                    return crate::enforce::cli::run_with(enforce, out, err).await;
                }
                Err(e) => Err(e),
            }
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(err, "kubectl verdict: {}", crate::errors::chain(e.as_ref()));
            EXIT_ERROR
        }
    }
}

/// The port-forward door to `node`'s agent.
async fn door(
    client: &Client,
    namespace: &str,
    selector: &str,
    node: &str,
) -> Result<forward::Door, Box<dyn std::error::Error + Send + Sync>> {
    let agents = agents::list_agents(client, namespace, selector).await?;
    let agent = agents::on_node(&agents, node)?;
    Ok(forward::Door::open(client, agent)
        .await
        .map_err(|source| KubectlError::Door { agent: agent.display(), source })?)
}

/// How long one agent may take to answer, by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests;

//! `kubectl verdict readiness`: every node's answer to "is it safe to leave
//! audit mode here?", side by side. Each agent is asked exactly as
//! `preflight` asks it; a node without an agent, or whose agent cannot be
//! asked, is UNKNOWN: the cluster is never called safe over a node nobody
//! could see.

use std::{io::Write, time::Duration};

use futures::future::join_all;
use kube::Client;
use serde::Serialize;

use super::{
    agents::{self, AgentPod},
    forward::Door,
};
use crate::{
    preflight::{
        self, EXIT_ERROR, EXIT_NO_EVIDENCE, EXIT_SAFE, EXIT_WOULD_BREAK, fetch_report_with_timeout, parse_duration_arg,
        rejudge_report,
    },
    readiness::report::{EndpointReadiness, ReadinessState},
    text::{escape_for_terminal as escape, neutralize},
};

#[derive(Debug, Clone, clap::Args)]
pub struct ReadinessArgs {
    /// Only these endpoints on every node: `host`, an endpoint ID, or NAMESPACE/POD (or NAMESPACE/*).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Judge on this evidence period instead of each agent's (as `preflight --window`).
    #[arg(long, value_parser = parse_duration_arg)]
    pub window: Option<Duration>,
    /// Seconds to wait for each agent.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    /// table, or json (one object per node, and the exit code).
    #[arg(long, short = 'o', value_enum, default_value_t = preflight::OutputFormat::Table)]
    pub output: preflight::OutputFormat,
}

/// One node's answer.
#[derive(Debug, Clone, Serialize)]
pub struct NodeAnswer {
    pub node: String,
    /// `namespace/pod` of its agent.
    pub agent: Option<String>,
    /// `ready`, `would_break`, `no_evidence`, or `unknown` (not asked).
    pub state: String,
    pub exit_code: u8,
    /// Why it is unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The endpoints the answer covers.
    pub endpoints: Vec<EndpointReadiness>,
}

#[derive(Debug, Serialize)]
struct ClusterAnswer<'a> {
    exit_code: u8,
    nodes: &'a [NodeAnswer],
    /// Whether nodes without an agent could be looked for (list nodes).
    nodes_listed: bool,
}

pub async fn run(
    client: &Client,
    namespace: &str,
    selector: &str,
    args: &ReadinessArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    let agents = match agents::list_agents(client, namespace, selector).await {
        Ok(a) => a,
        Err(e) => {
            let _ = writeln!(err, "kubectl verdict: {}", crate::errors::chain(&e));
            return EXIT_ERROR;
        }
    };
    let nodes = agents::list_nodes(client).await;
    let mut answers: Vec<NodeAnswer> = join_all(agents.iter().map(|a| ask(client, a, args))).await;
    if let Some(nodes) = &nodes {
        for node in nodes.iter().filter(|n| !agents.iter().any(|a| &a.node == *n)) {
            answers.push(NodeAnswer {
                node: node.clone(),
                agent: None,
                state: "unknown".into(),
                exit_code: EXIT_NO_EVIDENCE,
                error: Some(format!("no verdict-agent pod on this node (selector {selector:?} in {namespace})")),
                endpoints: Vec::new(),
            });
        }
    }
    answers.sort_by(|a, b| a.node.cmp(&b.node));
    let code = cluster_exit_code(&answers);
    let written = match args.output {
        preflight::OutputFormat::Table => print_table(&answers, nodes.is_some(), code, out),
        _ => {
            let body = ClusterAnswer { exit_code: code, nodes: &answers, nodes_listed: nodes.is_some() };
            serde_json::to_writer_pretty(&mut *out, &body).map_err(std::io::Error::other).and_then(|()| writeln!(out))
        }
    };
    match written {
        Ok(()) => code,
        Err(e) => {
            let _ = writeln!(err, "kubectl verdict: cannot write the result: {e}");
            EXIT_ERROR
        }
    }
}

/// The cluster's code: any node that would break, else any node unknown or
/// short of evidence, else safe.
pub fn cluster_exit_code(answers: &[NodeAnswer]) -> u8 {
    if answers.iter().any(|a| a.exit_code == EXIT_WOULD_BREAK) {
        EXIT_WOULD_BREAK
    } else if answers.is_empty() || answers.iter().any(|a| a.exit_code != EXIT_SAFE) {
        EXIT_NO_EVIDENCE
    } else {
        EXIT_SAFE
    }
}

async fn ask(client: &Client, agent: &AgentPod, args: &ReadinessArgs) -> NodeAnswer {
    let unknown = |error: String| NodeAnswer {
        node: agent.node.clone(),
        agent: Some(agent.display()),
        state: "unknown".into(),
        exit_code: EXIT_NO_EVIDENCE,
        error: Some(error),
        endpoints: Vec::new(),
    };
    let door = match Door::open(client, agent).await {
        Ok(d) => d,
        Err(e) => return unknown(format!("cannot open a local port for the port-forward: {e}")),
    };
    let timeout = Duration::from_secs(args.timeout);
    let report = match fetch_report_with_timeout(&door.url, args.endpoint.as_deref(), args.window, timeout).await {
        Ok(r) => r,
        // The door's own refusal: its message, without the loopback URL.
        Err(preflight::PreflightError::Status { status: 502, body, .. })
            if let Ok(serde_json::Value::String(error)) =
                serde_json::from_str::<serde_json::Value>(&body).map(|v| v["error"].clone()) =>
        {
            return unknown(error);
        }
        Err(e) => return unknown(crate::errors::chain(&e)),
    };
    let report = match args.window {
        Some(w) => rejudge_report(&report, w),
        None => report,
    };
    let selected: Vec<&EndpointReadiness> = match &args.endpoint {
        Some(sel) => report.select(sel),
        None => report.endpoints.iter().collect(),
    };
    if selected.is_empty() {
        return unknown(match &args.endpoint {
            Some(sel) => format!("no endpoint matches {sel:?} on this node"),
            None => "the agent reports no endpoint".into(),
        });
    }
    let state = preflight::worst_state(&selected);
    NodeAnswer {
        node: agent.node.clone(),
        agent: Some(agent.display()),
        state: state.as_str().into(),
        exit_code: preflight::exit_code(state),
        error: None,
        endpoints: selected.into_iter().cloned().collect(),
    }
}

fn answer_word(a: &NodeAnswer) -> &'static str {
    match a.exit_code {
        EXIT_SAFE => "SAFE",
        EXIT_WOULD_BREAK => "NOT SAFE",
        _ => "UNKNOWN",
    }
}

fn print_table(answers: &[NodeAnswer], nodes_listed: bool, code: u8, out: &mut dyn Write) -> std::io::Result<()> {
    let count = |a: &NodeAnswer, s: ReadinessState| a.endpoints.iter().filter(|e| e.state == s).count();
    let node_w = answers.iter().map(|a| a.node.len()).max().unwrap_or(4).max(4);
    let agent_w = answers.iter().map(|a| a.agent.as_deref().map_or(1, str::len)).max().unwrap_or(5).max(5);
    writeln!(
        out,
        "{:<node_w$}  {:<agent_w$}  {:<8}  {:>9}  {:>11}  {:>11}  HOST",
        "NODE", "AGENT", "ANSWER", "ENDPOINTS", "WOULD-BREAK", "NO-EVIDENCE"
    )?;
    for a in answers {
        let host = match (&a.error, a.endpoints.iter().find(|e| e.display_name() == "host")) {
            (Some(e), _) => neutralize(e, 200),
            (None, Some(h)) => format!("{} ({})", h.state.as_str(), h.reason.as_str()),
            (None, None) => "-".into(),
        };
        let n = |v: usize| if a.error.is_some() { "-".to_string() } else { v.to_string() };
        writeln!(
            out,
            "{:<node_w$}  {:<agent_w$}  {:<8}  {:>9}  {:>11}  {:>11}  {}",
            escape(&a.node),
            a.agent.as_deref().map(escape).unwrap_or_else(|| "-".into()),
            answer_word(a),
            n(a.endpoints.len()),
            n(count(a, ReadinessState::WouldBreak)),
            n(count(a, ReadinessState::NoEvidence)),
            host
        )?;
    }
    writeln!(out)?;
    for a in answers.iter().filter(|a| a.exit_code != EXIT_SAFE && a.error.is_none()) {
        for e in a.endpoints.iter().filter(|e| e.state != ReadinessState::Ready).take(5) {
            writeln!(
                out,
                "  {}: {} (endpoint {}) {}: {}",
                escape(&a.node),
                escape(&e.display_name()),
                e.endpoint_id,
                e.reason.as_str(),
                neutralize(&e.detail, 300)
            )?;
        }
        writeln!(out, "  details: kubectl verdict preflight --node {}", escape(&a.node))?;
    }
    if !nodes_listed {
        writeln!(out, "Nodes without an agent were not looked for (listing nodes was refused).")?;
    }
    let total = answers.len();
    let of = |c: u8| answers.iter().filter(|a| a.exit_code == c || (c == EXIT_NO_EVIDENCE && a.exit_code > 1)).count();
    match code {
        EXIT_SAFE => writeln!(out, "SAFE on all {total} node(s)."),
        EXIT_WOULD_BREAK => {
            writeln!(
                out,
                "NOT SAFE: switching PolicyAuditMode off would break traffic on {} of {total} node(s).",
                of(1)
            )
        }
        _ => writeln!(out, "UNKNOWN: {} of {total} node(s) could not be called safe.", of(EXIT_NO_EVIDENCE)),
    }
}

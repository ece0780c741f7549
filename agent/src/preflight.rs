//! `verdict-agent preflight`: ask a running agent whether switching
//! PolicyAuditMode off is safe, and say why not.
//!
//! Exit codes: 0 safe, 1 something would break, 3 not enough evidence
//! (the gate is named), 2 error (agent unreachable, bad answer).

use std::{io::Write, process::ExitCode, time::Duration};

use http_body_util::{BodyExt, Empty};
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;
use thiserror::Error;

pub use crate::analyze::OutputFormat;
use crate::{
    model::EndpointKind,
    readiness::{
        evaluate::rejudge,
        report::{EndpointReadiness, GateStatus, ReadinessReport, ReadinessState, Reason, Summary},
    },
    suggest::labels::{is_dns_label, is_dns_subdomain},
    text::{escape_for_terminal as escape, neutralize},
    timefmt::{format_duration, format_rfc3339},
};

pub const DEFAULT_AGENT: &str = "http://127.0.0.1:9975";

/// Exit codes, as documented in `--help`.
pub const EXIT_SAFE: u8 = 0;
pub const EXIT_WOULD_BREAK: u8 = 1;
pub const EXIT_ERROR: u8 = 2;
pub const EXIT_NO_EVIDENCE: u8 = 3;

/// `verdict-agent preflight`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Exit codes: 0 safe to switch PolicyAuditMode off, 1 something would break, \
                        2 error (agent unreachable, bad answer), 3 not enough evidence (the gate is named).")]
pub struct PreflightArgs {
    /// The endpoint to check: `host`, an endpoint ID, or NAMESPACE/POD. Default: every endpoint.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Judge on this evidence period instead of the agent's (e.g. 1h after a policy fix):
    /// only would-deny flows seen within it count, and the agent must have watched that long.
    #[arg(long, value_parser = parse_duration_arg)]
    pub window: Option<Duration>,
    /// The agent's HTTP address.
    #[arg(long, default_value = DEFAULT_AGENT)]
    pub agent: String,
    /// Seconds to wait for the agent.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    /// Output format: table (for people), json or yaml (the selected endpoints' readiness, as the agent's API
    /// answers it). The exit code is the same in every format.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// Write the result to this file instead of standard output.
    #[arg(long)]
    pub output_file: Option<std::path::PathBuf>,
}

/// clap value parser for durations: the one grammar of `crate::duration`
/// (`analyze` and `suggest` name it through here).
pub use crate::duration::arg as parse_duration_arg;

#[derive(Debug, Error)]
pub enum PreflightError {
    #[error("{url:?} is not an agent address (expected http://HOST:PORT, e.g. {DEFAULT_AGENT})")]
    BadUrl { url: String },
    #[error(
        "cannot reach the agent at {addr}: {source}; is `verdict-agent run` running there (kubectl -n kube-system port-forward ds/verdict-agent 9975)?"
    )]
    Connect { addr: String, source: std::io::Error },
    #[error("the agent at {addr} did not answer within {secs}s")]
    Timeout { addr: String, secs: u64 },
    #[error("HTTP exchange with the agent at {addr} failed: {source}")]
    Http { addr: String, source: hyper::Error },
    #[error("the agent at {url} answered {status}: {body}")]
    Status { url: String, status: u16, body: String },
    #[error(
        "the agent at {url} sent a readiness report this preflight cannot read ({source}); are the agent and CLI the same version?"
    )]
    Decode { url: String, source: serde_json::Error },
    #[error("the agent at {url} has no readiness report: {message}")]
    NotReady { url: String, message: String },
}

struct AgentUrl {
    host: String,
    port: u16,
    base: String,
}

fn parse_url(url: &str) -> Result<AgentUrl, PreflightError> {
    let bad = || PreflightError::BadUrl { url: url.into() };
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse::<u16>().map_err(|_| bad())?),
        _ => (authority, 80),
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok(AgentUrl { host: host.trim_start_matches('[').trim_end_matches(']').to_owned(), port, base: path.to_owned() })
}

fn encode_query(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET `/api/v1/readiness` from the agent (optionally `?endpoint=`).
pub async fn fetch_report(
    agent: &str,
    endpoint: Option<&str>,
    window: Option<Duration>,
) -> Result<ReadinessReport, PreflightError> {
    fetch_report_with_timeout(agent, endpoint, window, Duration::from_secs(10)).await
}

pub async fn fetch_report_with_timeout(
    agent: &str,
    endpoint: Option<&str>,
    window: Option<Duration>,
    timeout: Duration,
) -> Result<ReadinessReport, PreflightError> {
    let u = parse_url(agent)?;
    let addr = if u.host.contains(':') { format!("[{}]:{}", u.host, u.port) } else { format!("{}:{}", u.host, u.port) };
    let mut query = Vec::new();
    if let Some(e) = endpoint {
        query.push(format!("endpoint={}", encode_query(e)));
    }
    if let Some(w) = window {
        query.push(format!("window={}s", w.as_secs()));
    }
    let path = format!("{}/api/v1/readiness{}{}", u.base, if query.is_empty() { "" } else { "?" }, query.join("&"));
    let url = format!("http://{addr}{path}");
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|source| PreflightError::Connect { addr: addr.clone(), source })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| PreflightError::Http { addr: addr.clone(), source })?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::get(&path)
            .header(hyper::header::HOST, &addr)
            .header(hyper::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .expect("a GET with a path and two headers is a valid request");
        let resp =
            sender.send_request(req).await.map_err(|source| PreflightError::Http { addr: addr.clone(), source })?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|source| PreflightError::Http { addr: addr.clone(), source })?
            .to_bytes();
        driver.abort();
        Ok::<_, PreflightError>((status, body))
    };
    let (status, body) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| PreflightError::Timeout { addr: addr.clone(), secs: timeout.as_secs() })??;
    if status != 200 {
        let text = String::from_utf8_lossy(&body);
        return Err(PreflightError::Status { url, status, body: text.trim().chars().take(300).collect() });
    }
    // The agent answers `{"error": ...}` until its first evaluation.
    if let Ok(serde_json::Value::Object(m)) = serde_json::from_slice::<serde_json::Value>(&body)
        && m.len() == 1
        && let Some(serde_json::Value::String(message)) = m.get("error")
    {
        return Err(PreflightError::NotReady { url, message: message.clone() });
    }
    serde_json::from_slice(&body).map_err(|source| PreflightError::Decode { url, source })
}

/// The report judged on another evidence period (see `rejudge`).
pub fn rejudge_report(report: &ReadinessReport, window: Duration) -> ReadinessReport {
    let mut out = report.clone();
    out.endpoints = report.endpoints.iter().map(|e| rejudge(e, report.generated_at, window)).collect();
    let mut summary = Summary { endpoints: out.endpoints.len(), ..report.summary.clone() };
    summary.ready = 0;
    summary.would_break = 0;
    summary.no_evidence = 0;
    summary.reasons.clear();
    for e in &out.endpoints {
        match e.state {
            ReadinessState::Ready => summary.ready += 1,
            ReadinessState::WouldBreak => summary.would_break += 1,
            ReadinessState::NoEvidence => summary.no_evidence += 1,
        }
        *summary.reasons.entry(e.reason.as_str().to_owned()).or_default() += 1;
    }
    out.summary = summary;
    out
}

/// Runs `preflight`.
pub async fn run(args: PreflightArgs) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    Ok(ExitCode::from(run_with(args, &mut stdout, &mut stderr).await))
}

/// `run` with its output streams; returns the exit code.
pub async fn run_with(args: PreflightArgs, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let report = match fetch_report_with_timeout(
        &args.agent,
        args.endpoint.as_deref(),
        args.window,
        Duration::from_secs(args.timeout),
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(err, "preflight: {e}");
            return EXIT_ERROR;
        }
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
        let _ = writeln!(
            err,
            "preflight: the agent at {} reports no endpoint matching {:?}; use `host`, an endpoint ID, or NAMESPACE/POD \
             (run preflight without --endpoint to list them)",
            args.agent,
            args.endpoint.as_deref().unwrap_or("")
        );
        return EXIT_ERROR;
    }
    let mut text = Vec::new();
    let code = match args.output {
        OutputFormat::Table => print_outcome(&report, &selected, args.window, &mut text),
        OutputFormat::Json | OutputFormat::Yaml => print_outcome(&report, &selected, args.window, &mut std::io::sink())
            .and_then(|code| {
                let mut chosen = report.clone();
                chosen.endpoints = selected.iter().map(|e| (*e).clone()).collect();
                let body = if args.output == OutputFormat::Json {
                    serde_json::to_string_pretty(&chosen).map(|s| s + "\n").map_err(std::io::Error::other)
                } else {
                    serde_yaml::to_string(&chosen).map_err(std::io::Error::other)
                }?;
                text.extend_from_slice(body.as_bytes());
                Ok(code)
            }),
    };
    let written = code.and_then(|code| {
        match &args.output_file {
            Some(path) => std::fs::write(path, &text).map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot write {}: {e}; check --output-file", path.display()))
            })?,
            None => out.write_all(&text)?,
        }
        Ok(code)
    });
    match written {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(err, "preflight: cannot write the result: {e}");
            EXIT_ERROR
        }
    }
}

fn pad(s: &str, w: usize) -> String {
    format!("{s:<w$}")
}

/// A short flow list: direction, remote, port, protocol, notifications.
fn print_flows(
    out: &mut dyn Write,
    flows: &[crate::readiness::report::FlowEntry],
    left_out: usize,
) -> std::io::Result<()> {
    for f in flows {
        writeln!(
            out,
            "  {}  {}  {}  {}  {}  match {}",
            pad(f.direction.as_str(), 9),
            pad(&escape(&f.remote_name), 24),
            pad(&f.port.to_string(), 6),
            pad(&escape(&f.protocol), 6),
            pad(&f.notifications.to_string(), 8),
            escape(&f.match_type)
        )?;
    }
    if left_out > 0 {
        writeln!(out, "  ... and {left_out} more, not listed")?;
    }
    Ok(())
}

fn print_outcome(
    report: &ReadinessReport,
    selected: &[&EndpointReadiness],
    window: Option<Duration>,
    out: &mut dyn Write,
) -> std::io::Result<u8> {
    writeln!(
        out,
        "Readiness at {}{} (evidence period {}, window {})",
        format_rfc3339(report.generated_at),
        report.node.as_deref().map(|n| format!(" on node {}", escape(n))).unwrap_or_default(),
        format_duration(window.unwrap_or(Duration::from_secs(report.config.min_evidence_seconds))),
        format_duration(Duration::from_secs(report.config.window_seconds)),
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{}  {}  {}  {}  {}  DENY-RULE",
        pad("ENDPOINT", 36),
        pad("STATE", 12),
        pad("REASON", 26),
        pad("WOULD-DENY", 10),
        pad("DENIED", 6)
    )?;
    for e in selected {
        writeln!(
            out,
            "{}  {}  {}  {}  {}  {}",
            pad(&format!("{} ({})", e.display_name(), e.endpoint_id), 36),
            pad(e.state.as_str(), 12),
            pad(e.reason.as_str(), 26),
            pad(&e.would_deny_flows().to_string(), 10),
            pad(&(e.denied.len() + e.left_out.denied).to_string(), 6),
            e.explicit_deny.len() + e.left_out.explicit_deny
        )?;
    }
    for e in selected.iter().filter(|e| !e.denied.is_empty()) {
        writeln!(out)?;
        writeln!(out, "Denied now on {} (endpoint {}):", e.display_name(), e.endpoint_id)?;
        print_flows(out, &e.denied, e.left_out.denied)?;
    }
    for e in selected.iter().filter(|e| !e.explicit_deny.is_empty()) {
        writeln!(out)?;
        writeln!(
            out,
            "Matched a deny rule on {} (endpoint {}): enforcement drops these on purpose; no allow is suggested:",
            e.display_name(),
            e.endpoint_id
        )?;
        print_flows(out, &e.explicit_deny, e.left_out.explicit_deny)?;
    }
    for e in selected.iter().filter(|e| !e.would_deny.is_empty() && e.state == ReadinessState::WouldBreak) {
        writeln!(out)?;
        writeln!(out, "Would break on {} (endpoint {}):", e.display_name(), e.endpoint_id)?;
        writeln!(
            out,
            "  {}  {}  {}  {}  {}  {}  LAST SEEN / SERVICE",
            pad("DIRECTION", 9),
            pad("REMOTE", 16),
            pad("IDENTITY", 12),
            pad("PORT", 6),
            pad("PROTO", 6),
            pad("NOTIFICATIONS", 13)
        )?;
        for f in &e.would_deny {
            writeln!(
                out,
                "  {}  {}  {}  {}  {}  {}  {}{}",
                pad(f.direction.as_str(), 9),
                pad(&escape(&f.remote), 16),
                pad(&escape(&f.remote_name), 12),
                pad(&f.port.to_string(), 6),
                pad(&escape(&f.protocol), 6),
                pad(&f.notifications.to_string(), 13),
                format_rfc3339(f.last_seen),
                f.service.as_deref().map(|s| format!("  {} (critical)", escape(s))).unwrap_or_default()
            )?;
        }
        if e.left_out.would_deny > 0 {
            writeln!(
                out,
                "  ... and {} more, not listed (the agent lists critical flows, then the {} most recently seen)",
                e.left_out.would_deny,
                crate::readiness::report::MAX_LISTED_FLOWS
            )?;
        }
    }
    let host_selected = selected.iter().any(|e| e.kind == EndpointKind::Host);
    if host_selected && (!report.lockout.risk.is_empty() || !report.lockout.in_progress.is_empty()) {
        writeln!(out)?;
        for (title, list) in [
            ("Host lockout risk (audited critical flows)", &report.lockout.risk),
            ("Host lockout IN PROGRESS (denied critical flows)", &report.lockout.in_progress),
        ] {
            if list.is_empty() {
                continue;
            }
            writeln!(out, "{title}:")?;
            for r in list {
                writeln!(
                    out,
                    "  {} ({} notifications, last {})",
                    r.describe(),
                    r.notifications,
                    format_rfc3339(r.last_seen)
                )?;
            }
        }
    }
    // Named endpoints show all their gates; a whole node shows the gates
    // of the endpoints that are not ready (a node has many pods).
    let gated = selected.iter().filter(|e| selected.len() == 1 || e.state != ReadinessState::Ready);
    for e in gated {
        writeln!(out)?;
        writeln!(out, "Evidence gates for {} (endpoint {}):", e.display_name(), e.endpoint_id)?;
        for g in &e.gates {
            let status = match (g.status, g.holds_back()) {
                (GateStatus::Passed, _) => "passed ",
                (GateStatus::Failed, true) => "FAILED ",
                (GateStatus::Failed, false) => "failed ",
                (GateStatus::Unknown, true) => "UNKNOWN",
                (GateStatus::Unknown, false) => "unknown",
            };
            let dir = g.direction.map(|d| format!(" ({})", d.as_str())).unwrap_or_default();
            let src = g
                .source
                .map(|s| {
                    format!(
                        " [{}]",
                        serde_json::to_value(s).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
                    )
                })
                .unwrap_or_default();
            writeln!(out, "  [{status}] {}{dir}{src}: {}", g.name, neutralize(&g.detail, 4096))?;
        }
    }
    writeln!(out)?;
    match worst_state(selected) {
        ReadinessState::WouldBreak => {
            let n: usize = selected.iter().filter(|e| e.state == ReadinessState::WouldBreak).count();
            writeln!(
                out,
                "NOT SAFE: switching PolicyAuditMode off would break traffic on {n} endpoint(s) listed above."
            )?;
            writeln!(
                out,
                "Allow the flows you need (`verdict-agent suggest{}`), then check again.",
                selected_arg(selected)
            )?;
            Ok(EXIT_WOULD_BREAK)
        }
        ReadinessState::NoEvidence => {
            writeln!(out, "UNKNOWN: not enough evidence to call it safe.")?;
            for e in selected.iter().filter(|e| e.state == ReadinessState::NoEvidence) {
                let gates: Vec<String> = e
                    .gates
                    .iter()
                    .filter(|g| g.holds_back() && g.cause == Some(e.reason))
                    .map(|g| {
                        format!("{}{}", g.name, g.direction.map(|d| format!(" ({})", d.as_str())).unwrap_or_default())
                    })
                    .collect();
                writeln!(
                    out,
                    "  {} (endpoint {}): {} — gate {}: {}",
                    e.display_name(),
                    e.endpoint_id,
                    e.reason.as_str(),
                    if gates.is_empty() { "-".into() } else { gates.join(", ") },
                    e.detail
                )?;
            }
            Ok(EXIT_NO_EVIDENCE)
        }
        ReadinessState::Ready => {
            writeln!(out, "SAFE: nothing seen would be denied and every evidence gate passed.")?;
            print_switch_commands(report, selected, out)?;
            Ok(EXIT_SAFE)
        }
    }
}

/// The state that decides the answer for these endpoints: any would-break
/// wins, then any lack of evidence.
pub fn worst_state(selected: &[&EndpointReadiness]) -> ReadinessState {
    if selected.iter().any(|e| e.state == ReadinessState::WouldBreak) {
        ReadinessState::WouldBreak
    } else if selected.iter().any(|e| e.state == ReadinessState::NoEvidence) {
        ReadinessState::NoEvidence
    } else {
        ReadinessState::Ready
    }
}

/// Preflight's exit code for a state.
pub fn exit_code(state: ReadinessState) -> u8 {
    match state {
        ReadinessState::Ready => EXIT_SAFE,
        ReadinessState::WouldBreak => EXIT_WOULD_BREAK,
        ReadinessState::NoEvidence => EXIT_NO_EVIDENCE,
    }
}

fn selected_arg(selected: &[&EndpointReadiness]) -> String {
    if selected.len() == 1 {
        let e = selected[0];
        match (e.kind, &e.namespace, &e.pod) {
            (EndpointKind::Host, _, _) => " --endpoint host".into(),
            // Only names Kubernetes accepts go into a command line to copy.
            (_, Some(ns), Some(p)) if is_dns_label(ns) && is_dns_subdomain(p) => format!(" --endpoint {ns}/{p}"),
            _ => format!(" --endpoint {}", e.endpoint_id),
        }
    } else {
        String::new()
    }
}

/// The commands that switch audit mode off and back on. Endpoint IDs are
/// local to a node, so they must run in the Cilium pod of that node:
/// `ds/cilium` would pick any node's pod.
fn print_switch_commands(
    report: &ReadinessReport,
    selected: &[&EndpointReadiness],
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let exec = match report.node.as_deref().filter(|n| is_dns_subdomain(n)) {
        Some(node) => format!(
            "kubectl -n kube-system exec $(kubectl -n kube-system get pod -l k8s-app=cilium --field-selector spec.nodeName={node} -o name) --"
        ),
        None => "kubectl -n kube-system exec ds/cilium --".to_owned(),
    };
    let targets: Vec<&&EndpointReadiness> = selected.iter().filter(|e| e.reason == Reason::NoWouldDeny).collect();
    for e in selected.iter().filter(|e| e.reason == Reason::Enforcing) {
        writeln!(out, "  {} (endpoint {}): PolicyAuditMode is already off.", e.display_name(), e.endpoint_id)?;
    }
    if targets.is_empty() {
        return Ok(());
    }
    if report.node.as_deref().is_some_and(|n| !is_dns_subdomain(n)) {
        writeln!(
            out,
            "  Note: the agent reported the node name {}, which is not a valid node name; the commands below use \
             `ds/cilium`: exec into the Cilium pod on the node this agent runs on.",
            escape(report.node.as_deref().unwrap_or_default())
        )?;
    } else if report.node.is_none() {
        writeln!(
            out,
            "  Note: the agent did not report its node; `ds/cilium` picks the Cilium pod of an arbitrary node, and endpoint \
             IDs are per node: exec into the Cilium pod on the node this agent runs on."
        )?;
    }
    writeln!(out)?;
    writeln!(out, "Switch PolicyAuditMode off:")?;
    for e in &targets {
        writeln!(
            out,
            "  {exec} cilium-dbg endpoint config {} PolicyAuditMode=Disabled   # {}",
            e.endpoint_id,
            e.display_name()
        )?;
    }
    writeln!(out)?;
    writeln!(out, "Switch it back on (if anything breaks; the agent's lockout alarm watches the first minutes):")?;
    for e in &targets {
        writeln!(
            out,
            "  {exec} cilium-dbg endpoint config {} PolicyAuditMode=Enabled   # {}",
            e.endpoint_id,
            e.display_name()
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "Before Cilium 1.15 the binary is `cilium`, not `cilium-dbg`. If the agent runs with policy-audit-mode=true \
         (cilium-config), endpoints created later start in audit mode again."
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{Direction, FlowRecord, Verdict},
        readiness::{self, EvidenceEnvironment, Observation, RateLimit, ReadinessConfig, ReadinessInput, testkit::*},
    };

    fn env() -> EvidenceEnvironment {
        EvidenceEnvironment {
            cilium_version: Some("1.17.8".parse().unwrap()),
            verdict_notifications: Some(true),
            rate_limit: Some(RateLimit { configured: false, dropped: None }),
        }
    }

    fn scenario_json() -> String {
        let sc = Scenario::lockout();
        let flows = sc.flows(&sc.policies, false);
        let obs = Observation::since_start(sc.observed_since);
        let mut input = ReadinessInput::new(&flows, &sc.directory, &obs, now());
        input.environment = env();
        input.node = Some(NODE.into());
        serde_json::to_string(&readiness::evaluate(&input, &ReadinessConfig::default())).unwrap()
    }

    /// QUIET has allowed traffic only, and an audited call from 20 hours ago.
    fn quiet_json(node: Option<&str>) -> String {
        let sc = Scenario::lockout();
        let flows: Vec<FlowRecord> = vec![
            flow(QUIET, Direction::Ingress, FRONTEND_ID, 6, 80, Verdict::Allowed, 500, ago(40 * 3600), ago(30)),
            flow(QUIET, Direction::Ingress, FRONTEND_ID, 6, 9090, Verdict::Audited, 1, ago(20 * 3600), ago(20 * 3600)),
        ];
        let obs = Observation::since_start(sc.observed_since);
        let mut input = ReadinessInput::new(&flows, &sc.directory, &obs, now());
        input.environment = env();
        input.node = node.map(str::to_owned);
        serde_json::to_string(&readiness::evaluate(&input, &ReadinessConfig::default())).unwrap()
    }

    fn args(agent: &str, endpoint: Option<&str>, window: Option<&str>) -> PreflightArgs {
        PreflightArgs {
            endpoint: endpoint.map(str::to_owned),
            window: window.map(|w| crate::duration::parse(w).unwrap()),
            agent: agent.into(),
            timeout: 5,
            output: OutputFormat::Table,
            output_file: None,
        }
    }

    async fn run_capture(a: PreflightArgs) -> (u8, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run_with(a, &mut out, &mut err).await;
        (code, String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap())
    }

    #[tokio::test]
    async fn exit_1_when_something_would_break() {
        let (url, seen) = serve(200, scenario_json()).await;
        let (code, out, err) = run_capture(args(&url, Some("host"), None)).await;
        assert_eq!(code, EXIT_WOULD_BREAK, "{out}{err}");
        assert!(out.contains("NOT SAFE"), "{out}");
        assert!(out.contains("10250") && out.contains("kubelet (critical)"), "{out}");
        assert!(out.contains("Host lockout risk"), "{out}");
        assert!(out.contains("[passed ] host_policy_selects_node"), "{out}");
        assert!(!out.contains("PolicyAuditMode=Disabled"));
        assert_eq!(seen.lock().unwrap()[0], "GET /api/v1/readiness?endpoint=host HTTP/1.1");
        // Without --endpoint every endpoint counts: still 1.
        let (code, ..) = run_capture(args(&url, None, None)).await;
        assert_eq!(code, EXIT_WOULD_BREAK);
    }

    #[tokio::test]
    async fn exit_3_names_the_gate() {
        let (url, _) = serve(200, scenario_json()).await;
        let (code, out, _) = run_capture(args(&url, Some("shop/quiet-0"), None)).await;
        assert_eq!(code, EXIT_NO_EVIDENCE, "{out}");
        assert!(out.contains("UNKNOWN: not enough evidence"), "{out}");
        assert!(out.contains("no_traffic — gate verdicts_seen (ingress)"), "{out}");
        assert!(out.contains("[FAILED ] verdicts_seen (ingress)"), "{out}");
    }

    #[tokio::test]
    async fn exit_0_prints_both_switch_commands() {
        let (url, seen) = serve(200, quiet_json(Some(NODE))).await;
        // The audited call 20 hours ago still breaks over 24 hours...
        let (code, out, _) = run_capture(args(&url, Some("1003"), None)).await;
        assert_eq!(code, EXIT_WOULD_BREAK, "{out}");
        // ...but not over the 2 hours since the policy was fixed.
        let (code, out, _) = run_capture(args(&url, Some("1003"), Some("2h"))).await;
        assert_eq!(code, EXIT_SAFE, "{out}");
        assert!(out.contains("SAFE: nothing seen would be denied"), "{out}");
        let exec = "kubectl -n kube-system exec $(kubectl -n kube-system get pod -l k8s-app=cilium --field-selector spec.nodeName=node-a -o name) --";
        assert!(out.contains(&format!("{exec} cilium-dbg endpoint config 1003 PolicyAuditMode=Disabled")), "{out}");
        assert!(out.contains(&format!("{exec} cilium-dbg endpoint config 1003 PolicyAuditMode=Enabled")), "{out}");
        assert_eq!(seen.lock().unwrap()[1], "GET /api/v1/readiness?endpoint=1003&window=7200s HTTP/1.1");

        // Without the node name, ds/cilium with a warning.
        let (url, _) = serve(200, quiet_json(None)).await;
        let (code, out, _) = run_capture(args(&url, Some("shop/quiet-0"), Some("2h"))).await;
        assert_eq!(code, EXIT_SAFE, "{out}");
        assert!(
            out.contains(
                "kubectl -n kube-system exec ds/cilium -- cilium-dbg endpoint config 1003 PolicyAuditMode=Disabled"
            ),
            "{out}"
        );
        assert!(out.contains("picks the Cilium pod of an arbitrary node"), "{out}");
    }

    #[tokio::test]
    async fn exit_2_on_errors() {
        // Nobody listening.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = format!("http://{}", l.local_addr().unwrap());
        drop(l);
        let (code, _, err) = run_capture(args(&dead, None, None)).await;
        assert_eq!(code, EXIT_ERROR);
        assert!(err.contains("cannot reach the agent"), "{err}");
        // The agent answers with an error.
        let (url, _) = serve(404, "readiness is not enabled in this agent\n".into()).await;
        let (code, _, err) = run_capture(args(&url, None, None)).await;
        assert_eq!(code, EXIT_ERROR);
        assert!(err.contains("answered 404: readiness is not enabled"), "{err}");
        // The agent answers something else than a report.
        let (url, _) = serve(200, "{\"flows\": []}".into()).await;
        let (code, _, err) = run_capture(args(&url, None, None)).await;
        assert_eq!(code, EXIT_ERROR);
        assert!(err.contains("cannot read"), "{err}");
        // The agent has not evaluated yet.
        let (url, _) = serve(200, r#"{"error":"readiness not evaluated yet; retry in a few seconds"}"#.into()).await;
        let (code, _, err) = run_capture(args(&url, None, None)).await;
        assert_eq!(code, EXIT_ERROR);
        assert!(err.contains("has no readiness report: readiness not evaluated yet"), "{err}");
        // No such endpoint.
        let (url, _) = serve(200, scenario_json()).await;
        let (code, _, err) = run_capture(args(&url, Some("shop/nope"), None)).await;
        assert_eq!(code, EXIT_ERROR);
        assert!(err.contains("no endpoint matching \"shop/nope\""), "{err}");
        // Not an agent address.
        let (code, _, err) = run_capture(args("https://127.0.0.1:9965", None, None)).await;
        assert_eq!(code, EXIT_ERROR);
        assert!(err.contains("not an agent address"), "{err}");
    }

    #[test]
    fn urls() {
        let u = parse_url("http://127.0.0.1:9965").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.base.as_str()), ("127.0.0.1", 9965, ""));
        let u = parse_url("http://[::1]:8080/agent/").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.base.as_str()), ("::1", 8080, "/agent"));
        let u = parse_url("http://verdict-agent.kube-system").unwrap();
        assert_eq!(u.port, 80);
        assert!(parse_url("127.0.0.1:9965").is_err());
        assert_eq!(encode_query("shop/web-7d9f"), "shop%2Fweb-7d9f");
    }

    #[tokio::test]
    async fn output_formats_agree_on_the_exit_code() {
        let (url, _) = serve_at("127.0.0.1:19730", 200, scenario_json()).await;
        let (table_code, _, _) = run_capture(args(&url, Some("host"), None)).await;
        let mut a = args(&url, Some("host"), None);
        a.output = OutputFormat::Json;
        let (code, out, err) = run_capture(a).await;
        assert_eq!(code, table_code, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["endpoints"].as_array().unwrap().len(), 1);
        assert_eq!(v["endpoints"][0]["kind"], "host");
        let dir = tempfile::tempdir().unwrap();
        let mut a = args(&url, Some("host"), None);
        a.output = OutputFormat::Yaml;
        a.output_file = Some(dir.path().join("r.yaml"));
        let (code, out, _) = run_capture(a).await;
        assert_eq!((code, out.as_str()), (table_code, ""));
        let y: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(dir.path().join("r.yaml")).unwrap()).unwrap();
        assert_eq!(y["endpoints"][0]["kind"], "host");
    }

    #[tokio::test]
    async fn hostile_names_cannot_forge_terminal_lines_or_commands() {
        let hostile = "web\n\rSAFE: nothing seen would be denied\u{202e}\x1b[2J; rm -rf / #";
        let mut r: ReadinessReport = serde_json::from_str(&quiet_json(Some(NODE))).unwrap();
        r.node = Some(format!("node-a$(reboot){hostile}"));
        for e in &mut r.endpoints {
            if e.pod.is_some() {
                e.pod = Some(hostile.into());
            }
            for f in e.would_deny.iter_mut().chain(e.allowed.iter_mut()).chain(e.denied.iter_mut()) {
                f.remote_name = hostile.into();
            }
        }
        let (url, _) = serve_at("127.0.0.1:19731", 200, serde_json::to_string(&r).unwrap()).await;
        let (_, out, _) = run_capture(args(&url, None, None)).await;
        assert!(!out.chars().any(|c| c != '\n' && crate::text::is_hazardous(c)), "{out:?}");
        assert!(!out.lines().any(|l| l.starts_with("SAFE")), "{out}");
        assert!(!out.contains("$(reboot)") || !out.contains("spec.nodeName=node-a$(reboot)"), "{out}");
        assert!(!out.contains("--endpoint shop/web"), "{out}");
    }

    /// QUIET with allowed traffic only, but audited verdicts the kernel
    /// counted that are in no flow the agent read (evicted before a read).
    fn lost_evidence_json() -> String {
        let sc = Scenario::lockout();
        let flows: Vec<FlowRecord> =
            vec![flow(QUIET, Direction::Ingress, FRONTEND_ID, 6, 80, Verdict::Allowed, 500, ago(40 * 3600), ago(30))];
        let lost = [crate::unattributed::LostEvidence {
            endpoint_id: QUIET,
            direction: Direction::Ingress,
            verdict: Verdict::Audited,
            verdicts: 2,
            last_grew: ago(120),
        }];
        let obs = Observation::since_start(sc.observed_since);
        let mut input = ReadinessInput::new(&flows, &sc.directory, &obs, now());
        input.environment = env();
        input.lost_evidence = &lost;
        serde_json::to_string(&readiness::evaluate(&input, &ReadinessConfig::default())).unwrap()
    }

    #[tokio::test]
    async fn exit_3_names_lost_evidence() {
        let (url, _) = serve(200, lost_evidence_json()).await;
        let (code, out, _) = run_capture(args(&url, Some("1003"), None)).await;
        assert_eq!(code, EXIT_NO_EVIDENCE, "{out}");
        assert!(out.contains("evidence_lost — gate evidence_complete (ingress)"), "{out}");
        assert!(out.contains("[FAILED ] evidence_complete (ingress)"), "{out}");
    }
}

//! `verdict-agent enforce`: the operator's side. It asks the running agent
//! for readiness exactly as `preflight` does (same report, same exit
//! codes), then hands the trial to the daemon: the CLI process may die with
//! the network it is testing, the daemon on the node does not.

use std::{io::Write, process::ExitCode, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;

use super::{
    api::{ApiError, TRIALS_PATH, TrialList},
    record::{PreflightVerdict, Requester, TrialRecord},
    trial::TrialRequest,
};
use crate::{
    model::EndpointKind,
    preflight::{self, EXIT_ERROR, EXIT_SAFE, PreflightArgs, parse_duration_arg},
    timefmt::{format_duration, format_rfc3339},
};

/// `verdict-agent enforce`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Exit codes: 0 done, 1 preflight says something would break, 2 error or refused by the \
                        agent, 3 preflight has not enough evidence. The agent must run with --enable-enforcement.")]
pub struct EnforceArgs {
    /// The endpoint: `host`, an endpoint ID, or NAMESPACE/POD.
    #[arg(long, required_unless_present_any = ["status", "namespace"], conflicts_with = "namespace")]
    pub endpoint: Option<String>,
    /// Every pod endpoint of this namespace on this node, one trial each: started only if preflight says safe for
    /// all of them (or --force), and all undone if one cannot start. --confirm, --abort and --status act on all.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Trial length: audit mode comes back after it unless --confirm came first.
    #[arg(long = "try", default_value = "5m", value_parser = parse_duration_arg)]
    pub try_for: Duration,
    /// Start even though preflight does not say safe; needs --reason, which is recorded.
    #[arg(long, requires = "reason")]
    pub force: bool,
    /// Why (recorded with the trial, the confirmation or the abort).
    #[arg(long)]
    pub reason: Option<String>,
    /// Revert on any new denied flow of the endpoint, not only critical ones.
    #[arg(long)]
    pub strict: bool,
    /// Keep enforcement: confirm the endpoint's running trial.
    #[arg(long, conflicts_with_all = ["abort", "status", "force"])]
    pub confirm: bool,
    /// Put audit mode back now.
    #[arg(long, conflicts_with_all = ["confirm", "status", "force"])]
    pub abort: bool,
    /// Show the recorded trials (of --endpoint, or all).
    #[arg(long, conflicts_with_all = ["confirm", "abort", "force"])]
    pub status: bool,
    /// The agent's HTTP address.
    #[arg(long, default_value = preflight::DEFAULT_AGENT)]
    pub agent: String,
    /// Seconds to wait for the agent.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    /// How the printed follow-up commands start (`kubectl verdict enforce
    /// --node N` through the plugin); empty: `verdict-agent enforce`.
    #[arg(skip)]
    pub command: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{url:?} is not an agent address (expected http://HOST:PORT, e.g. {})", preflight::DEFAULT_AGENT)]
    BadUrl { url: String },
    #[error("cannot reach the agent at {addr}; is `verdict-agent run` running there?")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent at {addr} did not answer within {secs}s")]
    Timeout { addr: String, secs: u64 },
    #[error("HTTP exchange with the agent at {addr} failed")]
    Http {
        addr: String,
        #[source]
        source: hyper::Error,
    },
    #[error("the agent refused: {error} (HTTP {status})")]
    Refused { status: u16, error: String },
    #[error("the agent's answer to {path} is not what this CLI reads; are the agent and CLI the same version?")]
    Decode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

impl EnforceArgs {
    /// The command the printed follow-ups use.
    fn command(&self) -> &str {
        if self.command.is_empty() { "verdict-agent enforce" } else { &self.command }
    }

    /// The endpoint selector: `--endpoint`, or `NAMESPACE/*` for `--namespace`.
    fn selector(&self) -> Option<String> {
        match (&self.endpoint, &self.namespace) {
            (Some(e), _) => Some(e.clone()),
            (None, Some(ns)) => Some(format!("{ns}/*")),
            (None, None) => None,
        }
    }
}

/// Runs `enforce`.
pub async fn run(args: EnforceArgs) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    Ok(ExitCode::from(run_with(args, &mut stdout, &mut stderr).await))
}

/// `run` with its output streams; returns the exit code.
pub async fn run_with(args: EnforceArgs, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let agent = Agent { url: args.agent.clone(), timeout: Duration::from_secs(args.timeout) };
    let result = if args.status {
        status(&agent, args.selector().as_deref(), out).await
    } else if args.confirm || args.abort {
        finish(&agent, &args, out).await
    } else {
        return start(&agent, &args, out, err).await;
    };
    match result {
        Ok(()) => EXIT_SAFE,
        Err(e) => {
            let _ = writeln!(err, "enforce: {}", chain(&e));
            EXIT_ERROR
        }
    }
}

/// The error and its causes, each once.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    crate::errors::chain(e)
}

/// `user@host` of whoever runs the CLI (sudo's caller when under sudo).
fn requester(reason: Option<&str>) -> Requester {
    let user = std::env::var("SUDO_USER").or_else(|_| std::env::var("USER")).unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    let who = if host.is_empty() { user } else { format!("{user}@{host}") };
    Requester { who, reason: reason.map(str::to_owned) }
}

async fn start(agent: &Agent, args: &EnforceArgs, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let Some(selector) = args.selector() else {
        let _ =
            writeln!(err, "enforce: --endpoint (host, an endpoint ID, or NAMESPACE/POD) or --namespace is required");
        return EXIT_ERROR;
    };
    let selector = selector.as_str();
    // The same evaluation and exit codes as `preflight`, printed the same way.
    let pre = PreflightArgs {
        endpoint: Some(selector.to_owned()),
        window: None,
        agent: args.agent.clone(),
        timeout: args.timeout,
        output: preflight::OutputFormat::Table,
        output_file: None,
    };
    let code = preflight::run_with(pre, out, err).await;
    if code == EXIT_ERROR {
        return code;
    }
    if code != EXIT_SAFE && !args.force {
        let _ = writeln!(
            err,
            "enforce: refusing to leave audit mode on {selector}: preflight did not say safe (exit code {code}); \
             fix what it reports, or override with --force --reason TEXT"
        );
        return code;
    }
    let report = match preflight::fetch_report_with_timeout(&args.agent, Some(selector), None, agent.timeout).await {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(err, "enforce: {e}");
            return EXIT_ERROR;
        }
    };
    let selected = report.select(selector);
    if selected.is_empty() {
        let _ = writeln!(err, "enforce: {selector:?} names no endpoint in the agent's readiness report");
        return EXIT_ERROR;
    }
    if selected.len() > 1 && args.namespace.is_none() {
        let _ = writeln!(
            err,
            "enforce: {selector:?} names {} endpoints on this node; a trial switches one: name it by ID",
            selected.len()
        );
        return EXIT_ERROR;
    }
    let mut started: Vec<TrialRecord> = Vec::new();
    for endpoint in selected {
        let name = match (endpoint.kind, &endpoint.namespace, &endpoint.pod) {
            (EndpointKind::Host, _, _) => "host".to_owned(),
            (_, Some(ns), Some(pod)) => format!("{ns}/{pod}"),
            _ => endpoint.endpoint_id.to_string(),
        };
        let req = TrialRequest {
            endpoint_id: endpoint.endpoint_id,
            endpoint_name: name.clone(),
            endpoint_kind: endpoint.kind,
            try_seconds: args.try_for.as_secs().max(1),
            strict: args.strict,
            requested_by: requester(args.reason.as_deref()),
            preflight: PreflightVerdict {
                state: endpoint.state.as_str().to_owned(),
                exit_code: code,
                forced: args.force && code != EXIT_SAFE,
            },
        };
        match agent.call::<TrialRecord>(Method::POST, TRIALS_PATH, Some(&req)).await {
            Ok(t) => started.push(t),
            Err(e) => {
                let _ = writeln!(err, "enforce: {name}: {}", chain(&e));
                // All or nothing: a namespace is switched whole or not at all.
                undo(agent, &started, &name, args.command(), err).await;
                return EXIT_ERROR;
            }
        }
    }
    let _ = writeln!(out);
    for t in &started {
        let _ = writeln!(
            out,
            "Trial {} started: endpoint {} (ID {}) enforces policy until {} ({}), then goes back to audit mode \
             unless confirmed. The agent reverts by itself on the first critical signal.",
            t.id,
            t.endpoint_name,
            t.endpoint_id,
            t.deadline.map(format_rfc3339).unwrap_or_default(),
            format_duration(t.try_for()),
        );
    }
    let target = match &args.namespace {
        Some(ns) => format!("--namespace {ns}"),
        None => format!("--endpoint {}", started[0].endpoint_name),
    };
    let _ = writeln!(out, "  keep it:    {} {target} --confirm", args.command());
    let _ = writeln!(out, "  undo it:    {} {target} --abort", args.command());
    EXIT_SAFE
}

/// Aborts trials a namespace request started before one of its trials failed.
async fn undo(agent: &Agent, started: &[TrialRecord], failed: &str, command: &str, err: &mut dyn Write) {
    let by = requester(Some(&format!("undone: the trial of {failed} in the same request could not start")));
    for t in started {
        match agent.call::<TrialRecord>(Method::POST, &format!("{TRIALS_PATH}/{}/abort", t.id), Some(&by)).await {
            Ok(_) => {
                let _ = writeln!(err, "enforce: {}: trial {} aborted, audit mode back on", t.endpoint_name, t.id);
            }
            Err(e) => {
                let _ = writeln!(
                    err,
                    "enforce: {}: could not abort trial {} ({}); the agent reverts it at its deadline: \
                     {command} --endpoint {} --abort",
                    t.endpoint_name,
                    t.id,
                    chain(&e),
                    t.endpoint_name
                );
            }
        }
    }
}

/// Whether a trial is one `selector` names (`NAMESPACE/*`: every pod of it).
fn names(t: &TrialRecord, selector: &str) -> bool {
    match selector.strip_suffix("/*") {
        Some(ns) => {
            t.endpoint_kind != EndpointKind::Host && t.endpoint_name.split_once('/').is_some_and(|(n, _)| n == ns)
        }
        None => t.endpoint_name == selector || t.endpoint_id.to_string() == selector,
    }
}

async fn finish(agent: &Agent, args: &EnforceArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let selector = args.selector().unwrap_or_default();
    let list: TrialList = agent.call(Method::GET, TRIALS_PATH, None::<&()>).await?;
    let running: Vec<&TrialRecord> = match &args.namespace {
        Some(_) => list.trials.iter().filter(|t| names(t, &selector) && t.is_active()).collect(),
        None => list.trials.iter().rev().find(|t| names(t, &selector) && t.is_active()).into_iter().collect(),
    };
    if running.is_empty() {
        let what = match &args.namespace {
            Some(ns) => format!("in namespace {ns:?}"),
            None => format!("on endpoint {selector:?}"),
        };
        return Err(CliError::Refused {
            status: 404,
            error: format!("no running trial {what}; see {} --status", args.command()),
        });
    }
    let action = if args.confirm { "confirm" } else { "abort" };
    let by = requester(args.reason.as_deref());
    for t in running {
        let t: TrialRecord = agent.call(Method::POST, &format!("{TRIALS_PATH}/{}/{action}", t.id), Some(&by)).await?;
        writeln!(out, "Trial {} on {}: {}", t.id, t.endpoint_name, t.history.last().map_or("", |h| h.message.as_str()))
            .ok();
    }
    Ok(())
}

async fn status(agent: &Agent, selector: Option<&str>, out: &mut dyn Write) -> Result<(), CliError> {
    let list: TrialList = agent.call(Method::GET, TRIALS_PATH, None::<&()>).await?;
    let shown: Vec<&TrialRecord> = list.trials.iter().filter(|t| selector.is_none_or(|s| names(t, s))).collect();
    writeln!(out, "Enforcement {} in this agent.", if list.enabled { "enabled" } else { "disabled" }).ok();
    if shown.is_empty() {
        writeln!(out, "No trials recorded{}.", selector.map(|s| format!(" for {s}")).unwrap_or_default()).ok();
        return Ok(());
    }
    writeln!(out, "{:<24}  {:<20}  {:<13}  {:<24}  WHO / OUTCOME", "TRIAL", "ENDPOINT", "PHASE", "DEADLINE").ok();
    for t in shown {
        writeln!(
            out,
            "{:<24}  {:<20}  {:<13}  {:<24}  {}{}",
            t.id,
            format!("{} ({})", t.endpoint_name, t.endpoint_id),
            t.phase.as_str(),
            t.deadline.map(format_rfc3339).unwrap_or_else(|| "-".into()),
            t.requested_by.who,
            t.outcome.as_deref().map(|o| format!(": {o}")).unwrap_or_default()
        )
        .ok();
    }
    Ok(())
}

struct Agent {
    url: String,
    timeout: Duration,
}

impl Agent {
    /// One JSON request to the agent; a non-2xx answer is a refusal.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl serde::Serialize>,
    ) -> Result<T, CliError> {
        let uri: Uri = self.url.parse().map_err(|_| CliError::BadUrl { url: self.url.clone() })?;
        let (Some("http"), Some(host)) = (uri.scheme_str(), uri.host()) else {
            return Err(CliError::BadUrl { url: self.url.clone() });
        };
        let addr = format!("{host}:{}", uri.port_u16().unwrap_or(80));
        let base = uri.path().trim_end_matches('/');
        let full_path = format!("{base}{path}");
        let payload = body.map(|b| serde_json::to_vec(b).expect("request bodies serialize")).unwrap_or_default();
        let exchange = async {
            let stream = tokio::net::TcpStream::connect(&addr)
                .await
                .map_err(|source| CliError::Connect { addr: addr.clone(), source })?;
            let http = |source| CliError::Http { addr: addr.clone(), source };
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http)?;
            let driver = tokio::spawn(async move {
                let _ = conn.await;
            });
            let req = Request::builder()
                .method(method)
                .uri(&full_path)
                .header(hyper::header::HOST, &addr)
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .header(hyper::header::ACCEPT, "application/json")
                .body(Full::new(Bytes::from(payload)))
                .expect("a request with a path and three headers is valid");
            let resp = sender.send_request(req).await.map_err(http)?;
            let status = resp.status().as_u16();
            let bytes = resp.into_body().collect().await.map_err(http)?.to_bytes();
            driver.abort();
            Ok::<_, CliError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| CliError::Timeout { addr: addr.clone(), secs: self.timeout.as_secs() })??;
        if !(200..300).contains(&status) {
            let error = serde_json::from_slice::<ApiError>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).trim().chars().take(300).collect());
            return Err(CliError::Refused { status, error });
        }
        serde_json::from_slice(&bytes).map_err(|source| CliError::Decode { path: full_path, source })
    }
}

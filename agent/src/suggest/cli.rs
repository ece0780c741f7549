//! `verdict-agent suggest` on the command line: arguments, where the report
//! comes from (a running agent or a capture), where the output goes.

use std::{io::Write, path::PathBuf, process::ExitCode, time::Duration};

use super::{render::render_json, *};

/// `verdict-agent suggest`.
#[derive(Debug, Clone, clap::Args)]
pub struct SuggestArgs {
    /// Only this endpoint: `host`, an endpoint ID, or NAMESPACE/POD.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// The running agent to ask (GET /api/v1/readiness).
    #[arg(long, default_value = crate::preflight::DEFAULT_AGENT)]
    pub agent: String,
    /// Build from a capture instead of a running agent (as `analyze`).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Capture format for --input: monitor (cilium monitor text) or hubble-json.
    #[arg(long, value_enum)]
    pub format: Option<crate::analyze::CaptureFormat>,
    /// `cilium endpoint list -o json` of the captured node (labels, host endpoint).
    #[arg(long)]
    pub endpoints: Option<PathBuf>,
    /// The host endpoint's ID in the capture, when --endpoints is not given.
    #[arg(long)]
    pub host_endpoint: Option<u16>,
    /// Evidence period (agent) or readiness window (capture), e.g. 24h.
    #[arg(long, value_parser = crate::preflight::parse_duration_arg)]
    pub window: Option<Duration>,
    /// The node's name, for the host policy's nodeSelector.
    #[arg(long)]
    pub node: Option<String>,
    /// nodeSelector for the host policy, `key=value` (repeatable).
    #[arg(long = "node-selector", value_parser = parse_key_value)]
    pub node_selector: Vec<(String, String)>,
    /// World flows with at most this many addresses are allowed by address.
    #[arg(long, default_value_t = 8)]
    pub max_cidrs: usize,
    /// Output format: yaml (the policies, ready for review and `kubectl apply`) or json (each endpoint's
    /// policy and notes).
    #[arg(long, short = 'o', value_enum, default_value_t = SuggestFormat::Yaml)]
    pub output: SuggestFormat,
    /// Write the result to this file instead of standard output.
    #[arg(long)]
    pub output_file: Option<PathBuf>,
}

/// What `suggest -o` writes. Table is not offered: a policy is read as YAML.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SuggestFormat {
    #[default]
    Yaml,
    Json,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

/// Runs `suggest`; exit 0 with policies written, 1 when nothing could be
/// suggested for an endpoint that has would-deny flows, 2 on errors, 3 when
/// the `--input` capture is incomplete (unreadable verdict lines, lost events).
pub async fn run(args: SuggestArgs) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    Ok(ExitCode::from(run_with(args, &mut stdout, &mut stderr).await))
}

/// `run` with its output streams, for tests.
pub async fn run_with(args: SuggestArgs, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    match run_inner(&args).await {
        Ok((yaml, code)) => {
            let written = match &args.output_file {
                Some(path) => std::fs::write(path, &yaml)
                    .map_err(|e| anyhow::anyhow!("cannot write the suggestions to {}: {e}", path.display())),
                None => out.write_all(yaml.as_bytes()).map_err(anyhow::Error::from),
            };
            if let Err(e) = written {
                let _ = writeln!(err, "error: {e:#}");
                return 2;
            }
            code
        }
        Err(e) => {
            let _ = writeln!(err, "error: {e:#}");
            2
        }
    }
}

async fn run_inner(args: &SuggestArgs) -> anyhow::Result<(String, u8)> {
    let (out, code, incomplete) = suggest_inner(args).await?;
    // A capture with unreadable verdict lines or lost events never gives a
    // clean answer: a missing flow may be the one a policy must allow.
    Ok(match incomplete {
        // JSON has no comments: the exit code says it (analyze gives the lines).
        Some(_) if args.output == SuggestFormat::Json => (out, 3),
        Some((rejected, lost)) => (
            format!(
                "# verdict-agent: the capture is incomplete ({rejected} verdict lines could not be read, {lost} events \
                 lost): flows may be missing from these suggestions; run `verdict-agent analyze` for the lines\n{out}"
            ),
            3,
        ),
        None => (out, code),
    })
}

async fn suggest_inner(args: &SuggestArgs) -> anyhow::Result<(String, u8, Option<(usize, u64)>)> {
    let mut times_unknown = false;
    let mut incomplete = None;
    let report = match &args.input {
        Some(path) => {
            let opts = crate::analyze::CaptureOptions {
                format: args.format,
                endpoints: args.endpoints.clone(),
                host_endpoint: args.host_endpoint,
                window: args.window,
                ..crate::analyze::CaptureOptions::default()
            };
            let analysis = crate::analyze::analyze_file(path, &opts)?;
            times_unknown = !analysis.capture.timestamps;
            if analysis.incomplete_because.is_some() {
                incomplete = Some((analysis.capture.rejected_verdict_lines, analysis.capture.lost_events));
            }
            analysis.report
        }
        None => {
            let report = crate::preflight::fetch_report(&args.agent, args.endpoint.as_deref(), args.window).await?;
            match args.window {
                Some(w) => crate::preflight::rejudge_report(&report, w),
                None => report,
            }
        }
    };
    let opts = SuggestOptions {
        max_cidrs: args.max_cidrs,
        node: args.node.clone(),
        node_selector: (!args.node_selector.is_empty()).then(|| args.node_selector.iter().cloned().collect()),
        times_unknown,
        ..SuggestOptions::default()
    };
    let suggestions = suggest(&report, args.endpoint.as_deref(), &opts)?;
    if args.output == SuggestFormat::Json {
        let missing =
            suggestions.iter().any(|s| s.policy.is_none() && s.notes.iter().any(|n| n.starts_with("no policy")));
        return Ok((render_json(&suggestions)?, if missing { 1 } else { 0 }, incomplete));
    }
    if suggestions.is_empty() {
        return Ok(("# verdict-agent: no endpoint has would-deny flows; nothing to suggest\n".into(), 0, incomplete));
    }
    let missing = suggestions.iter().any(|s| s.policy.is_none() && !s.rule_comments.is_empty())
        || suggestions.iter().any(|s| s.policy.is_none() && s.notes.iter().any(|n| n.starts_with("no policy")));
    Ok((render(&suggestions)?, if missing { 1 } else { 0 }, incomplete))
}

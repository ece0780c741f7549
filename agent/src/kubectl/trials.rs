//! `kubectl verdict trials`: the `AuditModeTrial` rollouts and where each
//! node stands (what the agents wrote in `status.nodes`); `--abort NAME`
//! sets `spec.abort`, and every agent reverts its node's running trials.

use std::io::Write;

use kube::{
    Api, Client,
    api::{DynamicObject, ListParams, Patch, PatchParams},
};
use serde_json::json;

use crate::{
    enforce::cluster::{self, AuditModeTrialSpec, AuditModeTrialStatus, GROUP, PLURAL},
    text::{escape_for_terminal as escape, neutralize},
};

#[derive(Debug, Clone, clap::Args)]
pub struct TrialsArgs {
    /// One rollout (default: all).
    pub name: Option<String>,
    /// Stop the rollout NAME: nodes in trial revert now, the others never start; confirmed nodes keep enforcing.
    #[arg(long, requires = "name")]
    pub abort: bool,
    /// Why (recorded with the trials the abort ends).
    #[arg(long, requires = "abort")]
    pub reason: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrialsError {
    #[error("cannot list {PLURAL}.{GROUP}: is the chart installed with enforcement.enabled (it installs the CRD)?")]
    List(#[source] kube::Error),
    #[error("cannot read {PLURAL}.{GROUP} {name}")]
    Get {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot set spec.abort on {PLURAL}.{GROUP} {name}: may you patch it?")]
    Abort {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot write the result")]
    Write(#[source] std::io::Error),
}

pub async fn run(client: &Client, args: &TrialsArgs, out: &mut dyn Write) -> Result<(), TrialsError> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &cluster::api_resource());
    if args.abort {
        let name = args.name.as_deref().unwrap_or_default();
        let mut spec = json!({"abort": true});
        if let Some(r) = &args.reason {
            spec["reason"] = json!(r);
        }
        api.patch(name, &PatchParams::default(), &Patch::Merge(&json!({ "spec": spec })))
            .await
            .map_err(|source| TrialsError::Abort { name: name.into(), source })?;
        writeln!(
            out,
            "{} {}: abort requested; each agent reverts its node's running trial within seconds \
             (kubectl verdict trials {} shows them)",
            cluster::KIND,
            escape(name),
            escape(name)
        )
        .map_err(TrialsError::Write)?;
        return Ok(());
    }
    let objects = match &args.name {
        Some(name) => vec![api.get(name).await.map_err(|source| TrialsError::Get { name: name.clone(), source })?],
        None => api.list(&ListParams::default()).await.map_err(TrialsError::List)?.items,
    };
    print(&objects, out).map_err(TrialsError::Write)
}

fn print(objects: &[DynamicObject], out: &mut dyn Write) -> std::io::Result<()> {
    if objects.is_empty() {
        return writeln!(out, "No {} objects.", cluster::KIND);
    }
    writeln!(
        out,
        "{:<24}  {:<7}  {:<6}  {:<24}  {:<9}  {:<20}  MESSAGE",
        "TRIAL", "MODE", "TRY", "NODE", "PHASE", "SINCE"
    )?;
    for obj in objects {
        let name = obj.metadata.name.clone().unwrap_or_default();
        let spec: Option<AuditModeTrialSpec> = serde_json::from_value(obj.data["spec"].clone()).ok();
        let status: AuditModeTrialStatus = serde_json::from_value(obj.data["status"].clone()).unwrap_or_default();
        let (mode, try_for) = match &spec {
            Some(s) => (format!("{:?}{}", s.mode, if s.abort { "!" } else { "" }), s.try_duration.clone()),
            None => ("?".into(), "?".into()),
        };
        if status.nodes.is_empty() {
            writeln!(
                out,
                "{:<24}  {:<7}  {:<6}  {:<24}  {:<9}  {:<20}  no node has started",
                escape(&name),
                mode,
                escape(&try_for),
                "-",
                "-",
                "-"
            )?;
        }
        for (node, s) in &status.nodes {
            writeln!(
                out,
                "{:<24}  {:<7}  {:<6}  {:<24}  {:<9}  {:<20}  {}",
                escape(&name),
                mode,
                escape(&try_for),
                escape(node),
                format!("{:?}", s.phase),
                escape(&s.last_transition_time),
                neutralize(&s.message, 300)
            )?;
        }
    }
    writeln!(out, "(\"!\" after the mode: spec.abort is set)")
}

//! `verdict-scenario`: plays a built-in traffic scenario as Cilium
//! notifications, for the demo and tests. Test tooling: it writes into a
//! `cilium_events` map (through the emitter, seen by an attached tap) or
//! into the agent's pinned counters (through the replay entry, for an
//! agent running `--tap none`), so it is not part of the shipped agent.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::Parser;
use verdict_testkit::{
    emitter::{Emitter, Target},
    replay::{Replayer, replay_with},
    scenario::{self, Layout},
};

/// Where the notifications go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Via {
    /// The Cilium-compatible emitter: through `bpf_skb_event_output` and
    /// the attached tap, exactly the path Cilium's verdicts take.
    Emitter,
    /// The replay entry on the agent's pinned maps (no hook needed; the
    /// agent runs with `--tap none`).
    Replay,
}

#[derive(Parser, Debug)]
#[command(
    name = "verdict-scenario",
    about = "Plays a built-in traffic scenario as Cilium notifications (test and demo tooling: it writes \
             into a cilium_events map, or into a verdict-agent's pinned counters)"
)]
struct Args {
    #[arg(long, default_value = "demo")]
    name: String,
    #[arg(long, value_enum, default_value = "emitter")]
    via: Via,
    #[arg(long, value_enum, default_value = "v1-19")]
    layout: Layout,
    /// Pin path of the cilium_events map the emitter writes (emitter only).
    #[arg(long, default_value = verdict_agent::bpf::events_map::DEFAULT_PATH)]
    cilium_events_map: PathBuf,
    /// The agent's pin directory (replay only).
    #[arg(long, default_value = verdict_common::maps::PIN_DIR)]
    pin_dir: PathBuf,
    /// Play the scenario this many times.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// Print the scenario's endpoints as `cilium endpoint list -o json` prints them, and exit.
    #[arg(long)]
    print_endpoints: bool,
}

fn main() -> ExitCode {
    match play(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("verdict-scenario: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn play(args: Args) -> anyhow::Result<()> {
    let sc = match args.name.as_str() {
        "demo" => scenario::demo(args.layout),
        other => anyhow::bail!("unknown scenario {other:?}; built-in scenarios: demo"),
    };
    if args.print_endpoints {
        println!("{}", serde_json::to_string_pretty(&scenario::cilium_endpoint_list(&sc.endpoints))?);
        return Ok(());
    }
    match args.via {
        Via::Emitter => {
            let emitter = Emitter::load(&args.cilium_events_map)?;
            for _ in 0..args.rounds {
                for step in &sc.steps {
                    emitter.emit(Target::CiliumEvents, &step.notification, step.repeat)?;
                }
            }
            let c = emitter.counts()?;
            println!(
                "scenario {}: {} notifications emitted into {}",
                sc.name,
                c.cilium_events,
                args.cilium_events_map.display()
            );
        }
        Via::Replay => {
            // Only join a running agent's maps; never create counters of our own.
            let pinned_flows =
                args.pin_dir.join(verdict_common::maps::LAYOUT_VERSION).join(verdict_common::maps::FLOW_TABLE);
            anyhow::ensure!(
                pinned_flows.exists(),
                "no agent maps pinned at {}: start `verdict-agent run --tap none --pin-dir {}` first",
                pinned_flows.display(),
                args.pin_dir.display()
            );
            let replayer = Replayer::load(&args.pin_dir, verdict_common::maps::DEFAULT_FLOW_TABLE_SIZE)
                .context("joining the agent's pinned counters")?;
            for _ in 0..args.rounds {
                for step in &sc.steps {
                    replay_with(replayer.ebpf(), &step.notification, step.repeat)?;
                }
            }
            println!(
                "scenario {}: {} notifications replayed into {}",
                sc.name,
                sc.total_notifications() * args.rounds as u64,
                args.pin_dir.display()
            );
        }
    }
    Ok(())
}

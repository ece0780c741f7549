//! Runs inside a QEMU VM booted on a real distribution kernel (see
//! `xtask/src/vm.rs`): proves the tap on that kernel, end to end.
//!
//! For each tap (fentry, then kprobe): start `verdict-agent run` with that
//! tap, write N notifications into a pinned `cilium_events` and M into
//! another perf event array through the Cilium-compatible emitter, and
//! check through `/metrics` that exactly N were counted (the map-ID filter
//! works) and the M ignored. Then recreate `cilium_events` (new map ID, as
//! a Cilium restart does) and check the agent follows it.
//!
//! The agent runs with exactly the DaemonSet's privileges, which xtask
//! reads from the rendered chart and passes as `VERDICT_AGENT_UID` and
//! `VERDICT_AGENT_CAPS` (uid 0, only those capabilities: bounding,
//! permitted and effective sets, nothing inheritable or ambient,
//! no_new_privs); the driver checks the running agent's sets in /proc.
//! Where the kernel needs a chart value beyond the defaults (5.10:
//! `memlockCapability`), xtask also passes the default set
//! (`VERDICT_AGENT_CAPS_DEFAULT`, `VERDICT_AGENT_NEEDED_VALUES`) and the
//! driver checks that the agent started with it fails saying what it lacks.
//!
//! Then an enforcement trial on the real tap: the agent (with
//! `--enable-enforcement`, a fake Cilium API on a unix socket) sees the API
//! server's audited connections to the host, a trial switches audit mode
//! off, and the emitter reacts to the PATCH as Cilium's datapath would (the
//! forgotten flow is denied, per packet): the agent must put audit mode
//! back by itself. The time is printed, not judged (emulated time; the
//! bench measures it).
//!
//! Prints one `VMTEST ...` line per check and `VMTEST RESULT pass|fail`.

use std::{net::SocketAddr, path::Path, process::ExitCode, time::Duration};

use anyhow::{Context, bail, ensure};
use verdict_agent_tests::{
    agent_process::AgentProcess,
    privileges::{KERNEL_DEFAULT_MEMLOCK, PodPrivileges, capabilities_of, names},
};
use verdict_testkit::{
    emitter::{Emitter, Target},
    fake_cilium::FakeCilium,
    scenario::{self, DEMO_HOST_ENDPOINT, Layout, PolicyVerdict, api_server_to_host},
};

const EVENTS: &str = "/sys/fs/bpf/tc/globals/cilium_events";
const N: u32 = 1000;
const M: u32 = 500;
const K: u32 = 250;

fn notification(i: u32) -> Vec<u8> {
    PolicyVerdict {
        layout: if i.is_multiple_of(2) { Layout::V1_19 } else { Layout::V1_18 },
        endpoint: 100 + (i % 7) as u16,
        remote_identity: 2,
        verdict: 0,
        dst_port: 1000 + (i % 13) as u16,
        proto: 6,
        dir: 1,
        ipv6: false,
        match_type: 0,
        audited: true,
        packet_len: 60,
    }
    .encode()
}

/// Emits `count` notifications, a handful of distinct ones repeated.
fn emit(emitter: &Emitter, target: Target, count: u32) -> anyhow::Result<()> {
    let distinct = 10;
    for i in 0..distinct {
        let share = count / distinct + u32::from(i < count % distinct);
        if share > 0 {
            emitter.emit(target, &notification(i), share)?;
        }
    }
    Ok(())
}

/// The DaemonSet's privileges, as xtask rendered them from the chart.
fn chart_privileges(var: &str) -> anyhow::Result<PodPrivileges> {
    let uid: u32 = std::env::var("VERDICT_AGENT_UID")
        .context("VERDICT_AGENT_UID is not set: xtask passes the chart's runAsUser")?
        .parse()
        .context("VERDICT_AGENT_UID")?;
    let caps =
        std::env::var(var).with_context(|| format!("{var} is not set: xtask passes the chart's capabilities"))?;
    let mut privileges = PodPrivileges::parse(uid, &caps)?;
    // The worst a runtime passes on: the kernel's own default. Kernels that
    // charge maps to it (before 5.11) make the agent raise it, which is
    // what CAP_SYS_RESOURCE is for; later ones ignore it.
    privileges.memlock_bytes = Some(KERNEL_DEFAULT_MEMLOCK);
    Ok(privileges)
}

fn check_tap(tap: &str, port: u16, privileges: &PodPrivileges) -> anyhow::Result<()> {
    let pins = format!("/sys/fs/bpf/verdict-vmtest-{tap}");
    let _ = std::fs::remove_dir_all(&pins);
    let _ = std::fs::remove_file(EVENTS);

    let emitter = Emitter::load(Path::new(EVENTS)).context("loading the emitter")?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let log = format!("/tmp/agent-{tap}.log");
    let agent = AgentProcess::start_as(
        &addr.to_string(),
        addr,
        &["--tap", tap, "--pin-dir", &pins, "--cilium-events-map", EVENTS, "--poll-interval", "500ms"],
        Path::new(&log),
        Some(privileges),
    )?;
    let (effective, bounding) = capabilities_of(agent.child.id())?;
    ensure!(
        effective == privileges.capabilities && bounding == privileges.capabilities,
        "{tap}: the agent runs with effective {} and bounding {}, not exactly the chart's {}",
        names(effective),
        names(bounding),
        privileges.names()
    );
    println!(
        "VMTEST {tap} privileges uid={} capabilities={} memlock={} KiB (effective = bounding = the chart's)",
        privileges.uid,
        names(effective),
        privileges.memlock_bytes.unwrap_or(0) / 1024
    );
    let s = agent
        .scrape_until(Duration::from_secs(20), |s| s.sum("verdict_agent_cilium_events_map_present", &[]) == 1.0)?;
    ensure!(s.has("verdict_agent_tap_info", &[&format!("tap=\"{tap}\"")]), "tap_info does not say {tap}");
    // fentry reads notifications in place where the kernel casts to void
    // (Linux 6.17+), else (and always for kprobe) with a probe read.
    let direct = verdict_agent::bpf::btf::KernelBtf::load(Path::new("/sys/kernel/btf/vmlinux"))
        .ok()
        .and_then(|btf| verdict_agent::bpf::direct_read::rdonly_cast_to_void(&btf).ok().flatten())
        .is_some();
    let read = if tap == "fentry" && direct { "direct" } else { "probe_read" };
    ensure!(
        s.has("verdict_agent_tap_info", &[&format!("read=\"{read}\"")]),
        "{tap}: tap_info does not say read=\"{read}\" (the kernel {} the cast to void)",
        if direct { "announces" } else { "does not announce" }
    );
    println!("VMTEST {tap} reads notifications with {read}");
    let first_id = map_id(&s)?;

    emit(&emitter, Target::CiliumEvents, N)?;
    emit(&emitter, Target::OtherEvents, M)?;
    let emitted = emitter.counts()?;
    ensure!(emitted.cilium_events == N as u64 && emitted.other_events == M as u64, "emitter counted {emitted:?}");
    let s = agent.scrape_until(Duration::from_secs(20), |s| s.counted() >= N as f64)?;
    ensure!(s.counted() == N as f64, "{tap}: counted {} of {N} (log:\n{})", s.counted(), agent.log_text());
    ensure!(
        s.sum("verdict_agent_tap_other_map_writes_total", &[]) >= M as f64,
        "{tap}: other-map writes not seen: {}",
        s.sum("verdict_agent_tap_other_map_writes_total", &[])
    );
    let audited = s.sum("verdict_agent_endpoint_verdicts_total", &["verdict=\"audited\""]);
    ensure!(audited == N as f64, "{tap}: endpoint totals say {audited} audited, expected {N}");
    println!("VMTEST {tap} counted={N}/{N} other_map_ignored={M} endpoint_totals=ok");

    // Cilium restarts: its map is recreated with a new ID at the same path.
    drop(emitter);
    std::fs::remove_file(EVENTS).context("unpinning cilium_events")?;
    let emitter = Emitter::load(Path::new(EVENTS)).context("recreating cilium_events")?;
    let s = agent.scrape_until(Duration::from_secs(20), |s| map_id(s).is_ok_and(|id| id != first_id))?;
    let second_id = map_id(&s)?;
    ensure!(second_id != first_id, "{tap}: agent still follows map {first_id} after recreation");
    emit(&emitter, Target::CiliumEvents, K)?;
    let s = agent.scrape_until(Duration::from_secs(20), |s| s.counted() >= (N + K) as f64)?;
    ensure!(s.counted() == (N + K) as f64, "{tap}: after recreation counted {} of {}", s.counted(), N + K);
    println!("VMTEST {tap} recreate map_id {first_id}->{second_id} counted={}/{}", N + K, N + K);

    ensure!(agent.stop()?, "{tap}: agent did not exit cleanly on SIGTERM");
    ensure!(
        Path::new(&pins).join(verdict_common::maps::LAYOUT_VERSION).join(verdict_common::maps::FLOW_TABLE).exists(),
        "{tap}: pins removed on shutdown"
    );
    let _ = std::fs::remove_dir_all(&pins);
    Ok(())
}

/// A trial on the real tap: audited API-server traffic to the host, the
/// switch, denials from the emitter once the fake Cilium saw the PATCH, and
/// the agent's own revert.
fn check_trial(tap: &str, port: u16, privileges: &PodPrivileges) -> anyhow::Result<()> {
    let pins = "/sys/fs/bpf/verdict-vmtest-trial";
    let _ = std::fs::remove_dir_all(pins);
    let _ = std::fs::remove_file(EVENTS);
    let emitter = Emitter::load(Path::new(EVENTS)).context("loading the emitter")?;
    let dir = Path::new("/tmp/trial");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let socket = dir.join("cilium.sock");
    let fake = FakeCilium::start(&socket, DEMO_HOST_ENDPOINT)?;
    let endpoints = dir.join("endpoints.json");
    std::fs::write(&endpoints, scenario::cilium_endpoint_list(&scenario::demo(Layout::V1_19).endpoints).to_string())?;
    let state = dir.join("state");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let args = [
        "--tap",
        tap,
        "--pin-dir",
        pins,
        "--cilium-events-map",
        EVENTS,
        "--poll-interval",
        "2s",
        "--endpoints-file",
        endpoints.to_str().context("path")?,
        "--cilium-socket",
        socket.to_str().context("path")?,
        "--enable-enforcement",
        "--state-dir",
        state.to_str().context("path")?,
    ];
    let agent = AgentProcess::start_as(&addr.to_string(), addr, &args, &dir.join("agent.log"), Some(privileges))?;
    // In audit mode the API server's connections to the host are audited.
    emitter.emit(Target::CiliumEvents, &api_server_to_host(0, true), 20)?;
    agent.scrape_until(Duration::from_secs(20), |s| s.counted() >= 20.0)?;
    let request = serde_json::json!({
        "endpoint_id": DEMO_HOST_ENDPOINT, "endpoint_name": "host", "endpoint_kind": "host",
        "try_seconds": 120, "strict": false,
        "requested_by": {"who": "vm-driver", "reason": "trial on the real tap"},
        "preflight": {"state": "would_break", "exit_code": 1, "forced": true},
    });
    let (status, body) =
        verdict_agent_tests::scrape::http_post(addr, "/api/v1/enforcement/trials", &request.to_string())?;
    ensure!(status == 201, "the trial was not started (HTTP {status}): {body}");
    ensure!(fake.audit_mode() == "Disabled", "audit mode reads {} after the switch", fake.audit_mode());
    // The datapath enforces now: the forgotten flow is denied, per packet.
    let first_denied = std::time::Instant::now();
    emitter.emit(Target::CiliumEvents, &api_server_to_host(-133, false), 3)?;
    while fake.patches().len() < 2 {
        ensure!(
            first_denied.elapsed() < Duration::from_secs(30),
            "no revert within 30 s of the first denied verdict; log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (at, value) = fake.patches()[1].clone();
    ensure!(value == "Enabled", "the second PATCH wrote {value}, not Enabled");
    let (status, body) = verdict_agent_tests::scrape::http_get(addr, "/api/v1/enforcement/trials")?;
    ensure!(status == 200 && body.contains("\"reverted\"") && body.contains("lockout_in_progress"), "{body}");
    println!(
        "VMTEST trial {tap} reverted {} ms after the first denied critical verdict (emulated time, not a performance \
         figure)",
        at.saturating_duration_since(first_denied).as_millis()
    );
    ensure!(agent.stop()?, "trial: agent did not exit cleanly on SIGTERM");
    let _ = std::fs::remove_dir_all(pins);
    Ok(())
}

/// With the chart's default set on a kernel that needs more, the agent
/// must fail at start and name what it lacks and the chart value that
/// grants it.
fn check_default_set_is_refused_clearly(default: &PodPrivileges, needed_values: &str) -> anyhow::Result<()> {
    let pins = "/sys/fs/bpf/verdict-vmtest-default-set";
    let _ = std::fs::remove_dir_all(pins);
    let (code, text) = AgentProcess::run_to_failure(
        &["--listen", "127.0.0.1:19973", "--tap", "auto", "--pin-dir", pins, "--no-kube", "--no-cilium-api"],
        Some(default),
        Duration::from_secs(60),
    )?;
    let _ = std::fs::remove_dir_all(pins);
    let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
    ensure!(code == Some(2), "with {} the agent exited with {code:?}:\n{text}", default.names());
    for value in needed_values.split(',') {
        let key = value.split('=').next().unwrap_or(value);
        ensure!(last.contains(key), "the error does not name the chart value {key}: {last}");
    }
    ensure!(last.contains("CAP_SYS_RESOURCE"), "the error does not name CAP_SYS_RESOURCE: {last}");
    println!("VMTEST default-set {} refused: {last}", default.names());
    Ok(())
}

const PARANOID: &str = "/proc/sys/kernel/perf_event_paranoid";

/// Debian's kernels (and Ubuntu's) add a `perf_event_paranoid` level 3
/// that refuses perf_event_open without CAP_SYS_ADMIN, CAP_PERFMON or not:
/// the kprobe tap cannot attach with the chart's set there. The agent must
/// say so; then the node setting the docs prescribe (level 2, the upstream
/// default) is applied and the kprobe tap must work with the chart's set.
fn prepare_kprobe(privileges: &PodPrivileges) -> anyhow::Result<()> {
    let paranoid: i32 = std::fs::read_to_string(PARANOID)?.trim().parse()?;
    if paranoid <= 2 {
        println!("VMTEST kprobe perf_event_paranoid={paranoid}: no node setting needed");
        return Ok(());
    }
    let pins = "/sys/fs/bpf/verdict-vmtest-paranoid";
    let _ = std::fs::remove_dir_all(pins);
    let (code, text) = AgentProcess::run_to_failure(
        &["--listen", "127.0.0.1:19974", "--tap", "kprobe", "--pin-dir", pins, "--no-kube", "--no-cilium-api"],
        Some(privileges),
        Duration::from_secs(60),
    )?;
    let _ = std::fs::remove_dir_all(pins);
    let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
    ensure!(code == Some(2), "kprobe with perf_event_paranoid={paranoid}: the agent exited with {code:?}:\n{text}");
    ensure!(
        last.contains("kernel.perf_event_paranoid is 3") && last.contains("kernel.perf_event_paranoid=2"),
        "the kprobe error does not name the node setting: {last}"
    );
    println!("VMTEST kprobe perf_event_paranoid={paranoid} refused: {last}");
    std::fs::write(PARANOID, "2").context("setting kernel.perf_event_paranoid=2")?;
    println!("VMTEST kprobe node setting kernel.perf_event_paranoid=2 applied");
    Ok(())
}

fn map_id(s: &verdict_agent_tests::scrape::Scrape) -> anyhow::Result<String> {
    for k in s.series.keys() {
        if let Some(rest) = k.strip_prefix("verdict_agent_cilium_events_map_info{")
            && let Some(i) = rest.find("map_id=\"")
        {
            let v = &rest[i + 8..];
            return Ok(v[..v.find('"').unwrap_or(v.len())].to_string());
        }
    }
    bail!("no cilium_events_map_info series")
}

fn main() -> ExitCode {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("VMTEST kernel {}", kernel.trim());
    let privileges = match chart_privileges("VERDICT_AGENT_CAPS") {
        Ok(p) => p,
        Err(e) => {
            println!("VMTEST privileges FAIL: {e:#}");
            println!("VMTEST RESULT fail");
            return ExitCode::FAILURE;
        }
    };
    let mut ok = true;
    let mut working = None;
    for (tap, port) in [("fentry", 19971), ("kprobe", 19972)] {
        let checked = if tap == "kprobe" { prepare_kprobe(&privileges) } else { Ok(()) };
        match checked.and_then(|()| check_tap(tap, port, &privileges)) {
            Ok(()) => working = working.or(Some(tap)),
            Err(e) => {
                println!("VMTEST {tap} FAIL: {e:#}");
                ok = false;
            }
        }
    }
    // The trial on the first tap this kernel runs.
    match working.map(|tap| check_trial(tap, 19975, &privileges)) {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            println!("VMTEST trial FAIL: {e:#}");
            ok = false;
        }
        None => {
            println!("VMTEST trial FAIL: no tap attached on this kernel");
            ok = false;
        }
    }
    if let Ok(values) = std::env::var("VERDICT_AGENT_NEEDED_VALUES") {
        let checked = chart_privileges("VERDICT_AGENT_CAPS_DEFAULT")
            .and_then(|default| check_default_set_is_refused_clearly(&default, &values));
        if let Err(e) = checked {
            println!("VMTEST default-set FAIL: {e:#}");
            ok = false;
        }
    }
    println!("VMTEST RESULT {}", if ok { "pass" } else { "fail" });
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

//! Reads what `cilium monitor` (`cilium-dbg monitor` from v1.15) prints,
//! typically with `-t policy-verdict` or `-t drop`, into
//! [`CapturedVerdict`]s.
//!
//! Every line shape v1.12 through main prints was checked against the
//! sources (`pkg/monitor/datapath_policy.go`, `datapath_drop.go`,
//! `dissect.go`, `format/format.go`, `cilium{,-dbg}/cmd/monitor.go` at
//! v1.12.16, v1.13.9, v1.14.4, v1.16.8, v1.18.3 and main):
//!
//! * policy verdicts, with and without `auth: X, ` (v1.14+), named or `-n`
//!   numeric remote identities. The line is the same at every verbosity,
//!   `-j` included. The 1.8-era line (`remote ID %d, dst port %d, proto
//!   %d, ingress %v, action %s, match %s, %s`, `PolicyVerdictNotifyLen =
//!   32`) is read too;
//! * drops at INFO/`-v` (`xx drop (...) ...`, all four generations), at
//!   `-vv` (`CPU NN: MARK ... FROM <ep> DROP: ...`) and at `-j` (JSON);
//! * everything else Cilium prints (banners, logs, traces, debug events,
//!   `-vv` separators and packet dumps, DNS/L7 records, lost events) is
//!   classified and counted, not read.
//!
//! A verdict or drop line that cannot be read is *rejected*, never
//! skipped: the analysis is then incomplete. A line whose connection
//! summary does not end the way Cilium ends it was cut: when the next
//! line(s) continue it (a terminal or web page wrapped it) and exactly one
//! way of joining them reads, the joined line is the record.
//!
//! Cilium prints no timestamps; a leading RFC 3339 timestamp (as
//! `kubectl logs --timestamps` adds) is accepted and becomes `time`.
//! Redacted addresses (`10.xxx.0.xxx`, `x.x.x.x`, `<redacted>`) are read
//! as unknown, with their ports, and the verdict is marked `redacted`.
//!
//! What the text cannot say, and what is recorded instead:
//! * a `deny` verdict line has no reason code: `reason` is 0;
//! * an INFO drop line names the local endpoint only as `to endpoint N`,
//!   which is 0 on egress: `endpoint_id` is then 0 (`-vv` and `-j` print the
//!   emitting endpoint and are exact);
//! * drops carry no direction; it is inferred exactly as the in-kernel
//!   classifier does ([`guess_direction`]). Their 5-tuple comes from the
//!   connection summary (the protocol from its `tcp`/`udp`/`sctp`/`icmp`
//!   word);
//! * for ICMP verdicts `dst_port` holds the ICMP type, which Cilium's ICMP
//!   rules key on (`policy.h@main`: `key.dport = icmp type`).

use std::{
    io::BufRead,
    net::{IpAddr, SocketAddr},
    time::SystemTime,
};

use verdict_common::cilium::drop_reason;

pub use crate::cilium::capture_lines::{CaptureError, CaptureParse, SkippedLine};
use crate::{
    cilium::{
        capture_lines::{Line, LineOutcome, LineReader, kind, read_capture},
        identity,
        monitor::{
            api::{PrintedReason, auth_type_from_name, icmp_type_from_string, match_type_from_name, parse_drop_reason},
            drop_notify::guess_direction,
        },
    },
    model::{CapturedVerdict, Direction, NotifySource, Verdict},
    timefmt::parse_rfc3339,
};

/// Reads a whole capture. Fails only on binary input; every other problem
/// is a counted rejection or unknown line.
pub fn parse_monitor_text<R: BufRead>(input: R) -> Result<CaptureParse, CaptureError> {
    let mut pre_v1_14 = 0;
    let mut parsed = read_capture(input, |line, reader| {
        let (outcome, joined) = parse_record(line, reader);
        // `auth: %s, ` is printed from v1.14 on (`datapath_policy.go@v1.14.4`).
        if let LineOutcome::Verdict(v) = &outcome
            && v.source == NotifySource::PolicyVerdict
            && joined == 0
            && !line.text.contains(", auth: ")
        {
            pre_v1_14 += 1;
        }
        Ok((outcome, joined))
    })?;
    parsed.pre_v1_14_verdicts = pre_v1_14;
    Ok(parsed)
}

const VERDICT_MARK: &str = "Policy verdict log: ";
const DROP_MARK: &str = "xx drop (";
/// Continuation lines tried when a record was wrapped (an IPv6 verdict with
/// a tunnel summary spans four 80-column terminal lines).
const MAX_JOINED: usize = 3;

/// What a verdict-looking text read as: the verdict, and whether the line
/// ended the way Cilium ends it (else it may have been cut).
type Read = Result<(CapturedVerdict, bool), String>;

fn parse_record<R: BufRead>(line: &Line, reader: &mut LineReader<R>) -> (LineOutcome, usize) {
    let text = line.text.as_str();
    if text.trim().is_empty() {
        return (LineOutcome::Blank, 0);
    }
    let (time, body) = split_timestamp(text);
    let n = line.number;
    if let Some(kind) = record_kind(body) {
        let first = read_kind(kind, body, n, time);
        return match first {
            Ok((v, true)) => (verdict_outcome(v), 0),
            Ok(_) | Err(_) => match rejoin(kind, body, n, time, reader) {
                Ok(Some((v, joined))) => (verdict_outcome(v), joined),
                Ok(None) => (first_failure(first), 0),
                Err(why) => (LineOutcome::Rejected(why), 0),
            },
        };
    }
    // The marker itself cut: "... Policy verdict" / "log: flow ...".
    if ends_with_mark_prefix(body.trim_end())
        && let Ok(Some((v, joined))) = rejoin(RecordKind::Verdict, body, n, time, reader)
    {
        return (verdict_outcome(v), joined);
    }
    if body.trim_start().starts_with('{') {
        return (parse_json_line(body, n, time), 0);
    }
    if body.contains(" DROP: ") && body.contains("MARK ") {
        return (
            match parse_drop_verbose(body, n, time) {
                Ok(v) => verdict_outcome(v),
                Err(Refusal::NotPolicy) => LineOutcome::Benign(kind::NON_POLICY_DROP),
                Err(Refusal::Unreadable(why)) => LineOutcome::Rejected(why),
            },
            0,
        );
    }
    (classify_other(body.trim()), 0)
}

fn verdict_outcome(v: CapturedVerdict) -> LineOutcome {
    LineOutcome::Verdict(Box::new(v))
}

/// The outcome of a record that no join completed.
fn first_failure(first: Read) -> LineOutcome {
    match first {
        Err(why) if why == NOT_POLICY => LineOutcome::Benign(kind::NON_POLICY_DROP),
        Err(why) => LineOutcome::Rejected(why),
        Ok(_) => LineOutcome::Rejected(
            "the line ends before its connection summary is complete (cut, or wrapped with no continuation)".into(),
        ),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RecordKind {
    Verdict,
    Drop,
}

fn record_kind(body: &str) -> Option<RecordKind> {
    if body.contains(VERDICT_MARK) || body.contains("Policy verdict log:") {
        Some(RecordKind::Verdict)
    } else if body.contains(DROP_MARK) {
        Some(RecordKind::Drop)
    } else {
        None
    }
}

fn ends_with_mark_prefix(body: &str) -> bool {
    let mark = VERDICT_MARK.trim_end();
    (6..mark.len()).any(|k| body.ends_with(&mark[..k]) && mark.as_bytes()[k - 1] != b' ')
}

const NOT_POLICY: &str = "drop with a non-policy reason";

fn read_kind(kind: RecordKind, body: &str, line: usize, time: Option<SystemTime>) -> Read {
    match kind {
        RecordKind::Verdict => {
            let i = body.find("Policy verdict log:").ok_or("no \"Policy verdict log:\" marker")?;
            let rest = &body[i + "Policy verdict log:".len()..];
            parse_verdict(rest.strip_prefix(' ').unwrap_or(rest), line, time)
        }
        RecordKind::Drop => {
            let i = body.find(DROP_MARK).ok_or("no drop marker")?;
            match parse_drop_info(&body[i + DROP_MARK.len()..], line, time) {
                Ok(r) => Ok(r),
                Err(Refusal::NotPolicy) => Err(NOT_POLICY.into()),
                Err(Refusal::Unreadable(why)) => Err(why),
            }
        }
    }
}

/// A line that continues a wrapped record: it starts nothing of its own.
fn is_continuation(text: &str) -> bool {
    let t = text.trim();
    if t.is_empty() || record_kind(t).is_some() || split_timestamp(t).0.is_some() {
        return false;
    }
    // A page may wrap at the space before a summary's arrow: `-> 10.0.0.2:22
    // tcp SYN` continues; a trace line's arrow is followed by a word.
    if let Some(rest) = t.strip_prefix("-> ") {
        return rest.split_whitespace().next().and_then(parse_endpoint).is_some();
    }
    let starts = ["CPU ", "->", "<-", ">>", "{", "level=", "time=", "---", "Listening for events", "Press Ctrl-C"];
    !starts.iter().any(|s| t.starts_with(s))
}

/// Joins the record with up to [`MAX_JOINED`] continuation lines, each
/// either directly (a terminal cut inside a word) or with one space (a page
/// wrapped at a space). Accepted only when every complete reading agrees.
fn rejoin<R: BufRead>(
    kind: RecordKind,
    body: &str,
    line: usize,
    time: Option<SystemTime>,
    reader: &mut LineReader<R>,
) -> Result<Option<(CapturedVerdict, usize)>, String> {
    let mut candidates = vec![body.trim_end().to_owned()];
    for depth in 1..=MAX_JOINED {
        let Ok(Some(next)) = reader.peek(depth - 1) else { return Ok(None) };
        if next.binary || next.overlong.is_some() || !is_continuation(&next.text) {
            return Ok(None);
        }
        let cont = next.text.trim().to_owned();
        candidates = candidates.iter().flat_map(|c| [format!("{c}{cont}"), format!("{c} {cont}")]).collect();
        let mut complete: Vec<CapturedVerdict> = Vec::new();
        for c in &candidates {
            if let Ok((v, true)) = read_kind(kind, c, line, time)
                && !complete.contains(&v)
            {
                complete.push(v);
            }
        }
        match complete.len() {
            0 => continue,
            1 => {
                reader.consume_ahead(depth);
                return Ok(complete.pop().map(|v| (v, depth)));
            }
            n => {
                reader.consume_ahead(depth);
                return Err(format!(
                    "wrapped over {} lines, and the pieces join in {n} ways that read differently: not guessed",
                    depth + 1
                ));
            }
        }
    }
    Ok(None)
}

/// A leading RFC 3339 token, as `kubectl logs --timestamps` prefixes.
fn split_timestamp(text: &str) -> (Option<SystemTime>, &str) {
    let trimmed = text.trim_start();
    if let Some((first, rest)) = trimmed.split_once(' ')
        && let Ok(t) = parse_rfc3339(first)
    {
        return (Some(t), rest);
    }
    (None, text)
}

/// Lines that are not verdicts or drops, by kind (`format.go`,
/// `datapath_trace.go`, `datapath_debug.go`, `logrecord.go`, `agent.go`
/// and the `cilium-dbg monitor` command at the tags above).
fn classify_other(body: &str) -> LineOutcome {
    let b = LineOutcome::Benign;
    if body.starts_with("Listening for events on") || body == "Press Ctrl-C to quit" {
        return b(kind::BANNER);
    }
    if body.starts_with("Received an interrupt") || body.contains("Initializing dissection cache") {
        return b(kind::LOG);
    }
    if body.starts_with("level=") || (body.starts_with("time=") && body.contains(" level=")) {
        return b(kind::LOG);
    }
    if let Some((cpu, n)) = lost_events(body) {
        return LineOutcome::Lost(n, format!("{n} events lost on CPU {cpu}: verdicts in them are missing"));
    }
    if body.len() >= 10 && body.chars().all(|c| c == '-') {
        return b(kind::SEPARATOR);
    }
    // LogRecordNotify: `<- Request http from ...`, `-> Response dns to ...`.
    let l7 = [" Request ", " Response ", " Sample "];
    if (body.starts_with("<-") || body.starts_with("->")) && l7.iter().any(|w| body.contains(w)) {
        return b(kind::L7);
    }
    if body.starts_with("->") || body.starts_with("<-") || body.starts_with(">>") {
        return b(kind::TRACE);
    }
    if body.starts_with("CPU ") {
        if body.contains(" DEBUG: ") {
            return b(kind::DEBUG);
        }
        if body.contains(" TRACE ") || body.contains(" TRACE:") || body.contains(" FROM ") {
            return b(kind::TRACE);
        }
        return b(kind::OTHER_EVENT);
    }
    if body.starts_with("=> ") || body.starts_with("Unknown message type") {
        return b(kind::AGENT_EVENT);
    }
    if is_packet_dump(body) {
        return b(kind::DUMP);
    }
    LineOutcome::Unknown("not a policy verdict, a drop, or a line Cilium prints".into())
}

/// `-vv` prints gopacket layers (`Ethernet\t{Contents=...}`) and hex dumps
/// (`00000000  45 00 ...`) after each event.
fn is_packet_dump(body: &str) -> bool {
    if let Some((layer, rest)) = body.split_once('\t') {
        return rest.starts_with('{') && layer.chars().all(|c| c.is_ascii_alphanumeric() || c == '.');
    }
    if body.contains("{Contents=[") {
        return true;
    }
    let mut words = body.split_whitespace();
    let offset = words.next().unwrap_or("");
    offset.len() == 8
        && offset.chars().all(|c| c.is_ascii_hexdigit())
        && words.next().is_some_and(|w| w.len() == 2 && w.chars().all(|c| c.is_ascii_hexdigit()))
}

/// `CPU %02d: Lost %d events` (`format.go`), also inside the
/// `Unknown payload type: %d, CPU ...` variant.
fn lost_events(body: &str) -> Option<(&str, u64)> {
    let at = body.find("CPU ")?;
    let rest = &body[at + 4..];
    let (cpu, rest) = rest.split_once(": Lost ")?;
    let n = rest.strip_suffix(" events")?.parse().ok()?;
    Some((cpu, n))
}

/// A left-to-right reader over one line's fields.
struct Cursor<'a> {
    rest: &'a str,
}

impl<'a> Cursor<'a> {
    fn lit(&mut self, lit: &str) -> Result<(), String> {
        self.rest =
            self.rest.strip_prefix(lit).ok_or_else(|| format!("expected {lit:?} before {:?}", clip(self.rest)))?;
        Ok(())
    }
    fn try_lit(&mut self, lit: &str) -> bool {
        match self.rest.strip_prefix(lit) {
            Some(r) => {
                self.rest = r;
                true
            }
            None => false,
        }
    }
    fn until(&mut self, delim: &str) -> Result<&'a str, String> {
        let (a, b) =
            self.rest.split_once(delim).ok_or_else(|| format!("expected {delim:?} in {:?}", clip(self.rest)))?;
        self.rest = b;
        Ok(a)
    }
}

fn clip(s: &str) -> String {
    s.chars().take(40).collect()
}

fn number<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, String> {
    s.trim().parse().map_err(|_| format!("{what} {s:?} is not a number in range"))
}

fn hex_u32(s: &str) -> Result<u32, String> {
    s.strip_prefix("0x")
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or_else(|| format!("flow hash {s:?} is not 0x-hex"))
}

/// Names main gives the aggregate identities (`numericidentity.go@main`,
/// 2026-08: 11-14); before that 11 printed as a number.
const AGGREGATE_NAMES: &[(&str, u32)] = &[
    ("aggregate-cluster", 11),
    ("aggregate-cluster-mesh", 12),
    ("aggregate-world", 13),
    ("aggregate-remote-node", 14),
];

/// A remote ID as `NumericIdentity.String()` or `-n` prints it. Names map
/// back through the reserved table; any other name is refused, not guessed.
fn parse_identity(s: &str) -> Result<u32, String> {
    let s = s.trim();
    if let Ok(n) = s.parse() {
        return Ok(n);
    }
    identity::reserved_id(s)
        .or_else(|| AGGREGATE_NAMES.iter().find(|(n, _)| *n == s).map(|(_, id)| *id))
        .ok_or_else(|| format!("unknown identity name {s:?} (not a reserved identity; capture with -n)"))
}

/// `Policy verdict log: flow %#x local EP ID %d, remote ID %s, proto %d,
/// %s, action %s, [auth: %s, ]match %s, <summary>`; and the 1.8-era
/// `..., remote ID %d, dst port %d, proto %d, ingress %v, action %s,
/// match %s, <summary>`.
fn parse_verdict(body: &str, line: usize, time: Option<SystemTime>) -> Read {
    let mut c = Cursor { rest: body };
    c.lit("flow ")?;
    hex_u32(c.until(" local EP ID ")?)?;
    let endpoint_id: u16 = number(c.until(", remote ID ")?, "local EP ID")?;
    let remote = c.until(", proto ")?;
    let (remote, printed_port) = match remote.split_once(", dst port ") {
        Some((id, port)) => (id, Some(number::<u16>(port, "dst port")?)),
        None => (remote, None),
    };
    let remote_identity = parse_identity(remote)?;
    let proto: u8 = number(c.until(", ")?, "proto")?;
    let direction = match c.until(", ")? {
        "ingress" | "ingress true" => Direction::Ingress,
        "egress" | "ingress false" => Direction::Egress,
        other => return Err(format!("direction {other:?} is neither ingress nor egress")),
    };
    c.lit("action ")?;
    let verdict = match c.until(", ")? {
        "allow" => Verdict::Allowed,
        "deny" => Verdict::Denied,
        "redirect" => Verdict::Redirected,
        "audit" => Verdict::Audited,
        other => return Err(format!("action {other:?} is not allow, deny, redirect or audit")),
    };
    if c.try_lit("auth: ") {
        let auth = c.until(", ")?;
        auth_type_from_name(auth).ok_or_else(|| format!("auth type {auth:?} is not one Cilium prints"))?;
    }
    c.lit("match ")?;
    let (match_name, summary) = c.rest.split_once(", ").unwrap_or((c.rest, ""));
    let match_type = match_type_from_name(match_name.trim()).ok_or_else(|| {
        format!("match type {match_name:?} has no number (Cilium prints \"unknown\" for values it cannot name)")
    })?;

    let s = parse_summary(summary);
    let complete = s.complete_for(Some(proto));
    let (src_port, dst_port) = ports_for(proto, &s);
    let dst_port = printed_port.unwrap_or(dst_port);
    let v = CapturedVerdict {
        line,
        endpoint_id,
        direction,
        remote_identity,
        proto,
        dst_port,
        verdict,
        match_type,
        source: NotifySource::PolicyVerdict,
        reason: 0,
        ipv6: s.ipv6(),
        src_addr: s.src,
        dst_addr: s.dst,
        src_port,
        time,
        local_labels: Vec::new(),
        remote_labels: Vec::new(),
        namespace: None,
        pod: None,
        events: 1,
        local_is_host: false,
        redacted: s.redacted,
    };
    Ok((v, complete))
}

/// The source port and the value recorded as `dst_port` for a protocol.
fn ports_for(proto: u8, s: &Summary) -> (Option<u16>, u16) {
    match proto {
        6 | 17 | 132 => (s.src_port, s.dst_port.unwrap_or(0)),
        1 | 58 => (None, s.icmp_type.unwrap_or(0)),
        _ => (None, 0),
    }
}

/// What `GetConnectionSummary` printed.
#[derive(Debug, Default, PartialEq, Eq)]
struct Summary {
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    src_port: Option<u16>,
    dst_port: Option<u16>,
    /// tcp, udp, sctp, icmp (v1.18+), vrrp, igmp.
    proto_word: Option<String>,
    icmp_type: Option<u16>,
    /// `[unknown]`, `[error]`: nothing to read, and nothing cut.
    empty: bool,
    /// Both sides read as addresses (or redacted ones).
    sides: bool,
    /// Words after the protocol that are not what Cilium prints there, or
    /// a trailing comma: the line was cut.
    ragged: bool,
    redacted: bool,
}

impl Summary {
    fn ipv6(&self) -> bool {
        self.src.or(self.dst).is_some_and(|a| a.is_ipv6())
    }

    /// The protocol the summary names (`icmp` by address family).
    fn proto(&self) -> Option<u8> {
        match self.proto_word.as_deref()? {
            "tcp" => Some(6),
            "udp" => Some(17),
            "sctp" => Some(132),
            "icmp" => Some(if self.ipv6() { 58 } else { 1 }),
            "vrrp" => Some(112),
            "igmp" => Some(2),
            _ => None,
        }
    }

    /// Whether the summary ends as Cilium ends it for `proto` (`None`: the
    /// line does not say, as drop lines do not).
    fn complete_for(&self, proto: Option<u8>) -> bool {
        if self.empty {
            return true;
        }
        if !self.sides || self.ragged {
            return false;
        }
        let ported = self.src_port.is_some() || self.dst_port.is_some();
        match proto.or(self.proto()) {
            Some(6 | 17 | 132) if ported => {
                self.src_port.is_some() && self.dst_port.is_some() && self.proto_word.is_some()
            }
            Some(1 | 58) => self.icmp_type.is_some(),
            _ if ported => self.proto_word.is_some(),
            _ => true,
        }
    }
}

/// A redacted host: `10.xxx.0.xxx`, `x.x.x.x`, `<redacted>`, `[REDACTED]`,
/// `xxxx::xxxx`. Hex digits, dots, colons and at least one `x`/`*`.
fn is_redacted_host(s: &str) -> bool {
    let s = s.trim_matches(['[', ']']);
    let lower = s.to_ascii_lowercase();
    if matches!(lower.as_str(), "<redacted>" | "redacted" | "<ip>" | "***") {
        return true;
    }
    (lower.contains('x') || lower.contains('*'))
        && (lower.contains('.') || lower.contains(':'))
        && lower.chars().all(|c| c.is_ascii_hexdigit() || matches!(c, 'x' | '*' | '.' | ':'))
}

/// An address side: `(ip, port, redacted)`; `None` when unreadable.
fn parse_endpoint(s: &str) -> Option<(Option<IpAddr>, Option<u16>, bool)> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some((Some(sa.ip()), Some(sa.port()), false));
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some((Some(ip), None, false));
    }
    // `host:port` with a redacted host: bracketed when IPv6 (JoinHostPort).
    if let Some((host, port)) = s.rsplit_once(':')
        && let Ok(port) = port.parse::<u16>()
        && (host.starts_with('[') || !host.contains(':'))
        && is_redacted_host(host)
    {
        return Some((None, Some(port), true));
    }
    is_redacted_host(s).then_some((None, None, true))
}

fn is_mac(s: &str) -> bool {
    s.len() == 17 && s.split(':').count() == 6 && s.split(':').all(|o| o.len() == 2)
}

const TCP_FLAGS: &[&str] = &["SYN", "ACK", "RST", "FIN"];

/// `a:p -> b:q proto [flags]`, `a -> b [icmp ]TypeCode`, `a -> b`,
/// `mac -> mac EtherType`, `[unknown]`, `[error]`, each possibly followed
/// by ` [tunnel ...]` (v1.18+ overlay).
fn parse_summary(s: &str) -> Summary {
    let mut s = s.trim();
    if s == "[unknown]" || s == "[error]" {
        return Summary { empty: true, ..Summary::default() };
    }
    let mut ragged = false;
    if let Some(i) = s.find(" [tunnel ") {
        ragged = !s.ends_with(']');
        s = &s[..i];
    }
    let Some((left, right)) = s.split_once(" -> ") else { return Summary::default() };
    let mut words = right.split_whitespace();
    let dst_word = words.next().unwrap_or("");
    if is_mac(left.trim()) && is_mac(dst_word) {
        return Summary { sides: words.next().is_some(), ..Summary::default() };
    }
    let (Some((src, src_port, r1)), Some((dst, dst_port, r2))) =
        (parse_endpoint(left.trim()), parse_endpoint(dst_word))
    else {
        return Summary::default();
    };
    let mut out =
        Summary { src, dst, src_port, dst_port, sides: true, ragged, redacted: r1 || r2, ..Summary::default() };
    let ipv6 = out.ipv6() || left.contains('[') || left.matches(':').count() > 1;
    match words.next() {
        Some(w @ ("udp" | "sctp" | "vrrp" | "igmp")) => {
            out.proto_word = Some(w.to_owned());
            out.ragged |= words.next().is_some();
        }
        Some("tcp") => {
            out.proto_word = Some("tcp".into());
            let flags: Vec<&str> = words.collect();
            out.ragged |= flags.iter().any(|f| !TCP_FLAGS.contains(&f.trim_end_matches(',')))
                || flags.last().is_some_and(|f| f.ends_with(','));
        }
        Some("icmp") => {
            out.proto_word = Some("icmp".into());
            out.icmp_type = words.next().and_then(|t| icmp_type_from_string(ipv6, t)).map(u16::from);
            out.ragged |= words.next().is_some();
        }
        // Before v1.18 the ICMP type code follows the bare addresses.
        Some(t) if src_port.is_none() => {
            out.icmp_type = icmp_type_from_string(ipv6, t).map(u16::from);
            out.ragged |= out.icmp_type.is_none() || words.next().is_some();
        }
        Some(_) => out.ragged = true,
        None => {}
    }
    out
}

/// Why a drop line produced no verdict.
enum Refusal {
    /// A drop, but not a policy decision: benign.
    NotPolicy,
    Unreadable(String),
}

impl From<String> for Refusal {
    fn from(s: String) -> Refusal {
        Refusal::Unreadable(s)
    }
}

impl From<&str> for Refusal {
    fn from(s: &str) -> Refusal {
        Refusal::Unreadable(s.to_owned())
    }
}

/// A policy-reason drop, given what the line printed.
struct DropFields {
    line: usize,
    time: Option<SystemTime>,
    reason_text: String,
    src_label: u32,
    dst_label: u32,
    dst_id: u32,
    /// The emitting endpoint when the line says (`-vv`, `-j`).
    source: Option<u16>,
    summary: Summary,
}

fn drop_verdict(d: DropFields) -> Result<CapturedVerdict, Refusal> {
    let reason = match parse_drop_reason(&d.reason_text) {
        PrintedReason::Policy { code, .. } => code,
        PrintedReason::Numeric { code, .. } if drop_reason::is_policy(code) => code,
        _ => return Err(Refusal::NotPolicy),
    };
    let (direction, remote_identity) = guess_direction(d.src_label, d.dst_label, d.dst_id);
    let endpoint_id = match (d.source, direction) {
        (Some(ep), _) => ep,
        (None, Direction::Ingress) => u16::try_from(d.dst_id)
            .map_err(|_| format!("endpoint {} is outside Cilium's endpoint ID range", d.dst_id))?,
        // The INFO line does not print the emitting endpoint of an egress drop.
        (None, Direction::Egress) => 0,
    };
    let s = &d.summary;
    let proto = s.proto().or_else(|| s.icmp_type.map(|_| if s.ipv6() { 58 } else { 1 })).unwrap_or(0);
    // `-j` summaries carry ports without a protocol: keep them (proto 0).
    let (src_port, dst_port) = if proto == 0 { (s.src_port, s.dst_port.unwrap_or(0)) } else { ports_for(proto, s) };
    Ok(CapturedVerdict {
        line: d.line,
        endpoint_id,
        direction,
        remote_identity,
        proto,
        dst_port,
        verdict: Verdict::Denied,
        match_type: 0,
        source: NotifySource::PolicyDrop,
        reason,
        ipv6: s.ipv6(),
        src_addr: s.src,
        dst_addr: s.dst,
        src_port,
        time: d.time,
        local_labels: Vec::new(),
        remote_labels: Vec::new(),
        namespace: None,
        pod: None,
        events: 1,
        local_is_host: false,
        redacted: s.redacted,
    })
}

fn parse_identities(s: &str) -> Result<(u32, u32), String> {
    let (a, b) = s.split_once("->").ok_or_else(|| format!("identities {s:?} are not SRC->DST"))?;
    Ok((parse_identity(a)?, parse_identity(b)?))
}

/// `xx drop (%s) flow %#x to endpoint %d, ` then `file %s line %d, `
/// (v1.12), `ifindex %d, file %d:%d, ` (v1.13) or `ifindex %d, file %s:%d, `
/// (v1.14+), then ` [ ip-trace-id = %d ]` (v1.19+, when non-zero), then
/// `, identity %s->%s: <summary>`.
fn parse_drop_info(body: &str, line: usize, time: Option<SystemTime>) -> Result<(CapturedVerdict, bool), Refusal> {
    let mut c = Cursor { rest: body };
    let reason_text = c.until(") flow ")?.to_owned();
    if !matches!(parse_drop_reason(&reason_text), PrintedReason::Policy { .. } | PrintedReason::Numeric { .. }) {
        return Err(Refusal::NotPolicy);
    }
    hex_u32(c.until(" to endpoint ")?)?;
    let dst_id: u32 = number(c.until(", ")?, "endpoint")?;
    c.until(", identity ")?;
    let (src_label, dst_label) = parse_identities(c.until(": ")?)?;
    let summary = parse_summary(c.rest);
    let complete = summary.complete_for(None);
    let v = drop_verdict(DropFields { line, time, reason_text, src_label, dst_label, dst_id, source: None, summary })?;
    Ok((v, complete))
}

/// `-vv`: `CPU %02d: MARK %#x FROM %d DROP: %d bytes, reason %s`, then
/// `, identity %s->%s` when either label is non-zero, then `, to endpoint
/// %d` when `dst_id` is.
fn parse_drop_verbose(body: &str, line: usize, time: Option<SystemTime>) -> Result<CapturedVerdict, Refusal> {
    let mut c = Cursor { rest: body };
    c.until("MARK ")?;
    hex_u32(c.until(" FROM ")?)?;
    let source: u16 = number(c.until(" DROP: ")?, "FROM endpoint")?;
    let _bytes: u64 = number(c.until(" bytes, reason ")?, "byte count")?;
    let mut rest = c.rest.trim_end();
    let mut dst_id = 0;
    if let Some((head, ep)) = rest.rsplit_once(", to endpoint ") {
        dst_id = number(ep, "to endpoint")?;
        rest = head;
    }
    let (mut src_label, mut dst_label) = (0, 0);
    if let Some((head, ids)) = rest.rsplit_once(", identity ") {
        (src_label, dst_label) = parse_identities(ids)?;
        rest = head;
    }
    drop_verdict(DropFields {
        line,
        time,
        reason_text: rest.to_owned(),
        src_label,
        dst_label,
        dst_id,
        source: Some(source),
        summary: Summary::default(),
    })
}

/// `-j`: drops are JSON (`DropNotifyVerbose`); policy verdicts stay text.
/// Other event types are benign; unreadable JSON is not understood.
fn parse_json_line(body: &str, line: usize, time: Option<SystemTime>) -> LineOutcome {
    let v: serde_json::Value = match serde_json::from_str(body.trim()) {
        Ok(v) => v,
        Err(e) if body.contains("\"drop\"") => {
            return LineOutcome::Rejected(format!("drop JSON that does not parse: {e}"));
        }
        Err(e) => return LineOutcome::Unknown(format!("not JSON: {e}")),
    };
    match v.get("type").and_then(|t| t.as_str()).unwrap_or("") {
        "drop" => match parse_json_drop(&v, line, time) {
            Ok(v) => verdict_outcome(v),
            Err(Refusal::NotPolicy) => LineOutcome::Benign(kind::NON_POLICY_DROP),
            Err(Refusal::Unreadable(why)) => LineOutcome::Rejected(why),
        },
        "trace" | "traceSock" => LineOutcome::Benign(kind::TRACE),
        "debug" | "capture" => LineOutcome::Benign(kind::DEBUG),
        "logRecord" => LineOutcome::Benign(kind::L7),
        "agent" => LineOutcome::Benign(kind::AGENT_EVENT),
        "" => LineOutcome::Unknown("JSON without a monitor event type".into()),
        _ => LineOutcome::Benign(kind::OTHER_EVENT),
    }
}

fn parse_json_drop(v: &serde_json::Value, line: usize, time: Option<SystemTime>) -> Result<CapturedVerdict, Refusal> {
    let label = |k: &str| -> Result<u32, String> {
        match v.get(k) {
            None => Ok(0),
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| format!("{k} {n} out of range"))
            }
            Some(serde_json::Value::String(s)) => parse_identity(s),
            Some(other) => Err(format!("{k} is {other}, not an identity")),
        }
    };
    let reason_text = v.get("reason").and_then(|r| r.as_str()).unwrap_or("").to_owned();
    if matches!(parse_drop_reason(&reason_text), PrintedReason::Other) {
        return Err(Refusal::NotPolicy);
    }
    let src_label = label("srcLabel")?;
    let dst_label = label("dstLabel")?;
    let dst_id = label("dstID")?;
    let source = v
        .get("source")
        .and_then(|s| s.as_u64())
        .and_then(|s| u16::try_from(s).ok())
        .ok_or("drop JSON without a usable \"source\"")?;
    let summary = v.get("summary").map(json_summary).unwrap_or_default();
    drop_verdict(DropFields { line, time, reason_text, src_label, dst_label, dst_id, source: Some(source), summary })
}

/// `DissectSummary`: `l3 {src,dst}` addresses and `l4 {src,dst}` ports;
/// `l4` names no protocol, so the protocol stays 0.
fn json_summary(s: &serde_json::Value) -> Summary {
    let field = |layer: &str, k: &str| s.get(layer).and_then(|l| l.get(k)).and_then(|x| x.as_str()).map(str::to_owned);
    let ip = |k| field("l3", k).and_then(|a| a.parse().ok());
    let port = |k| field("l4", k).and_then(|p| p.parse().ok());
    Summary {
        src: ip("src"),
        dst: ip("dst"),
        src_port: port("src"),
        dst_port: port("dst"),
        sides: true,
        ..Summary::default()
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, io::Cursor as IoCursor, time::Duration};

    use super::*;
    use crate::cilium::{
        golden::golden_notifications,
        monitor::{
            Notification, decode,
            format::{MonitorText, drop_line, drop_verbose_line, icmp_summary, l4_summary, policy_verdict_line},
        },
    };

    fn parse(text: &str) -> CaptureParse {
        parse_monitor_text(IoCursor::new(text.as_bytes())).unwrap()
    }

    fn one(text: &str) -> CapturedVerdict {
        let p = parse(text);
        assert!(p.rejected.is_empty() && p.unknown.is_empty(), "{:?} {:?}", p.rejected, p.unknown);
        assert_eq!(p.verdicts.len(), 1);
        p.verdicts.into_iter().next().unwrap()
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    /// A verdict as the monitor reports it; tests override what differs.
    fn base(line: usize) -> CapturedVerdict {
        CapturedVerdict {
            line,
            endpoint_id: 0,
            direction: Direction::Ingress,
            remote_identity: 0,
            proto: 0,
            dst_port: 0,
            verdict: Verdict::Allowed,
            match_type: 0,
            source: NotifySource::PolicyVerdict,
            reason: 0,
            ipv6: false,
            src_addr: None,
            dst_addr: None,
            src_port: None,
            time: None,
            local_labels: vec![],
            remote_labels: vec![],
            namespace: None,
            pod: None,
            events: 1,
            local_is_host: false,
            redacted: false,
        }
    }

    #[test]
    fn v1_12_verdict_without_auth() {
        // datapath_policy.go@v1.12.16 DumpInfo.
        let v = one(
            "Policy verdict log: flow 0x1f2e3d4c local EP ID 1234, remote ID world, proto 6, ingress, action allow, \
             match L3-L4, 192.168.1.10:45678 -> 10.0.1.23:80 tcp SYN",
        );
        assert_eq!(
            v,
            CapturedVerdict {
                endpoint_id: 1234,
                remote_identity: 2,
                proto: 6,
                dst_port: 80,
                match_type: 2,
                src_addr: ip("192.168.1.10"),
                dst_addr: ip("10.0.1.23"),
                src_port: Some(45678),
                ..base(1)
            }
        );
    }

    #[test]
    fn v1_14_verdict_with_auth_audit() {
        // The example in CILIUM.md g, datapath_policy.go@v1.14.4.
        let v = one("Policy verdict log: flow 0x0 local EP ID 3001, remote ID world, proto 6, ingress, action audit, \
             auth: disabled, match none, 89.23.224.44:56372 -> 159.69.60.182:6443 tcp SYN");
        assert_eq!(
            v,
            CapturedVerdict {
                endpoint_id: 3001,
                remote_identity: 2,
                proto: 6,
                dst_port: 6443,
                verdict: Verdict::Audited,
                src_addr: ip("89.23.224.44"),
                dst_addr: ip("159.69.60.182"),
                src_port: Some(56372),
                ..base(1)
            }
        );
    }

    #[test]
    fn ipv6_udp_numeric_egress_redirect() {
        let v = one(
            "Policy verdict log: flow 0xabc local EP ID 77, remote ID 16777217, proto 17, egress, action redirect, \
             auth: spire, match L4-Only, [2001:db8::1]:40000 -> [2001:db8::2]:53 udp",
        );
        assert_eq!(
            v,
            CapturedVerdict {
                endpoint_id: 77,
                direction: Direction::Egress,
                remote_identity: 16_777_217,
                proto: 17,
                dst_port: 53,
                verdict: Verdict::Redirected,
                match_type: 3,
                ipv6: true,
                src_addr: ip("2001:db8::1"),
                dst_addr: ip("2001:db8::2"),
                src_port: Some(40000),
                ..base(1)
            }
        );
    }

    #[test]
    fn tcp_flags_and_flagless_tcp() {
        let v =
            one("Policy verdict log: flow 0x0 local EP ID 5, remote ID remote-node, proto 6, egress, action deny, \
             auth: disabled, match none, 10.0.0.5:1000 -> 10.0.1.9:10250 tcp SYN, ACK");
        assert_eq!((v.remote_identity, v.verdict, v.dst_port, v.reason), (6, Verdict::Denied, 10250, 0));
        // No flags: Cilium leaves "tcp " with a trailing space; editors strip it.
        for tail in ["tcp ", "tcp"] {
            let v = one(&format!(
                "Policy verdict log: flow 0x0 local EP ID 5, remote ID host, proto 6, ingress, action allow, \
                 auth: disabled, match all, 10.0.0.1:1 -> 10.0.0.2:22 {tail}"
            ));
            assert_eq!((v.remote_identity, v.dst_port, v.match_type, v.src_port), (1, 22, 4, Some(1)));
        }
    }

    #[test]
    fn icmp_with_and_without_the_icmp_word() {
        // v1.17 and before: no "icmp" word (dissect.go@v1.16.8); v1.18+: "icmp".
        for summary in ["10.0.0.1 -> 10.0.0.2 EchoRequest", "10.0.0.1 -> 10.0.0.2 icmp EchoRequest"] {
            let v = one(&format!(
                "Policy verdict log: flow 0x0 local EP ID 9, remote ID kube-apiserver, proto 1, egress, action allow, \
                 auth: disabled, match L3-Proto, {summary}"
            ));
            assert_eq!(
                v,
                CapturedVerdict {
                    endpoint_id: 9,
                    direction: Direction::Egress,
                    remote_identity: 7,
                    proto: 1,
                    dst_port: 8,
                    match_type: 5,
                    src_addr: ip("10.0.0.1"),
                    dst_addr: ip("10.0.0.2"),
                    ..base(1)
                }
            );
        }
        let v =
            one("Policy verdict log: flow 0x0 local EP ID 9, remote ID world-ipv6, proto 58, ingress, action deny, \
             auth: disabled, match none, fd00::1 -> fd00::2 icmp EchoRequest");
        assert_eq!((v.proto, v.dst_port, v.ipv6, v.remote_identity), (58, 128, true, 10));
        let v = one("Policy verdict log: flow 0x0 local EP ID 9, remote ID world, proto 1, ingress, action deny, \
             match none, 1.1.1.1 -> 10.0.0.2 DestinationUnreachable(Port)");
        assert_eq!(v.dst_port, 3);
    }

    #[test]
    fn summaries_without_ports() {
        let v = one("Policy verdict log: flow 0x0 local EP ID 9, remote ID world, proto 6, ingress, action deny, \
             auth: disabled, match none, [unknown]");
        assert_eq!((v.src_addr, v.dst_port, v.src_port), (None, 0, None));
        let v = one("Policy verdict log: flow 0x0 local EP ID 9, remote ID world, proto 6, ingress, action deny, \
             auth: disabled, match none, [error]");
        assert_eq!(v.src_addr, None);
        let v = one("Policy verdict log: flow 0x0 local EP ID 9, remote ID world, proto 132, ingress, action allow, \
             auth: disabled, match L3-L4, 10.0.0.1:5000 -> 10.0.0.2:38412 sctp [tunnel 172.18.0.2:1 -> 172.18.0.3:8472 vxlan]");
        assert_eq!((v.proto, v.dst_port, v.src_addr), (132, 38412, ip("10.0.0.1")));
    }

    #[test]
    fn unknown_identity_name_and_match_are_skipped_not_guessed() {
        let p = parse(
            "Policy verdict log: flow 0x0 local EP ID 9, remote ID overlay-to-encrypt, proto 6, ingress, action allow, \
             auth: disabled, match none, 1.1.1.1:1 -> 2.2.2.2:2 tcp SYN\n\
             Policy verdict log: flow 0x0 local EP ID 9, remote ID 11, proto 6, ingress, action allow, \
             match unknown, 1.1.1.1:1 -> 2.2.2.2:2 tcp SYN\n",
        );
        assert!(p.verdicts.is_empty());
        assert_eq!((p.rejected_total, p.rejected.len()), (2, 2));
        assert_eq!(p.rejected[0].line, 1);
        assert!(
            p.rejected[0].reason.contains("unknown identity name \"overlay-to-encrypt\""),
            "{}",
            p.rejected[0].reason
        );
        assert_eq!(p.rejected[1].line, 2);
        assert!(p.rejected[1].reason.contains("match type \"unknown\""), "{}", p.rejected[1].reason);
    }

    #[test]
    fn a_session_with_headers_lost_events_and_noise() {
        let input = "\
Listening for events on 8 CPUs with 64x4096 of shared memory
Press Ctrl-C to quit
level=info msg=\"Initializing dissection cache...\" subsys=monitor
Policy verdict log: flow 0x0 local EP ID 12, remote ID health, proto 6, ingress, action allow, auth: disabled, match L3-Only, 10.0.0.8:41234 -> 10.0.1.3:4240 tcp SYN

CPU 03: Lost 17 events
-> endpoint 12 flow 0x0 , identity health->12345 state new ifindex lxc123 orig-ip 10.0.0.8: 10.0.0.8:41234 -> 10.0.1.3:4240 tcp SYN
Policy verdict log: flow 0x0 local EP ID 12, remote ID health, proto 6, ingress, action
Received an interrupt, disconnecting from monitor...
";
        let p = parse(input);
        assert_eq!(p.lines, 9);
        assert_eq!(p.verdicts.len(), 1);
        assert_eq!(p.verdicts[0].line, 4);
        assert_eq!(p.verdicts[0].remote_identity, 4);
        // The cut line has no continuation: rejected, never dropped.
        assert_eq!(p.rejected.iter().map(|r| r.line).collect::<Vec<_>>(), vec![8]);
        assert_eq!(p.lost_events, 17);
        assert_eq!(p.benign, BTreeMap::from([(kind::BANNER, 2), (kind::LOG, 2), (kind::LOST, 1), (kind::TRACE, 1)]));
        assert_eq!(p.unknown_total, 0);
    }

    #[test]
    fn kubectl_timestamp_prefix() {
        let v = one(
            "2024-05-01T12:00:01.500000000Z Policy verdict log: flow 0x0 local EP ID 12, remote ID world, proto 17, \
             egress, action allow, auth: disabled, match L3-L4, 10.0.0.8:5353 -> 8.8.8.8:53 udp",
        );
        assert_eq!(v.time, Some(SystemTime::UNIX_EPOCH + Duration::new(1_714_564_801, 500_000_000)));
        assert_eq!(v.dst_port, 53);
    }

    #[test]
    fn drop_lines_every_generation() {
        // v1.12: file name and "line".
        let v = one("xx drop (Policy denied) flow 0x11112222 to endpoint 1234, file bpf_lxc.c line 1120, , \
             identity world->12345: 1.2.3.4:5555 -> 10.0.1.23:80 tcp SYN");
        assert_eq!(
            v,
            CapturedVerdict {
                endpoint_id: 1234,
                remote_identity: 2,
                verdict: Verdict::Denied,
                source: NotifySource::PolicyDrop,
                reason: 133,
                proto: 6,
                dst_port: 80,
                src_addr: ip("1.2.3.4"),
                dst_addr: ip("10.0.1.23"),
                src_port: Some(5555),
                ..base(1)
            }
        );
        // v1.13: ifindex, numeric file; egress: endpoint unknown from INFO.
        let v = one("xx drop (Policy denied by denylist) flow 0x0 to endpoint 0, ifindex 17, file 2:1326, , \
             identity 12345->world: 10.0.1.23:40000 -> 1.1.1.1:443 tcp SYN");
        assert_eq!(
            (v.endpoint_id, v.direction, v.remote_identity, v.reason, v.proto, v.dst_port),
            (0, Direction::Egress, 2, 181, 6, 443)
        );
        // v1.14-v1.18: file name:line; auth type in ext_error.
        let v =
            one("xx drop (Authentication required, 1) flow 0x0 to endpoint 300, ifindex 9, file bpf_lxc.c:2087, , \
             identity 70000->12345: [fd00::1]:3000 -> [fd00::2]:8080 tcp SYN");
        assert_eq!(
            (v.endpoint_id, v.direction, v.remote_identity, v.reason, v.ipv6),
            (300, Direction::Ingress, 70000, 189, true)
        );
        // v1.19+: ip-trace-id.
        let v = one("xx drop (Policy denied) flow 0xabc to endpoint 42, ifindex 4, file bpf_lxc.c:2420,  \
             [ ip-trace-id = 99 ], identity remote-node->12345: 10.0.2.1:1 -> 10.0.1.2:2 udp");
        assert_eq!((v.endpoint_id, v.remote_identity, v.reason), (42, 6, 133));
    }

    #[test]
    fn non_policy_and_unknown_drops_are_skipped() {
        let p = parse(
            "xx drop (Invalid source ip) flow 0x0 to endpoint 0, ifindex 5, file bpf_lxc.c:123, , identity 1->2: [unknown]\n\
             xx drop (150, 0) flow 0x0 to endpoint 0, ifindex 5, file unknown(9):1, , identity 1->2: [unknown]\n",
        );
        assert!(p.verdicts.is_empty());
        assert_eq!(p.rejected_total + p.unknown_total, 0);
        assert_eq!(p.benign, BTreeMap::from([(kind::NON_POLICY_DROP, 2)]));
    }

    #[test]
    fn verbose_and_json_drops_name_the_emitting_endpoint() {
        let input = "\
------------------------------------------------------------------------------
CPU 01: MARK 0x0 FROM 42 DROP: 74 bytes, reason Policy denied by denylist, identity 12345->world
Ethernet\t{Contents=[..14..] Payload=[..60..] SrcMAC=aa:bb:cc:dd:ee:ff DstMAC=11:22:33:44:55:66 EthernetType=IPv4 Length=0}
{\"cpu\":\"CPU 00:\",\"type\":\"drop\",\"mark\":\"0x0\",\"reason\":\"Policy denied\",\"source\":77,\"bytes\":60,\"srcLabel\":2,\"dstLabel\":4321,\"dstID\":77,\"Line\":2681,\"File\":2,\"ExtError\":0,\"Ifindex\":12,\"summary\":{\"l3\":{\"src\":\"1.1.1.1\",\"dst\":\"10.0.0.7\"},\"l4\":{\"src\":\"4000\",\"dst\":\"443\"}}}
{\"cpu\":\"CPU 00:\",\"type\":\"trace\",\"mark\":\"0x0\"}
";
        let p = parse(input);
        assert_eq!(p.verdicts.len(), 2);
        let v = &p.verdicts[0];
        assert_eq!(
            (v.line, v.endpoint_id, v.direction, v.remote_identity, v.reason),
            (2, 42, Direction::Egress, 2, 181)
        );
        let v = &p.verdicts[1];
        assert_eq!(
            (v.line, v.endpoint_id, v.direction, v.remote_identity, v.reason, v.src_addr, v.src_port),
            (4, 77, Direction::Ingress, 2, 133, ip("1.1.1.1"), Some(4000))
        );
        assert_eq!(p.rejected_total + p.unknown_total, 0);
        assert_eq!(p.benign, BTreeMap::from([(kind::SEPARATOR, 1), (kind::DUMP, 1), (kind::TRACE, 1)]));
    }

    #[test]
    fn invalid_utf8_is_not_fatal() {
        let mut bytes = b"\xff\xfe junk\n".to_vec();
        bytes.extend_from_slice(
            b"Policy verdict log: flow 0x0 local EP ID 1, remote ID host, proto 6, ingress, action allow, match none, [unknown]\n",
        );
        let p = parse_monitor_text(IoCursor::new(bytes)).unwrap();
        assert_eq!((p.lines, p.verdicts.len(), p.unknown_total), (2, 1, 1));
    }

    /// Every golden notification, printed the way each generation prints it,
    /// reads back to what the kernel counts.
    #[test]
    fn printed_golden_vectors_read_back() {
        for g in golden_notifications() {
            let Ok(Some(key)) = g.expected else { continue };
            let n = decode(&g.bytes).unwrap();
            let v6 = key.flags & 1 != 0;
            let (src, dst) = if v6 { ("[fd00::1]:4000", "[fd00::2]:80") } else { ("10.0.0.1:4000", "10.0.0.2:80") };
            for text in MonitorText::ALL {
                for numeric in [false, true] {
                    let line = match &n {
                        Notification::PolicyVerdict(p) => {
                            let summary = match p.proto {
                                1 | 58 => icmp_summary(
                                    src.rsplit_once(':').unwrap().0.trim_matches(['[', ']']).parse().unwrap(),
                                    dst.rsplit_once(':').unwrap().0.trim_matches(['[', ']']).parse().unwrap(),
                                    "EchoRequest",
                                    text >= MonitorText::V1_19,
                                ),
                                _ => l4_summary(src.parse().unwrap(), dst.parse().unwrap(), "tcp", &["SYN"]),
                            };
                            policy_verdict_line(p, text, numeric, &summary)
                        }
                        Notification::Drop(d) => drop_line(d, text, numeric, "[unknown]"),
                        Notification::Other { .. } => unreachable!(),
                    };
                    let v = one(&line);
                    assert_eq!(v.direction as u8 + 1, key.direction, "{}: {line}", g.name);
                    assert_eq!(v.remote_identity, key.remote_identity, "{}: {line}", g.name);
                    assert_eq!(v.match_type, key.match_type, "{}: {line}", g.name);
                    assert_eq!(
                        crate::model::Verdict::from(verdict_common::maps::VerdictClass::from_u8(key.class).unwrap()),
                        v.verdict
                    );
                    match &n {
                        Notification::PolicyVerdict(p) => {
                            assert_eq!(v.endpoint_id, key.endpoint_id, "{}", g.name);
                            assert_eq!(v.proto, key.proto);
                            assert_eq!(v.ipv6, v6);
                            if p.proto == 6 {
                                assert_eq!(v.dst_port, 80);
                            }
                        }
                        Notification::Drop(d) => {
                            assert_eq!(v.reason, key.reason);
                            let expect_ep = if d.dst_id != 0 { key.endpoint_id } else { 0 };
                            assert_eq!(v.endpoint_id, expect_ep, "{}", g.name);
                            let vv = one(&drop_verbose_line(d, 0, numeric));
                            assert_eq!(
                                (vv.endpoint_id, vv.remote_identity, vv.reason),
                                (key.endpoint_id, key.remote_identity, key.reason)
                            );
                        }
                        Notification::Other { .. } => {}
                    }
                }
            }
        }
    }

    #[test]
    fn wrapped_lines_are_rejoined_only_when_unambiguous() {
        let full = "Policy verdict log: flow 0x0 local EP ID 227, remote ID world, proto 6, ingress, action audit, \
                    auth: disabled, match none, 198.51.100.7:50022 -> 10.0.0.11:6443 tcp SYN";
        // Cut at every position: a terminal (nothing lost) and a page (at a space, the space lost).
        for at in 20..full.len() - 1 {
            let (a, b) = full.split_at(at);
            let term = parse(&format!("{a}\n{b}\n"));
            let page = (a.ends_with(' ') || b.starts_with(' '))
                .then(|| parse(&format!("{}\n{}\n", a.trim_end(), b.trim_start())));
            for p in [Some(term), page].into_iter().flatten() {
                assert_eq!(p.rejected_total, 0, "cut at {at}: {:?}", p.rejected);
                if p.verdicts.len() == 1 {
                    let v = &p.verdicts[0];
                    assert_eq!((v.dst_port, v.src_port, v.remote_identity), (6443, Some(50022), 2), "cut at {at}");
                    assert_eq!(p.rejoined, usize::from(p.lines == 2 && p.unknown_total == 0), "cut at {at}");
                } else {
                    panic!("cut at {at}: {:?} {:?}", p.verdicts, p.unknown);
                }
            }
        }
        // A trace line after a cut verdict is not its continuation.
        let p = parse(
            "Policy verdict log: flow 0x0 local EP ID 227, remote ID world, proto 6, ingress, action audit, \
             auth: disabled, match none, 198.51.100.7:50022 -> 10.0.0.11:64\n\
             -> endpoint 227 flow 0x0 , identity world->host state new ifindex 0 orig-ip 0.0.0.0: 1.1.1.1:1 -> 2.2.2.2:2 tcp SYN\n",
        );
        assert_eq!((p.verdicts.len(), p.rejected_total, p.benign[kind::TRACE]), (0, 1, 1));
    }

    #[test]
    fn redacted_addresses_keep_ports() {
        for (src, dst) in [
            ("10.xxx.0.xxx:51512", "10.xxx.0.xxx:6443"),
            ("x.x.x.x:51512", "<redacted>:6443"),
            ("[xxxx::xxxx]:51512", "[2001:db8::1]:6443"),
        ] {
            let v = one(&format!(
                "Policy verdict log: flow 0x0 local EP ID 227, remote ID world, proto 6, ingress, action audit, \
                 auth: disabled, match none, {src} -> {dst} tcp SYN"
            ));
            assert!(v.redacted && v.src_addr.is_none(), "{src}");
            assert_eq!((v.src_port, v.dst_port), (Some(51512), 6443), "{src}");
        }
    }

    #[test]
    fn aggregate_identity_names_of_main() {
        let v = one(
            "Policy verdict log: flow 0x0 local EP ID 9, remote ID aggregate-world, proto 6, egress, action allow, \
             auth: disabled, match all, 10.0.0.1:1000 -> 1.1.1.1:443 tcp SYN",
        );
        assert_eq!((v.remote_identity, v.match_type), (13, 4));
    }
}

//! What the capture readers (`monitor_text`, `hubble_json`) share: a line
//! reader whose memory is bounded by [`MAX_LINE_BYTES`] whatever the input,
//! and the tally of what every line was.
//!
//! Every line ends up in exactly one class:
//! * a verdict (or policy drop) that was read;
//! * **rejected**: it looks like a verdict but could not be read. Any
//!   rejection makes the analysis incomplete (it is lost evidence);
//! * **benign**: understood, not a verdict (banners, logs, traces, dumps,
//!   non-policy drops, DNS/L7 records), counted by kind;
//! * **not understood**: anything else, counted, a few kept as examples.
//!
//! Examples are capped ([`KEPT_EXAMPLES`], [`KEPT_REJECTED`]); counts are
//! exact. Binary input (NUL bytes, runs of invalid UTF-8) is refused.

use std::{
    collections::{BTreeMap, VecDeque},
    io::BufRead,
};

use thiserror::Error;

use crate::model::{CapturedVerdict, NotifySource, Verdict};

/// Longest line kept; the rest of a longer line is read and discarded, and
/// the line is a counted rejection or unknown line. Hubble flows with many
/// labels reach a few KiB; nothing Cilium prints comes near this.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Examples kept of lines not understood.
pub const KEPT_EXAMPLES: usize = 20;
/// Rejected verdict lines kept with their line number and reason.
pub const KEPT_REJECTED: usize = 200;
/// Characters of a line kept in an example.
const EXAMPLE_CHARS: usize = 200;
/// Binary lines tolerated (each counted) before the input is refused.
const MAX_BINARY_LINES: usize = 8;

#[derive(Debug, Error)]
pub enum CaptureError {
    #[error(
        "line {line} is binary data (NUL bytes or invalid UTF-8), not the text `cilium-dbg monitor` or `hubble observe` prints; pass the capture as text"
    )]
    Binary { line: usize },
}

/// One line of input, at most [`MAX_LINE_BYTES`] long.
#[derive(Clone, Debug)]
pub struct Line {
    /// 1-based.
    pub number: usize,
    /// The line without its end of line; invalid UTF-8 replaced.
    pub text: String,
    /// The line's full length when it was longer than the bound.
    pub overlong: Option<usize>,
    pub binary: bool,
}

/// Lines of a capture, with a push-back for readers that look ahead (a
/// wrapped verdict line continues on the next line).
pub struct LineReader<R> {
    input: R,
    number: usize,
    ahead: VecDeque<Line>,
    binary_lines: usize,
    /// A read error ends the input; the reader reports it once.
    pub read_error: Option<(usize, std::io::Error)>,
}

impl<R: BufRead> LineReader<R> {
    pub fn new(input: R) -> LineReader<R> {
        LineReader { input, number: 0, ahead: VecDeque::new(), binary_lines: 0, read_error: None }
    }

    /// Lines read so far (blank ones included), look-ahead excluded.
    pub fn lines_read(&self) -> usize {
        self.number - self.ahead.len()
    }

    pub fn next_line(&mut self) -> Result<Option<Line>, CaptureError> {
        if let Some(l) = self.ahead.pop_front() {
            return Ok(Some(l));
        }
        self.read_one()
    }

    /// The `n`th line ahead (0 = the next), without consuming it.
    pub fn peek(&mut self, n: usize) -> Result<Option<&Line>, CaptureError> {
        while self.ahead.len() <= n {
            match self.read_one()? {
                Some(l) => self.ahead.push_back(l),
                None => return Ok(None),
            }
        }
        Ok(self.ahead.get(n))
    }

    /// Drops `n` look-ahead lines (they were joined to the current one).
    pub fn consume_ahead(&mut self, n: usize) {
        for _ in 0..n {
            self.ahead.pop_front();
        }
    }

    fn read_one(&mut self) -> Result<Option<Line>, CaptureError> {
        if self.read_error.is_some() {
            return Ok(None);
        }
        let mut buf = Vec::new();
        let mut total = 0usize;
        let mut any = false;
        loop {
            let avail = match self.input.fill_buf() {
                Ok(a) => a,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.read_error = Some((self.number + 1, e));
                    break;
                }
            };
            if avail.is_empty() {
                break;
            }
            any = true;
            let (chunk, used, done) = match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (&avail[..i], i + 1, true),
                None => (avail, avail.len(), false),
            };
            let room = MAX_LINE_BYTES.saturating_sub(buf.len());
            buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            total += chunk.len();
            // NUL anywhere: refuse now rather than read a /dev/zero to its end.
            let nul = chunk.contains(&0);
            self.input.consume(used);
            if done || nul {
                break;
            }
        }
        if !any {
            return Ok(None);
        }
        self.number += 1;
        while buf.last() == Some(&b'\r') {
            buf.pop();
        }
        let binary = buf.contains(&0) || invalid_utf8_run(&buf, total > buf.len());
        if binary {
            self.binary_lines += 1;
            if self.binary_lines > MAX_BINARY_LINES || self.number == 1 {
                return Err(CaptureError::Binary { line: self.number });
            }
        }
        let text = match String::from_utf8(buf) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        };
        Ok(Some(Line { number: self.number, text, overlong: (total > MAX_LINE_BYTES).then_some(total), binary }))
    }
}

/// More than a stray byte or two of invalid UTF-8 (a Latin-1 name is
/// tolerated, a binary blob is not). `cut` says the line was truncated
/// at the bound, possibly inside a character.
fn invalid_utf8_run(bytes: &[u8], cut: bool) -> bool {
    let mut rest = bytes;
    let mut bad = 0usize;
    loop {
        match std::str::from_utf8(rest) {
            Ok(_) => return false,
            Err(e) => {
                let Some(len) = e.error_len() else { return !cut && bad + 1 > 4 };
                bad += len;
                if bad > 4 {
                    return true;
                }
                rest = &rest[e.valid_up_to() + len..];
            }
        }
    }
}

/// A line that did not yield a verdict: its number, why, and (clipped) text.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SkippedLine {
    pub line: usize,
    pub reason: String,
    pub text: String,
}

impl SkippedLine {
    pub fn new(line: usize, reason: impl Into<String>, text: &str) -> SkippedLine {
        SkippedLine { line, reason: reason.into(), text: text.chars().take(EXAMPLE_CHARS).collect() }
    }
}

/// Kinds of benign lines, as counted.
pub mod kind {
    pub const BANNER: &str = "monitor banner";
    pub const LOG: &str = "log message";
    pub const TRACE: &str = "trace event";
    pub const DEBUG: &str = "debug event";
    pub const DUMP: &str = "packet dump (-v -v)";
    pub const SEPARATOR: &str = "separator (-v -v)";
    pub const L7: &str = "DNS or L7 record";
    pub const NON_POLICY_DROP: &str = "drop with a non-policy reason";
    pub const LOST: &str = "lost-events notice";
    pub const AGENT_EVENT: &str = "agent event";
    pub const NODE_STATUS: &str = "hubble relay node status";
    pub const CAPTURE: &str = "capture or recorder event";
    pub const OTHER_EVENT: &str = "other monitor event";
    pub const DUPLICATE_DROP: &str = "drop of a packet already counted by its deny verdict";
}

/// What one line (or a few rejoined lines) meant.
pub enum LineOutcome {
    Verdict(Box<CapturedVerdict>),
    /// Looked like a verdict; could not be read.
    Rejected(String),
    Benign(&'static str),
    /// `n` events or flows lost: verdicts in them are missing.
    Lost(u64, String),
    Unknown(String),
    Blank,
}

/// The result of reading one capture.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CaptureParse {
    pub verdicts: Vec<CapturedVerdict>,
    /// Lines read, blank ones included.
    pub lines: usize,
    /// Verdict-looking lines that could not be read: the count, and the
    /// first [`KEPT_REJECTED`] with number and reason.
    pub rejected_total: usize,
    pub rejected: Vec<SkippedLine>,
    /// Lines not understood: the count and the first [`KEPT_EXAMPLES`].
    pub unknown_total: usize,
    pub unknown: Vec<SkippedLine>,
    /// Benign lines by kind.
    pub benign: BTreeMap<&'static str, usize>,
    /// Events the capture says were lost, and the notices saying so (first few).
    pub lost_events: u64,
    pub lost_notices: Vec<SkippedLine>,
    /// Verdicts whose address was redacted.
    pub redacted: usize,
    /// Verdict records read from lines a terminal or page had wrapped.
    pub rejoined: usize,
    /// Monitor verdict lines without `auth:`: printed by Cilium before 1.14.
    pub pre_v1_14_verdicts: usize,
}

impl CaptureParse {
    pub fn record(&mut self, line: &Line, outcome: LineOutcome) {
        match outcome {
            LineOutcome::Verdict(v) => {
                if v.redacted {
                    self.redacted += 1;
                }
                self.verdicts.push(*v);
            }
            LineOutcome::Rejected(reason) => self.reject(line.number, reason, &line.text),
            LineOutcome::Benign(kind) => *self.benign.entry(kind).or_default() += 1,
            LineOutcome::Lost(n, why) => {
                self.lost_events = self.lost_events.saturating_add(n);
                *self.benign.entry(kind::LOST).or_default() += 1;
                if self.lost_notices.len() < KEPT_EXAMPLES {
                    self.lost_notices.push(SkippedLine::new(line.number, why, &line.text));
                }
            }
            LineOutcome::Unknown(reason) => {
                self.unknown_total += 1;
                if self.unknown.len() < KEPT_EXAMPLES {
                    self.unknown.push(SkippedLine::new(line.number, reason, &line.text));
                }
            }
            LineOutcome::Blank => {}
        }
    }

    pub fn reject(&mut self, line: usize, reason: impl Into<String>, text: &str) {
        self.rejected_total += 1;
        if self.rejected.len() < KEPT_REJECTED {
            self.rejected.push(SkippedLine::new(line, reason, text));
        }
    }

    /// Benign lines in total.
    pub fn benign_total(&self) -> usize {
        self.benign.values().sum()
    }

    /// Ends a read: a read error is a rejection (what followed is lost),
    /// and drops of packets whose deny verdict was read are folded into it.
    pub fn finish<R>(&mut self, reader: &mut LineReader<R>) {
        self.lines = reader.number;
        if let Some((line, e)) = reader.read_error.take() {
            self.reject(line, format!("read error, the rest of the capture is missing: {e}"), "");
        }
        let folded = fold_drops_into_verdicts(&mut self.verdicts);
        if folded > 0 {
            *self.benign.entry(kind::DUPLICATE_DROP).or_default() += folded;
        }
    }
}

/// The reading loop: `parse` sees each line (and the reader, to look
/// ahead), and says what it was.
pub fn read_capture<R: BufRead>(
    input: R,
    mut parse: impl FnMut(&Line, &mut LineReader<R>) -> Result<(LineOutcome, usize), CaptureError>,
) -> Result<CaptureParse, CaptureError> {
    let mut reader = LineReader::new(input);
    let mut out = CaptureParse::default();
    while let Some(line) = reader.next_line()? {
        if let Some(len) = line.overlong {
            let looks = line.text.contains("verdict") || line.text.contains("drop");
            let why = format!("line of {len} bytes, longer than the {MAX_LINE_BYTES}-byte bound: not read");
            if looks {
                out.reject(line.number, why, &line.text);
            } else {
                out.record(&line, LineOutcome::Unknown(why));
            }
            continue;
        }
        if line.binary {
            out.record(&line, LineOutcome::Unknown("binary data".into()));
            continue;
        }
        let (outcome, joined) = parse(&line, &mut reader)?;
        if joined > 0 && matches!(outcome, LineOutcome::Verdict(_)) {
            out.rejoined += 1;
        }
        out.record(&line, outcome);
    }
    out.finish(&mut reader);
    Ok(out)
}

/// Cilium sends a deny verdict and then the drop notification of the same
/// packet (`policy_log.h`, then `send_drop_notify` in `bpf_lxc.c` and
/// `bpf_host.c`, v1.12 through main): both print. A drop that repeats a
/// recent deny verdict's 5-tuple is that packet's second report, and is
/// dropped here. Returns how many were.
pub fn fold_drops_into_verdicts(verdicts: &mut Vec<CapturedVerdict>) -> usize {
    /// Per-CPU buffers interleave; the pair is never far apart.
    const LOOKBACK: usize = 64;
    type Tuple = (Option<std::net::IpAddr>, Option<std::net::IpAddr>, u16, u16, u8);
    let tuple =
        |v: &CapturedVerdict| -> Option<Tuple> { Some((v.src_addr, v.dst_addr, v.src_port?, v.dst_port, v.proto)) };
    // A `-j` drop names no protocol (0): the rest of the tuple must match.
    let same = |verdict: &Tuple, drop: &Tuple| {
        verdict.0 == drop.0
            && verdict.1 == drop.1
            && verdict.2 == drop.2
            && verdict.3 == drop.3
            && (verdict.4 == drop.4 || drop.4 == 0)
    };
    let mut recent: VecDeque<(usize, Tuple)> = VecDeque::new();
    let mut drop_idx = Vec::new();
    for (i, v) in verdicts.iter().enumerate() {
        let Some(t) = tuple(v) else { continue };
        match (v.source, v.verdict) {
            (NotifySource::PolicyVerdict, Verdict::Denied) => {
                recent.push_back((i, t));
                if recent.len() > LOOKBACK {
                    recent.pop_front();
                }
            }
            (NotifySource::PolicyDrop, _) => {
                if let Some(pos) = recent.iter().position(|(_, rt)| same(rt, &t)) {
                    recent.remove(pos);
                    drop_idx.push(i);
                }
            }
            _ => {}
        }
    }
    let n = drop_idx.len();
    if n > 0 {
        let mut k = 0;
        let mut i = 0;
        verdicts.retain(|_| {
            let keep = !(k < drop_idx.len() && drop_idx[k] == i);
            if !keep {
                k += 1;
            }
            i += 1;
            keep
        });
    }
    n
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    fn lines(input: &[u8]) -> Result<Vec<Line>, CaptureError> {
        let mut r = LineReader::new(Cursor::new(input.to_vec()));
        let mut out = Vec::new();
        while let Some(l) = r.next_line()? {
            out.push(l);
        }
        Ok(out)
    }

    #[test]
    fn nul_bytes_are_refused_at_once() {
        // /dev/zero: no newline ever; the first chunk decides.
        let zeros = std::io::Read::take(std::io::repeat(0), 1 << 30);
        let mut r = LineReader::new(std::io::BufReader::new(zeros));
        let start = std::time::Instant::now();
        assert!(matches!(r.next_line(), Err(CaptureError::Binary { line: 1 })));
        assert!(start.elapsed() < std::time::Duration::from_secs(2));
        assert!(matches!(lines(b"Press Ctrl-C to quit\n\0\0\0\n"), Ok(v) if v[1].binary));
    }

    #[test]
    fn invalid_utf8_runs_are_binary_a_stray_byte_is_not() {
        let v = lines(b"ok\nname caf\xe9\n").unwrap();
        assert!(!v[1].binary);
        assert!(matches!(lines(b"\xff\xfe\xfd\xfc\xfb\xfa\n"), Err(CaptureError::Binary { line: 1 })));
        let mut many = b"text\n".to_vec();
        for _ in 0..=MAX_BINARY_LINES {
            many.extend_from_slice(b"\x80\x81\x82\x83\x84\x85\n");
        }
        assert!(matches!(lines(&many), Err(CaptureError::Binary { .. })));
    }

    #[test]
    fn an_overlong_line_is_bounded() {
        let mut input = vec![b'a'; 3 * MAX_LINE_BYTES];
        input.extend_from_slice(b"\nnext\n");
        let v = lines(&input).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].overlong, Some(3 * MAX_LINE_BYTES));
        assert_eq!(v[0].text.len(), MAX_LINE_BYTES);
        assert_eq!((v[1].number, v[1].text.as_str()), (2, "next"));
    }

    #[test]
    fn crlf_and_missing_final_newline() {
        let v = lines(b"a\r\nb").unwrap();
        assert_eq!(v.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(), vec!["a", "b"]);
    }

    fn record(source: NotifySource, verdict: Verdict, sport: u16, proto: u8) -> CapturedVerdict {
        CapturedVerdict {
            line: 1,
            endpoint_id: 7,
            direction: crate::model::Direction::Egress,
            remote_identity: 2,
            proto,
            dst_port: 443,
            verdict,
            match_type: 0,
            source,
            reason: 133,
            ipv6: false,
            src_addr: "10.0.1.5".parse().ok(),
            dst_addr: "203.0.113.10".parse().ok(),
            src_port: Some(sport),
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
    fn a_drop_repeating_a_deny_verdict_is_folded_once() {
        use NotifySource::{PolicyDrop as D, PolicyVerdict as V};
        let mut v = vec![
            record(V, Verdict::Denied, 1000, 6),
            record(D, Verdict::Denied, 1000, 6),
            // A retransmission: its own verdict and drop.
            record(V, Verdict::Denied, 1000, 6),
            record(D, Verdict::Denied, 1000, 0),
            // A drop without a verdict (pre-1.16 host, -t drop) stays.
            record(D, Verdict::Denied, 2000, 6),
            // An audited verdict has no drop to fold.
            record(V, Verdict::Audited, 3000, 6),
            record(D, Verdict::Denied, 3000, 6),
        ];
        assert_eq!(fold_drops_into_verdicts(&mut v), 2);
        let left: Vec<_> = v.iter().map(|r| (r.source, r.src_port)).collect();
        assert_eq!(left, vec![(V, Some(1000)), (V, Some(1000)), (D, Some(2000)), (V, Some(3000)), (D, Some(3000))]);
    }
}

//! A minimal HTTP/1.1 GET (and JSON POST) over loopback and an OpenMetrics text reader:
//! enough to read a running agent the way Prometheus does, with no HTTP
//! client dependency (the VM has no DNS, no TLS, nothing to configure).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context, bail};

/// GETs `path` and returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    exchange(addr, &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"))
}

/// POSTs the JSON `body` to `path` and returns (status, body).
pub fn http_post(addr: SocketAddr, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    exchange(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

fn exchange(addr: SocketAddr, request: &str) -> anyhow::Result<(u16, String)> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    let status: u16 = head.split_whitespace().nth(1).context("no status")?.parse()?;
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").context("bad chunk")?;
        let n = usize::from_str_radix(size.trim(), 16)?;
        if n == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..n).context("short chunk")?);
        body = rest.get(n + 2..).context("short chunk")?;
    }
}

/// Series of one scrape: "name{labels}" -> value.
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    pub series: BTreeMap<String, f64>,
}

impl Scrape {
    pub fn parse(text: &str) -> anyhow::Result<Scrape> {
        let mut series = BTreeMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (name, value) = line.rsplit_once(' ').with_context(|| format!("bad exposition line {line:?}"))?;
            series.insert(name.to_string(), value.parse::<f64>().with_context(|| format!("bad value in {line:?}"))?);
        }
        if !text.trim_end().ends_with("# EOF") {
            bail!("exposition does not end with # EOF");
        }
        Ok(Scrape { series })
    }

    /// Sum of every series of `metric` whose labels contain all `labels`
    /// (each given as `key="value"`).
    pub fn sum(&self, metric: &str, labels: &[&str]) -> f64 {
        self.series
            .iter()
            .filter(|(k, _)| {
                let (name, rest) = k.split_once('{').unwrap_or((k.as_str(), ""));
                name == metric && labels.iter().all(|l| rest.contains(l))
            })
            .map(|(_, v)| *v)
            .sum()
    }

    /// `verdict_agent_events_total{outcome="counted"}`: notifications the
    /// tap accounted, what every test and bench part compares with what it
    /// emitted.
    pub fn counted(&self) -> f64 {
        self.sum("verdict_agent_events_total", &["outcome=\"counted\""])
    }

    /// Whether any series of `metric` has all `labels`.
    pub fn has(&self, metric: &str, labels: &[&str]) -> bool {
        self.series.keys().any(|k| {
            let (name, rest) = k.split_once('{').unwrap_or((k.as_str(), ""));
            name == metric && labels.iter().all(|l| rest.contains(l))
        })
    }
}

/// Scrapes /metrics.
pub fn scrape(addr: SocketAddr) -> anyhow::Result<Scrape> {
    let (status, body) = http_get(addr, "/metrics")?;
    if status != 200 {
        bail!("/metrics answered {status}: {body}");
    }
    Scrape::parse(&body)
}

/// Counters of the agent process itself, which start over with it like any
/// Prometheus counter (`rate()` handles the reset): the map reads, the
/// enrichment errors and the HTTP connections. Every counter derived from
/// the kernel's maps or from readiness continues across restarts.
pub const PROCESS_SCOPED: &[&str] = &[
    "verdict_agent_map_reads_total",
    "verdict_agent_enrichment_errors_total",
    "verdict_agent_http_connections_accepted_total",
    "verdict_agent_http_connections_evicted_total",
    "verdict_agent_http_connections_refused_total",
    "verdict_agent_http_connections_idle_closed_total",
];

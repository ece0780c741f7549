//! Serving the router to clients that may be hostile: every connection is
//! bounded in time (header read, idle keep-alive), in memory (header bytes,
//! header count) and in number (a cap), and shutdown is bounded too.
//!
//! Why eviction rather than a reserved share of the cap: a share reserved
//! for probes is itself a cap an attacker can fill, and kubelet's probes
//! come from the node like any other client, so nothing tells them apart
//! before their request is read. Instead, when the cap is reached a new
//! connection displaces another one with no request in progress: first
//! those that sent part of a request and stalled (a half-sent header, a slow
//! drip, a large unfinished header), the one waiting longest among them;
//! then silent ones (an idle keep-alive, a client that does not read its
//! answer, a connect without a request), again the one waiting longest. A
//! probe writes its whole request at once, so it is never "partial" and is
//! the freshest of the silent ones: it is answered, and a slowloris only
//! ever displaces its own connections. Connections with a handler running
//! are never displaced; when all of them are busy the new one is closed at
//! once (and counted) rather than queued. The limit: a flood of more than
//! the cap of silent connects within the moment between a probe's connect
//! and its request can still displace the probe.

use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::Router;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpListener,
    sync::Notify,
    task::JoinSet,
};
use tower_service::Service as _;
use tracing::{debug, info, warn};

/// The peer of the connection a request came on (a request extension).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

/// What one connection may cost, and how long shutdown may take.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Open connections at most; past it the longest-waiting one is closed.
    pub max_connections: usize,
    /// A request's start line and headers must arrive within this, counted
    /// from when the connection starts waiting for it: after accept, and
    /// after each answer (hyper's header read timeout, which is thereby also
    /// the keep-alive idle timeout).
    pub header_read_timeout: Duration,
    /// A connection with no request in progress for this long is closed
    /// whatever it is doing: this catches clients that do not read their
    /// answers, which the header read timeout does not see.
    pub idle_timeout: Duration,
    /// Bytes buffered per connection while reading a request head (hyper's
    /// `max_buf_size`; hyper answers 431 beyond it). At least 8192.
    pub max_header_bytes: usize,
    /// Header fields per request at most (hyper answers 431 beyond it).
    pub max_headers: usize,
    /// After SIGTERM, requests in progress get this long to finish.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            // Prometheus, a few probes, an operator's curl: dozens at most.
            max_connections: 128,
            // Probes and Prometheus write their request at once; 5 s is
            // generous for them and short for a slowloris.
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Counts of what the server did to protect itself, for `/metrics`.
#[derive(Debug, Default)]
pub struct ServerStats {
    open: AtomicU64,
    accepted: AtomicU64,
    evicted: AtomicU64,
    refused: AtomicU64,
    idle_closed: AtomicU64,
}

impl ServerStats {
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }
}

/// `/metrics` families of the HTTP server.
#[derive(Debug)]
pub struct ServerCollector(pub Arc<ServerStats>);

impl Collector for ServerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        let gauge = ConstGauge::new(s.open.load(Ordering::Relaxed) as i64);
        gauge.encode(encoder.encode_descriptor(
            "verdict_agent_http_connections",
            "Open HTTP connections",
            None,
            gauge.metric_type(),
        )?)?;
        for (name, help, value) in [
            ("verdict_agent_http_connections_accepted", "HTTP connections accepted", &s.accepted),
            (
                "verdict_agent_http_connections_evicted",
                "HTTP connections closed to make room under the connection cap (the longest without a request in progress)",
                &s.evicted,
            ),
            (
                "verdict_agent_http_connections_refused",
                "HTTP connections closed on accept because every connection under the cap had a request in progress",
                &s.refused,
            ),
            (
                "verdict_agent_http_connections_idle_closed",
                "HTTP connections closed after the idle timeout without a request in progress",
                &s.idle_closed,
            ),
        ] {
            let c = ConstCounter::new(value.load(Ordering::Relaxed));
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        Ok(())
    }
}

/// One open connection as the cap and the idle reaper see it.
struct Conn {
    /// Requests in progress (0 or 1 with HTTP/1.1).
    busy: AtomicU32,
    /// Bytes arrived since the last request began or ended: a request is
    /// under way but its head is not complete.
    partial: AtomicBool,
    /// Microseconds since the server's epoch when the connection last had
    /// no request in progress.
    waiting_since: AtomicU64,
    close: Notify,
}

/// The open connections, for eviction, the idle reaper and shutdown.
struct Registry {
    epoch: Instant,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    stats: Arc<ServerStats>,
}

impl Registry {
    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Registers a new connection, displacing the longest-waiting one when
    /// the cap is reached. None: every connection is busy, refuse this one.
    fn admit(&self, cap: usize) -> Option<(u64, Arc<Conn>)> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if conns.len() >= cap {
            let victim = conns
                .iter()
                .filter(|(_, c)| c.busy.load(Ordering::Acquire) == 0)
                // Ties (connections accepted in the same microsecond) go to
                // the one accepted first.
                .min_by_key(|(id, c)| {
                    (!c.partial.load(Ordering::Acquire), c.waiting_since.load(Ordering::Acquire), **id)
                })
                .map(|(id, _)| *id);
            match victim.and_then(|id| conns.remove(&id)) {
                Some(c) => {
                    c.close.notify_one();
                    self.stats.evicted.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            busy: AtomicU32::new(0),
            partial: AtomicBool::new(false),
            waiting_since: AtomicU64::new(self.now_us()),
            close: Notify::new(),
        });
        conns.insert(id, conn.clone());
        self.stats.open.store(conns.len() as u64, Ordering::Relaxed);
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        Some((id, conn))
    }

    fn remove(&self, id: u64) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.remove(&id);
        self.stats.open.store(conns.len() as u64, Ordering::Relaxed);
    }

    /// Closes the connections that have waited longer than `idle` (all of
    /// them with `Duration::ZERO`), busy ones excepted.
    fn close_waiting(&self, idle: Duration) -> usize {
        let now = self.now_us();
        let idle_us = idle.as_micros() as u64;
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let stale: Vec<u64> = conns
            .iter()
            .filter(|(_, c)| {
                c.busy.load(Ordering::Acquire) == 0
                    && now.saturating_sub(c.waiting_since.load(Ordering::Acquire)) >= idle_us
            })
            .map(|(id, _)| *id)
            .collect();
        for id in &stale {
            if let Some(c) = conns.remove(id) {
                c.close.notify_one();
            }
        }
        self.stats.open.store(conns.len() as u64, Ordering::Relaxed);
        stale.len()
    }
}

/// Marks a connection busy while a handler runs; waiting again when dropped.
struct BusyGuard {
    conn: Arc<Conn>,
    registry: Arc<Registry>,
}

impl BusyGuard {
    fn new(conn: Arc<Conn>, registry: Arc<Registry>) -> BusyGuard {
        conn.busy.fetch_add(1, Ordering::AcqRel);
        conn.partial.store(false, Ordering::Release);
        BusyGuard { conn, registry }
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.conn.waiting_since.store(self.registry.now_us(), Ordering::Release);
        self.conn.partial.store(false, Ordering::Release);
        self.conn.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then closes
/// waiting connections at once and gives busy ones `limits.shutdown_grace`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stats: Arc<ServerStats>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let registry =
        Arc::new(Registry { epoch: Instant::now(), conns: Mutex::default(), next_id: AtomicU64::new(0), stats });
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers)
        .keep_alive(true);
    let stopping = Arc::new(tokio::sync::watch::Sender::new(false));
    let mut tasks = JoinSet::new();
    let mut reap = tokio::time::interval(Duration::from_secs(1).min(limits.idle_timeout));
    reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        while tasks.try_join_next().is_some() {}
        tokio::select! {
            () = &mut shutdown => break,
            _ = reap.tick() => {
                let closed = registry.close_waiting(limits.idle_timeout);
                registry.stats.idle_closed.fetch_add(closed as u64, Ordering::Relaxed);
            }
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "accepting an HTTP connection failed; retrying in 100 ms");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Some((id, conn)) = registry.admit(limits.max_connections) else {
                    debug!(%peer, "every HTTP connection is busy; closing the new one");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let conn_for_io = conn.clone();
                tasks.spawn(serve_connection(
                    ConnectionTask { id, conn, registry: registry.clone(), peer, router: router.clone() },
                    TokioIo::new(Watched { stream, conn: conn_for_io }),
                    h1.clone(),
                    stopping.subscribe(),
                ));
                // Let the new connection read what it was sent before more
                // are accepted: a probe's request is in its socket on
                // arrival, and once read it is busy and cannot be displaced.
                // Without this a flood of connects outruns the connection
                // tasks and displaces probes before they are looked at.
                tokio::task::yield_now().await;
            }
        }
    }
    drop(listener);
    stopping.send_replace(true);
    let waiting = registry.close_waiting(Duration::ZERO);
    let busy = registry.conns.lock().unwrap_or_else(|e| e.into_inner()).len();
    info!(closed = waiting, in_progress = busy, grace = ?limits.shutdown_grace, "HTTP: not accepting; finishing requests in progress");
    let drained =
        tokio::time::timeout(limits.shutdown_grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!(left = tasks.len(), "HTTP: requests still in progress after the shutdown grace; closing them");
        tasks.abort_all();
    }
}

struct ConnectionTask {
    id: u64,
    conn: Arc<Conn>,
    registry: Arc<Registry>,
    peer: SocketAddr,
    router: Router,
}

async fn serve_connection(
    task: ConnectionTask,
    io: TokioIo<Watched>,
    h1: http1::Builder,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let ConnectionTask { id, conn, registry, peer, router } = task;
    let service = {
        let (conn, registry) = (conn.clone(), registry.clone());
        service_fn(move |mut req: hyper::Request<Incoming>| {
            let guard = BusyGuard::new(conn.clone(), registry.clone());
            req.extensions_mut().insert(PeerAddr(peer));
            // axum's own extractor for handlers that ask for the peer.
            req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
            let mut router = router.clone();
            async move {
                let response = router.call(req).await;
                drop(guard);
                Ok::<_, Infallible>(response.unwrap_or_else(|never: Infallible| match never {}))
            }
        })
    };
    let connection = h1.serve_connection(io, service);
    tokio::pin!(connection);
    let mut graceful = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    log_connection_error(peer, &e);
                }
                break;
            }
            () = conn.close.notified() => break,
            changed = stopping.changed(), if !graceful => {
                graceful = true;
                if changed.is_ok() {
                    // Answer what is in progress, then close (no keep-alive).
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
    registry.remove(id);
}

/// The connection's socket, noting when request bytes arrive (`Conn::partial`).
struct Watched {
    stream: tokio::net::TcpStream,
    conn: Arc<Conn>,
}

impl AsyncRead for Watched {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.conn.partial.store(true, Ordering::Release);
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Hostile or broken clients are routine here: debug, not warn.
fn log_connection_error(peer: SocketAddr, e: &hyper::Error) {
    if e.is_timeout() {
        debug!(%peer, "HTTP request header not received in time; connection closed");
    } else {
        debug!(%peer, error = %e, "HTTP connection ended with an error");
    }
}

/// Binds `addr` for listening. `[::]:PORT` is dual-stack (IPV6_V6ONLY off,
/// whatever the node's `net.ipv6.bindv6only`); `0.0.0.0:PORT` is IPv4 only;
/// a specific address listens on that address only.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    // A restarted agent rebinds while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        Registry { epoch: Instant::now(), conns: Mutex::default(), next_id: AtomicU64::new(0), stats: Arc::default() }
    }

    #[test]
    fn a_full_cap_displaces_the_longest_waiting_connection() {
        let r = registry();
        let (first, a) = r.admit(2).unwrap();
        let (_, b) = r.admit(2).unwrap();
        a.waiting_since.store(0, Ordering::Release);
        b.waiting_since.store(10, Ordering::Release);
        let (_, _c) = r.admit(2).unwrap();
        assert!(!r.conns.lock().unwrap().contains_key(&first), "the oldest waiting connection leaves");
        assert_eq!(r.conns.lock().unwrap().len(), 2);
        assert_eq!(r.stats.evicted(), 1);
    }

    #[test]
    fn stalled_partial_requests_go_before_silent_connections() {
        let r = registry();
        let (silent_id, silent) = r.admit(2).unwrap();
        let (partial_id, partial) = r.admit(2).unwrap();
        silent.waiting_since.store(0, Ordering::Release);
        partial.partial.store(true, Ordering::Release);
        r.admit(2).unwrap();
        let conns = r.conns.lock().unwrap();
        assert!(!conns.contains_key(&partial_id), "the stalled partial request leaves first");
        assert!(conns.contains_key(&silent_id), "though the silent one waited longer");
    }

    #[test]
    fn busy_connections_are_never_displaced() {
        let r = Arc::new(registry());
        let (_, a) = r.admit(1).unwrap();
        let guard = BusyGuard::new(a, r.clone());
        assert!(r.admit(1).is_none(), "the only connection is busy: refuse the new one");
        assert_eq!(r.stats.refused.load(Ordering::Relaxed), 1);
        drop(guard);
        assert!(r.admit(1).is_some(), "once it waits again it can be displaced");
    }

    #[test]
    fn idle_reaper_spares_busy_and_fresh_connections() {
        let r = Arc::new(registry());
        let (_, _old) = r.admit(10).unwrap();
        let (_, busy) = r.admit(10).unwrap();
        let (_, fresh) = r.admit(10).unwrap();
        let _guard = BusyGuard::new(busy, r.clone());
        std::thread::sleep(Duration::from_millis(30));
        fresh.waiting_since.store(r.now_us(), Ordering::Release);
        assert_eq!(r.close_waiting(Duration::from_millis(20)), 1, "only the old idle one");
        assert_eq!(r.conns.lock().unwrap().len(), 2);
        assert_eq!(r.close_waiting(Duration::ZERO), 1, "shutdown closes every waiting connection, not busy ones");
        assert_eq!(r.conns.lock().unwrap().len(), 1);
    }

    #[test]
    fn dual_stack_wildcard_takes_ipv4_clients() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let Ok(listener) = bind("[::]:0".parse().unwrap()) else {
                eprintln!("SKIP dual_stack_wildcard_takes_ipv4_clients: no IPv6 on this host");
                return;
            };
            let port = listener.local_addr().unwrap().port();
            let client = tokio::net::TcpStream::connect(("127.0.0.1", port));
            let (accepted, connected) = tokio::join!(listener.accept(), client);
            connected.expect("an IPv4 client reaches [::] with IPV6_V6ONLY off");
            let (_, peer) = accepted.unwrap();
            assert_eq!(peer.ip().to_canonical(), std::net::Ipv4Addr::LOCALHOST);
        });
    }
}

//! The agent's HTTP listeners, and the operations endpoint: `/metrics`, `/healthz` and `/readyz`
//! on one listener.
//!
//! The endpoint runs on a thread of its own with its own small runtime, so a reconcile pass that
//! keeps the main loop busy (or a loop that is wedged) cannot silence it: `/healthz` then answers
//! 503 instead of timing out, which tells an operator which of the two happened.
//!
//! Every listener of the agent (this one, kube-proxy's healthz in [`crate::healthz`], the
//! healthCheckNodePorts in [`crate::health_check`]) serves through [`serve`], which bounds what a
//! client can hold ([`crate::config::HttpConfig`]): a fixed number of connection slots, a deadline
//! for each request head (slowloris, idle connections) and one for the whole connection. A new
//! connection over the cap takes the slot of the oldest connection waiting for a request, so a
//! flood of idle connections can never lock a probe out; only when every slot is mid-request is
//! the new one closed at once. Either way the agent never holds more descriptors for a listener
//! than its cap ([`crate::fd_budget`]).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::config::HttpConfig;
use crate::metrics::{Metrics, Ops, Probe};

const TEXT: &str = "text/plain; charset=utf-8";
/// The content type Prometheus expects for the text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The running endpoint; dropping it stops the server and joins its thread.
pub struct OpsServer {
    pub local_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OpsServer {
    /// Binds `addr` now (so a taken port is an error at start-up, not a log line later) and
    /// serves on a new thread.
    pub fn start(addr: SocketAddr, ops: Ops, limits: HttpConfig) -> std::io::Result<OpsServer> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        let (shutdown, stop) = oneshot::channel();
        let thread = serve_on_thread("weir-ops-http", "operations endpoint", move || async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => serve_ops(listener, ops, limits, stop).await,
                Err(e) => warn!(error = %e, "operations endpoint: listener"),
            }
        })?;
        info!(%local_addr, "serving /metrics, /healthz and /readyz");
        Ok(OpsServer {
            local_addr,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }
}

/// Runs the future `make` builds on a thread of its own with a single-threaded runtime, so an
/// HTTP server keeps answering however busy the agent's main loop is.
pub(crate) fn serve_on_thread<F, Fut>(
    thread_name: &str,
    what: &'static str,
    make: F,
) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    std::thread::Builder::new()
        .name(thread_name.into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(make()),
                Err(e) => warn!(error = %e, "{what}: no runtime"),
            }
        })
}

impl Drop for OpsServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve_ops(
    listener: tokio::net::TcpListener,
    ops: Ops,
    limits: HttpConfig,
    stop: oneshot::Receiver<()>,
) {
    let slots = Slots::new("metrics", limits, Some(ops.metrics.clone()));
    let handler: Handler = Arc::new(move |req| route(&ops, req));
    tokio::select! {
        _ = serve(listener, slots, handler) => {}
        _ = stop => {}
    }
}

/// Answers one request; runs on the listener's thread, so it must not block.
pub(crate) type Handler = Arc<dyn Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync>;

/// How long a connection past its deadline may take to finish the response it is writing.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// After an accept error (out of descriptors and the like), the pause before the next accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The connection slots of one listener, or of several that share one budget.
pub(crate) struct Slots {
    /// The `listener` label of the connection metrics.
    listener: &'static str,
    limits: HttpConfig,
    metrics: Option<Arc<Metrics>>,
    table: Mutex<SlotTable>,
}

#[derive(Default)]
struct SlotTable {
    next_id: u64,
    /// Open connections by id: ids grow, so the first is the oldest.
    open: BTreeMap<u64, OpenConnection>,
}

struct OpenConnection {
    /// No request is being answered: the connection waits for one (or for its client to read).
    waiting: Arc<AtomicBool>,
    /// Fired to close the connection for a newer one.
    evict: oneshot::Sender<()>,
}

/// One admitted connection; dropping it frees the slot.
struct Slot {
    id: u64,
    slots: Arc<Slots>,
    waiting: Arc<AtomicBool>,
    evicted: oneshot::Receiver<()>,
}

impl Slots {
    pub(crate) fn new(
        listener: &'static str,
        limits: HttpConfig,
        metrics: Option<Arc<Metrics>>,
    ) -> Arc<Slots> {
        Arc::new(Slots {
            listener,
            limits,
            metrics,
            table: Mutex::new(SlotTable::default()),
        })
    }

    /// A slot for a new connection: a free one, else the oldest waiting connection's (which is
    /// closed). None when every slot is mid-request: the caller closes the new connection.
    fn admit(self: &Arc<Self>) -> Option<Slot> {
        let Ok(mut table) = self.table.lock() else {
            return None;
        };
        if table.open.len() >= self.limits.max_connections {
            let oldest_waiting = table
                .open
                .iter()
                .find(|(_, c)| c.waiting.load(Ordering::Relaxed))
                .map(|(id, _)| *id);
            match oldest_waiting.and_then(|id| table.open.remove(&id)) {
                Some(evicted) => {
                    // The receiver may have finished already: nothing left to close then.
                    let _ = evicted.evict.send(());
                    self.count_closed("evicted");
                }
                None => {
                    self.count_closed("over_limit");
                    return None;
                }
            }
        }
        let id = table.next_id;
        table.next_id += 1;
        let waiting = Arc::new(AtomicBool::new(true));
        let (evict, evicted) = oneshot::channel();
        table.open.insert(
            id,
            OpenConnection {
                waiting: waiting.clone(),
                evict,
            },
        );
        self.set_open_gauge(table.open.len());
        Some(Slot {
            id,
            slots: self.clone(),
            waiting,
            evicted,
        })
    }

    fn count_closed(&self, reason: &'static str) {
        if let Some(metrics) = &self.metrics {
            metrics
                .http_connections_closed
                .get_or_create(&[("listener", self.listener), ("reason", reason)])
                .inc();
        }
    }

    fn set_open_gauge(&self, open: usize) {
        if let Some(metrics) = &self.metrics {
            metrics
                .http_connections
                .get_or_create(&[("listener", self.listener)])
                .set(open as i64);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut table) = self.slots.table.lock() {
            table.open.remove(&self.id);
            self.slots.set_open_gauge(table.open.len());
        }
    }
}

/// Accepts connections on `listener` for ever, each in a slot of `slots`, answered by `handler`.
pub(crate) async fn serve(listener: tokio::net::TcpListener, slots: Arc<Slots>, handler: Handler) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors and the like: keep serving once it passes.
                warn!(listener = slots.listener, error = %e, "accept");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        match slots.admit() {
            Some(slot) => {
                tokio::spawn(serve_connection(stream, peer, slot, handler.clone()));
            }
            None => {
                debug!(listener = slots.listener, %peer, "every connection slot is busy: closed");
                drop(stream);
            }
        }
        // Lets an evicted connection's task close its socket before the next accept, so a flood
        // never holds more descriptors than the cap.
        tokio::task::yield_now().await;
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    mut slot: Slot,
    handler: Handler,
) {
    let limits = slot.slots.limits;
    let waiting = slot.waiting.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        waiting.store(false, Ordering::Relaxed);
        let response = handler(&req);
        waiting.store(true, Ordering::Relaxed);
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                if e.is_timeout() {
                    slot.slots.count_closed("timeout");
                }
                debug!(listener = slot.slots.listener, %peer, error = %e, "connection");
            }
            return;
        }
        // Counted by `admit`.
        _ = &mut slot.evicted => return,
        _ = tokio::time::sleep(limits.connection_timeout) => {
            slot.slots.count_closed("timeout");
            connection.as_mut().graceful_shutdown();
        }
    }
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, connection).await;
}

fn route(ops: &Ops, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => match ops.metrics.encode() {
            Ok(body) => reply(StatusCode::OK, OPENMETRICS, body),
            Err(_) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                TEXT,
                "encoding metrics failed\n".into(),
            ),
        },
        "/healthz" => probe(ops.health.liveness()),
        "/readyz" => probe(ops.health.readiness()),
        "/policy" => {
            let names = ops
                .metrics
                .policy_names
                .lock()
                .map(|n| serde_json::to_string(&*n));
            match names {
                Ok(Ok(body)) => json_reply(StatusCode::OK, body),
                _ => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    "policy names unavailable\n".into(),
                ),
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "try /metrics, /healthz, /readyz or /policy\n".into(),
        ),
    }
}

fn probe(p: Probe) -> Response<Full<Bytes>> {
    let status = if p.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    reply(status, TEXT, format!("{}\n", p.message))
}

/// A JSON answer with the headers kube-proxy's health servers send.
pub(crate) fn json_reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = reply(status, "application/json", body);
    response.headers_mut().insert(
        hyper::header::X_CONTENT_TYPE_OPTIONS,
        hyper::header::HeaderValue::from_static("nosniff"),
    );
    response
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

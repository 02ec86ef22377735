//! The operations endpoint: `/metrics`, `/healthz` and `/readyz` on one HTTP listener.
//!
//! It runs on a thread of its own with its own small runtime, so a reconcile pass that keeps
//! the main loop busy (or a loop that is wedged) cannot silence it: `/healthz` then answers 503
//! instead of timing out, which tells an operator which of the two happened.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::metrics::{Ops, Probe};

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
    pub fn start(addr: SocketAddr, ops: Ops) -> std::io::Result<OpsServer> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        let (shutdown, stop) = oneshot::channel();
        let thread = serve_on_thread("weir-ops-http", "operations endpoint", move || async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => serve(listener, ops, stop).await,
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

async fn serve(listener: tokio::net::TcpListener, ops: Ops, mut stop: oneshot::Receiver<()>) {
    let ops = Arc::new(ops);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving once it passes.
                    warn!(error = %e, "operations endpoint: accept");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut stop => return,
        };
        let ops = ops.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let ops = ops.clone();
                async move { Ok::<_, Infallible>(route(&ops, &req)) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "operations endpoint: connection");
            }
        });
    }
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
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "try /metrics, /healthz or /readyz\n".into(),
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

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

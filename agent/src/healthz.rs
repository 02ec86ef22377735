//! kube-proxy's healthz server (`healthzBindAddress`, port 10256), so cloud load balancers and
//! anything else that probes it keep working on nodes without kube-proxy.
//!
//! The semantics are kube-proxy's (`pkg/proxy/healthcheck/proxier_health.go`), from
//! [`Health::proxier`]:
//! - `/healthz`: 200 when the proxier is healthy (starting, fully synced, or the oldest change not
//!   yet written is younger than the sync timeout, twice kube-proxy's sync period) and the node
//!   is eligible (its Node object has no deletionTimestamp and no `ToBeDeletedByClusterAutoscaler`
//!   taint); else 503. Body `{"lastUpdated": "...", "currentTime": "...", "nodeEligible": true}`,
//!   `lastUpdated` being the current time while healthy, as kube-proxy reports it.
//! - `/livez`: the same without the node's eligibility (and without `nodeEligible`).
//! - Any method; other paths 404.
//!
//! Times are RFC 3339 (kube-proxy prints Go's default time format; nothing parses it). One
//! addition: a main loop that has stopped turning is unhealthy, since it could not even see the
//! changes it fails to write.
//!
//! The port is often still held by kube-proxy while Weir is installed beside it: a bind that
//! fails is logged and retried every few seconds, and the agent runs on meanwhile.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use serde::Serialize;
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use crate::config::HttpConfig;
use crate::http::{json_reply, Handler, Slots};
use crate::metrics::{Health, Metrics};

/// How soon a port that could not be bound is tried again.
const RETRY_BIND: Duration = Duration::from_secs(5);

/// Go's zero `time.Time` in RFC 3339: what kube-proxy reports before its first sync.
const NEVER: &str = "0001-01-01T00:00:00Z";

/// The listener's state, for logs and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthzState {
    Binding,
    Listening(SocketAddr),
    /// The last bind failed with this error; retried every few seconds.
    Failed(String),
}

/// The running server; dropping it closes the listener and joins its thread.
pub struct HealthzServer {
    state: watch::Receiver<HealthzState>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HealthzServer {
    /// Serves on `addr` from a thread of its own, binding (and retrying) there. An unspecified
    /// IPv4 address means every address, IPv6 included where the node has it, as kube-proxy's
    /// Go listener does.
    pub fn start(
        addr: SocketAddr,
        health: Arc<Health>,
        limits: HttpConfig,
        metrics: Option<Arc<Metrics>>,
    ) -> std::io::Result<HealthzServer> {
        let (state_tx, state) = watch::channel(HealthzState::Binding);
        let (shutdown, stop) = oneshot::channel();
        let thread = crate::http::serve_on_thread("weir-healthz", "healthz server", move || {
            let slots = Slots::new("healthz", limits, metrics);
            let handler: Handler = Arc::new(move |req| route(&health, req));
            async move {
                tokio::select! {
                    _ = bind_and_serve(addr, slots, handler, state_tx) => {}
                    _ = stop => {}
                }
            }
        })?;
        Ok(HealthzServer {
            state,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    pub fn state(&self) -> HealthzState {
        self.state.borrow().clone()
    }
}

impl Drop for HealthzServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn bind_and_serve(
    addr: SocketAddr,
    slots: Arc<Slots>,
    handler: Handler,
    state: watch::Sender<HealthzState>,
) {
    let mut failures = 0u32;
    let listener = loop {
        match bind(addr) {
            Ok(listener) => break listener,
            Err(e) => {
                if failures == 0 {
                    warn!(%addr, error = %e, "cannot open the healthz port (kube-proxy still running?); retrying");
                } else {
                    debug!(%addr, error = %e, "healthz port still taken");
                }
                failures += 1;
                state.send_replace(HealthzState::Failed(e.to_string()));
                tokio::time::sleep(RETRY_BIND).await;
            }
        }
    };
    let local = listener.local_addr().unwrap_or(addr);
    info!(%local, "serving kube-proxy's /healthz and /livez");
    state.send_replace(HealthzState::Listening(local));
    crate::http::serve(listener, slots, handler).await;
}

fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let addr = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), addr.port())
        }
        _ => addr,
    };
    crate::health_check::bind_listener(addr)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body {
    last_updated: String,
    current_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
}

fn route(health: &Health, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let with_node = match req.uri().path() {
        "/healthz" => true,
        "/livez" => false,
        _ => {
            let mut response =
                Response::new(Full::new(Bytes::from_static(b"try /healthz or /livez\n")));
            *response.status_mut() = StatusCode::NOT_FOUND;
            return response;
        }
    };
    let status = health.proxier();
    let healthy = status.healthy && (!with_node || status.node_eligible);
    let body = Body {
        last_updated: status
            .last_updated
            .map_or_else(|| NEVER.to_owned(), rfc3339),
        current_time: rfc3339(status.current_time),
        node_eligible: with_node.then_some(status.node_eligible),
    };
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_reply(code, serde_json::to_string(&body).unwrap_or_default())
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_has_kube_proxys_keys() {
        let body = Body {
            last_updated: NEVER.into(),
            current_time: rfc3339(SystemTime::UNIX_EPOCH),
            node_eligible: Some(true),
        };
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"lastUpdated":"0001-01-01T00:00:00Z","currentTime":"1970-01-01T00:00:00.000Z","nodeEligible":true}"#
        );
    }
}

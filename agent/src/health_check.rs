//! healthCheckNodePort: for every Service with `externalTrafficPolicy: Local`, an HTTP listener
//! on its health-check port that tells external load balancers whether this node has a local
//! ready endpoint, answering as kube-proxy's health-check server does: 200 with one or more,
//! 503 with none, and a JSON body with the count.
//!
//! The listeners follow the reconciler's intent through a `watch` channel: each update is
//! diffed against the open listeners, so ports open and close as Services come, go or change
//! their port, and a count change only changes answers. A port that cannot be bound (another
//! process holds it) is logged, counted in `weir_health_check_bind_errors` and retried every
//! few seconds; it never stops the agent or the other listeners. A port the node needs (the
//! kubelet's, sshd's, the agent's own: `[health_check] reserved_ports`) is refused: logged once
//! and counted in `weir_rejected_objects_total{kind="Service",reason="reserved_health_check_node_port"}`.
//!
//! Like the operations endpoint, the server runs on a thread with its own runtime, so a long
//! reconcile pass never leaves a load balancer's probe unanswered. Every port's connections
//! share one set of slots ([`crate::http`]): how many Services ask for a port does not change
//! how many descriptors the agent may spend on their clients.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use serde::Serialize;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::{HttpConfig, PortRange};
use crate::http::{Handler, Slots};
use crate::intent::{ClusterIntent, Endpoint, EndpointTarget, ObjectRef, TrafficPolicy};
use crate::metrics::{rejection_labels, Health, Metrics};

/// How soon a port that could not be bound is tried again.
const RETRY_BIND: Duration = Duration::from_secs(5);

/// What one health-check port reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceHealth {
    pub service: ObjectRef,
    /// Ready endpoints on this node (terminating ones do not count: a node with only those
    /// should lose its traffic), each counted once whatever its addresses and families.
    pub local_endpoints: usize,
}

/// Health-check ports and what each reports.
pub type HealthChecks = BTreeMap<u16, ServiceHealth>;

/// The listeners `intent` asks of node `node_name`: one per Service with
/// `externalTrafficPolicy: Local` and a `healthCheckNodePort`. Two Services claiming one port
/// (the API server prevents it) keep the first in name order.
pub fn desired(intent: &ClusterIntent, node_name: &str) -> HealthChecks {
    let mut out = HealthChecks::new();
    for (id, service) in &intent.services {
        let Some(port) = service.health_check_node_port else {
            continue;
        };
        if service.external_traffic_policy != TrafficPolicy::Local || out.contains_key(&port) {
            continue;
        }
        let local: BTreeSet<EndpointIdentity> = intent
            .slices_of(id)
            .flat_map(|slice| &slice.endpoints)
            .filter(|e| e.ready && e.node_name.as_deref() == Some(node_name))
            .filter_map(EndpointIdentity::of)
            .collect();
        out.insert(
            port,
            ServiceHealth {
                service: id.clone(),
                local_endpoints: local.len(),
            },
        );
    }
    out
}

/// What makes two endpoints one: the pod behind them (a dual-stack pod is in the IPv4 and the
/// IPv6 slice, with the same `targetRef`), else, for endpoints without a `targetRef`, the
/// address, as kube-proxy counts distinct addresses (a pod behind two ports is one endpoint).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum EndpointIdentity {
    Target(EndpointTarget),
    Address(IpAddr),
}

impl EndpointIdentity {
    fn of(endpoint: &Endpoint) -> Option<EndpointIdentity> {
        match &endpoint.target {
            Some(target) => Some(EndpointIdentity::Target(target.clone())),
            None => endpoint
                .addresses
                .first()
                .copied()
                .map(EndpointIdentity::Address),
        }
    }
}

/// A health-check port's state, for logs and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortState {
    Listening(Vec<SocketAddr>),
    /// The last bind failed with this error; retried every few seconds.
    Failed(String),
    /// A port the node needs (`[health_check] reserved_ports`, the agent's own): never opened.
    Refused,
}

/// Where and how the health-check listeners serve.
#[derive(Clone, Debug)]
pub struct HealthCheckOptions {
    /// Addresses every port listens on (`::` is dual-stack, and falls back to `0.0.0.0` where
    /// the node has no IPv6).
    pub bind: Vec<IpAddr>,
    /// Ports no Service may take.
    pub reserved: Vec<PortRange>,
    /// Shared by every port: `max_connections` is the budget of all of them together.
    pub limits: HttpConfig,
}

impl Default for HealthCheckOptions {
    fn default() -> Self {
        HealthCheckOptions {
            bind: default_bind_addresses(),
            reserved: crate::config::HealthCheckConfig::default().reserved_ports,
            limits: HttpConfig::default(),
        }
    }
}

/// The running server; dropping it closes every listener and joins its thread.
pub struct HealthCheckServer {
    checks: watch::Sender<HealthChecks>,
    status: watch::Receiver<BTreeMap<u16, PortState>>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Where listeners bind: every address of the node, dual-stack where IPv6 exists.
pub fn default_bind_addresses() -> Vec<IpAddr> {
    vec![IpAddr::V6(Ipv6Addr::UNSPECIFIED)]
}

impl HealthCheckServer {
    /// Starts the server thread with no listeners; [`HealthCheckServer::update`] opens them.
    /// `health` feeds `serviceProxyHealthy`.
    pub fn start(
        options: HealthCheckOptions,
        metrics: Option<Arc<Metrics>>,
        health: Option<Arc<Health>>,
    ) -> std::io::Result<HealthCheckServer> {
        let (checks, checks_rx) = watch::channel(HealthChecks::new());
        let (status_tx, status) = watch::channel(BTreeMap::new());
        let (shutdown, stop) = oneshot::channel();
        let thread =
            crate::http::serve_on_thread("weir-health-check", "health-check server", move || {
                let server = Server {
                    slots: Slots::new("health_check", options.limits, metrics.clone()),
                    bind: options.bind,
                    reserved: options.reserved,
                    checks: checks_rx,
                    status: status_tx,
                    metrics,
                    health,
                    listeners: BTreeMap::new(),
                };
                server.run(stop)
            })?;
        Ok(HealthCheckServer {
            checks,
            status,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// Sets the ports and reports; unchanged input wakes nothing.
    pub fn update(&self, checks: HealthChecks) {
        self.checks.send_if_modified(|current| {
            if *current == checks {
                false
            } else {
                *current = checks;
                true
            }
        });
    }

    /// Each wanted port's state, as of the server's last pass.
    pub fn status(&self) -> BTreeMap<u16, PortState> {
        self.status.borrow().clone()
    }
}

impl Drop for HealthCheckServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Server {
    bind: Vec<IpAddr>,
    reserved: Vec<PortRange>,
    slots: Arc<Slots>,
    checks: watch::Receiver<HealthChecks>,
    status: watch::Sender<BTreeMap<u16, PortState>>,
    metrics: Option<Arc<Metrics>>,
    health: Option<Arc<Health>>,
    /// Accept loops by port; aborting one closes its sockets.
    listeners: BTreeMap<u16, Vec<JoinHandle<()>>>,
}

impl Server {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        let mut retry = tokio::time::interval(RETRY_BIND);
        loop {
            tokio::select! {
                changed = self.checks.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.sync();
                }
                _ = retry.tick() => {
                    let failed = self.status.borrow().values().any(|s| matches!(s, PortState::Failed(_)));
                    if failed {
                        self.sync();
                    }
                }
                _ = &mut stop => break,
            }
        }
        for (_, tasks) in std::mem::take(&mut self.listeners) {
            tasks.iter().for_each(JoinHandle::abort);
        }
    }

    /// Opens the wanted ports that are not open and closes the open ones no longer wanted.
    fn sync(&mut self) {
        let wanted = self.checks.borrow().clone();
        let gone: Vec<u16> = self
            .listeners
            .keys()
            .filter(|port| !wanted.contains_key(port))
            .copied()
            .collect();
        for port in gone {
            if let Some(tasks) = self.listeners.remove(&port) {
                tasks.iter().for_each(JoinHandle::abort);
                info!(port, "health-check listener closed");
            }
        }
        let status = wanted
            .iter()
            .map(|(port, report)| (*port, self.open(*port, report)))
            .collect();
        if let Some(metrics) = &self.metrics {
            metrics
                .health_check_listeners
                .set(self.listeners.len() as i64);
        }
        self.status.send_replace(status);
    }

    /// Brings one wanted port to its state: refused, already open, newly open, or failed.
    fn open(&mut self, port: u16, report: &ServiceHealth) -> PortState {
        if self.reserved.iter().any(|r| r.contains(port)) {
            self.refuse(port, report);
            return PortState::Refused;
        }
        if self.listeners.contains_key(&port) {
            let previous = self.status.borrow().get(&port).cloned();
            return previous.unwrap_or(PortState::Listening(Vec::new()));
        }
        match bind_all(port, &self.bind) {
            Ok(listeners) => {
                let addrs: Vec<SocketAddr> = listeners
                    .iter()
                    .filter_map(|l| l.local_addr().ok())
                    .collect();
                info!(port, service = %report.service, ?addrs, "health-check listener open");
                let handler = port_handler(port, self.checks.clone(), self.health.clone());
                let tasks = listeners
                    .into_iter()
                    .map(|listener| {
                        tokio::spawn(crate::http::serve(
                            listener,
                            self.slots.clone(),
                            handler.clone(),
                        ))
                    })
                    .collect();
                self.listeners.insert(port, tasks);
                PortState::Listening(addrs)
            }
            Err(e) => {
                warn!(port, service = %report.service, error = %e, "cannot open health-check port; retrying");
                if let Some(metrics) = &self.metrics {
                    metrics.health_check_bind_errors.inc();
                }
                PortState::Failed(e.to_string())
            }
        }
    }

    /// Logs and counts a reserved port once, when it is first asked for.
    fn refuse(&self, port: u16, report: &ServiceHealth) {
        if self.status.borrow().get(&port) == Some(&PortState::Refused) {
            return;
        }
        warn!(port, service = %report.service, "healthCheckNodePort is a port the node needs (health_check.reserved_ports): refused");
        if let Some(metrics) = &self.metrics {
            metrics
                .rejected_total
                .get_or_create(&rejection_labels(
                    "Service",
                    "reserved_health_check_node_port",
                ))
                .inc();
        }
    }
}

/// Binds `port` on every address, all or none.
fn bind_all(port: u16, addrs: &[IpAddr]) -> std::io::Result<Vec<tokio::net::TcpListener>> {
    addrs
        .iter()
        .map(|addr| bind_listener(SocketAddr::new(*addr, port)))
        .collect()
}

/// A non-blocking listener on `addr`; `::` that the node cannot bind (no IPv6) falls back to
/// `0.0.0.0`.
pub(crate) fn bind_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let listener = match std::net::TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e)
            if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                && matches!(
                    e.raw_os_error(),
                    Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
                ) =>
        {
            std::net::TcpListener::bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port()))?
        }
        Err(e) => return Err(e),
    };
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}

/// Answers every request on `port` from the latest report, as kube-proxy does whatever the
/// path and method.
fn port_handler(
    port: u16,
    checks: watch::Receiver<HealthChecks>,
    health: Option<Arc<Health>>,
) -> Handler {
    Arc::new(move |_req| {
        let report = checks.borrow().get(&port).cloned();
        let proxy_healthy = health.as_ref().is_none_or(|h| h.proxier().healthy);
        answer(report.as_ref(), proxy_healthy)
    })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    service: &'a ObjectRef,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

/// kube-proxy's answer, for any path and method: 200 when the node has a local ready endpoint
/// and the proxy is healthy ([`Health::proxier`], the node's eligibility aside), else 503.
fn answer(report: Option<&ServiceHealth>, proxy_healthy: bool) -> Response<Full<Bytes>> {
    let unknown = ObjectRef::default();
    let (service, count) = match report {
        Some(r) => (&r.service, r.local_endpoints),
        // The port is closing: the Service is gone.
        None => (&unknown, 0),
    };
    let body = serde_json::to_string(&Body {
        service,
        local_endpoints: count,
        service_proxy_healthy: proxy_healthy,
    })
    .unwrap_or_default();
    let status = if count > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    crate::http::json_reply(status, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intent::{Endpoint, EndpointSliceIntent, ServiceIntent};

    fn endpoint(ip: &str, node: &str, ready: bool) -> Endpoint {
        Endpoint {
            addresses: vec![ip.parse().unwrap()],
            ready,
            serving: true,
            terminating: !ready,
            node_name: Some(node.into()),
            ..Endpoint::default()
        }
    }

    fn pod(name: &str) -> Option<EndpointTarget> {
        Some(EndpointTarget {
            kind: "Pod".into(),
            namespace: "ns".into(),
            name: name.into(),
        })
    }

    #[test]
    fn a_dual_stack_pod_is_one_local_endpoint() {
        let mut intent = ClusterIntent::default();
        let id = ObjectRef {
            namespace: "ns".into(),
            name: "dual".into(),
        };
        intent.services.insert(
            id.clone(),
            ServiceIntent {
                id: id.clone(),
                external_traffic_policy: TrafficPolicy::Local,
                health_check_node_port: Some(31000),
                ..Default::default()
            },
        );
        let targeted = |ip: &str, name: &str| Endpoint {
            target: pod(name),
            ..endpoint(ip, "node1", true)
        };
        // One endpoint with an address of each family and no targetRef (hand-written).
        let both_families = Endpoint {
            addresses: vec!["198.18.1.30".parse().unwrap(), "fd00::1e".parse().unwrap()],
            ..endpoint("198.18.1.30", "node1", true)
        };
        for (slice, endpoints) in [
            (
                "dual-ipv4",
                vec![
                    targeted("198.18.1.10", "a"),
                    targeted("198.18.1.20", "b"),
                    both_families,
                ],
            ),
            // The same pod a in the IPv6 slice, and pod c only there.
            (
                "dual-ipv6",
                vec![targeted("fd00::a", "a"), targeted("fd00::c", "c")],
            ),
        ] {
            let slice = ObjectRef {
                namespace: "ns".into(),
                name: slice.into(),
            };
            intent.slices.insert(
                slice.clone(),
                EndpointSliceIntent {
                    id: slice,
                    service: id.clone(),
                    ports: vec![],
                    endpoints,
                },
            );
        }
        // a, b, c and the untargeted one.
        assert_eq!(desired(&intent, "node1")[&31000].local_endpoints, 4);
    }

    #[test]
    fn only_local_policy_services_with_a_port_get_a_listener_counting_local_ready_endpoints() {
        let mut intent = ClusterIntent::default();
        for (name, policy, port) in [
            ("local", TrafficPolicy::Local, Some(31000)),
            ("cluster", TrafficPolicy::Cluster, Some(31001)),
            ("noport", TrafficPolicy::Local, None),
        ] {
            let id = ObjectRef {
                namespace: "ns".into(),
                name: name.into(),
            };
            intent.services.insert(
                id.clone(),
                ServiceIntent {
                    id: id.clone(),
                    external_traffic_policy: policy,
                    health_check_node_port: port,
                    ..Default::default()
                },
            );
            let slice = ObjectRef {
                namespace: "ns".into(),
                name: format!("{name}-1"),
            };
            intent.slices.insert(
                slice.clone(),
                EndpointSliceIntent {
                    id: slice,
                    service: id,
                    ports: vec![],
                    endpoints: vec![
                        endpoint("198.19.1.10", "node1", true),
                        endpoint("198.19.1.11", "node1", false),
                        endpoint("198.19.2.10", "node2", true),
                    ],
                },
            );
        }
        let checks = desired(&intent, "node1");
        assert_eq!(checks.keys().copied().collect::<Vec<_>>(), [31000]);
        assert_eq!(checks[&31000].local_endpoints, 1);
        assert_eq!(checks[&31000].service.name, "local");
        assert_eq!(desired(&intent, "node3")[&31000].local_endpoints, 0);
    }

    #[test]
    fn the_body_is_kube_proxys() {
        let report = ServiceHealth {
            service: ObjectRef {
                namespace: "ns".into(),
                name: "svc".into(),
            },
            local_endpoints: 2,
        };
        let response = answer(Some(&report), true);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(answer(Some(&report), false).status(), 503);
        let body = serde_json::to_string(&Body {
            service: &report.service,
            local_endpoints: 2,
            service_proxy_healthy: true,
        })
        .unwrap();
        assert_eq!(
            body,
            r#"{"service":{"namespace":"ns","name":"svc"},"localEndpoints":2,"serviceProxyHealthy":true}"#
        );
    }
}

//! healthCheckNodePort listeners for real: Service YAML through the intent builder the reconciler
//! uses, the server's diffed listeners on loopback, and real HTTP requests against them: 200/503
//! as local ready endpoints come and go, port changes, Services leaving, and a port someone else
//! holds (an error and a metric, then a retry), never a crash; a port the node needs, refused; a
//! dual-stack pod counted once; and `serviceProxyHealthy` following the proxier's sync.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use weir_agent::config::PortRange;
use weir_agent::health_check::{
    desired, HealthCheckOptions, HealthCheckServer, HealthChecks, PortState,
};
use weir_agent::metrics::{Health, Metrics};
use weir_agent::source::{parse_documents, IntentBuilder, Objects};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A LoadBalancer Service `web` with `externalTrafficPolicy: Local` on health-check port `port`,
/// with one endpoint on node1 (ready or not) and one ready endpoint on node2.
fn web(port: u16, local_ready: bool) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  type: LoadBalancer
  clusterIP: 198.18.100.30
  externalTrafficPolicy: Local
  healthCheckNodePort: {port}
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {{name: http, protocol: TCP, port: 8080}}
endpoints:
- addresses: ["198.19.1.11"]
  nodeName: node1
  conditions: {{ready: {local_ready}, serving: true, terminating: {terminating}}}
- addresses: ["198.19.2.11"]
  nodeName: node2
  conditions: {{ready: true}}
"#,
        terminating = !local_ready
    )
}

/// The checks node1 should serve for `yaml`, through the reconciler's intent builder.
fn checks(builder: &mut IntentBuilder, yaml: &str) -> HealthChecks {
    let mut objects = Objects::default();
    parse_documents(Path::new("test.yaml"), yaml, &mut objects).expect("YAML parses");
    let (intent, errors) = builder.build(&objects);
    assert!(errors.is_empty(), "{errors:?}");
    desired(&intent, "node1")
}

fn on_loopback() -> HealthCheckOptions {
    HealthCheckOptions {
        bind: vec![LOOPBACK],
        ..Default::default()
    }
}

/// A port nothing listens on right now (the kernel's choice of a free one).
fn free_port() -> u16 {
    TcpListener::bind((LOOPBACK, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (bounded) until the server reports what `ok` wants; panics with the last status.
fn wait_for(
    server: &HealthCheckServer,
    what: &str,
    ok: impl Fn(&BTreeMap<u16, PortState>) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = server.status();
        if ok(&status) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {status:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn listening(port: u16) -> impl Fn(&BTreeMap<u16, PortState>) -> bool {
    move |s| matches!(s.get(&port), Some(PortState::Listening(_)))
}

struct Answer {
    status: u16,
    headers: String,
    body: String,
}

fn get(port: u16) -> std::io::Result<Answer> {
    let mut stream =
        TcpStream::connect_timeout(&SocketAddr::new(LOOPBACK, port), Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head and body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    Ok(Answer {
        status,
        headers: head.to_ascii_lowercase(),
        body: body.to_owned(),
    })
}

fn body(count: usize) -> String {
    format!(
        r#"{{"service":{{"namespace":"shop","name":"web"}},"localEndpoints":{count},"serviceProxyHealthy":true}}"#
    )
}

#[test]
fn health_check_ports_follow_services_and_their_local_endpoints() {
    let metrics = Arc::new(Metrics::new());
    let server =
        HealthCheckServer::start(on_loopback(), Some(metrics.clone()), None).expect("start");
    let mut builder = IntentBuilder::default();
    let first = free_port();

    // A local ready endpoint: 200, kube-proxy's body and headers.
    server.update(checks(&mut builder, &web(first, true)));
    wait_for(&server, "first port open", listening(first));
    let answer = get(first).expect("GET");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, body(1));
    assert!(
        answer.headers.contains("content-type: application/json"),
        "{}",
        answer.headers
    );
    assert!(
        answer.headers.contains("x-content-type-options: nosniff"),
        "{}",
        answer.headers
    );

    // The local endpoint terminates (the remote one stays ready): 503 on the same listener.
    server.update(checks(&mut builder, &web(first, false)));
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        let answer = get(first).expect("GET");
        if answer.status != 200 || Instant::now() > deadline {
            break answer;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(answer.status, 503);
    assert_eq!(answer.body, body(0));

    // Ready again: 200.
    server.update(checks(&mut builder, &web(first, true)));
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(first).expect("GET").status != 200 {
        assert!(Instant::now() < deadline, "never 200 again");
        std::thread::sleep(Duration::from_millis(20));
    }

    // The port changes: the old one closes, the new one answers.
    let second = free_port();
    server.update(checks(&mut builder, &web(second, true)));
    wait_for(&server, "moved to the second port", |s| {
        listening(second)(s) && !s.contains_key(&first)
    });
    assert_eq!(get(second).expect("GET second").status, 200);
    let refused = get(first).err().expect("the first port is closed");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);

    // The Service leaves: nothing listens.
    server.update(checks(&mut builder, ""));
    wait_for(&server, "no ports", BTreeMap::is_empty);
    assert_eq!(
        get(second).err().expect("closed").kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    assert_eq!(metrics.health_check_listeners.get(), 0);
}

#[test]
fn a_port_someone_else_holds_is_an_error_and_a_metric_then_a_retry() {
    let metrics = Arc::new(Metrics::new());
    let server =
        HealthCheckServer::start(on_loopback(), Some(metrics.clone()), None).expect("start");
    let mut builder = IntentBuilder::default();
    let blocker = TcpListener::bind((LOOPBACK, 0)).unwrap();
    let port = blocker.local_addr().unwrap().port();

    server.update(checks(&mut builder, &web(port, true)));
    wait_for(
        &server,
        "bind failure reported",
        |s| matches!(s.get(&port), Some(PortState::Failed(e)) if e.contains("in use")),
    );
    assert!(metrics.health_check_bind_errors.get() >= 1);
    assert_eq!(metrics.health_check_listeners.get(), 0);

    // The holder goes away: the retry opens the port.
    drop(blocker);
    wait_for(&server, "opened on retry", listening(port));
    assert_eq!(get(port).expect("GET").status, 200);
    assert_eq!(metrics.health_check_listeners.get(), 1);
}

#[test]
fn a_port_the_node_needs_is_refused_and_counted_once() {
    let metrics = Arc::new(Metrics::new());
    let port = free_port();
    let server = HealthCheckServer::start(
        HealthCheckOptions {
            reserved: vec![PortRange::one(port)],
            ..on_loopback()
        },
        Some(metrics.clone()),
        None,
    )
    .expect("start");
    let mut builder = IntentBuilder::default();
    server.update(checks(&mut builder, &web(port, true)));
    wait_for(&server, "refused", |s| {
        s.get(&port) == Some(&PortState::Refused)
    });
    assert_eq!(
        get(port).err().expect("nothing listens").kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    // Another Service's change wakes the server: the refusal is not counted again.
    let mut other = checks(&mut builder, &web(port, true));
    other.insert(free_port(), other[&port].clone());
    server.update(other);
    wait_for(&server, "the other port open", |s| {
        s.len() == 2 && s.get(&port) == Some(&PortState::Refused)
    });
    let text = metrics.encode().unwrap();
    let series =
        "weir_rejected_objects_total{kind=\"Service\",reason=\"reserved_health_check_node_port\"}";
    assert!(text.lines().any(|l| l == format!("{series} 1")), "{text}");
    assert_eq!(metrics.health_check_listeners.get(), 1);

    // The default list holds the kubelet's port.
    let kubelet = HealthCheckServer::start(on_loopback(), None, None).expect("start");
    kubelet.update(checks(&mut builder, &web(10250, true)));
    wait_for(&kubelet, "10250 refused", |s| {
        s.get(&10250) == Some(&PortState::Refused)
    });
}

/// Service `web` (port `port`) whose one local pod is dual-stack: listed in the IPv4 and the
/// IPv6 slice with the same targetRef, as the EndpointSlice controller writes it.
fn dual_stack_web(port: u16) -> String {
    let slice = |family: &str, address: &str| {
        format!(
            r#"---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-{family}
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: {family}
ports:
- {{name: http, protocol: TCP, port: 8080}}
endpoints:
- addresses: ["{address}"]
  nodeName: node1
  conditions: {{ready: true}}
  targetRef: {{kind: Pod, namespace: shop, name: web-0}}
"#
        )
    };
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  type: LoadBalancer
  clusterIP: 198.18.100.30
  clusterIPs: [198.18.100.30, "fd00::100:30"]
  ipFamilies: [IPv4, IPv6]
  externalTrafficPolicy: Local
  healthCheckNodePort: {port}
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}}
{}{}"#,
        slice("IPv4", "198.19.1.11"),
        slice("IPv6", "fd00::1:11")
    )
}

#[test]
fn a_dual_stack_pod_is_one_local_endpoint_and_a_stale_proxy_is_unhealthy() {
    let health = Arc::new(
        Health::new(Duration::from_secs(60)).with_sync_timeout(Duration::from_millis(200)),
    );
    health.beat();
    let server =
        HealthCheckServer::start(on_loopback(), None, Some(health.clone())).expect("start");
    let mut builder = IntentBuilder::default();
    let port = free_port();
    server.update(checks(&mut builder, &dual_stack_web(port)));
    wait_for(&server, "open", listening(port));
    let answer = get(port).expect("GET");
    assert_eq!((answer.status, answer.body), (200, body(1)));

    // A change left unwritten past the sync timeout: the proxy is not healthy, whatever the
    // endpoints say (kube-proxy's serviceProxyHealthy).
    health.queued_update();
    std::thread::sleep(Duration::from_millis(300));
    health.beat();
    let answer = get(port).expect("GET");
    assert_eq!(answer.status, 503);
    assert!(
        answer.body.contains("\"serviceProxyHealthy\":false"),
        "{}",
        answer.body
    );
    health.updated();
    assert_eq!(get(port).expect("GET").status, 200);
}

//! The running agent with `[maps]` set: readiness follows whether passes can write (a node map
//! too small for the cluster makes the node unready, saying why, until the cluster fits again),
//! and `/metrics` shows every map's capacity and fill.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sched::CloneFlags;
use weir_agent::compile::addr_key;
use weir_agent::dataplane::NodeMaps;
use weir_common::HostAddrKey;

struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on a loopback port: status and body, or None while nothing answers.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let timeout = Duration::from_secs(5);
    let mut stream =
        TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let status = text.split(' ').nth(1)?.parse().ok()?;
    Some((status, text.split_once("\r\n\r\n")?.1.to_owned()))
}

/// The value of the sample `series` (name and labels) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Node objects, one InternalIP each.
fn nodes(addresses: &[&str]) -> String {
    addresses
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            format!(
                "---\napiVersion: v1\nkind: Node\nmetadata: {{name: node{}}}\n\
                 status: {{addresses: [{{type: InternalIP, address: \"{ip}\"}}]}}\n",
                i + 1
            )
        })
        .collect()
}

/// Replaces the state file in one step, as an editor or a ConfigMap update does.
fn write_state(path: &Path, text: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// Polls `path` until `want` holds for its answer; panics with the agent's log otherwise.
fn wait_for(port: u16, path: &str, log: &Path, want: impl Fn(u16, &str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    loop {
        if let Some((status, body)) = get(port, path) {
            if want(status, &body) {
                return body;
            }
            last = Some((status, body));
        }
        assert!(
            Instant::now() < deadline,
            "{path}: last answer {last:?}; agent log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_node_that_cannot_write_a_pass_is_not_ready_until_one_succeeds() {
    require_root();
    let bpffs = private_bpffs(CloneFlags::CLONE_NEWNET);
    ip(&["link", "set", "lo", "up"]);
    let files = tempfile::tempdir().expect("tempdir");
    let (metrics_port, healthz_port) = (free_port(), free_port());
    let state = files.path().join("cluster.yaml");
    // Three nodes' addresses for a tunnel peer map of two: the third write fails (E2BIG).
    let three = nodes(&["198.18.0.1", "198.18.0.2", "198.18.0.3"]);
    write_state(
        &state,
        &format!("{}{three}", cluster_yaml(&[BACKEND, OTHER])),
    );
    let config = files.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"node_name = "node1"
pin_dir = "{}"
state_path = "{}"
metrics_listen = "127.0.0.1:{metrics_port}"
healthz_listen = "127.0.0.1:{healthz_port}"
poll_interval = "100ms"
[tunnel]
mode = "none"
[maps]
tunnel_peers = 2
conntrack = 8192
"#,
            bpffs.path().join("node1").display(),
            state.display(),
        ),
    )
    .unwrap();
    let log = files.path().join("agent.log");
    let _agent = AgentProcess(
        Command::new(env!("CARGO_BIN_EXE_weir-agent"))
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the agent"),
    );

    let body = wait_for(metrics_port, "/readyz", &log, |status, body| {
        status == 503 && body.contains("WEIR_TUNNEL_PEERS")
    });
    assert!(body.contains("sync failed"), "{body}");
    let metrics = wait_for(metrics_port, "/metrics", &log, |status, _| status == 200);
    assert_eq!(
        sample(&metrics, "weir_last_sync_success"),
        Some(0.0),
        "{metrics}"
    );
    assert!(
        sample(&metrics, "weir_reconcile_errors_total") >= Some(1.0),
        "{metrics}"
    );
    // The services were written all the same: the failure was the tunnel's.
    assert_eq!(
        sample(&metrics, "weir_map_entries{map=\"WEIR_SERVICES\"}"),
        Some(4.0),
        "{metrics}"
    );
    for (map, capacity) in [
        ("WEIR_TUNNEL_PEERS", 2),
        ("WEIR_CONNTRACK", 8192),
        ("WEIR_SERVICES", weir_common::capacity::SERVICES),
    ] {
        assert_eq!(
            sample(&metrics, &format!("weir_map_capacity{{map=\"{map}\"}}")),
            Some(f64::from(capacity)),
            "{map}: {metrics}"
        );
    }

    // One node leaves: the cluster fits again, and the node is ready. A Service refused as
    // bad input (its NodePort would take the node's SSH port: withheld) does not change that.
    let two = nodes(&["198.18.0.1", "198.18.0.2"]);
    let capture =
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: capture, namespace: default}\n\
                   spec: {type: NodePort, clusterIP: 198.18.100.20, \
                   ports: [{port: 80, targetPort: 8080, nodePort: 22}]}\n";
    write_state(
        &state,
        &format!("{}{two}{capture}", cluster_yaml(&[BACKEND, OTHER])),
    );
    wait_for(metrics_port, "/readyz", &log, |status, _| status == 200);
    let metrics = wait_for(metrics_port, "/metrics", &log, |status, _| status == 200);
    assert_eq!(
        sample(&metrics, "weir_last_sync_success"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "weir_rejected_objects_current{kind=\"Service\",reason=\"node_port_out_of_range\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "weir_map_entries{map=\"WEIR_TUNNEL_PEERS\"}"),
        Some(2.0),
        "{metrics}"
    );
    for (map, entries) in [("WEIR_BACKEND_SLOTS", 4.0), ("WEIR_BACKENDS", 4.0)] {
        assert_eq!(
            sample(&metrics, &format!("weir_map_entries{{map=\"{map}\"}}")),
            Some(entries),
            "{map}: {metrics}"
        );
    }
    assert_eq!(
        sample(&metrics, "weir_map_entries{map=\"WEIR_HOST_ADDRS\"}"),
        Some(0.0),
        "no host interfaces configured: {metrics}"
    );

    // A node replaced by another at full capacity: the one leaving makes room first.
    let replaced = nodes(&["198.18.0.1", "198.18.0.3"]);
    write_state(
        &state,
        &format!("{}{replaced}{capture}", cluster_yaml(&[BACKEND, OTHER])),
    );
    let pin_dir = weir_agent::config::versioned_pin_dir(&bpffs.path().join("node1"));
    let wanted: BTreeSet<HostAddrKey> = ["198.18.0.1", "198.18.0.3"]
        .iter()
        .map(|ip| addr_key(ip.parse().unwrap()))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let peers = NodeMaps::open_pinned(&pin_dir)
            .unwrap()
            .tunnel_peers()
            .unwrap();
        if peers == wanted {
            break;
        }
        assert!(Instant::now() < deadline, "tunnel peers stuck at {peers:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let metrics = wait_for(metrics_port, "/metrics", &log, |status, _| status == 200);
    assert_eq!(
        sample(&metrics, "weir_last_sync_success"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(get(metrics_port, "/readyz").map(|r| r.0), Some(200));
}

//! Host services for real: the cgroup sock_addr programs translate sockets of processes in a
//! cgroup, with real sockets, a real cgroup and real namespaces (BPF_PROG_TEST_RUN does not run
//! sock_addr programs).
//!
//! Each test thread gets a private mount namespace (its own bpffs) and a private network
//! namespace (the "node"), with a veth to a second network namespace (the "pod", a thread of
//! this test running TCP and UDP echo servers on a backend address). The agent's data plane is
//! loaded, services installed through the reconciler, and the host-service programs attached to
//! a child cgroup this test creates under the cgroup2 mount (and removes, by its path). Clients
//! are this test binary run again (`client_helper`), placed in the cgroup before they exec.

mod common;

use std::ffi::CString;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{ip, load_pinned, objects, private_bpffs, require_root};
use nix::sched::CloneFlags;
use weir_agent::config::{link_pin_dir, versioned_pin_dir};
use weir_agent::dataplane::{uninstall, Dataplane, Hook, LoadOptions};
use weir_agent::reconcile::Reconciler;

const NODE4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 1);
const POD4: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 11);
const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x19, 1, 0, 0, 0, 0, 0x11);
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 20);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0x100, 0, 0, 0, 0, 0x20);
const EMPTY4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 21);
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const TCP_TARGET: u16 = 8080;
const UDP_TARGET: u16 = 5353;

/// Environment variable that turns `client_helper` into a client: actions separated by `;`.
const CLIENT_ENV: &str = "WEIR_HOST_SERVICES_CLIENT";

fn cluster_yaml() -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec:
  clusterIPs: ["{VIP4}", "{VIP6}"]
  ipFamilies: [IPv4, IPv6]
  ports:
  - {{name: tcp, protocol: TCP, port: {TCP_PORT}, targetPort: {TCP_TARGET}}}
  - {{name: udp, protocol: UDP, port: {UDP_PORT}, targetPort: {UDP_TARGET}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-v4
  namespace: default
  labels: {{kubernetes.io/service-name: echo}}
addressType: IPv4
ports:
- {{name: tcp, protocol: TCP, port: {TCP_TARGET}}}
- {{name: udp, protocol: UDP, port: {UDP_TARGET}}}
endpoints:
- addresses: ["{POD4}"]
  conditions: {{ready: true}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-v6
  namespace: default
  labels: {{kubernetes.io/service-name: echo}}
addressType: IPv6
ports:
- {{name: tcp, protocol: TCP, port: {TCP_TARGET}}}
- {{name: udp, protocol: UDP, port: {UDP_TARGET}}}
endpoints:
- addresses: ["{POD6}"]
  conditions: {{ready: true}}
---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: default}}
spec:
  clusterIP: {EMPTY4}
  ports:
  - {{name: tcp, protocol: TCP, port: 81, targetPort: 8081}}
  - {{name: udp, protocol: UDP, port: 82, targetPort: 8082}}
"#
    )
}

fn gettid() -> i32 {
    // SAFETY: a system call without arguments.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// The pod: a thread in a network namespace of its own, answering TCP (echo of one read, then
/// close) and UDP (echo) on the backend ports of both families until told to stop or for at
/// most a minute.
struct Pod {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pod {
    fn start() -> Pod {
        let (tid_tx, tid_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let thread = std::thread::spawn(move || {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("pod netns");
            // /proc/sys/net is the opening thread's namespace's: this one's.
            no_dad();
            tid_tx.send(gettid()).unwrap();
            if go_rx.recv().is_err() {
                return;
            }
            serve(&stop_flag);
        });
        let tid = tid_rx.recv().expect("pod thread started");
        let netns = PathBuf::from(format!("/proc/{}/task/{tid}/ns/net", std::process::id()));
        // Should wiring fail, `go_tx` drops with the unwinding and the pod thread ends.
        wire(&netns, tid);
        go_tx.send(()).unwrap();
        Pod {
            stop,
            thread: Some(thread),
        }
    }
}

/// IPv6 addresses usable at once: no duplicate address detection in this thread's namespace.
fn no_dad() {
    for conf in ["all", "default"] {
        std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/accept_dad"), "0")
            .expect("accept_dad");
    }
}

/// Runs a command in the pod's network namespace (entered between fork and exec, so no
/// nsenter is needed: VM images lack it).
fn in_pod(netns: &Path, args: &[&str]) {
    use std::os::fd::AsRawFd as _;
    let ns = std::fs::File::open(netns).expect("pod netns file");
    let fd = ns.as_raw_fd();
    let mut command = Command::new(args[0]);
    command.args(&args[1..]);
    // SAFETY: setns is a plain system call, async-signal-safe; the descriptor stays open in
    // the parent until the child has run.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = command.output().expect("run in pod");
    assert!(
        out.status.success(),
        "{args:?} in the pod: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A veth `wh0` (node) / `wh1` (pod) with /32 and /128 addresses and routes both ways.
fn wire(pod: &Path, tid: i32) {
    no_dad();
    ip(&["link", "set", "lo", "up"]);
    ip(&["link", "add", "wh0", "type", "veth", "peer", "name", "wh1"]);
    ip(&["link", "set", "wh1", "netns", &tid.to_string()]);
    ip(&["addr", "add", &format!("{NODE4}/32"), "dev", "wh0"]);
    ip(&[
        "-6",
        "addr",
        "add",
        &format!("{NODE6}/128"),
        "dev",
        "wh0",
        "nodad",
    ]);
    ip(&["link", "set", "wh0", "up"]);
    ip(&["route", "add", &format!("{POD4}/32"), "dev", "wh0"]);
    ip(&["-6", "route", "add", &format!("{POD6}/128"), "dev", "wh0"]);
    in_pod(pod, &["ip", "link", "set", "lo", "up"]);
    in_pod(
        pod,
        &["ip", "addr", "add", &format!("{POD4}/32"), "dev", "wh1"],
    );
    in_pod(
        pod,
        &[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{POD6}/128"),
            "dev",
            "wh1",
            "nodad",
        ],
    );
    in_pod(pod, &["ip", "link", "set", "wh1", "up"]);
    in_pod(
        pod,
        &["ip", "route", "add", &format!("{NODE4}/32"), "dev", "wh1"],
    );
    in_pod(
        pod,
        &[
            "ip",
            "-6",
            "route",
            "add",
            &format!("{NODE6}/128"),
            "dev",
            "wh1",
        ],
    );
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(stop: &AtomicBool) {
    let tcp: Vec<TcpListener> = [IpAddr::from(POD4), IpAddr::from(POD6)]
        .into_iter()
        .map(|ip| {
            let l = TcpListener::bind(SocketAddr::new(ip, TCP_TARGET)).expect("bind tcp");
            l.set_nonblocking(true).unwrap();
            l
        })
        .collect();
    let udp: Vec<UdpSocket> = [IpAddr::from(POD4), IpAddr::from(POD6)]
        .into_iter()
        .map(|ip| {
            let s = UdpSocket::bind(SocketAddr::new(ip, UDP_TARGET)).expect("bind udp");
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        for listener in &tcp {
            if let Ok((mut stream, _)) = listener.accept() {
                // Echo every read until the client closes or goes quiet: the held connection
                // of the restart test sends twice.
                stream.set_nonblocking(false).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 512];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 || stream.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        }
        for socket in &udp {
            if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], peer);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A child cgroup of the cgroup2 mount, made by this test and removed (by its path) on drop.
struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    fn create(name: &str) -> TestCgroup {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let root = mountinfo
            .lines()
            .find_map(|line| {
                let (left, right) = line.split_once(" - ")?;
                (right.split(' ').next() == Some("cgroup2")).then(|| left.split(' ').nth(4))?
            })
            .expect("a cgroup2 mount (host services need cgroup v2)");
        let path = Path::new(root).join(format!("weir-test-{}-{name}", std::process::id()));
        std::fs::create_dir(&path).expect("create test cgroup");
        TestCgroup { path }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Only empty cgroups can go: clients have exited by now; retry briefly for the kernel
        // to finish reaping them.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("could not remove test cgroup {}", self.path.display());
    }
}

/// Starts this test binary as a client running `actions`, in `cgroup` when given.
fn spawn_client(actions: &str, cgroup: Option<&TestCgroup>) -> Child {
    let mut command = Command::new(std::env::current_exe().expect("test binary"));
    command
        .args([
            "--exact",
            "client_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CLIENT_ENV, actions)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(cgroup) = cgroup {
        let procs = CString::new(cgroup.path.join("cgroup.procs").into_os_string().into_vec())
            .expect("path without NUL");
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe calls (open, write, close) on memory prepared before the fork.
        unsafe {
            command.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process itself.
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if written != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    command.spawn().expect("spawn client")
}

use std::os::unix::ffi::OsStringExt as _;

/// Runs a client to completion (bounded by its own socket timeouts) and returns its result
/// lines.
fn client(actions: &str, cgroup: Option<&TestCgroup>) -> Vec<String> {
    let child = spawn_client(actions, cgroup);
    let out = child.wait_with_output().expect("client output");
    results(&String::from_utf8_lossy(&out.stdout))
}

fn results(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        // libtest may print "test client_helper ... " on the same line first.
        .filter_map(|l| {
            l.find("RESULT ")
                .map(|at| l[at + "RESULT ".len()..].to_owned())
        })
        .collect()
}

fn load(pin_root: &Path, cgroup: &TestCgroup) -> Dataplane {
    let mut dataplane = load_pinned(pin_root);
    dataplane
        .attach_host_services(&cgroup.path)
        .expect("host services attach");
    dataplane
}

fn host_service_pins(pin_root: &Path) -> usize {
    std::fs::read_dir(link_pin_dir(pin_root))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("cgroup_"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn host_processes_reach_cluster_ips_through_the_socket_hooks() {
    require_root();
    let bpffs = private_bpffs(CloneFlags::CLONE_NEWNET);
    let pod = Pod::start();
    let cgroup = TestCgroup::create("lb");
    let pin_root = bpffs.path().join("node");

    let mut dataplane = load(&pin_root, &cgroup);
    // The tc program on the pod's interface sees the backend's replies: they must pass.
    dataplane.attach("wh0", Hook::Ingress).expect("tc attach");
    let mut reconciler = Reconciler::default();
    reconciler
        .reconcile(&mut dataplane.services, &objects(&cluster_yaml()))
        .expect("reconcile");
    assert_eq!(host_service_pins(&pin_root), 8, "one pinned link per hook");

    let actions = format!(
        "tcp {VIP4}:{TCP_PORT};udp {VIP4}:{UDP_PORT};udpc {VIP4}:{UDP_PORT};\
         tcp [{VIP6}]:{TCP_PORT};udp [{VIP6}]:{UDP_PORT};\
         tcp {EMPTY4}:81;udpc {EMPTY4}:82;udp {EMPTY4}:82;tcp {POD4}:{TCP_TARGET}"
    );
    let inside = client(&actions, Some(&cgroup));
    assert_eq!(
        inside,
        [
            format!("tcp {VIP4}:80 peer={VIP4}:80 echo=hello"),
            format!("udp {VIP4}:53 from={VIP4}:53 echo=ping"),
            format!("udpc {VIP4}:53 peer={VIP4}:53 from={VIP4}:53 echo=ping"),
            format!("tcp [{VIP6}]:80 peer=[{VIP6}]:80 echo=hello"),
            format!("udp [{VIP6}]:53 from=[{VIP6}]:53 echo=ping"),
            // No endpoint: refused, as the tc path refuses pods (a reset for TCP).
            format!("tcp {EMPTY4}:81 error=111"),
            format!("udpc {EMPTY4}:82 error=111"),
            // Unconnected UDP to a service without endpoints: the send itself fails (EPERM).
            format!("udp {EMPTY4}:82 error=1"),
            // A backend addressed directly is left alone.
            format!("tcp {POD4}:8080 peer={POD4}:8080 echo=hello"),
        ],
        "a client inside the cgroup"
    );

    // Outside the cgroup nothing is translated: the node has no route to service addresses.
    let outside = client(
        &format!("tcp {VIP4}:{TCP_PORT};udp {VIP4}:{UDP_PORT}"),
        None,
    );
    assert_eq!(
        outside,
        [
            format!("tcp {VIP4}:80 error=101"),
            format!("udp {VIP4}:53 error=101"),
        ],
        "a client outside the cgroup"
    );

    let counters: std::collections::BTreeMap<_, _> = dataplane
        .counters
        .read()
        .expect("counters")
        .into_iter()
        .collect();
    assert_eq!(
        counters["ct_new_flow"], 0,
        "the tc program must not translate host-service traffic again"
    );
    assert!(counters["pass_no_service"] > 0, "{counters:?}");

    // Detaching leaves no hook behind: the same client is untouched again.
    dataplane.detach_host_services();
    assert_eq!(host_service_pins(&pin_root), 0);
    assert_eq!(
        client(&format!("tcp {VIP4}:{TCP_PORT}"), Some(&cgroup)),
        [format!("tcp {VIP4}:80 error=101")]
    );
    drop(dataplane);
    drop(pod);
}

/// A connected UDP socket of a host process was translated once, at connect, to an endpoint:
/// when that endpoint stops serving, the agent aborts the socket (sock_diag SOCK_DESTROY), so
/// the application's next call fails and it reconnects, to a live endpoint.
/// A socket connected to the endpoint's address directly is left alone.
#[test]
fn connected_udp_sockets_of_a_retired_endpoint_are_aborted() {
    require_root();
    let bpffs = private_bpffs(CloneFlags::CLONE_NEWNET);
    let pod = Pod::start();
    let cgroup = TestCgroup::create("retire");
    let pin_root = bpffs.path().join("node");
    let mut dataplane = load(&pin_root, &cgroup);
    let mut reconciler = Reconciler::default();
    reconciler
        .reconcile(&mut dataplane.services, &objects(&cluster_yaml()))
        .expect("reconcile");
    reconciler.take_retired();

    let mut through_service = spawn_client(&format!("udphold {VIP4}:{UDP_PORT}"), Some(&cgroup));
    let mut direct = spawn_client(&format!("udphold {POD4}:{UDP_TARGET}"), Some(&cgroup));
    let first_line = |child: &mut Child| {
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        for _ in 0..10 {
            line.clear();
            if stdout.read_line(&mut line).expect("first result") == 0 || line.contains("RESULT ") {
                break;
            }
        }
        (results(&line).concat(), stdout)
    };
    let (first, mut through_out) = first_line(&mut through_service);
    assert_eq!(first, format!("udphold {VIP4}:53 from={VIP4}:53 echo=ping"));
    let (first, mut direct_out) = first_line(&mut direct);
    assert_eq!(
        first,
        format!("udphold {POD4}:5353 from={POD4}:5353 echo=ping")
    );

    // The IPv4 endpoint stops serving.
    let without = cluster_yaml().replacen(
        &format!("- addresses: [\"{POD4}\"]\n  conditions: {{ready: true}}\n"),
        "",
        1,
    );
    assert_ne!(without, cluster_yaml());
    reconciler
        .reconcile(&mut dataplane.services, &objects(&without))
        .expect("retire");
    let retired = reconciler.take_retired();
    assert_eq!(
        dataplane
            .abort_retired_sockets(&retired)
            .expect("sock_diag"),
        1,
        "the translated socket, not the direct one"
    );

    for child in [&mut through_service, &mut direct] {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"go\n")
            .expect("signal");
    }
    let mut rest = String::new();
    through_out.read_to_string(&mut rest).expect("rest");
    through_service.wait().expect("exit");
    // The abort disconnects the socket: a send fails (EDESTADDRREQ; a receive would report
    // ECONNABORTED), and the application connects again.
    assert_eq!(
        results(&rest),
        [format!("udphold {VIP4}:53 error={}", libc::EDESTADDRREQ)]
    );
    let mut rest = String::new();
    direct_out.read_to_string(&mut rest).expect("rest");
    direct.wait().expect("exit");
    assert_eq!(results(&rest), [format!("udphold {POD4}:5353 echo=ping")]);
    drop(dataplane);
    drop(pod);
}

#[test]
fn connections_survive_an_agent_restart_and_uninstall_detaches() {
    require_root();
    let bpffs = private_bpffs(CloneFlags::CLONE_NEWNET);
    let pod = Pod::start();
    let cgroup = TestCgroup::create("restart");
    let pin_root = bpffs.path().join("node");

    let mut dataplane = load(&pin_root, &cgroup);
    Reconciler::default()
        .reconcile(&mut dataplane.services, &objects(&cluster_yaml()))
        .expect("reconcile");

    // A TCP connection and a connected UDP socket held open across the restart.
    let mut held = spawn_client(&format!("hold {VIP4}:{TCP_PORT}"), Some(&cgroup));
    let mut stdout = BufReader::new(held.stdout.take().unwrap());
    // libtest's own lines come first; a handful at most.
    let mut first = String::new();
    for _ in 0..10 {
        first.clear();
        if stdout.read_line(&mut first).expect("first result") == 0 || first.contains("RESULT ") {
            break;
        }
    }
    assert_eq!(
        results(&first).concat(),
        format!("hold {VIP4}:80 peer={VIP4}:80 echo=hello udp_from={VIP4}:53 udp_echo=ping")
    );

    // The agent stops (pins stay) and a new one adopts the hooks in place.
    drop(dataplane);
    let dataplane = load(&pin_root, &cgroup);
    assert_eq!(host_service_pins(&pin_root), 8, "adopted, not stacked");
    assert_eq!(
        dataplane.host_services_adopted(),
        8,
        "every hook taken over in place (BPF_LINK_UPDATE)"
    );

    held.stdin
        .take()
        .unwrap()
        .write_all(b"go\n")
        .expect("signal client");
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).expect("rest");
    held.wait().expect("client exit");
    assert_eq!(
        results(&rest),
        [format!(
            "hold {VIP4}:80 echo=hello udp_from={VIP4}:53 udp_echo=ping"
        )]
    );
    // New connections through the new agent's programs.
    assert_eq!(
        client(&format!("tcp {VIP4}:{TCP_PORT}"), Some(&cgroup)),
        [format!("tcp {VIP4}:80 peer={VIP4}:80 echo=hello")]
    );

    // Uninstall unpins the links: the hooks go with them.
    drop(dataplane);
    let report = uninstall(&pin_root, &[]).expect("uninstall");
    assert_eq!(report.links, 8);
    assert_eq!(
        client(&format!("tcp {VIP4}:{TCP_PORT}"), Some(&cgroup)),
        [format!("tcp {VIP4}:80 error=101")]
    );
    drop(pod);
}

#[test]
fn a_path_that_is_not_cgroup_v2_is_a_clear_error() {
    require_root();
    let bpffs = private_bpffs(CloneFlags::empty());
    let mut dataplane = Dataplane::load(&LoadOptions {
        pin_dir: Some(versioned_pin_dir(bpffs.path())),
        ..Default::default()
    })
    .expect("load");
    let err = dataplane
        .attach_host_services(bpffs.path())
        .expect_err("bpffs is no cgroup");
    assert!(
        err.to_string().contains("not a cgroup v2 directory"),
        "{err}"
    );
    assert!(!dataplane.host_services_attached());
}

/// Not a test by itself: the client process the tests above start (see `spawn_client`).
#[test]
fn client_helper() {
    let Ok(actions) = std::env::var(CLIENT_ENV) else {
        return;
    };
    for action in actions.split(';').filter(|a| !a.is_empty()) {
        let (verb, target) = action.split_once(' ').expect("verb and address");
        let addr: SocketAddr = target.parse().expect("socket address");
        let outcome = match verb {
            "tcp" => tcp_echo(addr).map(|(peer, echo)| format!("peer={peer} echo={echo}")),
            "udp" => udp_echo(addr),
            "udpc" => udp_connected(addr),
            "hold" => hold(addr),
            "udphold" => udp_hold(addr),
            other => panic!("unknown action {other}"),
        };
        let line = match outcome {
            Ok(text) => format!("RESULT {verb} {target} {text}"),
            Err(e) => format!(
                "RESULT {verb} {target} error={}",
                e.raw_os_error().unwrap_or(-1)
            ),
        };
        println!("{line}");
        std::io::stdout().flush().unwrap();
    }
}

const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);

fn tcp_echo(addr: SocketAddr) -> std::io::Result<(SocketAddr, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    let peer = stream.peer_addr()?;
    stream.write_all(b"hello")?;
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf)?;
    Ok((peer, String::from_utf8_lossy(&buf[..n]).into_owned()))
}

fn unbound_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = if addr.is_ipv4() {
        UdpSocket::bind("0.0.0.0:0")?
    } else {
        UdpSocket::bind("[::]:0")?
    };
    socket.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    Ok(socket)
}

fn udp_echo(addr: SocketAddr) -> std::io::Result<String> {
    let socket = unbound_udp(addr)?;
    socket.send_to(b"ping", addr)?;
    let mut buf = [0u8; 64];
    let (n, from) = socket.recv_from(&mut buf)?;
    Ok(format!(
        "from={from} echo={}",
        String::from_utf8_lossy(&buf[..n])
    ))
}

fn udp_connected(addr: SocketAddr) -> std::io::Result<String> {
    let socket = unbound_udp(addr)?;
    socket.connect(addr)?;
    socket.send(b"ping")?;
    let mut buf = [0u8; 64];
    // recv_from, not recv: the recvmsg hook must show the source too.
    let (n, from) = socket.recv_from(&mut buf)?;
    let peer = socket.peer_addr()?;
    Ok(format!(
        "peer={peer} from={from} echo={}",
        String::from_utf8_lossy(&buf[..n])
    ))
}

/// Connects TCP and UDP sockets and echoes once on each, reports, waits for a line on stdin
/// (the agent restarts meanwhile), then echoes again on the same sockets.
fn hold(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    let peer = stream.peer_addr()?;
    let udp_target = SocketAddr::new(addr.ip(), UDP_PORT);
    let udp = unbound_udp(udp_target)?;
    udp.connect(udp_target)?;
    let mut buf = [0u8; 64];
    let mut echo = |stream: &mut TcpStream, udp: &UdpSocket| -> std::io::Result<String> {
        stream.write_all(b"hello")?;
        let n = stream.read(&mut buf)?;
        let tcp = String::from_utf8_lossy(&buf[..n]).into_owned();
        udp.send(b"ping")?;
        let (n, from) = udp.recv_from(&mut buf)?;
        Ok(format!(
            "echo={tcp} udp_from={from} udp_echo={}",
            String::from_utf8_lossy(&buf[..n])
        ))
    };
    let before = echo(&mut stream, &udp)?;
    println!("RESULT hold {addr} peer={peer} {before}");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    // Printed by the caller as the action's result.
    echo(&mut stream, &udp)
}

/// Connects a UDP socket, echoes once and reports, waits for a line on stdin (its endpoint is
/// retired meanwhile), then uses the same socket again: reports how that went.
fn udp_hold(addr: SocketAddr) -> std::io::Result<String> {
    let udp = unbound_udp(addr)?;
    udp.connect(addr)?;
    let mut buf = [0u8; 64];
    udp.send(b"ping")?;
    let (n, from) = udp.recv_from(&mut buf)?;
    println!(
        "RESULT udphold {addr} from={from} echo={}",
        String::from_utf8_lossy(&buf[..n])
    );
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    // The first call after the abort reports it, whichever it is.
    udp.send(b"ping")?;
    let (n, _) = udp.recv_from(&mut buf)?;
    Ok(format!("echo={}", String::from_utf8_lossy(&buf[..n])))
}

/// The agent binary itself stops (SIGTERM, by PID) and is waited for when the test ends.
struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

/// `GET /` on a loopback port: status and body, or None while nothing answers.
fn http_get(port: u16) -> Option<(u16, String)> {
    let mut stream =
        TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), CLIENT_TIMEOUT)
            .ok()?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).ok()?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let status = text.split(' ').nth(1)?.parse().ok()?;
    Some((status, text.split_once("\r\n\r\n")?.1.to_owned()))
}

#[test]
fn the_agent_serves_host_services_and_health_checks_until_uninstalled() {
    require_root();
    let bpffs = private_bpffs(CloneFlags::CLONE_NEWNET);
    let pod = Pod::start();
    let cgroup = TestCgroup::create("agent");
    let files = tempfile::tempdir().expect("tempdir");
    let pin_dir = bpffs.path().join("node1");
    let health_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let state = files.path().join("cluster.yaml");
    std::fs::write(
        &state,
        format!(
            r#"{}---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  type: LoadBalancer
  clusterIP: 198.18.100.22
  externalTrafficPolicy: Local
  healthCheckNodePort: {health_port}
  ports:
  - {{name: tcp, protocol: TCP, port: 80, targetPort: {TCP_TARGET}, nodePort: 30080}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {{name: tcp, protocol: TCP, port: {TCP_TARGET}}}
endpoints:
- addresses: ["{POD4}"]
  nodeName: node1
  conditions: {{ready: true}}
"#,
            cluster_yaml()
        ),
    )
    .unwrap();
    let config = files.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"node_name = "node1"
pin_dir = "{}"
state_path = "{}"
metrics_listen = "127.0.0.1:0"
poll_interval = "100ms"
[tunnel]
mode = "none"
[host_services]
enabled = true
cgroup = "{}"
"#,
            pin_dir.display(),
            state.display(),
            cgroup.path.display()
        ),
    )
    .unwrap();
    let agent_binary = env!("CARGO_BIN_EXE_weir-agent");
    let log = files.path().join("agent.log");
    let agent = AgentProcess(
        Command::new(agent_binary)
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the agent"),
    );

    // The health check answers once the agent has read the state: 200, one local endpoint.
    let deadline = Instant::now() + Duration::from_secs(60);
    let answer = loop {
        if let Some(answer) = http_get(health_port) {
            break answer;
        }
        assert!(
            Instant::now() < deadline,
            "no health-check answer; agent log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        answer,
        (
            200,
            r#"{"service":{"namespace":"shop","name":"web"},"localEndpoints":1,"serviceProxyHealthy":true}"#
                .to_owned()
        )
    );
    let both = format!("tcp {VIP4}:{TCP_PORT};tcp 198.18.100.22:80");
    let served = [
        format!("tcp {VIP4}:80 peer={VIP4}:80 echo=hello"),
        "tcp 198.18.100.22:80 peer=198.18.100.22:80 echo=hello".to_owned(),
    ];
    assert_eq!(
        client(&both, Some(&cgroup)),
        served,
        "through the running agent"
    );

    // The agent stops: its pinned hooks keep serving; its health-check port closes with it.
    drop(agent);
    assert_eq!(
        client(&both, Some(&cgroup)),
        served,
        "with the agent stopped"
    );
    assert!(http_get(health_port).is_none());

    let out = Command::new(agent_binary)
        .args(["uninstall", "--pin-dir"])
        .arg(&pin_dir)
        .output()
        .expect("uninstall");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        client(&format!("tcp {VIP4}:{TCP_PORT}"), Some(&cgroup)),
        [format!("tcp {VIP4}:80 error=101")],
        "uninstalled"
    );
    drop(pod);
}

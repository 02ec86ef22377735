//! The agent's image in a real container engine: built by weir-oci, pushed to a loopback
//! `docker-registry`, pulled by a Docker engine this test starts on private paths, and run with
//! the agent's capabilities. The agent must load and attach its programs, apply a Service from
//! its state file, and answer `/healthz` and `/readyz` on the port the image exposes.
//!
//! The engine is Debian's docker.io, started as
//! `dockerd --data-root D --exec-root E -H unix://SOCK --bridge OWN --pidfile P` under a temp
//! dir, inside a private mount namespace (its mounts, a bpffs for the agent, and a private
//! /etc/docker vanish with it), without touching the host's firewall (`--iptables=false`), and
//! stopped by PID. When no engine can start here, the test says why and is reported as ignored,
//! never as passed: hence its own harness (libtest-mimic), which can ignore at run time.

mod common;

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{agent_binary, http_get, stop_child, which, LoopbackRegistry};
use libtest_mimic::{Arguments, Completion, Failed, Trial};
use testcontainers::core::{AccessMode, ExecCommand, IntoContainerPort, Mount, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{GenericImage, ImageExt};
use weir_oci::layout::METRICS_PORT;
use weir_oci::{build_layout, read_layout, ImageRequest, PushOptions};

const TRIAL: &str = "agent_runs_in_a_container_pulled_from_a_loopback_registry";
const TAG: &str = "container-test";
/// A Service the agent must turn into map entries inside the container.
const SERVICE_FRONTEND: &str = "198.18.240.10:80";

fn main() {
    let args = Arguments::from_args();
    // testcontainers finds the engine through DOCKER_HOST. It is set here, before any thread
    // exists, to the socket the trial's engine will create.
    let work = tempfile::Builder::new()
        .prefix("weir-engine-")
        .tempdir_in("/tmp") // short: unix socket paths are limited to 108 bytes
        .expect("temp dir");
    let socket = work.path().join("docker.sock");
    std::env::set_var("DOCKER_HOST", format!("unix://{}", socket.display()));
    let work_path = work.path().to_owned();
    let trials = vec![Trial::ignorable_test(TRIAL, move || trial(&work_path))];
    let conclusion = libtest_mimic::run(&args, trials);
    drop(work);
    conclusion.exit();
}

fn trial(work: &Path) -> Result<Completion, Failed> {
    let engine = match PrivateDockerd::start(work) {
        Ok(engine) => engine,
        Err(reason) => {
            eprintln!("{TRIAL}: SKIPPED: no container engine could start here: {reason}");
            return Ok(Completion::ignored_with(format!(
                "no container engine: {reason}"
            )));
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let result = runtime.block_on(run_agent_container(&engine, work));
    if result.is_err() {
        eprintln!("dockerd log (tail):\n{}", engine.log_tail());
    }
    drop(runtime);
    drop(engine);
    result.map(|()| Completion::Completed)
}

async fn run_agent_container(engine: &PrivateDockerd, work: &Path) -> Result<(), Failed> {
    // Build once, with the fastest deflate level (the debug agent is ~100 MB).
    let built = build_layout(
        &ImageRequest {
            compression_level: 1,
            ..ImageRequest::new(agent_binary(), TAG)
        },
        &work.join("layout"),
    )
    .map_err(|e| format!("building the image: {e}"))?;
    let registry = LoopbackRegistry::start()?;
    let repository = format!("{}/weir/agent", registry.addr);
    let layout = read_layout(&built.layout, TAG).map_err(|e| e.to_string())?;
    let pushed = weir_oci::push(
        &layout,
        &format!("{repository}:{TAG}"),
        &PushOptions {
            plain_http: true,
            ..Default::default()
        },
    )
    .await
    .map_err(|e| format!("push: {e}\nregistry log:\n{}", registry.log()))?;
    println!("pushed {repository}:{TAG} as {pushed}");

    let config_dir = work.join("config");
    write_agent_config(&config_dir)?;

    // As in images/kubernetes/daemonset.yaml: every capability dropped, then only what the
    // agent needs, on a read-only root filesystem. Docker 20.10 knows neither CAP_BPF nor
    // CAP_PERFMON, and `--privileged` fails here (the bounding set lacks CAP_SYS_RESOURCE):
    // CAP_SYS_ADMIN stands in for both, as it does on kernels before 5.8. Docker's default
    // seccomp profile would refuse bpf(). Docker pulls from 127.0.0.0/8 over plain HTTP.
    let container = GenericImage::new(repository.as_str(), TAG)
        .with_wait_for(WaitFor::message_on_stderr("data plane loaded"))
        .with_exposed_port(METRICS_PORT.tcp())
        .with_cap_drop("ALL")
        .with_cap_add("SYS_ADMIN")
        .with_cap_add("NET_ADMIN")
        .with_readonly_rootfs(true)
        .with_security_opt("seccomp=unconfined")
        .with_mount(Mount::bind_mount(
            engine.bpffs.display().to_string(),
            "/sys/fs/bpf",
        ))
        // The DaemonSet's writable /proc/sys/net: the container's own /proc/sys is read-only.
        .with_mount(Mount::bind_mount("/proc/sys/net", "/host/proc/sys/net"))
        .with_mount(
            Mount::bind_mount(config_dir.display().to_string(), "/etc/weir")
                .with_access_mode(AccessMode::ReadOnly),
        )
        .with_env_var("WEIR_NODE_NAME", "container-test")
        .with_startup_timeout(Duration::from_secs(90))
        .start()
        .await
        .map_err(|e| format!("starting the agent container: {e}"))?;

    let outcome = check_agent(&container).await;
    if outcome.is_err() {
        let logs = container.stderr_to_vec().await.unwrap_or_default();
        eprintln!("agent log:\n{}", String::from_utf8_lossy(&logs));
    }
    container
        .rm()
        .await
        .map_err(|e| format!("removing the container: {e}"))?;
    outcome
}

async fn check_agent(
    container: &testcontainers::ContainerAsync<GenericImage>,
) -> Result<(), Failed> {
    // The program attaches to the container's own uplink, and the Service reaches the maps.
    wait_for_log(container, "attached ingress program").await?;
    wait_for_log(container, "applied desired state").await?;
    let mut dump = container
        .exec(ExecCommand::new([
            "/usr/bin/weir-agent",
            "dump",
            "services",
            "--pin-dir",
            "/sys/fs/bpf/weir",
            "--json",
        ]))
        .await
        .map_err(|e| format!("exec dump: {e}"))?;
    let stdout = String::from_utf8_lossy(&dump.stdout_to_vec().await.map_err(|e| e.to_string())?)
        .into_owned();
    let services: serde_json::Value =
        serde_json::from_str(&stdout).map_err(|e| format!("dump output {stdout:?}: {e}"))?;
    let frontends: Vec<&str> = services
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["frontend"].as_str())
        .collect();
    if !frontends.contains(&SERVICE_FRONTEND) {
        return Err(format!("{SERVICE_FRONTEND} not in the maps: {stdout}").into());
    }

    // The probes of the DaemonSet, through the port the engine publishes on 127.0.0.1.
    let port = container
        .get_host_port_ipv4(METRICS_PORT.tcp())
        .await
        .map_err(|e| format!("published port: {e}"))?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    for path in ["/healthz", "/readyz"] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = tokio::task::spawn_blocking(move || http_get(addr, path))
                .await
                .map_err(|e| e.to_string())?;
            match answer {
                Ok((200, body)) => {
                    println!("GET {path} on {addr}: 200 {}", body.trim());
                    break;
                }
                other if Instant::now() > deadline => {
                    return Err(format!("GET {path} on {addr}: {other:?}").into());
                }
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
    Ok(())
}

async fn wait_for_log(
    container: &testcontainers::ContainerAsync<GenericImage>,
    message: &str,
) -> Result<(), Failed> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = container
            .stderr_to_vec()
            .await
            .map_err(|e| format!("logs: {e}"))?;
        if String::from_utf8_lossy(&logs).contains(message) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("the agent never logged {message:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The file source with one Service, so the test sees the whole path: file, intent, maps.
fn write_agent_config(dir: &Path) -> Result<(), Failed> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    std::fs::write(
        dir.join("config.toml"),
        format!(
            "source = \"file\"\npin_dir = \"/sys/fs/bpf/weir\"\nstate_path = \"/etc/weir/state.yaml\"\n\
             host_interfaces = [\"eth0\"]\nmetrics_listen = \"0.0.0.0:{METRICS_PORT}\"\n\
             [tunnel]\nproc_sys_net = \"/host/proc/sys/net\"\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let (ip, port) = SERVICE_FRONTEND.split_once(':').unwrap();
    std::fs::write(
        dir.join("state.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
             spec:\n  clusterIP: {ip}\n  ports:\n  - {{name: http, protocol: TCP, port: {port}}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\n\
             addressType: IPv4\nports: [{{name: http, protocol: TCP, port: 8080}}]\n\
             endpoints: [{{addresses: [\"198.18.241.2\"]}}]\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    Ok(())
}

/// A Docker engine of the test's own: data, exec root, socket and pidfile in a temp dir, its own
/// bridge, a private mount namespace, no iptables. Dropping it stops it by PID and removes the
/// bridge and the cgroups it made.
struct PrivateDockerd {
    child: Child,
    dir: PathBuf,
    cgroup_parent: String,
    bpffs: PathBuf,
    // Dropped after the engine has stopped (fields drop after `Drop::drop` runs).
    _bridge: OwnBridge,
}

/// The engine's bridge, deleted on drop.
struct OwnBridge(String);

impl OwnBridge {
    fn create(name: String, address: &str) -> Result<Self, String> {
        ip(&["link", "add", &name, "type", "bridge"])?;
        let bridge = OwnBridge(name);
        ip(&["addr", "add", address, "dev", &bridge.0])?;
        ip(&["link", "set", &bridge.0, "up"])?;
        Ok(bridge)
    }
}

impl Drop for OwnBridge {
    fn drop(&mut self) {
        let _ = ip(&["link", "delete", &self.0]);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl PrivateDockerd {
    fn start(dir: &Path) -> Result<Self, String> {
        for program in ["dockerd", "containerd", "runc", "unshare", "ip"] {
            if which(program).is_none() {
                return Err(format!(
                    "{program} is not installed (Debian packages docker.io, util-linux, iproute2)"
                ));
            }
        }
        let pid = std::process::id();
        // 198.18.0.0/15 is the project's test range; the third octet spreads concurrent runs.
        let bridge = OwnBridge::create(
            format!("wdk{}", pid % 100_000),
            &format!("198.19.{}.1/24", 200 + pid % 50),
        )?;
        let engine_dir = dir.join("engine");
        let bpffs = engine_dir.join("bpffs");
        for sub in ["data", "exec", "etc-docker", "bpffs"] {
            std::fs::create_dir_all(engine_dir.join(sub)).map_err(|e| e.to_string())?;
        }
        std::fs::write(engine_dir.join("daemon.json"), "{}").map_err(|e| e.to_string())?;
        let log =
            std::fs::File::create(engine_dir.join("dockerd.log")).map_err(|e| e.to_string())?;
        let socket = dir.join("docker.sock");
        let cgroup_parent = format!("weir-engine-{pid}");

        // In the new mount namespace: a private /etc/docker (dockerd writes its key there) and
        // a bpffs for the agent's pins, then exec dockerd, so the child's PID is dockerd's.
        let script = r#"set -e
[ -d /etc/docker ] || mkdir /etc/docker
mount --bind "$1" /etc/docker
mount -t bpf bpf "$2"
shift 2
exec dockerd "$@""#;
        let _ = std::fs::remove_file(&socket);
        let child = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                script,
                "sh",
            ])
            .arg(engine_dir.join("etc-docker"))
            .arg(&bpffs)
            .arg("--data-root")
            .arg(engine_dir.join("data"))
            .arg("--exec-root")
            .arg(engine_dir.join("exec"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .arg("--pidfile")
            .arg(engine_dir.join("dockerd.pid"))
            .arg("--config-file")
            .arg(engine_dir.join("daemon.json"))
            .args(["--bridge", &bridge.0])
            // Leave the host's firewall and forwarding alone; published ports bind loopback
            // only and go through docker-proxy.
            .args([
                "--iptables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--ip=127.0.0.1",
            ])
            .args(["--cgroup-parent", &cgroup_parent])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting dockerd: {e}"))?;
        let mut engine = PrivateDockerd {
            child,
            dir: engine_dir,
            cgroup_parent,
            bpffs,
            _bridge: bridge,
        };

        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if ping(&socket) {
                return Ok(engine);
            }
            if let Ok(Some(status)) = engine.child.try_wait() {
                return Err(format!(
                    "dockerd exited with {status}:\n{}",
                    engine.log_tail()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "dockerd did not answer in 60 s:\n{}",
                    engine.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for PrivateDockerd {
    fn drop(&mut self) {
        // dockerd stops its containers and its containerd on SIGTERM.
        stop_child(&mut self.child, Duration::from_secs(30));
        // If it had to be killed, its containerd may still run: stop that too, by its pidfile.
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("exec/containerd/containerd.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                if pid > 1 && Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        // cgroupfs leaves the parent cgroup of the containers behind in each hierarchy.
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for hierarchy in hierarchies.flatten() {
                let _ = std::fs::remove_dir(hierarchy.path().join(&self.cgroup_parent));
            }
        }
        let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(&self.cgroup_parent));
    }
}

/// `GET /_ping` on the engine's socket.
fn ping(socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200")
}

//! weir-node-init: PID 1 of a Weir lab VM.
//!
//! Mounts the kernel file systems (proc, sys, devtmpfs, bpffs, cgroup2), loads the modules the
//! image carries, names the node and brings up its network from the `weir.*` kernel parameters,
//! mounts the lab's virtiofs shares at the paths they have on the host, and then serves the
//! lab's commands on the control port. Progress and failures go to the console, which the lab
//! keeps as the VM's log.
//!
//! `weir-node-init --stdio` serves the same protocol on stdin/stdout, without touching the
//! system: that is how it is tested on a host.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use weir_node_image::guest::{BootParams, Server};
use weir_node_image::image::MODULE_ORDER;
use weir_node_image::proto::{PORT_NAME, READY_BANNER};
use weir_node_image::sys;

const DEVICE_WAIT: Duration = Duration::from_secs(20);

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--stdio") {
        let mut server = Server::new();
        if let Err(e) = server.serve(std::io::stdin(), std::io::stdout(), true) {
            eprintln!("weir-node-init: {e}");
            std::process::exit(1);
        }
        return;
    }
    if std::process::id() != 1 {
        eprintln!("weir-node-init: runs as PID 1 of a VM (or with --stdio)");
        std::process::exit(2);
    }
    if let Err(e) = boot() {
        say(&format!("FATAL: {e}"));
    }
    // A node that cannot serve is useless; powering off lets the lab see it at once.
    std::thread::sleep(Duration::from_secs(1));
    sys::poweroff();
}

fn say(msg: &str) {
    println!("weir-node-init: {msg}");
}

fn boot() -> Result<(), String> {
    let started = Instant::now();
    for (src, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
        ("tmpfs", "/run", "tmpfs"),
        ("tmpfs", "/tmp", "tmpfs"),
    ] {
        sys::mount(src, target, fstype, None).map_err(|e| format!("mounting {target}: {e}"))?;
    }
    for (src, target, fstype) in [
        ("bpf", "/sys/fs/bpf", "bpf"),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2"),
    ] {
        sys::mount(src, target, fstype, None).map_err(|e| format!("mounting {target}: {e}"))?;
    }
    std::fs::create_dir_all("/run/netns").map_err(|e| format!("/run/netns: {e}"))?;
    let node_cgroup = weir_node_image::guest::NODE_CGROUP;
    std::fs::create_dir_all(node_cgroup).map_err(|e| format!("{node_cgroup}: {e}"))?;
    // 5.10 charges BPF maps to RLIMIT_MEMLOCK; children inherit these.
    sys::unlimit(libc::RLIMIT_MEMLOCK, libc::RLIM_INFINITY).map_err(|e| format!("memlock: {e}"))?;
    let _ = sys::unlimit(libc::RLIMIT_NOFILE, 65536);

    let mut server = Server::new();
    load_modules(&mut server);
    say(&format!(
        "{} module(s) loaded, {} failed",
        server.modules_loaded,
        server.module_errors.len()
    ));
    for e in &server.module_errors {
        say(&format!("module: {e}"));
    }

    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let params = BootParams::parse(&cmdline);
    if let Some(h) = &params.hostname {
        let _ = sys::sethostname(h);
    }
    network(&params)?;
    for (tag, path) in &params.shares {
        std::fs::create_dir_all(path).map_err(|e| format!("creating {path}: {e}"))?;
        sys::mount(tag, path, "virtiofs", None)
            .map_err(|e| format!("mounting virtiofs {tag} at {path}: {e}"))?;
    }

    let port = wait_for(DEVICE_WAIT, control_port)
        .ok_or_else(|| format!("no virtio-serial port named {PORT_NAME}"))?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&port)
        .map_err(|e| format!("opening {}: {e}", port.display()))?;
    let reader = file.try_clone().map_err(|e| e.to_string())?;
    say(&format!(
        "{READY_BANNER} in {} ms (uptime {} ms)",
        started.elapsed().as_millis(),
        sys::uptime_ms()
    ));
    server
        .serve(reader, file, false)
        .map_err(|e| format!("control port: {e}"))
}

fn load_modules(server: &mut Server) {
    let Ok(order) = std::fs::read_to_string(MODULE_ORDER) else {
        return;
    };
    for path in order.lines().filter(|l| !l.is_empty()) {
        match sys::load_module(Path::new(path)) {
            Ok(()) => server.modules_loaded += 1,
            Err(e) => server.module_errors.push(format!("{path}: {e}")),
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("/usr/bin/ip")
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

fn network(p: &BootParams) -> Result<(), String> {
    ip(&["link", "set", "lo", "up"])?;
    let Some(address) = &p.address else {
        return Ok(());
    };
    wait_for(DEVICE_WAIT, || {
        Path::new("/sys/class/net/eth0").exists().then_some(())
    })
    .ok_or("no eth0 appeared (virtio_net not loaded?)")?;
    // Forwarding and loose reverse-path checks before addresses exist, as on the netns lab.
    for (key, value) in [
        ("net/ipv4/ip_forward", "1"),
        ("net/ipv4/conf/all/rp_filter", "0"),
        ("net/ipv4/conf/default/rp_filter", "0"),
    ] {
        std::fs::write(Path::new("/proc/sys").join(key), value)
            .map_err(|e| format!("sysctl {key}: {e}"))?;
    }
    if let Some(mtu) = p.mtu {
        ip(&["link", "set", "eth0", "mtu", &mtu.to_string()])?;
    }
    ip(&["addr", "add", address, "dev", "eth0"])?;
    ip(&["link", "set", "eth0", "up"])?;
    let _ = std::fs::write("/proc/sys/net/ipv4/conf/eth0/rp_filter", "0");
    if let Some(gw) = &p.gateway {
        ip(&["route", "add", "default", "via", gw])?;
    }
    Ok(())
}

/// /dev/vportNpM of the port whose name is PORT_NAME.
fn control_port() -> Option<PathBuf> {
    std::fs::read_dir("/sys/class/virtio-ports")
        .ok()?
        .filter_map(|e| e.ok())
        .find(|e| {
            std::fs::read_to_string(e.path().join("name")).is_ok_and(|n| n.trim() == PORT_NAME)
        })
        .map(|e| Path::new("/dev").join(e.file_name()))
}

fn wait_for<T>(limit: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

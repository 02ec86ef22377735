//! A lab of VMs: every node is a VM, its pods are namespaces inside it, wired exactly as the
//! namespace backend wires them; external clients are namespaces on the host, on the same
//! bridge as the VMs' tap devices. The bridge and taps live in a "fabric" namespace the lab
//! creates, so nothing touches the host's own network.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use weir_node_image::proto::{self, Op, Reply};

use super::vm::{Share, Vm, VmError, VmSpec};
use super::VmSetup;
use crate::fabric::{FabricDelays, BRIDGE};
use crate::sys::{
    describe, run, send_signal, spawn_logged, stop_group, NETNS_DIR, PLUMBING_TIMEOUT, STOP_GRACE,
};
use crate::wiring::{self, Side, Step};
use weir_lab_core::backend::{BackendError, Cmd, Lab, Output, ProcId, Signal};
use weir_lab_core::files::write_atomically;
use weir_lab_core::topology::{HostId, Plan, GATEWAY, NODE_PREFIX_LEN, NODE_PREFIX_LEN6};

/// Guest plumbing runs as one script per VM; under TCG each `ip` call costs tens of ms.
const GUEST_PLUMBING_TIMEOUT: Duration = Duration::from_secs(60);
/// Extra time for a request's answer to travel, on top of the command's own timeout.
const CHANNEL_SLACK: Duration = Duration::from_secs(15);
const STATUS_TIMEOUT: Duration = Duration::from_secs(20);

const TCG_SLOWDOWN: u32 = 4;

static LAB_SEQ: AtomicU32 = AtomicU32::new(0);

enum Proc {
    Guest { node: u8, pid: u32 },
    Host { child: Child, host: HostId },
}

pub struct QemuLab {
    prefix: String,
    plan: Plan,
    setup: std::sync::Arc<VmSetup>,
    vms: BTreeMap<u8, Vm>,
    namespaces: Vec<String>,
    procs: BTreeMap<ProcId, Proc>,
    next_proc: u32,
    shares: Vec<PathBuf>,
    /// Per node, the delay of its tunnelled first fragments on the fabric, at its tap
    /// ([`Lab::delay_first_fragments`]).
    delayers: FabricDelays,
    torn_down: bool,
    /// Boot wall times, for the report.
    pub boot_times: BTreeMap<u8, Duration>,
}

impl QemuLab {
    pub(super) fn create(
        setup: std::sync::Arc<VmSetup>,
        plan: &Plan,
        work_dir: &Path,
    ) -> Result<QemuLab, BackendError> {
        let seq = LAB_SEQ.fetch_add(1, Ordering::Relaxed);
        let mut shares = vec![work_dir.to_owned()];
        shares.extend(setup.read_only_shares.iter().cloned());
        let mut lab = QemuLab {
            prefix: format!("weirvm{}-{seq}", std::process::id()),
            plan: plan.clone(),
            setup,
            vms: BTreeMap::new(),
            namespaces: Vec::new(),
            procs: BTreeMap::new(),
            next_proc: 1,
            shares,
            delayers: FabricDelays::default(),
            torn_down: false,
            boot_times: BTreeMap::new(),
        };
        lab.build(work_dir)?;
        Ok(lab)
    }

    fn fabric(&self) -> String {
        format!("{}-fabric", self.prefix)
    }

    fn ip(&self, args: &[&str]) -> Result<(), BackendError> {
        run(
            "lab",
            None,
            &Cmd::new("ip").args(args.iter().copied()),
            PLUMBING_TIMEOUT,
            true,
        )?;
        Ok(())
    }

    fn add_ns(&mut self, name: String) -> Result<(), BackendError> {
        self.ip(&["netns", "add", &name])?;
        self.namespaces.push(name);
        Ok(())
    }

    fn ext_ns(&self, x: u8) -> String {
        format!("{}-x{x}", self.prefix)
    }

    fn build(&mut self, work_dir: &Path) -> Result<(), BackendError> {
        let started = Instant::now();
        let fabric = self.fabric();
        let host_mtu = self.setup.host_mtu.to_string();
        self.add_ns(fabric.clone())?;
        self.ip(&["-n", &fabric, "link", "set", "lo", "up"])?;
        self.ip(&[
            "-n", &fabric, "link", "add", BRIDGE, "mtu", &host_mtu, "type", "bridge",
        ])?;
        let gateway = format!("{GATEWAY}/{NODE_PREFIX_LEN}");
        self.ip(&["-n", &fabric, "addr", "add", &gateway, "dev", BRIDGE])?;
        self.ip(&["-n", &fabric, "link", "set", BRIDGE, "up"])?;
        let fabric_path = Path::new(NETNS_DIR).join(&fabric);

        // Boot every VM at once, then wait for each: boots overlap, the lab waits the longest.
        let vm_dir = work_dir.join("vms");
        for node in self.plan.nodes.clone() {
            let tap = format!("tap{}", node.index);
            self.ip(&["-n", &fabric, "tuntap", "add", "dev", &tap, "mode", "tap"])?;
            self.ip(&[
                "-n", &fabric, "link", "set", &tap, "mtu", &host_mtu, "master", BRIDGE, "up",
            ])?;
            let boot_params = format!(
                "weir.hostname={} weir.ip={}/{NODE_PREFIX_LEN} weir.gw={GATEWAY} weir.mtu={}",
                node.name, node.ip, self.plan.mtu
            );
            let spec = VmSpec {
                name: node.name.clone(),
                qemu: &self.setup.qemu,
                virtiofsd: &self.setup.virtiofsd,
                accel: self.setup.accel,
                kernel_image: &self.setup.kernel.image,
                initrd: &self.setup.image.path,
                memory_mib: self.setup.memory_mib,
                cpus: self.setup.cpus,
                tap: Some(tap),
                mac: format!("52:54:00:57:00:{:02x}", node.index),
                host_mtu: self.setup.host_mtu,
                offloads: self.setup.offloads,
                boot_params,
                shares: self
                    .shares
                    .iter()
                    .enumerate()
                    .map(|(i, p)| Share {
                        path: p.clone(),
                        read_only: i > 0,
                    })
                    .collect(),
                dir: vm_dir.clone(),
                netns: Some(&fabric_path),
            };
            let vm = Vm::start(&spec).map_err(vm_err)?;
            progress(&format!(
                "{}: booting {} ({}, pid {})",
                node.name,
                self.setup.kernel.release,
                format!("{:?}", self.setup.accel).to_lowercase(),
                vm.pid().unwrap_or(0)
            ));
            self.vms.insert(node.index, vm);
        }
        let indexes: Vec<u8> = self.vms.keys().copied().collect();
        for n in indexes {
            let vm = self.vms.get_mut(&n).expect("inserted above");
            let reply = vm.wait_ready(self.setup.boot_timeout).map_err(vm_err)?;
            let took = vm.uptime();
            self.boot_times.insert(n, took);
            if let Reply::Pong {
                release,
                module_errors,
                modules_loaded,
                ..
            } = &reply
            {
                progress(&format!(
                    "{}: ready in {:.1} s (kernel {release}, {modules_loaded} module(s) loaded{})",
                    vm.name,
                    took.as_secs_f64(),
                    if module_errors.is_empty() {
                        String::new()
                    } else {
                        format!(
                            ", {} failed: {}",
                            module_errors.len(),
                            module_errors.join("; ")
                        )
                    }
                ));
            }
        }

        // Pods inside each VM, wired as the namespace backend wires them, one script per VM.
        for node in self.plan.nodes.clone() {
            let script = self.node_script(node.index);
            let out = self.guest_exec(
                node.index,
                None,
                &Cmd::new("sh").arg("-ec").arg(script),
                GUEST_PLUMBING_TIMEOUT,
            )?;
            if !out.success() {
                return Err(BackendError::Failed {
                    host: node.name.clone(),
                    command: "pod plumbing script".into(),
                    status: out.status(),
                    stderr: weir_lab_core::backend::tail(&out.stderr, 6),
                });
            }
        }

        for ext in self.plan.externals.clone() {
            let ns = self.ext_ns(ext.index);
            self.add_ns(ns.clone())?;
            let port = format!("x{}", ext.index);
            let mtu = self.plan.mtu.to_string();
            self.ip(&[
                "-n", &fabric, "link", "add", &port, "mtu", &mtu, "type", "veth", "peer", "name",
                "eth0", "netns", &ns, "mtu", &mtu,
            ])?;
            self.ip(&["-n", &fabric, "link", "set", &port, "master", BRIDGE, "up"])?;
            let addr = format!("{}/{NODE_PREFIX_LEN}", ext.ip);
            self.ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            self.ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            self.ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            if let Some(ip6) = ext.ip6 {
                let addr6 = format!("{ip6}/{NODE_PREFIX_LEN6}");
                self.ip(&["-n", &ns, "addr", "add", &addr6, "dev", "eth0", "nodad"])?;
            }
        }
        for route in self.plan.routes.clone() {
            let HostId::External(x) = route.host else {
                return Err(unsupported(
                    "routes on nodes or pods (the QEMU lab routes external clients only)",
                ));
            };
            let ns = self.ext_ns(x);
            let prefix = format!("{}/{}", route.prefix.0, route.prefix.1);
            self.ip(&[
                "-n",
                &ns,
                "route",
                "add",
                &prefix,
                "via",
                &route.via.to_string(),
            ])?;
        }
        info!(prefix = %self.prefix, vms = self.vms.len(), elapsed = ?started.elapsed(), "VM lab built");
        Ok(())
    }

    /// The shell script that gives node `n` its routes and pods.
    fn node_script(&self, n: u8) -> String {
        let mtu = self.plan.mtu;
        let mut s = String::from("exec 2>&1\n");
        let node_ip6 = self.plan.node(n).and_then(|node| node.ip6);
        if let Some(ip6) = node_ip6 {
            // Before the pods' interfaces exist, so they inherit it: the plan's addresses are
            // unique, and duplicate address detection would hold each back for a second.
            let _ = writeln!(
                s,
                "sysctl -q -w net.ipv6.conf.all.forwarding=1 net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0"
            );
            let _ = writeln!(s, "ip -6 addr add {ip6}/{NODE_PREFIX_LEN6} dev eth0 nodad");
        }
        if let Some(node) = self.plan.node(n) {
            for route in wiring::pod_routes(&self.plan, node) {
                let _ = writeln!(s, "ip {}", route.join(" "));
            }
        }
        for pod in self.plan.pods.iter().filter(|p| p.node == n) {
            let ns = pod.name.as_str();
            let _ = writeln!(s, "ip netns add {ns}");
            for step in wiring::pod_steps(pod, ns, mtu) {
                let _ = match step {
                    Step::Ip(Side::Pod, args) => writeln!(s, "ip -n {ns} {}", args.join(" ")),
                    Step::Ip(Side::Node, args) => writeln!(s, "ip {}", args.join(" ")),
                    Step::NodeSysctl(settings) => {
                        writeln!(s, "sysctl -q -w {}", settings.join(" "))
                    }
                };
            }
        }
        s
    }

    /// What node `n`'s kernel offers Weir, probed from inside the VM.
    pub fn probe(&mut self, n: u8) -> Result<proto::Features, BackendError> {
        match self
            .vm(n)?
            .request(Op::Probe, Duration::from_secs(30) * TCG_SLOWDOWN)
            .map_err(vm_err)?
        {
            Reply::Probe { features } => Ok(*features),
            other => Err(unexpected(&format!("node{n}"), other)),
        }
    }

    fn vm(&mut self, n: u8) -> Result<&mut Vm, BackendError> {
        self.vms
            .get_mut(&n)
            .ok_or(BackendError::NoSuchHost(HostId::Node(n)))
    }

    fn check_host(&self, host: HostId) -> Result<(), BackendError> {
        if self.plan.hosts().any(|h| h == host) {
            Ok(())
        } else {
            Err(BackendError::NoSuchHost(host))
        }
    }

    fn guest_exec(
        &mut self,
        node: u8,
        netns: Option<String>,
        cmd: &Cmd,
        timeout: Duration,
    ) -> Result<Output, BackendError> {
        let host = match &netns {
            Some(ns) => ns.clone(),
            None => format!("node{node}"),
        };
        let op = Op::Exec {
            command: to_proto(cmd, netns),
            timeout_ms: timeout.as_millis() as u64,
        };
        let reply = self
            .vm(node)?
            .request(op, timeout + CHANNEL_SLACK)
            .map_err(vm_err)?;
        match reply {
            Reply::Exited {
                code,
                stdout,
                stderr,
                duration_ms,
                timed_out,
                ..
            } => {
                if timed_out {
                    return Err(BackendError::Timeout {
                        host,
                        command: cmd.to_string(),
                        after: timeout,
                    });
                }
                Ok(Output {
                    code,
                    stdout,
                    stderr,
                    duration: Duration::from_millis(duration_ms),
                })
            }
            Reply::Error { message } => Err(BackendError::Spawn {
                host,
                command: cmd.to_string(),
                source: std::io::Error::other(message),
            }),
            other => Err(unexpected(&host, other)),
        }
    }

    /// Where a host's commands run: a VM (and namespace in it) or a host namespace.
    fn place(&self, host: HostId) -> Result<Place, BackendError> {
        self.check_host(host)?;
        Ok(match host {
            HostId::Node(n) => Place::Guest(n, None),
            HostId::Pod { node, .. } => Place::Guest(node, Some(host.to_string())),
            HostId::External(x) => Place::Host(Path::new(NETNS_DIR).join(self.ext_ns(x))),
        })
    }

    fn shared(&self, path: &Path) -> bool {
        self.shares.iter().any(|s| path.starts_with(s))
    }
}

enum Place {
    Guest(u8, Option<String>),
    Host(PathBuf),
}

fn to_proto(cmd: &Cmd, netns: Option<String>) -> proto::Command {
    proto::Command {
        program: cmd.program.clone(),
        args: cmd.args.clone(),
        env: cmd.env.clone(),
        stdin: cmd
            .stdin
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned()),
        netns,
    }
}

/// A plan asks for something this backend cannot build.
pub(crate) fn unsupported(what: &str) -> BackendError {
    BackendError::Io {
        context: "QEMU backend".into(),
        source: std::io::Error::other(format!("not supported: {what}")),
    }
}

fn vm_err(e: VmError) -> BackendError {
    BackendError::Io {
        context: "VM".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

fn unexpected(host: &str, reply: Reply) -> BackendError {
    BackendError::Io {
        context: format!("{host}: unexpected answer from the guest"),
        source: std::io::Error::other(format!("{reply:?}")),
    }
}

/// Boot and teardown progress on stderr: visible while a scenario waits on slow TCG boots.
pub(crate) fn progress(msg: &str) {
    eprintln!("  [vm] {msg}");
}

impl Lab for QemuLab {
    fn plan(&self) -> &Plan {
        &self.plan
    }

    fn exec(&mut self, host: HostId, cmd: &Cmd, timeout: Duration) -> Result<Output, BackendError> {
        match self.place(host)? {
            Place::Guest(n, ns) => self.guest_exec(n, ns, cmd, timeout),
            Place::Host(path) => run(&host.to_string(), Some(&path), cmd, timeout, false),
        }
    }

    fn spawn(&mut self, host: HostId, cmd: &Cmd, log: &Path) -> Result<ProcId, BackendError> {
        let id = ProcId(self.next_proc);
        self.next_proc += 1;
        match self.place(host)? {
            Place::Guest(n, ns) => {
                if !self.shared(log) {
                    warn!(log = %log.display(), "log outside the shared folder: it stays in the guest");
                }
                let op = Op::Spawn {
                    command: to_proto(cmd, ns),
                    log: log.display().to_string(),
                };
                match self.vm(n)?.request(op, CHANNEL_SLACK).map_err(vm_err)? {
                    Reply::Spawned { pid } => {
                        debug!(%host, pid, command = %cmd, "spawned in guest");
                        self.procs.insert(id, Proc::Guest { node: n, pid });
                    }
                    Reply::Error { message } => {
                        return Err(BackendError::Spawn {
                            host: host.to_string(),
                            command: cmd.to_string(),
                            source: std::io::Error::other(message),
                        })
                    }
                    other => return Err(unexpected(&host.to_string(), other)),
                }
            }
            Place::Host(path) => {
                let child = spawn_logged(&host.to_string(), &path, None, cmd, log)?;
                self.procs.insert(id, Proc::Host { child, host });
            }
        }
        Ok(id)
    }

    fn exited(&mut self, proc: ProcId) -> Result<Option<String>, BackendError> {
        match self
            .procs
            .get_mut(&proc)
            .ok_or(BackendError::NoSuchProcess(proc))?
        {
            Proc::Host { child, host } => {
                let status = child.try_wait().map_err(|source| BackendError::Io {
                    context: format!("waiting for a process on {host}"),
                    source,
                })?;
                Ok(status.map(describe))
            }
            Proc::Guest { node, pid } => {
                let (node, pid) = (*node, *pid);
                let reply = self
                    .vm(node)?
                    .request(Op::Status { pid }, STATUS_TIMEOUT)
                    .map_err(vm_err)?;
                match reply {
                    Reply::Status { exited } => Ok(exited),
                    Reply::Error { message } => Ok(Some(message)),
                    other => Err(unexpected(&format!("node{node}"), other)),
                }
            }
        }
    }

    /// Inside the guest, where the node's agent runs: the init puts every command that is not
    /// a pod's into it.
    fn node_cgroup(&self, _node: u8) -> Option<PathBuf> {
        Some(PathBuf::from(weir_node_image::guest::NODE_CGROUP))
    }

    fn signal(&mut self, proc: ProcId, signal: Signal) -> Result<(), BackendError> {
        match self
            .procs
            .get(&proc)
            .ok_or(BackendError::NoSuchProcess(proc))?
        {
            Proc::Host { child, host } => {
                send_signal(child, signal).map_err(|source| BackendError::Io {
                    context: format!("{signal} to a process on {host}"),
                    source,
                })
            }
            Proc::Guest { node, pid } => {
                let (node, pid) = (*node, *pid);
                let op = Op::Signal {
                    pid,
                    signal: signal as i32,
                };
                match self.vm(node)?.request(op, CHANNEL_SLACK).map_err(vm_err)? {
                    Reply::Done => Ok(()),
                    Reply::Error { message } => Err(BackendError::Io {
                        context: format!("{signal} to pid {pid} on node{node}"),
                        source: std::io::Error::other(message),
                    }),
                    other => Err(unexpected(&format!("node{node}"), other)),
                }
            }
        }
    }

    fn stop(&mut self, proc: ProcId) -> Result<(), BackendError> {
        match self
            .procs
            .remove(&proc)
            .ok_or(BackendError::NoSuchProcess(proc))?
        {
            Proc::Host { mut child, host } => {
                stop_group(&mut child, STOP_GRACE).map_err(|source| BackendError::Io {
                    context: format!("stopping a process on {host}"),
                    source,
                })
            }
            Proc::Guest { node, pid } => {
                let op = Op::Stop {
                    pid,
                    grace_ms: STOP_GRACE.as_millis() as u64,
                };
                match self
                    .vm(node)?
                    .request(op, STOP_GRACE * 2 + CHANNEL_SLACK)
                    .map_err(vm_err)?
                {
                    Reply::Done => Ok(()),
                    Reply::Error { message } => Err(BackendError::Io {
                        context: format!("stopping pid {pid} on node{node}"),
                        source: std::io::Error::other(message),
                    }),
                    other => Err(unexpected(&format!("node{node}"), other)),
                }
            }
        }
    }

    fn write_file(
        &mut self,
        host: HostId,
        path: &Path,
        contents: &[u8],
    ) -> Result<(), BackendError> {
        let io = |source| BackendError::Io {
            context: format!("writing {}", path.display()),
            source,
        };
        // Shared folders have the same path on both sides; external clients share the host's
        // file system outright.
        if self.shared(path) || matches!(host, HostId::External(_)) {
            return write_atomically(path, contents).map_err(io);
        }
        let node = host.node().ok_or(BackendError::NoSuchHost(host))?;
        let op = Op::WriteFile {
            path: path.display().to_string(),
            contents: String::from_utf8_lossy(contents).into_owned(),
        };
        match self.vm(node)?.request(op, CHANNEL_SLACK).map_err(vm_err)? {
            Reply::Done => Ok(()),
            Reply::Error { message } => Err(io(std::io::Error::other(message))),
            other => Err(unexpected(&host.to_string(), other)),
        }
    }

    /// The QEMU processes' CPU time: what the VMs cost the host, emulation included. (Guests'
    /// own /proc/stat is unreliable under TCG: their timer ticks go missing on a busy host.)
    fn cpu_time(&mut self) -> Option<Duration> {
        self.vms.values().map(Vm::cpu_time).sum()
    }

    /// TCG runs guest code several times slower than the host (more on a busy host).
    fn slowdown(&self) -> u32 {
        match self.setup.accel {
            super::Accel::Kvm => 1,
            super::Accel::Tcg => TCG_SLOWDOWN,
        }
    }

    fn delay_first_fragments(
        &mut self,
        node: u8,
        vxlan_port: u16,
        log: &Path,
    ) -> Result<(), BackendError> {
        // The bridge's way out towards the node's VM.
        let tap = format!("tap{node}");
        let fabric = self.fabric();
        self.delayers.start(node, &fabric, &tap, vxlan_port, log)
    }

    fn restore_fragment_order(&mut self, node: u8) -> Result<(), BackendError> {
        self.delayers.stop(node)
    }

    fn teardown(&mut self) -> Result<(), BackendError> {
        if self.torn_down {
            return Ok(());
        }
        let mut problems = Vec::new();
        // Guest processes go with their VM's poweroff; host-side ones (external clients'
        // workloads) are stopped one by one.
        let procs: Vec<ProcId> = self.procs.keys().rev().copied().collect();
        for p in procs {
            if matches!(self.procs.get(&p), Some(Proc::Guest { .. })) {
                self.procs.remove(&p);
                continue;
            }
            if let Err(e) = self.stop(p) {
                problems.push(e.to_string());
            }
        }
        problems.extend(self.delayers.stop_all());
        for (_, mut vm) in std::mem::take(&mut self.vms) {
            vm.shutdown(Duration::from_secs(10));
        }
        while let Some(ns) = self.namespaces.pop() {
            if let Err(e) = self.ip(&["netns", "del", &ns]) {
                problems.push(e.to_string());
            }
        }
        self.torn_down = true;
        if problems.is_empty() {
            Ok(())
        } else {
            Err(BackendError::Teardown(problems.join("; ")))
        }
    }
}

impl Drop for QemuLab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            warn!("{e}");
        }
    }
}

//! The network-namespace backend: every host is a network namespace on the host kernel.
//!
//! Nodes hang off one bridge (`weirbr`) in a "fabric" namespace; pods are wired to their node
//! the way Calico does it: a routed veth pair, the pod side's default route pointing at a
//! link-local gateway that the node answers for with proxy ARP.
//!
//! Commands enter a namespace with `setns` between fork and exec rather than `ip netns exec`,
//! which remounts /sys and would hide the lab's bpffs from the agent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tracing::{debug, warn};

use weir_lab_core::backend::{Backend, BackendError, Cmd, Lab, Output, ProcId};
use weir_lab_core::files::write_atomically;
use weir_lab_core::topology::{
    network_gateway, ExternalPlan, HostId, NodePlan, Plan, PodPlan, RoutePlan, GATEWAY,
    NODE_PREFIX_LEN, NODE_PREFIX_LEN6,
};

use crate::fabric::{self, bridge_name, FabricDelays};
use crate::sys::{
    describe, run, run_in, send_signal, spawn_logged, stop_group, NETNS_DIR, PLUMBING_TIMEOUT,
    STOP_GRACE,
};
use crate::wiring::{self, Side, Step};

/// Several labs can be built one after another by one process; each gets fresh names so a
/// namespace that failed to go away cannot collide with the next lab.
static LAB_SEQ: AtomicU32 = AtomicU32::new(0);

pub struct NetnsBackend;

impl NetnsBackend {
    pub fn new() -> NetnsBackend {
        NetnsBackend
    }
}

impl Default for NetnsBackend {
    fn default() -> Self {
        NetnsBackend::new()
    }
}

impl Backend for NetnsBackend {
    fn name(&self) -> &'static str {
        "netns"
    }

    fn create(&self, plan: &Plan, _work_dir: &Path) -> Result<Box<dyn Lab>, BackendError> {
        let seq = LAB_SEQ.fetch_add(1, Ordering::Relaxed);
        let mut lab = NetnsLab {
            prefix: format!("weir{}-{seq}", std::process::id()),
            plan: plan.clone(),
            namespaces: Vec::new(),
            procs: BTreeMap::new(),
            delayers: FabricDelays::default(),
            cgroups: None,
            torn_down: false,
        };
        // On error `lab` is dropped here, which removes whatever was built so far.
        lab.build()?;
        Ok(Box::new(lab))
    }
}

struct Spawned {
    child: Child,
    host: HostId,
    command: String,
}

pub struct NetnsLab {
    prefix: String,
    plan: Plan,
    /// In creation order; removed in reverse.
    namespaces: Vec<String>,
    procs: BTreeMap<ProcId, Spawned>,
    /// Per node, the delay of its tunnelled first fragments on the fabric
    /// ([`Lab::delay_first_fragments`]).
    delayers: FabricDelays,
    /// None where the host has no cgroup2 mount.
    cgroups: Option<LabCgroups>,
    torn_down: bool,
}

/// Each node's cgroup (v2), below one directory of the lab's own. Processes started on a node
/// run in its cgroup, so connect-time hooks the node's agent attaches there see them and
/// nothing else.
struct LabCgroups {
    parent: PathBuf,
    /// Node 1 first.
    nodes: Vec<PathBuf>,
}

impl NetnsLab {
    fn ns_name(&self, host: HostId) -> String {
        let short = match host {
            HostId::Node(n) => format!("n{n}"),
            other => other.to_string(),
        };
        format!("{}-{short}", self.prefix)
    }

    fn host_cgroup(&self, host: HostId) -> Option<PathBuf> {
        let HostId::Node(n) = host else {
            return None;
        };
        let nodes = &self.cgroups.as_ref()?.nodes;
        nodes.get(usize::from(n).checked_sub(1)?).cloned()
    }

    fn fabric(&self) -> String {
        format!("{}-fabric", self.prefix)
    }

    fn ns_path(&self, host: HostId) -> Result<PathBuf, BackendError> {
        if !self.plan.hosts().any(|h| h == host) {
            return Err(BackendError::NoSuchHost(host));
        }
        Ok(Path::new(NETNS_DIR).join(self.ns_name(host)))
    }

    /// `ip` in the lab's own network namespace; `-n` makes it switch for the one call.
    fn ip(&self, args: &[&str]) -> Result<(), BackendError> {
        let cmd = Cmd::new("ip").args(args.iter().copied());
        run("lab", None, &cmd, PLUMBING_TIMEOUT, true)?;
        Ok(())
    }

    fn sysctl(&self, host: HostId, settings: &[String]) -> Result<(), BackendError> {
        let cmd = Cmd::new("sysctl")
            .arg("-q")
            .arg("-w")
            .args(settings.iter().cloned());
        let path = self.ns_path(host)?;
        run(&host.to_string(), Some(&path), &cmd, PLUMBING_TIMEOUT, true)?;
        Ok(())
    }

    /// Turns off segmentation offloads on `ifname` in namespace `ns` when the plan asks
    /// (`Plan::offloads`): TSO and GSO on sending, GRO on receiving.
    fn apply_offloads(&self, ns: &str, ifname: &str) -> Result<(), BackendError> {
        if self.plan.offloads {
            return Ok(());
        }
        let cmd =
            Cmd::new("ethtool").args(["-K", ifname, "tso", "off", "gso", "off", "gro", "off"]);
        let path = Path::new(NETNS_DIR).join(ns);
        run(ns, Some(&path), &cmd, PLUMBING_TIMEOUT, true)?;
        Ok(())
    }

    /// Gives namespace `ns` an interface `ifname` on node network `network`'s bridge (through
    /// the bridge port `port`) with address `ip`: nodes and external clients join the same way.
    #[allow(clippy::too_many_arguments)]
    fn join_fabric(
        &self,
        fabric: &str,
        network: u8,
        ns: &str,
        port: &str,
        ifname: &str,
        ip: &str,
        mtu: &str,
    ) -> Result<(), BackendError> {
        self.ip(&[
            "-n", fabric, "link", "add", port, "mtu", mtu, "type", "veth", "peer", "name", ifname,
            "netns", ns, "mtu", mtu,
        ])?;
        let bridge = bridge_name(network);
        self.ip(&["-n", fabric, "link", "set", port, "master", &bridge, "up"])?;
        let addr = format!("{ip}/{NODE_PREFIX_LEN}");
        self.ip(&["-n", ns, "link", "set", "lo", "up"])?;
        self.ip(&["-n", ns, "addr", "add", &addr, "dev", ifname])?;
        self.ip(&["-n", ns, "link", "set", ifname, "up"])?;
        self.apply_offloads(fabric, port)?;
        self.apply_offloads(ns, ifname)
    }

    /// Joins `ns` to every node network (eth0, eth1, ...) and, in a dual-stack lab, gives its
    /// eth0 `ip6` too.
    fn join_networks(
        &self,
        fabric: &str,
        ns: &str,
        port_base: &str,
        ips: &[std::net::Ipv4Addr],
        ip6: Option<std::net::Ipv6Addr>,
        mtu: &str,
    ) -> Result<(), BackendError> {
        for (i, ip) in ips.iter().enumerate() {
            let network = i as u8 + 1;
            let port = if network == 1 {
                port_base.to_owned()
            } else {
                format!("{port_base}k{network}")
            };
            let ifname = format!("eth{i}");
            self.join_fabric(fabric, network, ns, &port, &ifname, &ip.to_string(), mtu)?;
        }
        if let Some(ip6) = ip6 {
            let addr = format!("{ip6}/{NODE_PREFIX_LEN6}");
            self.ip(&["-n", ns, "addr", "add", &addr, "dev", "eth0", "nodad"])?;
        }
        Ok(())
    }

    fn add_ns(&mut self, name: String) -> Result<(), BackendError> {
        self.ip(&["netns", "add", &name])?;
        self.namespaces.push(name);
        Ok(())
    }

    fn build(&mut self) -> Result<(), BackendError> {
        let started = Instant::now();
        self.make_cgroups()?;
        self.build_fabric()?;
        for node in self.plan.nodes.clone() {
            self.build_node(&node)?;
        }
        for pod in self.plan.pods.clone() {
            self.build_pod(&pod)?;
        }
        for ext in self.plan.externals.clone() {
            self.build_external(&ext)?;
        }
        for route in self.plan.routes.clone() {
            self.add_route(&route)?;
        }
        debug!(
            prefix = %self.prefix,
            namespaces = self.namespaces.len(),
            elapsed = ?started.elapsed(),
            "lab built"
        );
        Ok(())
    }

    /// A cgroup per node under the lab's own, where the machine has cgroup2.
    fn make_cgroups(&mut self) -> Result<(), BackendError> {
        if let Some(root) = cgroup2_mount() {
            // Recorded before anything is made, so a failure half way is cleaned up too.
            let parent = root.join("weir-lab").join(&self.prefix);
            let cgroups = self.cgroups.insert(LabCgroups {
                parent: parent.clone(),
                nodes: Vec::new(),
            });
            for node in &self.plan.nodes {
                let dir = parent.join(&node.name);
                std::fs::create_dir_all(&dir).map_err(|source| BackendError::Io {
                    context: format!("creating cgroup {}", dir.display()),
                    source,
                })?;
                cgroups.nodes.push(dir);
            }
        }
        Ok(())
    }

    /// The fabric namespace with one bridge per node network, each the network's gateway.
    fn build_fabric(&mut self) -> Result<(), BackendError> {
        let mtu = self.plan.mtu.to_string();
        let fabric = self.fabric();
        self.add_ns(fabric.clone())?;
        self.ip(&["-n", &fabric, "link", "set", "lo", "up"])?;
        for network in 1..=self.plan.networks {
            let bridge = bridge_name(network);
            self.ip(&[
                "-n", &fabric, "link", "add", &bridge, "mtu", &mtu, "type", "bridge",
            ])?;
            let gateway = format!("{}/{NODE_PREFIX_LEN}", network_gateway(network));
            self.ip(&["-n", &fabric, "addr", "add", &gateway, "dev", &bridge])?;
            self.ip(&["-n", &fabric, "link", "set", &bridge, "up"])?;
        }
        Ok(())
    }

    /// A node: its namespace and sysctls, its uplinks, its default route and a route to every
    /// other node's pods.
    fn build_node(&mut self, node: &NodePlan) -> Result<(), BackendError> {
        let mtu = self.plan.mtu.to_string();
        let fabric = self.fabric();
        let ns = self.ns_name(node.id);
        self.add_ns(ns.clone())?;
        // Before any interface exists, so new ones inherit the defaults. Duplicate address
        // detection would hold every new IPv6 address back for a second; the lab's plan
        // guarantees uniqueness.
        let mut settings = vec![
            "net.ipv4.ip_forward=1".to_owned(),
            "net.ipv4.conf.all.rp_filter=0".to_owned(),
            "net.ipv4.conf.default.rp_filter=0".to_owned(),
        ];
        if self.plan.ipv6 {
            settings.extend([
                "net.ipv6.conf.all.forwarding=1".to_owned(),
                "net.ipv6.conf.all.accept_dad=0".to_owned(),
                "net.ipv6.conf.default.accept_dad=0".to_owned(),
            ]);
        }
        self.sysctl(node.id, &settings)?;
        self.join_networks(
            &fabric,
            &ns,
            &format!("n{}", node.index),
            &node.ips,
            node.ip6,
            &mtu,
        )?;
        self.ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &GATEWAY.to_string(),
        ])?;
        for route in wiring::pod_routes(&self.plan, node) {
            let mut full = vec!["-n", ns.as_str()];
            full.extend(route.iter().map(String::as_str));
            self.ip(&full)?;
        }
        Ok(())
    }

    /// A pod: its namespace and the veth to its node, routed Calico-style through a link-local
    /// gateway the node answers for (proxy ARP; IPv6: the node side holds the gateway address).
    fn build_pod(&mut self, pod: &PodPlan) -> Result<(), BackendError> {
        let ns = self.ns_name(pod.id);
        let node_id = HostId::Node(pod.node);
        let node_ns = self.ns_name(node_id);
        self.add_ns(ns.clone())?;
        for step in wiring::pod_steps(pod, &ns, self.plan.mtu) {
            match step {
                Step::Ip(side, args) => {
                    let target = match side {
                        Side::Pod => &ns,
                        Side::Node => &node_ns,
                    };
                    let mut full = vec!["-n", target.as_str()];
                    full.extend(args.iter().map(String::as_str));
                    self.ip(&full)?;
                }
                Step::NodeSysctl(settings) => self.sysctl(node_id, &settings)?,
            }
        }
        self.apply_offloads(&node_ns, &pod.host_interface)?;
        self.apply_offloads(&ns, "eth0")?;
        Ok(())
    }

    /// An external client: its namespace on every node network.
    fn build_external(&mut self, ext: &ExternalPlan) -> Result<(), BackendError> {
        let mtu = self.plan.mtu.to_string();
        let fabric = self.fabric();
        let ns = self.ns_name(ext.id);
        self.add_ns(ns.clone())?;
        if self.plan.ipv6 {
            self.sysctl(
                ext.id,
                &[
                    "net.ipv6.conf.all.accept_dad=0".to_owned(),
                    "net.ipv6.conf.default.accept_dad=0".to_owned(),
                ],
            )?;
        }
        self.join_networks(
            &fabric,
            &ns,
            &format!("x{}", ext.index),
            &ext.ips,
            ext.ip6,
            &mtu,
        )?;
        Ok(())
    }

    /// One of the plan's `[[routes]]`.
    fn add_route(&mut self, route: &RoutePlan) -> Result<(), BackendError> {
        let ns = self.ns_name(route.host);
        let prefix = format!("{}/{}", route.prefix.0, route.prefix.1);
        let family = if route.prefix.0.is_ipv6() { "-6" } else { "-4" };
        self.ip(&[
            "-n",
            &ns,
            family,
            "route",
            "add",
            &prefix,
            "via",
            &route.via.to_string(),
        ])?;
        Ok(())
    }
}

impl Lab for NetnsLab {
    fn plan(&self) -> &Plan {
        &self.plan
    }

    fn exec(&mut self, host: HostId, cmd: &Cmd, timeout: Duration) -> Result<Output, BackendError> {
        let path = self.ns_path(host)?;
        let cgroup = self.host_cgroup(host);
        run_in(
            &host.to_string(),
            Some(&path),
            cgroup.as_deref(),
            cmd,
            timeout,
            false,
        )
    }

    fn node_cgroup(&self, node: u8) -> Option<PathBuf> {
        self.host_cgroup(HostId::Node(node))
    }

    fn spawn(&mut self, host: HostId, cmd: &Cmd, log: &Path) -> Result<ProcId, BackendError> {
        let path = self.ns_path(host)?;
        let cgroup = self.host_cgroup(host);
        self.spawn_at(host, &path, cgroup, cmd, log)
    }

    fn delay_first_fragments(
        &mut self,
        node: u8,
        vxlan_port: u16,
        log: &Path,
    ) -> Result<(), BackendError> {
        let fabric = self.fabric();
        self.delayers
            .start(node, &fabric, &fabric::port_towards(node), vxlan_port, log)
    }

    fn restore_fragment_order(&mut self, node: u8) -> Result<(), BackendError> {
        self.delayers.stop(node)
    }

    fn exited(&mut self, proc: ProcId) -> Result<Option<String>, BackendError> {
        let spawned = self
            .procs
            .get_mut(&proc)
            .ok_or(BackendError::NoSuchProcess(proc))?;
        let status = spawned
            .child
            .try_wait()
            .map_err(|source| BackendError::Io {
                context: format!("waiting for {}", spawned.command),
                source,
            })?;
        Ok(status.map(describe))
    }

    fn signal(&mut self, proc: ProcId, signal: Signal) -> Result<(), BackendError> {
        let spawned = self
            .procs
            .get(&proc)
            .ok_or(BackendError::NoSuchProcess(proc))?;
        send_signal(&spawned.child, signal).map_err(|source| BackendError::Io {
            context: format!("{signal} to {} on {}", spawned.command, spawned.host),
            source,
        })
    }

    fn stop(&mut self, proc: ProcId) -> Result<(), BackendError> {
        let mut spawned = self
            .procs
            .remove(&proc)
            .ok_or(BackendError::NoSuchProcess(proc))?;
        debug!(host = %spawned.host, pid = proc.0, command = %spawned.command, "stopping");
        stop_group(&mut spawned.child, STOP_GRACE).map_err(|source| BackendError::Io {
            context: format!("stopping {} on {}", spawned.command, spawned.host),
            source,
        })
    }

    fn write_file(
        &mut self,
        _host: HostId,
        path: &Path,
        contents: &[u8],
    ) -> Result<(), BackendError> {
        // Every namespace shares the lab's file system, so the host does not matter here.
        write_atomically(path, contents).map_err(|source| BackendError::Io {
            context: format!("writing {}", path.display()),
            source,
        })
    }

    fn teardown(&mut self) -> Result<(), BackendError> {
        if self.torn_down {
            return Ok(());
        }
        let mut problems = Vec::new();
        let procs: Vec<ProcId> = self.procs.keys().rev().copied().collect();
        for p in procs {
            if let Err(e) = self.stop(p) {
                problems.push(e.to_string());
            }
        }
        problems.extend(self.delayers.stop_all());
        while let Some(ns) = self.namespaces.pop() {
            if let Err(e) = self.ip(&["netns", "del", &ns]) {
                problems.push(e.to_string());
            }
        }
        if let Some(cgroups) = self.cgroups.take() {
            for cgroup in cgroups.nodes.iter().chain([&cgroups.parent]) {
                if let Err(e) = remove_cgroup(cgroup) {
                    problems.push(format!("removing cgroup {}: {e}", cgroup.display()));
                }
            }
            // The labs' common parent goes too, unless another lab still uses it.
            if let Some(base) = cgroups.parent.parent() {
                let _ = std::fs::remove_dir(base);
            }
        }
        self.torn_down = true;
        if problems.is_empty() {
            debug!(prefix = %self.prefix, "lab torn down");
            Ok(())
        } else {
            Err(BackendError::Teardown(problems.join("; ")))
        }
    }
}

impl NetnsLab {
    /// Starts `cmd` in the network namespace at `path` (and `cgroup`), recorded as `host`'s.
    fn spawn_at(
        &mut self,
        host: HostId,
        path: &Path,
        cgroup: Option<PathBuf>,
        cmd: &Cmd,
        log: &Path,
    ) -> Result<ProcId, BackendError> {
        let child = spawn_logged(&host.to_string(), path, cgroup.as_deref(), cmd, log)?;
        let id = ProcId(child.id());
        debug!(%host, pid = id.0, command = %cmd, log = %log.display(), "spawned");
        self.procs.insert(
            id,
            Spawned {
                child,
                host,
                command: cmd.to_string(),
            },
        );
        Ok(id)
    }
}

impl Drop for NetnsLab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            warn!("{e}");
        }
    }
}

/// Where the unified (v2) cgroup hierarchy is mounted, if anywhere.
pub(crate) fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // Fields: id parent major:minor root mount-point options ... - fstype source options
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// Removes a cgroup the lab made; its processes have been stopped, but the kernel may take a
/// moment to let go of the last ones.
fn remove_cgroup(dir: &Path) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

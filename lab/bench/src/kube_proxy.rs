//! An emulation of kube-proxy in iptables mode: the baseline Weir is measured against.
//!
//! It writes the `iptables-restore` input kube-proxy's iptables proxier writes (the shape of
//! Kubernetes 1.28-1.31, `pkg/proxy/iptables/proxier.go`, for ClusterIP services): a filter table
//! with kube-proxy's top-level chains, and a nat table where `KUBE-SERVICES` holds one rule per
//! service port, each jumping to a `KUBE-SVC-<hash>` chain that picks an endpoint with
//! `-m statistic --mode random --probability`, each endpoint a `KUBE-SEP-<hash>` chain that marks
//! hairpin traffic for masquerade and DNATs. Chain names use kube-proxy's own hash (SHA-256 of the
//! service port name and protocol, base32, 16 characters), so they match a real node's.
//!
//! [`Proxier`] also keeps kube-proxy's sync behaviour: the first sync and forced resyncs write
//! every chain; later syncs are partial (`KUBE-SERVICES` and the other top-level chains in full,
//! but the SVC/SEP chains of changed services only). Every sync is applied with
//! `iptables-restore --noflush --counters`, and stale chains are found with `iptables-save -t nat`
//! and deleted, which in large-cluster mode (more than 1,000 endpoints) kube-proxy only does on
//! full syncs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use weir_lab_core::k8s;
pub use weir_lab_core::scenario::Protocol;
use weir_lab_core::scenario::Scenario;
use weir_lab_core::topology::{Plan, POD_CLUSTER_CIDR};

/// kube-proxy leaves SEP comments out above this many endpoints (`largeClusterEndpointsThreshold`).
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
pub const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
pub const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
/// Once kubelet's, written by kube-proxy since it took over localhost NodePorts.
pub const KUBE_FIREWALL: &str = "KUBE-FIREWALL";

/// `namespace/name:port`, or `namespace/name` for an unnamed port, as kube-proxy prints it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    pub port: String,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// One port of a ClusterIP or NodePort service (externalTrafficPolicy Cluster) and its ready
/// endpoints, which is what kube-proxy compiles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxiedServicePort {
    pub name: ServicePortName,
    pub protocol: Protocol,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// Served on every local address (kube-proxy's default `--nodeport-addresses`).
    pub node_port: Option<u16>,
    pub endpoints: Vec<SocketAddrV4>,
}

impl ProxiedServicePort {
    /// `KUBE-SVC-<hash>`.
    pub fn service_chain(&self) -> String {
        format!(
            "KUBE-SVC-{}",
            chain_hash(&format!("{}{}", self.name, self.protocol.lower()))
        )
    }

    /// `KUBE-EXT-<hash>`: where NodePort traffic is marked for masquerading.
    pub fn external_chain(&self) -> String {
        format!(
            "KUBE-EXT-{}",
            chain_hash(&format!("{}{}", self.name, self.protocol.lower()))
        )
    }

    /// `KUBE-SEP-<hash>` of one endpoint of this port.
    pub fn endpoint_chain(&self, endpoint: SocketAddrV4) -> String {
        format!(
            "KUBE-SEP-{}",
            chain_hash(&format!("{}{}{endpoint}", self.name, self.protocol.lower()))
        )
    }

    fn chains(&self) -> impl Iterator<Item = String> + '_ {
        let svc = (!self.endpoints.is_empty()).then(|| self.service_chain());
        let ext =
            (!self.endpoints.is_empty() && self.node_port.is_some()).then(|| self.external_chain());
        svc.into_iter()
            .chain(ext)
            .chain(self.endpoints.iter().map(|e| self.endpoint_chain(*e)))
    }
}

/// What kube-proxy would program for a scenario's services: every port of every service, with
/// the pods the service selects as endpoints (the same selection the lab hands the agent).
pub fn from_scenario(scenario: &Scenario, plan: &Plan) -> Vec<ProxiedServicePort> {
    let labels = k8s::pod_labels(scenario, plan);
    let mut out = Vec::new();
    // kube-proxy's IPv4 rules: Services without an IPv4 cluster IP (IPv6-only, headless,
    // ExternalName) and other proxies' have none.
    for svc in scenario.services.iter().filter(|s| s.served()) {
        let Some(cluster_ip) = svc.cluster_ip else {
            continue;
        };
        let pods = k8s::endpoints(svc, plan, &labels);
        for p in &svc.ports {
            out.push(ProxiedServicePort {
                name: ServicePortName {
                    namespace: k8s::NAMESPACE.to_owned(),
                    name: svc.name.clone(),
                    port: p.name.clone(),
                },
                protocol: p.protocol,
                cluster_ip,
                port: p.port,
                node_port: p.node_port,
                endpoints: pods
                    .iter()
                    .map(|pod| SocketAddrV4::new(pod.ip, p.target()))
                    .collect(),
            });
        }
    }
    out
}

/// kube-proxy's `portProtoHash`: the first 16 characters of the base32 (RFC 4648, upper case)
/// SHA-256 of the input.
pub fn chain_hash(input: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = Sha256::digest(input.as_bytes());
    // 16 base32 characters are 80 bits: exactly the first 10 bytes, no padding involved.
    let mut bits: u128 = 0;
    for b in &digest[..10] {
        bits = (bits << 8) | u128::from(*b);
    }
    (0..16)
        .rev()
        .map(|i| ALPHABET[((bits >> (i * 5)) & 0x1f) as usize] as char)
        .collect()
}

/// The kube-proxy flags that change the rules it writes.
#[derive(Clone, Debug)]
pub struct ProxierConfig {
    /// `--cluster-cidr` with the default `--detect-local-mode=ClusterCIDR`: traffic to a cluster
    /// IP from outside it is masqueraded. None: kube-proxy cannot tell and masquerades nothing
    /// but hairpin traffic.
    pub cluster_cidr: Option<(Ipv4Addr, u8)>,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// `--iptables-masquerade-bit` (default 14).
    pub masquerade_bit: u8,
    /// `MASQUERADE --random-fully`, which kube-proxy adds when iptables supports it (1.6.2+).
    pub random_fully: bool,
}

impl Default for ProxierConfig {
    fn default() -> Self {
        ProxierConfig {
            cluster_cidr: None,
            masquerade_all: false,
            masquerade_bit: 14,
            random_fully: true,
        }
    }
}

impl ProxierConfig {
    /// kube-proxy as every bench runs it in the lab: `--cluster-cidr` covering every pod, so
    /// pod-to-service traffic is not masqueraded, as on a real cluster.
    pub fn lab() -> ProxierConfig {
        ProxierConfig {
            cluster_cidr: Some(POD_CLUSTER_CIDR),
            ..ProxierConfig::default()
        }
    }

    fn mark(&self) -> String {
        format!("{:#x}", 1u32 << self.masquerade_bit)
    }
}

/// Whether a sync writes every chain or only those of changed services.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncKind {
    Full,
    Partial,
}

/// What one kube-proxy sync does to the kernel.
#[derive(Clone, Debug)]
pub struct Sync {
    pub kind: SyncKind,
    /// kube-proxy runs `iptables-save -t nat` first to find stale chains.
    pub save_nat_first: bool,
    /// Input for `iptables-restore --noflush --counters`.
    pub restore_input: String,
    /// Rules written (`-A` lines), for reports.
    pub rules: usize,
    /// Stale chains this sync deletes.
    pub deleted_chains: usize,
}

/// kube-proxy's iptables proxier, minus the API watchers: feed it the whole service list after
/// every change, as its sync loop sees it.
#[derive(Clone, Debug)]
pub struct Proxier {
    config: ProxierConfig,
    /// What the last sync wrote, by service port, to tell which services changed.
    last: Option<BTreeMap<ServicePortName, ProxiedServicePort>>,
    /// KUBE-SVC/KUBE-SEP chains in the kernel after the last sync; what `iptables-save` would
    /// list (nothing else on the lab's nodes writes such chains).
    existing_nat_chains: BTreeSet<String>,
}

impl Proxier {
    pub fn new(config: ProxierConfig) -> Proxier {
        Proxier {
            config,
            last: None,
            existing_nat_chains: BTreeSet::new(),
        }
    }

    pub fn config(&self) -> &ProxierConfig {
        &self.config
    }

    /// The next sync for `services`: full the first time, partial afterwards.
    pub fn sync(&mut self, services: &[ProxiedServicePort]) -> Sync {
        let changed = self.last.as_ref().map(|last| {
            services
                .iter()
                .filter(|s| last.get(&s.name) != Some(*s))
                .map(|s| s.name.clone())
                .collect::<BTreeSet<_>>()
        });
        self.write(services, changed.as_ref())
    }

    /// A sync that writes every chain, as after start-up or the periodic forced resync.
    pub fn full_sync(&mut self, services: &[ProxiedServicePort]) -> Sync {
        self.write(services, None)
    }

    fn write(
        &mut self,
        services: &[ProxiedServicePort],
        changed: Option<&BTreeSet<ServicePortName>>,
    ) -> Sync {
        let total_endpoints: usize = services.iter().map(|s| s.endpoints.len()).sum();
        let large_cluster = total_endpoints > LARGE_CLUSTER_ENDPOINTS;
        let partial = changed.is_some();

        let mut tables = Tables::default();
        tables.base_rules(&self.config);
        let mut active_nat_chains = BTreeSet::new();
        for svc in services {
            active_nat_chains.extend(svc.chains());
            let words = ServiceWords::of(svc);
            tables.dispatch(svc, &words);
            if changed.is_some_and(|c| !c.contains(&svc.name)) || svc.endpoints.is_empty() {
                continue;
            }
            tables.service_chains(svc, &words, &self.config, large_cluster);
        }
        tables.closing_rules(&self.config);

        // Stale chains: kube-proxy lists the nat table and deletes its own chains nothing uses
        // any more (declaring a chain flushes it, then -X removes it). In large clusters that
        // listing is too slow for every sync, so only full syncs do it.
        let save_nat_first = !large_cluster || !partial;
        let mut deleted_chains = 0;
        if save_nat_first {
            for chain in self.existing_nat_chains.difference(&active_nat_chains) {
                tables.nat_chains.chain(chain);
                tables.nat_rules.rule(&["-X", chain]);
                deleted_chains += 1;
            }
            self.existing_nat_chains = active_nat_chains;
        } else {
            self.existing_nat_chains.extend(active_nat_chains);
        }

        self.last = Some(
            services
                .iter()
                .map(|s| (s.name.clone(), s.clone()))
                .collect(),
        );
        Sync {
            kind: if partial {
                SyncKind::Partial
            } else {
                SyncKind::Full
            },
            save_nat_first,
            rules: tables.filter_rules.rules + tables.nat_rules.rules,
            restore_input: tables.restore_input(),
            deleted_chains,
        }
    }
}

/// The words a service port's rules share, formatted once per sync.
struct ServiceWords {
    name: String,
    proto: &'static str,
    ip: String,
    port: String,
    svc_chain: String,
}

impl ServiceWords {
    fn of(svc: &ProxiedServicePort) -> ServiceWords {
        ServiceWords {
            name: svc.name.to_string(),
            proto: svc.protocol.lower(),
            ip: svc.cluster_ip.to_string(),
            port: svc.port.to_string(),
            svc_chain: svc.service_chain(),
        }
    }

    /// Matches traffic to the service port's cluster IP, under `comment`.
    fn cluster_ip_match<'a>(&'a self, comment: &'a str) -> [&'a str; 12] {
        [
            "-m",
            "comment",
            "--comment",
            comment,
            "-m",
            self.proto,
            "-p",
            self.proto,
            "-d",
            &self.ip,
            "--dport",
            &self.port,
        ]
    }
}

/// One sync's restore input as it is written: the chains it declares and the rules it appends,
/// per table, in the order kube-proxy writes them.
#[derive(Default)]
struct Tables {
    filter_chains: Lines,
    filter_rules: Lines,
    nat_chains: Lines,
    nat_rules: Lines,
}

impl Tables {
    /// kube-proxy's own chains and the rules that do not depend on any service: masquerading
    /// by mark, and the localhost NodePort guard.
    fn base_rules(&mut self, config: &ProxierConfig) {
        let mark = config.mark();
        for chain in [
            KUBE_NODEPORTS,
            KUBE_SERVICES,
            KUBE_EXTERNAL_SERVICES,
            KUBE_FIREWALL,
            KUBE_FORWARD,
            KUBE_PROXY_FIREWALL,
        ] {
            self.filter_chains.chain(chain);
        }
        for chain in [
            KUBE_SERVICES,
            KUBE_NODEPORTS,
            KUBE_POSTROUTING,
            KUBE_MARK_MASQ,
        ] {
            self.nat_chains.chain(chain);
        }
        self.nat_rules.rule(&[
            "-A",
            KUBE_POSTROUTING,
            "-m",
            "mark",
            "!",
            "--mark",
            &format!("{mark}/{mark}"),
            "-j",
            "RETURN",
        ]);
        // Clears the mark so a packet that traverses the stack again is not masqueraded twice.
        self.nat_rules
            .rule(&["-A", KUBE_POSTROUTING, "-j", "MARK", "--xor-mark", &mark]);
        let mut masq = vec![
            "-A",
            KUBE_POSTROUTING,
            "-m",
            "comment",
            "--comment",
            "\"kubernetes service traffic requiring SNAT\"",
            "-j",
            "MASQUERADE",
        ];
        if config.random_fully {
            masq.push("--random-fully");
        }
        self.nat_rules.rule(&masq);
        self.nat_rules
            .rule(&["-A", KUBE_MARK_MASQ, "-j", "MARK", "--or-mark", &mark]);
        // Localhost NodePorts (on by default for IPv4) come with this guard.
        self.filter_rules.rule(&[
            "-A",
            KUBE_FIREWALL,
            "-m",
            "comment",
            "--comment",
            "\"block incoming localnet connections\"",
            "-d",
            "127.0.0.0/8",
            "!",
            "-s",
            "127.0.0.0/8",
            "-m",
            "conntrack",
            "!",
            "--ctstate",
            "RELATED,ESTABLISHED,DNAT",
            "-j",
            "DROP",
        ]);
    }

    /// A service port's entries in the dispatch chains (KUBE-SERVICES, KUBE-NODEPORTS and, for
    /// one without endpoints, the filter table's rejects), written on every sync.
    fn dispatch(&mut self, svc: &ProxiedServicePort, words: &ServiceWords) {
        let (name, proto, svc_chain) = (&words.name, words.proto, &words.svc_chain);
        let node_port = svc.node_port.map(|p| p.to_string());
        if let Some(node_port) = &node_port {
            let quoted = format!("\"{name}\"");
            let dispatch = [
                "-m",
                "comment",
                "--comment",
                &quoted,
                "-m",
                proto,
                "-p",
                proto,
                "--dport",
                node_port,
            ];
            if svc.endpoints.is_empty() {
                let comment = format!("\"{name} has no endpoints\"");
                self.filter_rules.rule_parts(&[
                    &[
                        "-A",
                        KUBE_EXTERNAL_SERVICES,
                        "-m",
                        "comment",
                        "--comment",
                        &comment,
                    ],
                    &["-m", "addrtype", "--dst-type", "LOCAL"],
                    &[
                        "-m", proto, "-p", proto, "--dport", node_port, "-j", "REJECT",
                    ],
                ]);
            } else {
                let ext_chain = svc.external_chain();
                self.nat_rules.rule_parts(&[
                    &["-A", KUBE_NODEPORTS],
                    &dispatch,
                    &["-j", &ext_chain],
                ]);
            }
        }
        if svc.endpoints.is_empty() {
            let comment = format!("\"{name} has no endpoints\"");
            let m = words.cluster_ip_match(&comment);
            self.filter_rules
                .rule_parts(&[&["-A", KUBE_SERVICES], &m, &["-j", "REJECT"]]);
        } else {
            let comment = format!("\"{name} cluster IP\"");
            let m = words.cluster_ip_match(&comment);
            self.nat_rules
                .rule_parts(&[&["-A", KUBE_SERVICES], &m, &["-j", svc_chain]]);
        }
    }

    /// A service port's own chains: its KUBE-SVC chain choosing an endpoint at random, the
    /// KUBE-EXT chain of its NodePort, and one KUBE-SEP chain per endpoint.
    fn service_chains(
        &mut self,
        svc: &ProxiedServicePort,
        words: &ServiceWords,
        config: &ProxierConfig,
        large_cluster: bool,
    ) {
        let (name, proto, svc_chain) = (&words.name, words.proto, &words.svc_chain);
        if svc.node_port.is_some() {
            // externalTrafficPolicy Cluster: external clients are masqueraded, so replies
            // come back through this node wherever the endpoint is.
            let ext_chain = svc.external_chain();
            self.nat_chains.chain(&ext_chain);
            let comment = format!("\"masquerade traffic for {name} external destinations\"");
            self.nat_rules.rule(&[
                "-A",
                &ext_chain,
                "-m",
                "comment",
                "--comment",
                &comment,
                "-j",
                KUBE_MARK_MASQ,
            ]);
            self.nat_rules.rule(&["-A", &ext_chain, "-j", svc_chain]);
        }
        self.nat_chains.chain(svc_chain);
        let comment = format!("\"{name} cluster IP\"");
        let m = words.cluster_ip_match(&comment);
        if config.masquerade_all {
            self.nat_rules
                .rule_parts(&[&["-A", svc_chain], &m, &["-j", KUBE_MARK_MASQ]]);
        } else if let Some((net, len)) = config.cluster_cidr {
            let cidr = format!("{net}/{len}");
            self.nat_rules.rule_parts(&[
                &["-A", svc_chain],
                &m,
                &["!", "-s", &cidr, "-j", KUBE_MARK_MASQ],
            ]);
        }
        let n = svc.endpoints.len();
        for (i, ep) in svc.endpoints.iter().enumerate() {
            let comment = format!("\"{name} -> {ep}\"");
            let sep = svc.endpoint_chain(*ep);
            if i + 1 < n {
                let probability = format!("{:.10}", 1.0 / (n - i) as f64);
                self.nat_rules.rule(&[
                    "-A",
                    svc_chain,
                    "-m",
                    "comment",
                    "--comment",
                    &comment,
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &probability,
                    "-j",
                    &sep,
                ]);
            } else {
                self.nat_rules.rule(&[
                    "-A",
                    svc_chain,
                    "-m",
                    "comment",
                    "--comment",
                    &comment,
                    "-j",
                    &sep,
                ]);
            }
        }
        for ep in &svc.endpoints {
            let sep = svc.endpoint_chain(*ep);
            self.nat_chains.chain(&sep);
            // Large clusters drop these comments: they make up much of the ruleset's size.
            let comment: &[&str] = if large_cluster {
                &[]
            } else {
                &["-m", "comment", "--comment", name]
            };
            let ep_ip = ep.ip().to_string();
            let ep_str = ep.to_string();
            // Hairpin: a pod reaching itself through the service must see the node's address.
            self.nat_rules.rule_parts(&[
                &["-A", &sep],
                comment,
                &["-s", &ep_ip, "-j", KUBE_MARK_MASQ],
            ]);
            self.nat_rules.rule_parts(&[
                &["-A", &sep],
                comment,
                &[
                    "-m",
                    proto,
                    "-p",
                    proto,
                    "-j",
                    "DNAT",
                    "--to-destination",
                    &ep_str,
                ],
            ]);
        }
    }

    /// The rules after every service's: the NodePort jump that must end KUBE-SERVICES, and
    /// KUBE-FORWARD.
    fn closing_rules(&mut self, config: &ProxierConfig) {
        let mark = config.mark();
        // With the default --nodeport-addresses every local address serves NodePorts; this jump
        // must stay the last rule of KUBE-SERVICES.
        self.nat_rules.rule(&[
            "-A",
            KUBE_SERVICES,
            "-m",
            "comment",
            "--comment",
            "\"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"",
            "-m",
            "addrtype",
            "--dst-type",
            "LOCAL",
            "-j",
            KUBE_NODEPORTS,
        ]);
        self.filter_rules.rule(&[
            "-A",
            KUBE_FORWARD,
            "-m",
            "conntrack",
            "--ctstate",
            "INVALID",
            "-j",
            "DROP",
        ]);
        self.filter_rules.rule(&[
            "-A",
            KUBE_FORWARD,
            "-m",
            "comment",
            "--comment",
            "\"kubernetes forwarding rules\"",
            "-m",
            "mark",
            "--mark",
            &format!("{mark}/{mark}"),
            "-j",
            "ACCEPT",
        ]);
        self.filter_rules.rule(&[
            "-A",
            KUBE_FORWARD,
            "-m",
            "comment",
            "--comment",
            "\"kubernetes forwarding conntrack rule\"",
            "-m",
            "conntrack",
            "--ctstate",
            "RELATED,ESTABLISHED",
            "-j",
            "ACCEPT",
        ]);
    }

    fn restore_input(&self) -> String {
        let mut restore_input = String::with_capacity(
            self.filter_chains.text.len()
                + self.filter_rules.text.len()
                + self.nat_chains.text.len()
                + self.nat_rules.text.len()
                + 32,
        );
        restore_input.push_str("*filter\n");
        restore_input.push_str(&self.filter_chains.text);
        restore_input.push_str(&self.filter_rules.text);
        restore_input.push_str("COMMIT\n*nat\n");
        restore_input.push_str(&self.nat_chains.text);
        restore_input.push_str(&self.nat_rules.text);
        restore_input.push_str("COMMIT\n");
        restore_input
    }
}

/// The jumps from the kernel's base chains into kube-proxy's, which kube-proxy keeps in place
/// with `iptables -C`/`-I` (EnsureChain/EnsureRule) before every sync rather than through
/// iptables-restore. As restore input (with `--noflush`) for a fresh node: it creates the
/// chains and inserts every jump at the top of its base chain, which is where `-I` puts them.
pub fn jump_rules_input() -> String {
    // (table, base chain, target, comment, extra matches), in kube-proxy's order.
    const NEW: &[&str] = &["-m", "conntrack", "--ctstate", "NEW"];
    let jumps: [(&str, &str, &str, &str, &[&str]); 14] = [
        (
            "filter",
            "INPUT",
            KUBE_EXTERNAL_SERVICES,
            "kubernetes externally-visible service portals",
            NEW,
        ),
        (
            "filter",
            "FORWARD",
            KUBE_EXTERNAL_SERVICES,
            "kubernetes externally-visible service portals",
            NEW,
        ),
        (
            "filter",
            "INPUT",
            KUBE_NODEPORTS,
            "kubernetes health check service ports",
            &[],
        ),
        (
            "filter",
            "FORWARD",
            KUBE_SERVICES,
            "kubernetes service portals",
            NEW,
        ),
        (
            "filter",
            "OUTPUT",
            KUBE_SERVICES,
            "kubernetes service portals",
            NEW,
        ),
        (
            "filter",
            "FORWARD",
            KUBE_FORWARD,
            "kubernetes forwarding rules",
            &[],
        ),
        (
            "filter",
            "INPUT",
            KUBE_PROXY_FIREWALL,
            "kubernetes load balancer firewall",
            NEW,
        ),
        (
            "filter",
            "OUTPUT",
            KUBE_PROXY_FIREWALL,
            "kubernetes load balancer firewall",
            NEW,
        ),
        (
            "filter",
            "FORWARD",
            KUBE_PROXY_FIREWALL,
            "kubernetes load balancer firewall",
            NEW,
        ),
        ("filter", "INPUT", KUBE_FIREWALL, "", &[]),
        ("filter", "OUTPUT", KUBE_FIREWALL, "", &[]),
        (
            "nat",
            "OUTPUT",
            KUBE_SERVICES,
            "kubernetes service portals",
            &[],
        ),
        (
            "nat",
            "PREROUTING",
            KUBE_SERVICES,
            "kubernetes service portals",
            &[],
        ),
        (
            "nat",
            "POSTROUTING",
            KUBE_POSTROUTING,
            "kubernetes postrouting rules",
            &[],
        ),
    ];
    let mut out = String::new();
    for table in ["filter", "nat"] {
        out.push_str(&format!("*{table}\n"));
        let targets: BTreeSet<&str> = jumps.iter().filter(|j| j.0 == table).map(|j| j.2).collect();
        let mut lines = Lines::default();
        for t in targets {
            lines.chain(t);
        }
        for (_, base, target, comment, extra) in jumps.iter().filter(|j| j.0 == table) {
            let quoted = format!("\"{comment}\"");
            let comment: &[&str] = if comment.is_empty() {
                &[]
            } else {
                &["-m", "comment", "--comment", &quoted]
            };
            lines.rule_parts(&[&["-I", base], comment, extra, &["-j", target]]);
        }
        out.push_str(&lines.text);
        out.push_str("COMMIT\n");
    }
    out
}

/// Restore input (for `--noflush`) that takes out again what the `applied` restore inputs put
/// in, in the order they were applied: every jump they inserted into a base chain is deleted,
/// and every chain they declared is flushed, then deleted. Base chains keep their policies and
/// anything else in them. (The kernel keeps a table it has once instantiated, with its hooks,
/// until the module goes; only the rules and chains go away.)
pub fn removal_input(applied: &[&str]) -> String {
    // Per table, in first-seen order: the chains declared (and not deleted again) and the
    // rules on base chains.
    let mut tables: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    let mut current: Option<usize> = None;
    for line in applied.iter().flat_map(|text| text.lines()).map(str::trim) {
        if let Some(table) = line.strip_prefix('*') {
            current = Some(match tables.iter().position(|t| t.0 == table) {
                Some(i) => i,
                None => {
                    tables.push((table.to_owned(), Vec::new(), Vec::new()));
                    tables.len() - 1
                }
            });
            continue;
        }
        let Some(i) = current else { continue };
        let (_, chains, base_rules) = &mut tables[i];
        if let Some(decl) = line.strip_prefix(':') {
            // `:NAME - [0:0]` declares a user chain; base chains carry a policy instead of `-`.
            let mut words = decl.split_whitespace();
            if let (Some(name), Some("-")) = (words.next(), words.next()) {
                if !chains.iter().any(|c| c == name) {
                    chains.push(name.to_owned());
                }
            }
        } else if let Some(name) = line.strip_prefix("-X ") {
            chains.retain(|c| c != name.trim());
        } else if let Some(rest) = line
            .strip_prefix("-I ")
            .or_else(|| line.strip_prefix("-A "))
        {
            let chain = rest.split_whitespace().next().unwrap_or("");
            if !chains.iter().any(|c| c == chain) {
                base_rules.push(rest.to_owned());
            }
        }
    }
    let mut out = String::new();
    for (table, chains, base_rules) in &tables {
        out.push_str(&format!("*{table}\n"));
        let mut lines = Lines::default();
        for chain in chains {
            lines.chain(chain);
        }
        for rule in base_rules {
            lines.rule(&["-D", rule]);
        }
        for chain in chains {
            lines.rule(&["-X", chain]);
        }
        out.push_str(&lines.text);
        out.push_str("COMMIT\n");
    }
    out
}

/// Builds restore input line by line; words are joined with single spaces, already quoted.
#[derive(Default)]
struct Lines {
    text: String,
    rules: usize,
}

impl Lines {
    fn chain(&mut self, name: &str) {
        self.text.push(':');
        self.text.push_str(name);
        self.text.push_str(" - [0:0]\n");
    }

    fn rule(&mut self, words: &[&str]) {
        self.rule_parts(&[words]);
    }

    fn rule_parts(&mut self, parts: &[&[&str]]) {
        let mut first = true;
        for w in parts.iter().flat_map(|p| p.iter()) {
            if !first {
                self.text.push(' ');
            }
            self.text.push_str(w);
            first = false;
        }
        self.text.push('\n');
        if parts.first().and_then(|p| p.first()) == Some(&"-A") {
            self.rules += 1;
        }
    }
}

/// Which iptables back end a binary drives. They are called by full name, never through the
/// `iptables` alternative, so the machine's choice stays untouched.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Flavor {
    Legacy,
    Nft,
}

impl Flavor {
    pub const ALL: [Flavor; 2] = [Flavor::Legacy, Flavor::Nft];

    pub fn name(self) -> &'static str {
        match self {
            Flavor::Legacy => "iptables-legacy",
            Flavor::Nft => "iptables-nft",
        }
    }

    pub fn restore_binary(self) -> String {
        format!("{}-restore", self.name())
    }

    pub fn save_binary(self) -> String {
        format!("{}-save", self.name())
    }

    /// The binary's full path if it is installed (searched in PATH and the sbin directories,
    /// which a non-login root shell may lack).
    pub fn find_restore(self) -> Option<PathBuf> {
        find_program(&self.restore_binary())
    }

    /// The flags kube-proxy passes to iptables-restore for every sync (iptables 1.6.2+): wait
    /// for the xtables lock, keep tables and chains not in the input, keep counters.
    pub fn restore_args() -> [&'static str; 6] {
        ["-w", "5", "-W", "100000", "--noflush", "--counters"]
    }
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `program` in PATH or the usual sbin directories.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(ns: &str, name: &str, port_name: &str) -> ServicePortName {
        ServicePortName {
            namespace: ns.into(),
            name: name.into(),
            port: port_name.into(),
        }
    }

    fn svc1(endpoints: &[&str]) -> ProxiedServicePort {
        ProxiedServicePort {
            name: port("ns1", "svc1", "p80"),
            protocol: Protocol::Tcp,
            cluster_ip: Ipv4Addr::new(198, 18, 130, 41),
            port: 80,
            node_port: None,
            endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
        }
    }

    fn config() -> ProxierConfig {
        ProxierConfig::lab()
    }

    fn lines_of<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
        text.lines().filter(|l| l.starts_with(prefix)).collect()
    }

    #[test]
    fn chain_names_match_kube_proxy() {
        // Names as they appear on every kubeadm cluster and in kube-proxy's own tests.
        let cases = [
            (
                "default/kubernetes:https",
                Protocol::Tcp,
                "NPX46M4PTMTKRN6Y",
            ),
            (
                "kube-system/kube-dns:dns",
                Protocol::Udp,
                "TCOU7JCQXEZGVUNU",
            ),
            (
                "kube-system/kube-dns:dns-tcp",
                Protocol::Tcp,
                "ERIFXISQEP7F7OF4",
            ),
            (
                "kube-system/kube-dns:metrics",
                Protocol::Tcp,
                "JD5MR3NA4I4DYORP",
            ),
            ("ns1/svc1:p80", Protocol::Tcp, "XPGD46QRK7WJZT7O"),
        ];
        for (name, proto, hash) in cases {
            assert_eq!(
                chain_hash(&format!("{name}{}", proto.lower())),
                hash,
                "{name}"
            );
        }
        // Endpoint chain names hash the endpoint too; the expected value was computed apart from
        // this code (sha256, base32, 16 characters), on a lab address.
        let svc = svc1(&["198.19.180.1:80"]);
        assert_eq!(svc.service_chain(), "KUBE-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(
            svc.endpoint_chain("198.19.180.1:80".parse().unwrap()),
            "KUBE-SEP-LSXSM55ETK73JAFF"
        );
    }

    #[test]
    fn port_names_print_like_kubernetes() {
        assert_eq!(port("a", "b", "").to_string(), "a/b");
        assert_eq!(port("a", "b", "http").to_string(), "a/b:http");
    }

    #[test]
    fn one_service_full_sync() {
        let mut proxier = Proxier::new(config());
        let sync = proxier.sync(&[svc1(&["198.19.180.1:80", "198.19.180.2:80"])]);
        assert_eq!(sync.kind, SyncKind::Full);
        assert!(sync.save_nat_first);
        let text = &sync.restore_input;
        let expected_nat = "\
*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
:KUBE-SEP-LSXSM55ETK73JAFF - [0:0]
:KUBE-SEP-";
        assert!(text.contains(expected_nat), "{text}");
        for line in [
            "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
            "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully",
            "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
            "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 198.18.130.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O",
            "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 198.18.130.41 --dport 80 ! -s 198.19.0.0/16 -j KUBE-MARK-MASQ",
            "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> 198.19.180.1:80\" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-LSXSM55ETK73JAFF",
            "-A KUBE-SEP-LSXSM55ETK73JAFF -m comment --comment ns1/svc1:p80 -s 198.19.180.1 -j KUBE-MARK-MASQ",
            "-A KUBE-SEP-LSXSM55ETK73JAFF -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 198.19.180.1:80",
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT",
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        // The last endpoint is the catch-all: no statistic match.
        let svc_rules = lines_of(text, "-A KUBE-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(svc_rules.len(), 3);
        assert!(!svc_rules[2].contains("statistic"), "{}", svc_rules[2]);
        // The NodePort jump closes KUBE-SERVICES.
        let services = lines_of(text, "-A KUBE-SERVICES");
        assert!(services.last().unwrap().contains("-j KUBE-NODEPORTS"));
        assert!(services
            .last()
            .unwrap()
            .contains("-m addrtype --dst-type LOCAL"));
        // filter before nat, each committed.
        assert!(text.starts_with("*filter\n:KUBE-NODEPORTS - [0:0]\n"));
        assert_eq!(text.matches("COMMIT\n").count(), 2);
        assert!(text.ends_with("COMMIT\n"));
    }

    #[test]
    fn probabilities_split_evenly() {
        let eps: Vec<String> = (1..=5).map(|i| format!("198.19.180.{i}:80")).collect();
        let eps: Vec<&str> = eps.iter().map(String::as_str).collect();
        let sync = Proxier::new(config()).sync(&[svc1(&eps)]);
        let probs: Vec<&str> = lines_of(&sync.restore_input, "-A KUBE-SVC-")
            .iter()
            .filter_map(|l| l.split("--probability ").nth(1))
            .map(|rest| rest.split(' ').next().unwrap())
            .collect();
        assert_eq!(
            probs,
            [
                "0.2000000000",
                "0.2500000000",
                "0.3333333333",
                "0.5000000000"
            ]
        );
    }

    #[test]
    fn masquerade_modes() {
        let svc = [svc1(&["198.19.180.1:80"])];
        let none = Proxier::new(ProxierConfig::default()).sync(&svc);
        assert!(!none
            .restore_input
            .lines()
            .any(|l| l.starts_with("-A KUBE-SVC-") && l.contains("KUBE-MARK-MASQ")));
        let all = Proxier::new(ProxierConfig {
            masquerade_all: true,
            ..config()
        })
        .sync(&svc);
        assert!(all
            .restore_input
            .lines()
            .any(|l| l.starts_with("-A KUBE-SVC-") && l.ends_with("--dport 80 -j KUBE-MARK-MASQ")));
    }

    #[test]
    fn services_without_endpoints_reject_in_filter() {
        let mut empty = svc1(&[]);
        empty.protocol = Protocol::Udp;
        let sync = Proxier::new(config()).sync(&[empty]);
        assert!(sync.restore_input.lines().any(|l| l
            == "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 has no endpoints\" -m udp -p udp -d 198.18.130.41 --dport 80 -j REJECT"));
        assert!(!sync.restore_input.contains("KUBE-SVC-"));
    }

    #[test]
    fn node_ports_go_through_an_external_chain_that_masquerades() {
        let mut svc = svc1(&["198.19.180.1:80"]);
        svc.node_port = Some(30080);
        let sync = Proxier::new(config()).sync(std::slice::from_ref(&svc));
        let ext = svc.external_chain();
        let lines: Vec<&str> = sync.restore_input.lines().collect();
        assert!(lines.contains(&format!(":{ext} - [0:0]").as_str()));
        assert!(lines.contains(&format!("-A KUBE-NODEPORTS -m comment --comment \"ns1/svc1:p80\" -m tcp -p tcp --dport 30080 -j {ext}").as_str()));
        assert!(lines.contains(&format!("-A {ext} -m comment --comment \"masquerade traffic for ns1/svc1:p80 external destinations\" -j KUBE-MARK-MASQ").as_str()));
        assert!(lines.contains(&format!("-A {ext} -j {}", svc.service_chain()).as_str()));

        svc.endpoints.clear();
        let empty = Proxier::new(config()).sync(&[svc]);
        assert!(empty.restore_input.lines().any(|l| l
            == "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"ns1/svc1:p80 has no endpoints\" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 30080 -j REJECT"));
        assert!(!empty.restore_input.contains("KUBE-EXT-"));
    }

    fn many(n: usize, endpoints: usize) -> Vec<ProxiedServicePort> {
        (0..n)
            .map(|i| ProxiedServicePort {
                name: port("default", &format!("svc-{i}"), "http"),
                protocol: Protocol::Tcp,
                cluster_ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 30, 0, 1)) + i as u32),
                port: 80,
                node_port: None,
                endpoints: (0..endpoints)
                    .map(|e| SocketAddrV4::new(Ipv4Addr::new(10, 180, 0, e as u8 + 1), 8080))
                    .collect(),
            })
            .collect()
    }

    #[test]
    fn partial_sync_rewrites_dispatch_and_changed_chains_only() {
        let mut services = many(300, 5);
        let mut proxier = Proxier::new(config());
        let full = proxier.sync(&services);
        assert_eq!(full.kind, SyncKind::Full);
        // 300 dispatch + nodeports, 300 x (masq + 5 jumps), 1,500 x 2 SEP rules, 4 + 4 fixed.
        assert_eq!(full.rules, 301 + 300 * 6 + 1500 * 2 + 8);
        // Large-cluster mode (1,500 endpoints): SEP rules lose their comments.
        assert!(lines_of(&full.restore_input, "-A KUBE-SEP-")
            .iter()
            .all(|l| !l.contains("--comment")));

        let unchanged = proxier.sync(&services);
        assert_eq!(unchanged.kind, SyncKind::Partial);
        // KUBE-SVC chains appear only as jump targets from KUBE-SERVICES.
        assert!(lines_of(&unchanged.restore_input, ":KUBE-SVC-").is_empty());
        assert_eq!(
            lines_of(&unchanged.restore_input, "-A KUBE-SERVICES").len(),
            301
        );

        let old = services[7].endpoints[0];
        services[7].endpoints[0] = SocketAddrV4::new(Ipv4Addr::new(10, 180, 1, 1), 8080);
        let update = proxier.sync(&services);
        assert_eq!(update.kind, SyncKind::Partial);
        assert!(
            !update.save_nat_first,
            "large clusters skip iptables-save on partial syncs"
        );
        let declared = lines_of(&update.restore_input, ":KUBE-S");
        // KUBE-SERVICES (in filter and nat), one SVC chain, five SEP chains: nothing of the
        // other 299 services.
        assert_eq!(declared.len(), 2 + 1 + 5, "{declared:?}");
        assert!(update.restore_input.contains(&services[7].service_chain()));
        assert!(lines_of(
            &update.restore_input,
            &format!(":{}", services[8].service_chain())
        )
        .is_empty());
        assert_eq!(update.deleted_chains, 0);

        // The next full sync lists the table and deletes the endpoint chain that went away.
        let resync = proxier.full_sync(&services);
        assert!(resync.save_nat_first);
        assert_eq!(resync.deleted_chains, 1);
        let stale = services[7].endpoint_chain(old);
        assert!(resync
            .restore_input
            .lines()
            .any(|l| l == format!("-X {stale}")));
        assert!(resync
            .restore_input
            .lines()
            .any(|l| l == format!(":{stale} - [0:0]")));
    }

    #[test]
    fn small_clusters_delete_stale_chains_at_once() {
        let mut services = many(3, 2);
        let mut proxier = Proxier::new(config());
        proxier.sync(&services);
        let gone = services.pop().unwrap();
        let update = proxier.sync(&services);
        assert!(update.save_nat_first);
        assert_eq!(update.deleted_chains, 3);
        assert!(update
            .restore_input
            .lines()
            .any(|l| l == format!("-X {}", gone.service_chain())));
    }

    #[test]
    fn jump_rules_enter_kube_chains_from_base_chains() {
        let text = jump_rules_input();
        for line in [
            "-I PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-I OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-I POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
            "-I FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
            "-I INPUT -j KUBE-FIREWALL",
            "-I FORWARD -m comment --comment \"kubernetes service portals\" -m conntrack --ctstate NEW -j KUBE-SERVICES",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert_eq!(text.matches("COMMIT\n").count(), 2);
    }

    #[test]
    fn removal_undoes_jumps_and_chains() {
        let mut proxier = Proxier::new(config());
        let jumps = jump_rules_input();
        let first = proxier.full_sync(&[svc1(&["198.19.1.11:8080", "198.19.2.11:8080"])]);
        // A later sync dropped an endpoint: its chain was deleted then, not again now.
        let second = proxier.full_sync(&[svc1(&["198.19.1.11:8080"])]);
        let gone = svc1(&["198.19.2.11:8080"]).endpoint_chain("198.19.2.11:8080".parse().unwrap());
        let text = removal_input(&[&jumps, &first.restore_input, &second.restore_input]);
        assert_eq!(text.matches("COMMIT\n").count(), 2, "{text}");
        // Every jump inserted into a base chain is deleted with the same spec.
        for line in jumps.lines().filter(|l| l.starts_with("-I ")) {
            let delete = format!("-D {}", &line[3..]);
            assert!(
                text.lines().any(|l| l == delete),
                "missing {delete:?} in\n{text}"
            );
        }
        // Every KUBE chain is flushed (declared) before deletion, and deleted once.
        let declared = lines_of(&text, ":");
        let deleted = lines_of(&text, "-X ");
        assert_eq!(declared.len(), deleted.len(), "{text}");
        assert!(text.contains(&format!("-X {}\n", KUBE_SERVICES)));
        assert!(!text.contains(&gone), "{gone} was already deleted:\n{text}");
        // Within each table, the flushing declarations come before any -D/-X line.
        for table in text.split("COMMIT") {
            if let (Some(d), Some(r)) = (table.rfind("\n:"), table.find("\n-")) {
                assert!(d < r, "{text}");
            }
        }
        // No base chain is declared (that would reset its policy) and no rule is appended.
        assert!(declared.iter().all(|l| l.starts_with(":KUBE-")), "{text}");
        assert!(!text.contains("-A "), "{text}");
        assert!(!text.contains("\n-D KUBE-"), "{text}");
    }

    #[test]
    fn scenario_services_become_service_ports() {
        let scenario = Scenario::parse(
            r#"
name = "t"
[topology]
nodes = 1
pods_per_node = 3
[[pods]]
match = "n1p*"
labels = { app = "echo" }
[[pods]]
match = "n1p0"
labels = { app = "client" }
[[services]]
name = "echo"
cluster_ip = "198.18.100.10"
selector = { app = "echo" }
ports = [
  { name = "http", port = 80, target_port = 8080 },
  { name = "dns", protocol = "UDP", port = 53, target_port = 5353 },
]
"#,
            Path::new("t.toml"),
        )
        .unwrap();
        let ports = from_scenario(&scenario, &scenario.plan());
        assert_eq!(ports.len(), 2);
        assert_eq!(ports[0].name.to_string(), "default/echo:http");
        assert_eq!(ports[1].protocol, Protocol::Udp);
        assert_eq!(
            ports[1].endpoints,
            [
                "198.19.1.11:5353".parse().unwrap(),
                "198.19.1.12:5353".parse().unwrap()
            ]
        );
    }

    #[test]
    fn flavors_name_their_binaries() {
        assert_eq!(Flavor::Legacy.restore_binary(), "iptables-legacy-restore");
        assert_eq!(Flavor::Nft.save_binary(), "iptables-nft-save");
        assert!(Flavor::restore_args().contains(&"--noflush"));
    }
}

//! Benchmarks on the lab: Weir against kube-proxy's iptables rules, measured in the same run.
//!
//! - [`connect`]: TCP connect latency to a ClusterIP with 1, 1,000 and 10,000 services
//!   installed, through Weir, through kube-proxy-style iptables rules and straight to the
//!   backend, interleaved round by round so drift of the (shared) machine hits every path alike.
//! - [`sync`]: how long programming 5,000 services x 5 endpoints takes: `iptables-restore` of
//!   kube-proxy's rules (full sync and a one-service update), and the Weir agent from state file
//!   to maps.
//! - [`churn`]: the seeds' experiment, the CPU of keeping 5,000 services in sync second by
//!   second through quiet, one service churned, and quiet again.
//! - [`prefilter`]: packets per second of a flood from a deny-listed client, dropped by the XDP
//!   pre-filter, by an iptables raw rule with an ipset, or taken by the stack.
//! - [`policy`]: TCP connect latency to a pod isolated by NetworkPolicy of 10 and 10,000 rules,
//!   through Weir and through the same policy as iptables rules with ipsets ([`netpol`]).
//!
//! Both build their labs through the [`Backend`](weir_lab_core::backend::Backend) trait and run their
//! measuring tools ([`probe`]) on the lab's hosts, so they can move to another backend. They
//! print a table and write JSON next to the lab report. Numbers are reported as ratios against a
//! baseline measured in the same run; nothing here asserts on timing.

pub mod churn;
pub mod connect;
mod iptables;
pub mod kube_proxy;
pub mod netpol;
pub mod policy;
pub mod prefilter;
pub mod probe;
pub mod probes;
pub mod reorder;
pub mod sync;
pub mod throughput;
mod weir;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

use weir_lab_core::backend::{BackendError, BackendKind};
use weir_lab_core::scenario::{Scenario, ScenarioError};
use weir_lab_core::topology::{HostId, Plan};

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// TCP connect latency to the last of N ClusterIP services: Weir, kube-proxy iptables rules
    /// and the backend directly, interleaved in one run.
    Connect(connect::ConnectOptions),
    /// Programming N services x M endpoints: iptables-restore of kube-proxy's rules (full sync,
    /// one-service update) and the Weir agent (state file to maps).
    SyncBaseline(sync::SyncOptions),
    /// The seeds' experiment: N services x M endpoints, quiet, one service churned, quiet, with
    /// the CPU of the agent and of kube-proxy's (emulated) iptables syncs sampled every second.
    Churn(churn::ChurnOptions),
    /// TCP connect latency to a pod isolated by NetworkPolicy of 10 and 10,000 ingress rules:
    /// Weir, the same policy as iptables rules with ipsets, no policy, interleaved in one run.
    Policy(policy::PolicyOptions),
    /// A UDP flood from a deny-listed client: the XDP pre-filter, the same deny-list as an
    /// iptables raw rule with an ipset, and no filter, interleaved in one run.
    Prefilter(prefilter::PrefilterOptions),
}

/// Options every bench takes.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchCommon {
    /// The weir-agent binary [default: weir-agent next to this executable].
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// Where the JSON results go [default: target/weir-lab in the workspace root].
    #[arg(long)]
    pub report_dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = BackendKind::Netns)]
    pub backend: BackendKind,
}

/// Resolved paths the benches work with.
#[derive(Debug, Clone)]
pub struct BenchEnv {
    /// weir-lab itself: the benches run its `probe` subcommand on lab hosts.
    pub exe: PathBuf,
    pub agent: PathBuf,
    pub report_dir: PathBuf,
    pub backend: BackendKind,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    #[error("{0}")]
    Setup(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl BenchError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
        let what = what.into();
        move |source| BenchError::Io { what, source }
    }
}

pub fn run(cmd: &BenchCommand, env: &BenchEnv) -> Result<(), BenchError> {
    std::fs::create_dir_all(&env.report_dir).map_err(BenchError::io(format!(
        "creating {}",
        env.report_dir.display()
    )))?;
    match cmd {
        BenchCommand::Connect(o) => connect::run(o, env).map(|_| ()),
        BenchCommand::SyncBaseline(o) => sync::run(o, env).map(|_| ()),
        BenchCommand::Churn(o) => churn::run(o, env).map(|_| ()),
        BenchCommand::Policy(o) => policy::run(o, env).map(|_| ()),
        BenchCommand::Prefilter(o) => prefilter::run(o, env).map(|_| ()),
    }
}

/// Services 0..N get ClusterIPs from here on, inside 198.18.0.0/15 and clear of the node
/// network (198.18.0.0/24) and the pod CIDRs (198.19.N.0/24).
pub const FIRST_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 1);
pub const MAX_SERVICES: usize = 32_000;
pub const SERVICE_PORT: u16 = 80;
/// Service i targets port FIRST_TARGET_PORT + i, so every service has endpoints of its own
/// (as pods of different deployments would) while five pods serve them all.
pub const FIRST_TARGET_PORT: u16 = 20_000;
/// The label that makes a pod an endpoint of every synthetic service.
const BACKEND_LABEL: (&str, &str) = ("role", "bench-backend");
/// Every endpoint pod but the last carries it; a churned service selects by it, losing one
/// endpoint as if its pod had gone away.
const CHURN_LABEL: (&str, &str) = ("churn", "kept");

/// N ClusterIP services over one node: pod n1p0 is the client, pods n1p1..=n1pE the endpoints
/// every service selects.
#[derive(Debug, Clone, Copy)]
pub struct Synthetic {
    pub services: usize,
    pub endpoints: u8,
}

impl Synthetic {
    pub fn new(services: usize, endpoints: u8) -> Result<Synthetic, BenchError> {
        if services == 0 || services > MAX_SERVICES {
            return Err(BenchError::Setup(format!(
                "services must be 1..={MAX_SERVICES}, not {services}"
            )));
        }
        if endpoints == 0 || endpoints > 50 {
            return Err(BenchError::Setup(format!(
                "endpoints must be 1..=50, not {endpoints}"
            )));
        }
        Ok(Synthetic {
            services,
            endpoints,
        })
    }

    pub fn plan(&self) -> Plan {
        Plan::new(1, self.endpoints + 1, 0, 1500)
    }

    pub fn client(&self) -> HostId {
        HostId::Pod { node: 1, index: 0 }
    }

    pub fn backends(&self) -> impl Iterator<Item = HostId> {
        (1..=self.endpoints).map(|index| HostId::Pod { node: 1, index })
    }

    pub fn cluster_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(FIRST_CLUSTER_IP) + i as u32)
    }

    pub fn target_port(i: usize) -> u16 {
        FIRST_TARGET_PORT + i as u16
    }

    /// The frontend of the last service: last in kube-proxy's KUBE-SERVICES chain, so the one
    /// whose packets walk the whole dispatch list.
    pub fn last_frontend(&self) -> SocketAddrV4 {
        SocketAddrV4::new(Self::cluster_ip(self.services - 1), SERVICE_PORT)
    }

    pub fn last_target_port(&self) -> u16 {
        Self::target_port(self.services - 1)
    }

    /// The services as a lab scenario, parsed and validated like any scenario file; its state
    /// file (Services and EndpointSlices) and kube-proxy's rules both derive from it.
    pub fn scenario(&self, name: &str) -> Result<Scenario, BenchError> {
        let mut toml = format!(
            "name = \"{name}\"\n[topology]\nnodes = 1\npods_per_node = {}\n\
             [agent]\nready_timeout = \"10m\"\n",
            self.endpoints + 1
        );
        for backend in self.backends() {
            let last = HostId::Pod {
                node: 1,
                index: self.endpoints,
            };
            let churn = if backend == last {
                String::new()
            } else {
                format!(", {} = \"{}\"", CHURN_LABEL.0, CHURN_LABEL.1)
            };
            toml.push_str(&format!(
                "[[pods]]\nmatch = \"{backend}\"\nlabels = {{ {} = \"{}\"{churn} }}\n",
                BACKEND_LABEL.0, BACKEND_LABEL.1
            ));
        }
        for i in 0..self.services {
            toml.push_str(&format!(
                "[[services]]\nname = \"svc-{i}\"\ncluster_ip = \"{}\"\n\
                 selector = {{ {} = \"{}\" }}\n\
                 ports = [ {{ name = \"http\", port = {SERVICE_PORT}, target_port = {} }} ]\n",
                Self::cluster_ip(i),
                BACKEND_LABEL.0,
                BACKEND_LABEL.1,
                Self::target_port(i)
            ));
        }
        Ok(Scenario::parse(&toml, Path::new(name))?)
    }
}

/// Step `step` of endpoint churn on service `i` of a synthetic scenario: odd steps take its last
/// endpoint away, even steps bring it back. Each step changes exactly one endpoint.
pub fn churn(scenario: &mut Scenario, i: usize, step: u32) {
    let (key, value) = if step % 2 == 1 {
        CHURN_LABEL
    } else {
        BACKEND_LABEL
    };
    if let Some(svc) = scenario.services.get_mut(i) {
        svc.selector = [(key.to_owned(), value.to_owned())].into();
    }
}

/// The p-th percentile (0..=100) of sorted values, nearest rank.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of a few values (mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Left-aligned first column, right-aligned numbers, two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == 0 {
                out.push_str(&format!("{cell:<w$}"));
            } else {
                out.push_str(&format!("  {cell:>w$}"));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// A short description of the machine for the JSON results.
pub fn host_info() -> serde_json::Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    serde_json::json!({ "kernel": kernel, "cpus": cpus, "loadavg": load })
}

pub(crate) fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A bench run's scratch directory below the report directory, `bench/NAME-PID`: its labs'
/// files, kept only when something failed (see [`RunRoot::finish`]).
pub(crate) struct RunRoot(pub PathBuf);

impl RunRoot {
    pub(crate) fn create(env: &BenchEnv, name: &str) -> Result<RunRoot, BenchError> {
        let dir = env
            .report_dir
            .join("bench")
            .join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(BenchError::io(format!("creating {}", dir.display())))?;
        Ok(RunRoot(dir))
    }

    /// The run went well: its files go, and `bench/` too if nothing else is in it.
    pub(crate) fn finish(self) {
        let _ = std::fs::remove_dir_all(&self.0);
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// Ends a bench whose paths each built a lab: `teardowns` (every path's, all run whatever
/// happened; the first error kept), then, if the measurement went well, the run's files go,
/// the table is printed and the results are written to `report_dir/json_name`.
pub(crate) fn conclude<R: serde::Serialize>(
    outcome: Result<R, BenchError>,
    teardowns: impl IntoIterator<Item = Result<(), BenchError>>,
    run_root: RunRoot,
    env: &BenchEnv,
    json_name: &str,
    table: impl Fn(&R) -> &str,
) -> Result<R, BenchError> {
    let mut teardown_error = None;
    for result in teardowns {
        if let Err(e) = result {
            teardown_error.get_or_insert(e);
        }
    }
    let results = outcome?;
    if let Some(e) = teardown_error {
        return Err(e);
    }
    run_root.finish();
    print!("{}", table(&results));
    let json = env.report_dir.join(json_name);
    write_json(&json, &results)?;
    println!("results: {}", json.display());
    Ok(results)
}

/// The `iptables-restore` of `flavor`, or what to do without it.
pub(crate) fn iptables_restore(flavor: crate::kube_proxy::Flavor) -> Result<PathBuf, BenchError> {
    flavor.find_restore().ok_or_else(|| {
        BenchError::Setup(format!(
            "{} not found: install iptables or pass --no-iptables",
            flavor.restore_binary()
        ))
    })
}

/// The `iptables-save` of `flavor`.
pub(crate) fn iptables_save(flavor: crate::kube_proxy::Flavor) -> Result<PathBuf, BenchError> {
    crate::kube_proxy::find_program(&flavor.save_binary())
        .ok_or_else(|| BenchError::Setup(format!("{} not found", flavor.save_binary())))
}

pub(crate) fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), BenchError> {
    let text = serde_json::to_string_pretty(value).expect("bench results serialize");
    std::fs::write(path, text + "\n").map_err(BenchError::io(format!("writing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[], 50.0), 0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn synthetic_services_stay_in_the_test_range() {
        let s = Synthetic::new(MAX_SERVICES, 5).unwrap();
        assert!(weir_lab_core::topology::is_test_address(
            *s.last_frontend().ip()
        ));
        assert!(Synthetic::cluster_ip(MAX_SERVICES - 1) < Ipv4Addr::new(198, 19, 0, 0));
        assert!(Synthetic::new(0, 5).is_err());
        assert!(Synthetic::new(1, 0).is_err());
        let plan = s.plan();
        assert_eq!(plan.pods.len(), 6);
        assert_eq!(plan.ip(s.client()), Some(Ipv4Addr::new(198, 19, 1, 10)));
    }

    #[test]
    fn synthetic_scenario_feeds_agent_and_kube_proxy_alike() {
        let s = Synthetic::new(3, 5).unwrap();
        let scenario = s.scenario("bench-test").unwrap();
        let plan = s.plan();
        let ports = crate::kube_proxy::from_scenario(&scenario, &plan);
        assert_eq!(ports.len(), 3);
        assert_eq!(ports[2].cluster_ip, *s.last_frontend().ip());
        assert_eq!(ports[2].endpoints.len(), 5);
        assert!(ports[2]
            .endpoints
            .iter()
            .all(|e| e.port() == s.last_target_port()));
        assert!(!ports[2]
            .endpoints
            .iter()
            .any(|e| Some(*e.ip()) == plan.ip(s.client())));
        let yaml = weir_lab_core::k8s::cluster_state(&scenario, &plan);
        assert_eq!(yaml.matches("kind: EndpointSlice").count(), 3);

        let mut churned = scenario.clone();
        churn(&mut churned, 1, 1);
        let after = crate::kube_proxy::from_scenario(&churned, &plan);
        assert_eq!(after[1].endpoints.len(), 4);
        assert_eq!(after[1].endpoints[..], ports[1].endpoints[..4]);
        assert_eq!(after[0], ports[0]);
        churn(&mut churned, 1, 2);
        assert_eq!(crate::kube_proxy::from_scenario(&churned, &plan), ports);
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["path", "p50"],
            &[
                vec!["weir".into(), "1.0".into()],
                vec!["direct".into(), "10.25".into()],
            ],
        );
        assert_eq!(t, "path      p50\nweir      1.0\ndirect  10.25\n");
    }
}

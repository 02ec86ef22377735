//! What a scenario changes while it runs: `[[steps]]` on a timeline, each doing actions on the
//! cluster (Services, pods, endpoint conditions, EndpointSlices), then waiting, then checking;
//! and `[[probes]]`, traffic that keeps flowing across the steps and is judged after them.
//!
//! The cluster the lab plays is a [`ClusterModel`]: the Services as they are now, the pods that
//! are gone, the endpoint conditions set and the slices deleted. Actions are pure edits of it,
//! so validation replays the whole timeline at load time (a step that names an unknown pod or
//! leaves a Service invalid fails in milliseconds) and the runner replays the same edits for
//! real, writing the state the agents read after each step.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::policy_objects::PolicyError;
use crate::scenario::{glob_match, CheckSpec, Family, Protocol, ServiceSpec, StopSignal};
use crate::topology::Plan;

/// Upper bound for a probe's pace, so a typo cannot flood a lab.
pub const MIN_PROBE_INTERVAL: Duration = Duration::from_millis(10);
/// How long a deleted pod's servers keep running after its endpoints are gone, by default: as
/// a real pod keeps serving through its grace period.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    #[serde(default)]
    pub name: Option<String>,
    /// Done in order, at once (a `wait` action pauses between two).
    #[serde(default)]
    pub actions: Vec<Action>,
    /// After the actions, before the checks: time for the agents to react.
    #[serde(default, with = "humantime_serde")]
    pub wait: Option<Duration>,
    #[serde(default)]
    pub checks: Vec<CheckSpec>,
}

impl StepSpec {
    /// "step 2 (name)" or "step 2: delete_pod n2p0, ...".
    pub fn title(&self, index: usize) -> String {
        match &self.name {
            Some(name) => format!("step {} ({name})", index + 1),
            None => {
                let actions: Vec<String> = self.actions.iter().map(Action::describe).collect();
                format!("step {}: {}", index + 1, actions.join(", "))
            }
        }
    }
}

/// One change to the cluster, or a pause.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Replaces the fields of `set` in a Service's `[[services]]` entry (ports, selector,
    /// labels, type, ...); a deleted Service comes back with them.
    UpdateService {
        service: String,
        set: toml::Table,
    },
    DeleteService {
        service: String,
    },
    /// The pods' endpoints leave every slice at once; their servers stop after `grace`.
    DeletePod {
        pods: String,
        #[serde(default, with = "humantime_serde")]
        grace: Option<Duration>,
    },
    /// Deleted pods come back (same name and address): servers first, then endpoints.
    RecreatePod {
        pods: String,
    },
    /// Endpoint conditions of the matching pods, in the slices of `service` (or of every
    /// Service selecting them); unset ones keep their value.
    SetConditions {
        pods: String,
        #[serde(default)]
        service: Option<String>,
        #[serde(default)]
        ready: Option<bool>,
        #[serde(default)]
        serving: Option<bool>,
        #[serde(default)]
        terminating: Option<bool>,
    },
    /// One of a Service's generated slices (`index` in the order they are written: IPv4 ones
    /// first), which stays deleted until the Service is deleted and comes back; or the
    /// hand-written slice `name`.
    DeleteSlice {
        #[serde(default)]
        service: Option<String>,
        #[serde(default)]
        index: usize,
        #[serde(default)]
        name: Option<String>,
    },
    Wait {
        #[serde(with = "humantime_serde")]
        duration: Duration,
    },
    /// A NetworkPolicy (YAML, as users write it): created, or replacing the one of the same
    /// namespace and name.
    ApplyPolicy {
        policy: String,
    },
    DeletePolicy {
        #[serde(default = "default_namespace")]
        namespace: String,
        name: String,
    },
    /// The matching pods' labels: `set` added or replaced, `remove` taken away. Services and
    /// policies select by the new labels from then on.
    LabelPods {
        pods: String,
        #[serde(default)]
        set: BTreeMap<String, String>,
        #[serde(default)]
        remove: Vec<String>,
    },
    /// A namespace's labels, as namespace selectors see them.
    LabelNamespace {
        name: String,
        #[serde(default)]
        set: BTreeMap<String, String>,
        #[serde(default)]
        remove: Vec<String>,
    },
    /// The node's agent stopped by `signal` and started again, ready before the step goes on.
    RestartAgent {
        node: String,
        #[serde(default = "default_restart_signal")]
        signal: StopSignal,
    },
}

fn default_namespace() -> String {
    crate::k8s::NAMESPACE.to_owned()
}

fn default_restart_signal() -> StopSignal {
    StopSignal::Term
}

/// "set a=b, remove c" for a label change.
fn describe_labels(set: &BTreeMap<String, String>, remove: &[String]) -> String {
    let mut parts: Vec<String> = set.iter().map(|(k, v)| format!("{k}={v}")).collect();
    parts.extend(remove.iter().map(|k| format!("-{k}")));
    parts.join(" ")
}

impl Action {
    pub fn describe(&self) -> String {
        match self {
            Action::UpdateService { service, set } => {
                let keys: Vec<&str> = set.keys().map(String::as_str).collect();
                format!("update {service} ({})", keys.join(", "))
            }
            Action::DeleteService { service } => format!("delete service {service}"),
            Action::DeletePod { pods, .. } => format!("delete pod {pods}"),
            Action::RecreatePod { pods } => format!("recreate pod {pods}"),
            Action::SetConditions {
                pods,
                ready,
                serving,
                terminating,
                ..
            } => {
                let mut set = Vec::new();
                for (name, v) in [
                    ("ready", ready),
                    ("serving", serving),
                    ("terminating", terminating),
                ] {
                    if let Some(v) = v {
                        set.push(format!("{name}={v}"));
                    }
                }
                format!("{pods} {}", set.join(" "))
            }
            Action::DeleteSlice {
                name: Some(name), ..
            } => format!("delete slice {name}"),
            Action::DeleteSlice { service, index, .. } => format!(
                "delete slice {index} of {}",
                service.as_deref().unwrap_or("?")
            ),
            Action::Wait { duration } => format!("wait {}", humantime::format_duration(*duration)),
            Action::ApplyPolicy { policy } => match crate::policy_objects::policy_key(policy) {
                Ok((namespace, name)) => format!("apply policy {namespace}/{name}"),
                Err(_) => "apply policy".to_owned(),
            },
            Action::DeletePolicy { namespace, name } => {
                format!("delete policy {namespace}/{name}")
            }
            Action::LabelPods { pods, set, remove } => {
                format!("label {pods} {}", describe_labels(set, remove))
            }
            Action::LabelNamespace { name, set, remove } => {
                format!("label namespace {name} {}", describe_labels(set, remove))
            }
            Action::RestartAgent { node, signal } => {
                format!("restart agent on {node} ({})", signal.name())
            }
        }
    }
}

/// Traffic started before the steps and judged after them.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSpec {
    #[serde(default)]
    pub name: Option<String>,
    /// "udp": datagrams from one socket (one flow), each answered by the echo server; "tcp":
    /// HTTP requests over one connection that stays open.
    pub kind: Protocol,
    pub from: String,
    pub service: String,
    pub port: u16,
    #[serde(default)]
    pub family: Family,
    #[serde(default = "default_probe_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// UDP: datagram size in bytes.
    #[serde(default)]
    pub size: Option<u32>,
    #[serde(default)]
    pub expect: ProbeExpect,
}

fn default_probe_interval() -> Duration {
    Duration::from_millis(100)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeExpect {
    /// Requests without an answer, at most.
    pub max_lost: u32,
    /// An endpoint removed from the Service (deleted, not ready, its slice gone) may still
    /// answer for this long after the step that removed it, while the agents react; never
    /// after.
    #[serde(with = "humantime_serde")]
    pub settle: Duration,
    /// TCP: the connection must end with a reset (connection reset, or refused on reconnect)
    /// within this after the step that removed its endpoint; unset, it must last to the end.
    #[serde(with = "humantime_serde")]
    pub reset_within: Option<Duration>,
}

impl Default for ProbeExpect {
    fn default() -> Self {
        ProbeExpect {
            max_lost: 0,
            settle: Duration::from_secs(1),
            reset_within: None,
        }
    }
}

impl ProbeSpec {
    pub fn title(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            format!(
                "{} probe {} -> {}:{} every {}",
                self.kind.lower(),
                self.from,
                self.service,
                self.port,
                humantime::format_duration(self.interval)
            )
        })
    }
}

/// An endpoint's conditions, as an EndpointSlice carries them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conditions {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Default for Conditions {
    fn default() -> Self {
        Conditions {
            ready: true,
            serving: true,
            terminating: false,
        }
    }
}

/// The cluster as the lab plays it at one point of the timeline.
#[derive(Clone, Debug)]
pub struct ClusterModel {
    /// Every Service the timeline has known, in file order, and whether it exists now.
    pub services: Vec<(ServiceSpec, bool)>,
    /// Each pod's labels, as `label_pods` leaves them.
    pub labels: BTreeMap<String, BTreeMap<String, String>>,
    pub gone_pods: BTreeSet<String>,
    /// (service, pod) -> conditions other than ready/serving.
    pub conditions: BTreeMap<(String, String), Conditions>,
    /// (service, slice index) deleted.
    pub deleted_slices: BTreeSet<(String, usize)>,
    /// `[[endpoint_slices]]`, and whether each exists now.
    pub manual_slices: Vec<(ManualSlice, bool)>,
    /// Namespaces, Pod objects and NetworkPolicies (written only when the scenario has
    /// policies).
    pub policy: crate::policy_objects::PolicyObjects,
    /// The scenario's `objects`, written as given.
    pub objects: Vec<String>,
}

/// A hand-written EndpointSlice (`[[endpoint_slices]]`), as for a Service without a selector:
/// written as given, whatever the Service selects. Its pods are not deleted with `delete_pod`
/// (nothing rewrites it), so a scenario says what it holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManualSlice {
    pub name: String,
    /// Its `kubernetes.io/service-name` label.
    pub service: String,
    #[serde(default)]
    pub family: Family,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub endpoints: Vec<ManualEndpoint>,
    pub ports: Vec<ManualPort>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManualEndpoint {
    /// The pod whose address (of the slice's family) it lists.
    pub pod: String,
    #[serde(default = "yes")]
    pub ready: bool,
    #[serde(default = "yes")]
    pub serving: bool,
    #[serde(default)]
    pub terminating: bool,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManualPort {
    /// Matches the Service port of the same name.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub protocol: Protocol,
    pub port: u16,
}

/// Why an action cannot apply where it stands in the timeline.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("pods {0:?} match no pod")]
    NoPodMatches(String),
    #[error("no live service {0:?}")]
    NoService(String),
    #[error("pod {0} is already deleted")]
    PodDeleted(String),
    #[error("pod {0} was not deleted")]
    PodNotDeleted(String),
    #[error("{0:?} are no live service's endpoints")]
    NotEndpoints(Vec<String>),
    #[error("service {service} has {count} slice(s), no index {index}")]
    NoSlice {
        service: String,
        count: usize,
        index: usize,
    },
    #[error("slice {index} of {service} is already deleted")]
    SliceDeleted { service: String, index: usize },
    #[error("no hand-written slice {0:?} to delete")]
    NoManualSlice(String),
    #[error("delete_slice: give a service (and an index) or the name of a hand-written slice")]
    WhichSlice,
    #[error("update_service {0}: a Service cannot be renamed")]
    Rename(String),
    #[error("update_service {service}: {source}")]
    Update {
        service: String,
        source: Box<toml::de::Error>,
    },
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("{0}: give labels to set or to remove")]
    NoLabels(&'static str),
    #[error("no node {0:?}")]
    NoNode(String),
}

/// What applying one action asks of the world beyond the state file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SideEffect {
    StopPods { pods: Vec<String>, grace: Duration },
    StartPods(Vec<String>),
    Sleep(Duration),
    RestartAgent { node: String, signal: StopSignal },
}

impl ClusterModel {
    /// The cluster as the scenario starts it.
    pub fn new(
        scenario: &crate::scenario::Scenario,
        labels: BTreeMap<String, BTreeMap<String, String>>,
    ) -> ClusterModel {
        ClusterModel {
            policy: crate::policy_objects::PolicyObjects::new(scenario, labels.keys()),
            services: scenario
                .services
                .iter()
                .map(|s| (s.clone(), true))
                .collect(),
            manual_slices: scenario
                .endpoint_slices
                .iter()
                .map(|s| (s.clone(), true))
                .collect(),
            labels,
            gone_pods: BTreeSet::new(),
            conditions: BTreeMap::new(),
            deleted_slices: BTreeSet::new(),
            objects: scenario.objects.clone(),
        }
    }

    /// The hand-written slices that exist now.
    pub fn live_manual_slices(&self) -> impl Iterator<Item = &ManualSlice> {
        self.manual_slices
            .iter()
            .filter(|(_, live)| *live)
            .map(|(s, _)| s)
    }

    /// The Services that exist now.
    pub fn live_services(&self) -> impl Iterator<Item = &ServiceSpec> {
        self.services
            .iter()
            .filter(|(_, live)| *live)
            .map(|(s, _)| s)
    }

    pub fn service(&self, name: &str) -> Option<&ServiceSpec> {
        self.live_services().find(|s| s.name == name)
    }

    /// The pods a Service selects that exist, in plan order, with their conditions. Like
    /// Kubernetes, an empty selector selects nothing.
    pub fn endpoints<'p>(
        &self,
        svc: &ServiceSpec,
        plan: &'p Plan,
    ) -> Vec<(&'p crate::topology::PodPlan, Conditions)> {
        if svc.selector.is_empty() {
            return Vec::new();
        }
        plan.pods
            .iter()
            .filter(|pod| !self.gone_pods.contains(&pod.name))
            .filter(|pod| {
                let l = &self.labels[&pod.name];
                svc.selector.iter().all(|(k, v)| l.get(k) == Some(v))
            })
            .map(|pod| {
                let c = self
                    .conditions
                    .get(&(svc.name.clone(), pod.name.clone()))
                    .copied()
                    .unwrap_or_default();
                (pod, c)
            })
            .collect()
    }

    /// The pods that get a Service's new traffic: its ready endpoints in slices that exist, or,
    /// when none is ready, the serving ones (as kube-proxy falls back to terminating endpoints).
    pub fn serving_pods(&self, svc: &ServiceSpec, plan: &Plan) -> Vec<String> {
        let listed = crate::k8s::listed_endpoints(self, svc, plan);
        let ready: Vec<String> = listed
            .iter()
            .filter(|(_, c)| c.ready)
            .map(|(p, _)| p.clone())
            .collect();
        if !ready.is_empty() {
            return ready;
        }
        listed
            .into_iter()
            .filter(|(_, c)| c.serving)
            .map(|(p, _)| p)
            .collect()
    }

    /// Service name -> the pods that answer it now.
    pub fn serving_map(&self, plan: &Plan) -> BTreeMap<String, Vec<String>> {
        self.live_services()
            .map(|s| (s.name.clone(), self.serving_pods(s, plan)))
            .collect()
    }

    fn pods_matching(&self, pattern: &str, plan: &Plan) -> Result<Vec<String>, ActionError> {
        let pods: Vec<String> = plan
            .pods
            .iter()
            .filter(|p| glob_match(pattern, &p.name))
            .map(|p| p.name.clone())
            .collect();
        if pods.is_empty() {
            return Err(ActionError::NoPodMatches(pattern.to_owned()));
        }
        Ok(pods)
    }

    /// The fields of `set` replace the Service's; a deleted Service comes back with them.
    fn update_service(
        &mut self,
        service: &str,
        set: &toml::Table,
    ) -> Result<Option<SideEffect>, ActionError> {
        if set.contains_key("name") {
            return Err(ActionError::Rename(service.to_owned()));
        }
        let entry = self
            .services
            .iter_mut()
            .find(|(s, _)| s.name == *service)
            .ok_or_else(|| ActionError::NoService(service.to_owned()))?;
        // A spec holds strings, numbers, durations and maps with string keys: it always
        // serializes.
        let mut table = toml::Table::try_from(&entry.0).expect("service spec serializes");
        for (k, v) in set {
            table.insert(k.clone(), v.clone());
        }
        let updated: ServiceSpec = table.try_into().map_err(|source| ActionError::Update {
            service: service.to_owned(),
            source: Box::new(source),
        })?;
        *entry = (updated, true);
        Ok(None)
    }

    /// `[ready, serving, terminating]`, each set when given.
    fn set_conditions(
        &mut self,
        pods: &[String],
        service: Option<&str>,
        [ready, serving, terminating]: [Option<bool>; 3],
        plan: &Plan,
    ) -> Result<Option<SideEffect>, ActionError> {
        let services: Vec<ServiceSpec> = match service {
            Some(name) => vec![self
                .service(name)
                .ok_or_else(|| ActionError::NoService(name.to_owned()))?
                .clone()],
            None => self.live_services().cloned().collect(),
        };
        let mut touched = 0;
        for svc in &services {
            let selected: Vec<String> = self
                .endpoints(svc, plan)
                .into_iter()
                .map(|(p, _)| p.name.clone())
                .collect();
            for pod in pods.iter().filter(|p| selected.contains(*p)) {
                let c = self
                    .conditions
                    .entry((svc.name.clone(), pod.clone()))
                    .or_default();
                c.ready = ready.unwrap_or(c.ready);
                c.serving = serving.unwrap_or(c.serving);
                c.terminating = terminating.unwrap_or(c.terminating);
                touched += 1;
            }
        }
        if touched == 0 {
            return Err(ActionError::NotEndpoints(pods.to_vec()));
        }
        Ok(None)
    }

    /// Applies one action; what it needs done outside the state file comes back.
    pub fn apply(
        &mut self,
        action: &Action,
        plan: &Plan,
    ) -> Result<Option<SideEffect>, ActionError> {
        match action {
            Action::UpdateService { service, set } => self.update_service(service, set),
            Action::DeleteService { service } => {
                let entry = self
                    .services
                    .iter_mut()
                    .find(|(s, live)| s.name == *service && *live)
                    .ok_or_else(|| ActionError::NoService(service.clone()))?;
                entry.1 = false;
                // A Service created again gets fresh slices.
                self.deleted_slices.retain(|(s, _)| s != service);
                Ok(None)
            }
            Action::DeletePod { pods, grace } => {
                let pods = self.pods_matching(pods, plan)?;
                if let Some(gone) = pods.iter().find(|p| self.gone_pods.contains(*p)) {
                    return Err(ActionError::PodDeleted(gone.clone()));
                }
                self.gone_pods.extend(pods.iter().cloned());
                Ok(Some(SideEffect::StopPods {
                    pods,
                    grace: grace.unwrap_or(DEFAULT_GRACE),
                }))
            }
            Action::RecreatePod { pods } => {
                let pods = self.pods_matching(pods, plan)?;
                if let Some(live) = pods.iter().find(|p| !self.gone_pods.contains(*p)) {
                    return Err(ActionError::PodNotDeleted(live.clone()));
                }
                for p in &pods {
                    self.gone_pods.remove(p);
                }
                Ok(Some(SideEffect::StartPods(pods)))
            }
            Action::SetConditions {
                pods,
                service,
                ready,
                serving,
                terminating,
            } => {
                let pods = self.pods_matching(pods, plan)?;
                let set = [*ready, *serving, *terminating];
                self.set_conditions(&pods, service.as_deref(), set, plan)
            }
            Action::DeleteSlice {
                name: Some(name), ..
            } => {
                let slice = self
                    .manual_slices
                    .iter_mut()
                    .find(|(s, live)| s.name == *name && *live)
                    .ok_or_else(|| ActionError::NoManualSlice(name.clone()))?;
                slice.1 = false;
                Ok(None)
            }
            Action::DeleteSlice {
                service: Some(service),
                index,
                name: None,
            } => {
                let svc = self
                    .service(service)
                    .ok_or_else(|| ActionError::NoService(service.clone()))?;
                let count = crate::k8s::slice_count(self, svc, plan);
                if *index >= count {
                    return Err(ActionError::NoSlice {
                        service: service.clone(),
                        count,
                        index: *index,
                    });
                }
                if !self.deleted_slices.insert((service.clone(), *index)) {
                    return Err(ActionError::SliceDeleted {
                        service: service.clone(),
                        index: *index,
                    });
                }
                Ok(None)
            }
            Action::DeleteSlice {
                service: None,
                name: None,
                ..
            } => Err(ActionError::WhichSlice),
            Action::Wait { duration } => Ok(Some(SideEffect::Sleep(*duration))),
            Action::ApplyPolicy { policy } => {
                self.policy.apply_policy(policy)?;
                Ok(None)
            }
            Action::DeletePolicy { namespace, name } => {
                self.policy.delete_policy(namespace, name)?;
                Ok(None)
            }
            Action::LabelPods { pods, set, remove } => {
                if set.is_empty() && remove.is_empty() {
                    return Err(ActionError::NoLabels("label_pods"));
                }
                for pod in self.pods_matching(pods, plan)? {
                    let labels = self.labels.entry(pod).or_default();
                    labels.extend(set.clone());
                    labels.retain(|k, _| !remove.contains(k));
                }
                Ok(None)
            }
            Action::LabelNamespace { name, set, remove } => {
                if set.is_empty() && remove.is_empty() {
                    return Err(ActionError::NoLabels("label_namespace"));
                }
                self.policy.label_namespace(name, set, remove)?;
                Ok(None)
            }
            Action::RestartAgent { node, signal } => {
                if !matches!(plan.host(node), Some(crate::topology::HostId::Node(_))) {
                    return Err(ActionError::NoNode(node.clone()));
                }
                Ok(Some(SideEffect::RestartAgent {
                    node: node.clone(),
                    signal: *signal,
                }))
            }
        }
    }
}

impl crate::scenario::Scenario {
    /// Replays the steps on the model: every action must apply, every point of the timeline
    /// must be a valid set of Services, and every check must make sense where it runs.
    pub(crate) fn validate_timeline(
        &self,
        plan: &Plan,
    ) -> Result<(), crate::scenario::ScenarioError> {
        use crate::topology::HostId;
        if (!self.steps.is_empty() || !self.probes.is_empty()) && !self.agent.enabled {
            return Err(self.invalid("steps and probes need the agent"));
        }
        for probe in &self.probes {
            let title = probe.title();
            let bad = |m: String| self.invalid(format!("probe {title:?}: {m}"));
            if !matches!(plan.host(&probe.from), Some(HostId::Pod { .. })) {
                return Err(bad(format!("{:?} is not a pod", probe.from)));
            }
            let svc = self
                .service(&probe.service)
                .ok_or_else(|| bad(format!("no service {:?}", probe.service)))?;
            if !svc
                .ports
                .iter()
                .any(|p| p.port == probe.port && p.protocol == probe.kind)
            {
                return Err(bad(format!(
                    "service {} has no {} port {}",
                    svc.name,
                    probe.kind.lower(),
                    probe.port
                )));
            }
            if svc.cluster_ip_of(probe.family).is_none() {
                return Err(bad(
                    "the service has no cluster IP of the probe's family".into()
                ));
            }
            if probe.interval < MIN_PROBE_INTERVAL || probe.interval > Duration::from_secs(10) {
                return Err(bad("interval must be 10ms..=10s".into()));
            }
            if probe.size.is_some() && probe.kind != Protocol::Udp {
                return Err(bad("size is for UDP probes".into()));
            }
            if probe
                .size
                .is_some_and(|n| !(16..=crate::scenario::MAX_DATAGRAM).contains(&n))
            {
                return Err(bad(format!(
                    "size must be 16..={}",
                    crate::scenario::MAX_DATAGRAM
                )));
            }
            if probe.expect.reset_within.is_some() && probe.kind != Protocol::Tcp {
                return Err(bad("reset_within is for TCP probes".into()));
            }
        }
        self.validate_manual_slices(plan)?;
        let mut model = ClusterModel::new(self, crate::k8s::pod_labels(self, plan));
        let mut total_wait = Duration::ZERO;
        for (i, step) in self.steps.iter().enumerate() {
            let title = step.title(i);
            let bad = |m: String| self.invalid(format!("{title}: {m}"));
            for action in &step.actions {
                if let Some(SideEffect::Sleep(d) | SideEffect::StopPods { grace: d, .. }) =
                    model.apply(action, plan).map_err(|e| bad(e.to_string()))?
                {
                    total_wait += d;
                }
            }
            total_wait += step.wait.unwrap_or_default();
            if total_wait > crate::scenario::MAX_WAIT {
                return Err(bad("the steps wait more than 10m in all".into()));
            }
            let at_step = self.at(&model);
            at_step
                .validate_services(model.live_services())
                .map_err(|e| bad(e.to_string()))?;
            for check in &step.checks {
                at_step.validate_check(check, plan)?;
            }
        }
        Ok(())
    }

    /// This scenario with the Services as `model` has them (deleted ones too, in their last
    /// version, so a check may show they no longer answer): what a step's checks see.
    pub fn at(&self, model: &ClusterModel) -> crate::scenario::Scenario {
        crate::scenario::Scenario {
            services: model.services.iter().map(|(s, _)| s.clone()).collect(),
            steps: Vec::new(),
            probes: Vec::new(),
            ..self.clone()
        }
    }

    /// Hand-written slices: names unique, pods and the Service known, ports non-zero.
    fn validate_manual_slices(&self, plan: &Plan) -> Result<(), crate::scenario::ScenarioError> {
        let mut names = BTreeSet::new();
        for slice in &self.endpoint_slices {
            let bad = |m: String| self.invalid(format!("endpoint slice {}: {m}", slice.name));
            if slice.name.is_empty() || !names.insert(slice.name.as_str()) {
                return Err(bad("names must be non-empty and unique".into()));
            }
            if self.service(&slice.service).is_none() {
                return Err(bad(format!("no service {:?}", slice.service)));
            }
            if slice.family == Family::Ipv6 && !self.topology.ipv6 {
                return Err(bad("IPv6 needs topology.ipv6".into()));
            }
            for e in &slice.endpoints {
                if plan.pod(&e.pod).is_none() {
                    return Err(bad(format!("{:?} is not a pod", e.pod)));
                }
            }
            if slice.ports.is_empty() || slice.ports.iter().any(|p| p.port == 0) {
                return Err(bad("give ports, each non-zero".into()));
            }
        }
        Ok(())
    }

    /// Every version of every Service the timeline holds, for the pods to serve all their
    /// ports from the start.
    pub fn all_service_versions(&self, plan: &Plan) -> Vec<ServiceSpec> {
        let mut out = self.services.clone();
        let mut model = ClusterModel::new(self, crate::k8s::pod_labels(self, plan));
        for step in &self.steps {
            for action in &step.actions {
                if model.apply(action, plan).is_ok() {
                    if let Action::UpdateService { service, .. } = action {
                        out.extend(model.service(service).cloned());
                    }
                }
            }
        }
        out
    }
}

impl crate::scenario::Scenario {
    /// Everything a run reports as a check: checks, agent restarts, the steps' checks and the
    /// probes.
    pub fn check_count(&self) -> usize {
        self.checks.len()
            + self.agent_restarts.len()
            + self.steps.iter().map(|s| s.checks.len()).sum::<usize>()
            + self.probes.len()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde::Deserialize;

    use crate::scenario::{Scenario, ScenarioError};

    const BASE: &str = r#"
name = "t"
[topology]
nodes = 2
pods_per_node = 3
ipv6 = true
[[pods]]
match = "n2*"
labels = { app = "echo" }
[[services]]
name = "echo"
cluster_ip = "198.18.100.10"
selector = { app = "echo" }
ports = [ { name = "dns", protocol = "UDP", port = 53, target_port = 5353 }, { name = "http", port = 80, target_port = 8080 } ]
[[probes]]
kind = "udp"
from = "n1p0"
service = "echo"
port = 53
"#;

    fn parse(extra: &str) -> Result<Scenario, ScenarioError> {
        Scenario::parse(&format!("{BASE}{extra}"), Path::new("t.toml"))
    }

    fn invalid(extra: &str) -> String {
        match parse(extra) {
            Err(ScenarioError::Invalid { message, .. }) => message,
            other => panic!("accepted or failed otherwise: {other:?}"),
        }
    }

    #[test]
    fn steps_parse_and_replay() {
        let s = parse(
            r#"
[[steps]]
name = "churn"
actions = [
  { action = "delete_pod", pods = "n2p0", grace = "200ms" },
  { action = "set_conditions", pods = "n2p1", ready = false },
  { action = "wait", duration = "100ms" },
  { action = "update_service", service = "echo", set = { ports = [ { name = "dns", protocol = "UDP", port = 53, target_port = 5353 } ] } },
  { action = "delete_slice", service = "echo", index = 0 },
]
wait = "1s"
[[steps.checks]]
kind = "frontend"
service = "echo"
port = 80
present = false
[[steps.checks]]
kind = "http"
from = "n1p0"
service = "echo"
port = 80
requests = 1
expect = { all_answered = false, none_answered = true }
"#,
        )
        .unwrap();
        assert_eq!(s.steps[0].actions.len(), 5);
        assert_eq!(s.check_count(), 3);
        let plan = s.plan();
        let mut model = super::ClusterModel::new(&s, crate::k8s::pod_labels(&s, &plan));
        let echo = s.services[0].clone();
        assert_eq!(model.serving_pods(&echo, &plan), ["n2p0", "n2p1", "n2p2"]);
        for action in &s.steps[0].actions[..2] {
            model.apply(action, &plan).unwrap();
        }
        // n2p0 gone, n2p1 not ready (but still serving): only n2p2 takes new traffic.
        assert_eq!(model.serving_pods(&echo, &plan), ["n2p2"]);
        // Deleted pods must come back before they can be deleted again.
        assert!(model.apply(&s.steps[0].actions[0], &plan).is_err());
        // The pods serve the dropped port from the start, since the first version has it.
        let versions = s.all_service_versions(&plan);
        assert_eq!(versions.len(), 2);
        assert_eq!(versions[1].ports.len(), 1);
    }

    /// The policy actions edit the model's policies, pod labels and namespace labels, and the
    /// state written after each step shows them; a Service selecting by label follows its pods.
    #[test]
    fn policy_steps_replay_on_the_model() {
        let s = parse(
            r#"
[[namespaces]]
name = "dev"
[[steps]]
actions = [
  { action = "apply_policy", policy = """
kind: NetworkPolicy
metadata: {name: p, namespace: dev}
spec: {podSelector: {}}
""" },
  { action = "apply_policy", policy = """
kind: NetworkPolicy
metadata: {name: p, namespace: dev}
spec: {podSelector: {matchLabels: {replaced: yes}}}
""" },
  { action = "label_pods", pods = "n1p0", set = { app = "echo", role = "client" } },
  { action = "label_pods", pods = "n2p0", remove = ["app"] },
  { action = "label_namespace", name = "dev", set = { access = "granted" } },
  { action = "restart_agent", node = "node2", signal = "KILL" },
]
[[steps]]
actions = [
  { action = "delete_policy", namespace = "dev", name = "p" },
  { action = "label_namespace", name = "dev", remove = ["access"] },
]
"#,
        )
        .unwrap();
        let plan = s.plan();
        let mut model = super::ClusterModel::new(&s, crate::k8s::pod_labels(&s, &plan));
        // Policies come later: the Pod and Namespace objects are written from the start.
        assert!(crate::k8s::cluster_state_of(&model, &plan).contains("kind: Pod"));
        let echo = s.services[0].clone();
        let effects: Vec<_> = s.steps[0]
            .actions
            .iter()
            .map(|a| model.apply(a, &plan).unwrap())
            .collect();
        assert_eq!(model.policy.policies.len(), 1, "replaced by namespace/name");
        assert!(model.policy.policies[0].contains("replaced"));
        assert_eq!(model.serving_pods(&echo, &plan), ["n1p0", "n2p1", "n2p2"]);
        assert_eq!(model.labels["n1p0"]["role"], "client");
        assert_eq!(model.policy.namespaces["dev"]["access"], "granted");
        assert_eq!(
            effects.last().unwrap(),
            &Some(super::SideEffect::RestartAgent {
                node: "node2".into(),
                signal: crate::scenario::StopSignal::Kill
            })
        );
        let state = crate::k8s::cluster_state_of(&model, &plan);
        assert!(state.contains("role: client") && state.contains("access: granted"));
        assert!(state.contains("replaced: yes"));
        for action in &s.steps[1].actions {
            model.apply(action, &plan).unwrap();
        }
        assert!(model.policy.policies.is_empty());
        assert!(!model.policy.namespaces["dev"].contains_key("access"));
        assert!(!crate::k8s::cluster_state_of(&model, &plan).contains("NetworkPolicy"));
        assert_eq!(
            s.steps[1].title(1),
            "step 2: delete policy dev/p, label namespace dev -access"
        );
    }

    #[test]
    fn policy_steps_are_validated_at_load() {
        for (action, says) in [
            (
                r#"{ action = "apply_policy", policy = "kind: NetworkPolicy\nmetadata: {name: p, namespace: nope}" }"#,
                "no namespace \"nope\"",
            ),
            (
                r#"{ action = "apply_policy", policy = "kind: Pod\nmetadata: {name: p}" }"#,
                "not a NetworkPolicy",
            ),
            (
                r#"{ action = "delete_policy", name = "p" }"#,
                "no policy default/p",
            ),
            (r#"{ action = "label_pods", pods = "n1p0" }"#, "give labels"),
            (
                r#"{ action = "label_namespace", name = "nope", set = { a = "b" } }"#,
                "no namespace",
            ),
            (
                r#"{ action = "label_namespace", name = "default", remove = ["kubernetes.io/metadata.name"] }"#,
                "the API server's",
            ),
            (
                r#"{ action = "restart_agent", node = "node9" }"#,
                "no node \"node9\"",
            ),
        ] {
            let message = invalid(&format!("[[steps]]\nactions = [ {action} ]\n"));
            assert!(message.contains(says), "{action}: {message}");
        }
    }

    #[test]
    fn dangling_references_in_steps_are_caught_at_load() {
        for (extra, says) in [
            (
                "[[steps]]\nactions = [ { action = \"delete_pod\", pods = \"n9*\" } ]\n",
                "match no pod",
            ),
            (
                "[[steps]]\nactions = [ { action = \"delete_service\", service = \"nope\" } ]\n",
                "no live service",
            ),
            (
                "[[steps]]\nactions = [ { action = \"update_service\", service = \"echo\", set = { portz = [] } } ]\n",
                "unknown field",
            ),
            (
                "[[steps]]\nactions = [ { action = \"update_service\", service = \"echo\", set = { ports = [ { port = 0 } ] } } ]\n",
                "non-zero",
            ),
            (
                "[[steps]]\nactions = [ { action = \"delete_slice\", service = \"echo\", index = 5 } ]\n",
                "no index 5",
            ),
            (
                "[[steps]]\nactions = [ { action = \"delete_service\", service = \"echo\" } ]\n[[steps.checks]]\nkind = \"udp\"\nfrom = \"n1p9\"\nservice = \"echo\"\nport = 53\n",
                "no host",
            ),
        ] {
            let message = invalid(extra);
            assert!(message.contains(says), "{extra}: {message}");
        }
        assert!(matches!(
            parse("[[steps]]\nactions = [ { action = \"explode\" } ]\n"),
            Err(ScenarioError::Parse { .. })
        ));
    }

    #[test]
    fn probes_are_validated() {
        let s = BASE.replacen("kind = \"udp\"\nfrom", "kind = \"tcp\"\nfrom", 1);
        let err = Scenario::parse(&s, Path::new("t.toml")).unwrap_err();
        assert!(err.to_string().contains("no tcp port 53"), "{err}");
    }

    #[test]
    fn shapes_in_yaml() {
        let s = parse(
            r#"
[[services]]
name = "many"
cluster_ip = "198.18.100.11"
cluster_ip6 = "fd00:100::11"
ipv6_first = true
selector = { app = "echo" }
max_endpoints_per_slice = 2
labels = { team = "a" }
annotations = { note = "b" }
ports = [ { port = 81, target_port = 8080 } ]
[[services]]
name = "hl"
headless = true
selector = { app = "echo" }
ports = [ { port = 82, target_port = 8080 } ]
[[services]]
name = "alias"
type = "ExternalName"
external_name = "example.com"
[[services]]
name = "v6only"
cluster_ip6 = "fd00:100::12"
selector = { app = "echo" }
ports = [ { port = 83, target_port = 8080 } ]
"#,
        )
        .unwrap();
        let yaml = crate::k8s::cluster_state(&s, &s.plan());
        let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&yaml)
            .map(|d| serde_yaml::Value::deserialize(d).unwrap())
            .collect();
        let of = |kind: &str, svc: &str| -> Vec<&serde_yaml::Value> {
            docs.iter()
                .filter(|d| d["kind"] == kind)
                .filter(|d| {
                    d["metadata"]["name"] == svc
                        || d["metadata"]["labels"]["kubernetes.io/service-name"] == svc
                })
                .collect()
        };
        let many = of("Service", "many")[0];
        assert_eq!(many["spec"]["ipFamilies"][0], "IPv6");
        assert_eq!(many["spec"]["clusterIPs"][0], "fd00:100::11");
        assert_eq!(many["spec"]["clusterIP"], "fd00:100::11");
        assert_eq!(many["metadata"]["labels"]["team"], "a");
        assert_eq!(many["metadata"]["annotations"]["note"], "b");
        // 3 endpoints at 2 a slice, per family: 2 IPv4 slices and 2 IPv6 ones.
        let slices = of("EndpointSlice", "many");
        let sizes: Vec<usize> = slices
            .iter()
            .map(|s| s["endpoints"].as_sequence().unwrap().len())
            .collect();
        assert_eq!(sizes, [2, 1, 2, 1]);
        let names: std::collections::BTreeSet<&str> = slices
            .iter()
            .map(|s| s["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names.len(), 4, "slice names are distinct");
        assert_eq!(slices[0]["metadata"]["labels"]["team"], "a");

        let hl = of("Service", "hl")[0];
        assert_eq!(hl["spec"]["clusterIP"], "None");
        let hl_slice = of("EndpointSlice", "hl")[0];
        assert!(hl_slice["metadata"]["labels"]
            .get("service.kubernetes.io/headless")
            .is_some());

        let alias = of("Service", "alias")[0];
        assert_eq!(alias["spec"]["type"], "ExternalName");
        assert_eq!(alias["spec"]["externalName"], "example.com");
        assert!(alias["spec"].get("clusterIP").is_none());
        assert!(of("EndpointSlice", "alias").is_empty());

        let v6 = of("Service", "v6only")[0];
        assert_eq!(v6["spec"]["ipFamilies"].as_sequence().unwrap().len(), 1);
        assert_eq!(of("EndpointSlice", "v6only")[0]["addressType"], "IPv6");
    }

    #[test]
    fn hand_written_slices() {
        let s = parse(
            r#"
[[services]]
name = "manual"
cluster_ip = "198.18.100.30"
ports = [ { name = "web", port = 80, target_port = 9090 } ]
[[endpoint_slices]]
name = "manual-1"
service = "manual"
endpoints = [ { pod = "n1p1" }, { pod = "n1p2", ready = false } ]
ports = [ { name = "web", port = 9090 } ]
[[steps]]
actions = [ { action = "delete_slice", name = "manual-1" } ]
"#,
        )
        .unwrap();
        let plan = s.plan();
        let mut model = super::ClusterModel::new(&s, crate::k8s::pod_labels(&s, &plan));
        let manual = s.service("manual").unwrap().clone();
        assert_eq!(model.serving_pods(&manual, &plan), ["n1p1"]);
        let yaml = crate::k8s::cluster_state_of(&model, &plan);
        assert!(yaml.contains("name: manual-1"), "{yaml}");
        assert!(yaml.contains("kubernetes.io/service-name: manual"));
        model.apply(&s.steps[0].actions[0], &plan).unwrap();
        assert!(model.serving_pods(&manual, &plan).is_empty());
        assert!(!crate::k8s::cluster_state_of(&model, &plan).contains("manual-1"));

        let message = invalid(
            "[[endpoint_slices]]\nname = \"x\"\nservice = \"echo\"\nendpoints = [ { pod = \"n7p1\" } ]\nports = [ { port = 1 } ]\n",
        );
        assert!(message.contains("not a pod"), "{message}");
        let message =
            invalid("[[steps]]\nactions = [ { action = \"delete_slice\", name = \"nope\" } ]\n");
        assert!(message.contains("no hand-written slice"), "{message}");
    }

    #[test]
    fn service_shapes_are_validated() {
        for (extra, says) in [
            (
                "[[services]]\nname = \"x\"\nheadless = true\ncluster_ip = \"198.18.100.20\"\nports = [ { port = 1 } ]\n",
                "headless",
            ),
            (
                "[[services]]\nname = \"x\"\nports = [ { port = 1 } ]\n",
                "give cluster_ip",
            ),
            (
                "[[services]]\nname = \"x\"\ntype = \"ExternalName\"\n",
                "external_name",
            ),
            (
                "[[services]]\nname = \"x\"\ncluster_ip = \"198.18.100.20\"\nipv6_first = true\nports = [ { port = 1 } ]\n",
                "dual-stack",
            ),
        ] {
            let message = invalid(extra);
            assert!(message.contains(says), "{extra}: {message}");
        }
    }
}

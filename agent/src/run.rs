//! The agent's main loop.
//!
//! Stopping the agent (SIGTERM, SIGINT, or SIGKILL) leaves the data plane forwarding: maps and
//! program links are pinned, and the next agent adopts them. Only `detach_on_exit` (or
//! `weir-agent uninstall`) takes the programs off the interfaces.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{debug, error, info, warn};

use crate::admission::{Footprint, Limits};
use crate::compile::CompileOptions;
use crate::config::{AgentConfig, HttpConfig, LoadBalancing, SourceKind, TunnelMode};
use crate::conntrack::{entries_created, EvictionEstimate, GcOutcome, GcThread};
use crate::dataplane::{Counters, Dataplane, Hook, LoadOptions};
use crate::drift::DriftWatch;
use crate::fd_budget;
use crate::health_check::{self, HealthCheckOptions, HealthCheckServer};
use crate::healthz::HealthzServer;
use crate::http::OpsServer;
use crate::interfaces;
use crate::kubernetes::{KubeSource, NodeIdentity, OptionalKinds};
use crate::metrics::{Health, Metrics, Ops};
use crate::node;
use crate::policy::PolicyReconciler;
use crate::prefilter::DenyListReconciler;
use crate::reconcile::Reconciler;
use crate::source::{FileSource, ObjectEvent};
use weir_common::{map_names, program_names, HostAddrKey};

/// The loop counts as wedged after this many poll intervals without a turn (at least
/// [`MIN_STALL`]): long enough for a full sync of a large cluster, short enough for a liveness
/// probe to restart a stuck agent within a minute or two.
const STALL_POLLS: u32 = 20;
const MIN_STALL: Duration = Duration::from_secs(30);
/// How often a file source watched by inotify also compares its files' stamps: changes made on
/// the far side of a shared file system (a VM's virtiofs folder, NFS) raise no inotify event.
const RESCAN_EVERY: Duration = Duration::from_secs(1);

pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    // Before anything opens a descriptor; the HTTP caps are sized against the result.
    let nofile = fd_budget::raise_nofile_limit();
    let http_limits = HttpConfig {
        max_connections: fd_budget::connection_cap(config.http.max_connections, nofile),
        ..config.http
    };
    let pin_dir = config.versioned_pin_dir();
    let mut dataplane = Dataplane::load(&LoadOptions {
        pin_dir: Some(pin_dir.clone()),
        max_entries: config.maps.max_entries(),
        older_pin_dirs: config.older_versioned_pin_dirs(),
    })
    .context("loading the data plane")?;
    dataplane
        .pin_links_in(&config.link_pin_dir())
        .context("preparing the link pin directory")?;
    info!(
        node = %config.node_name,
        pin_dir = %pin_dir.display(),
        attach = ?dataplane.attach_mode(),
        "data plane loaded"
    );

    let tunnel = node::ensure_tunnel(&config.tunnel, &config.host_interfaces)
        .await
        .context("setting up the tunnel device")?;
    let mut node_config = node::node_config(&config, tunnel.as_ref());
    // An earlier agent's isolation stays in force until the first policy pass decides.
    if let Ok(previous) = dataplane.node.config() {
        node_config.flags |= previous.flags & weir_common::node_flags::POLICY;
    }
    dataplane
        .node
        .set_config(&node_config)
        .context("writing the node configuration")?;
    let mut deny_lists = DenyListReconciler::new(&config)
        .context("the pre-filter's deny-list ([prefilter] deny)")?;
    let written = deny_lists
        .start(&mut dataplane.prefilter)
        .context("writing the pre-filter's deny-list and the failsafe ports")?;
    info!(
        deny = written.entries,
        writes = written.writes,
        "pre-filter deny-list and failsafe ports written"
    );
    if config.host_services.enabled {
        dataplane
            .attach_host_services(&config.host_services.cgroup)
            .context("attaching host services ([host_services])")?;
    } else {
        // Hooks an earlier agent left while host services were on.
        dataplane.detach_host_services();
    }

    // A second handle on the counter map, read by the HTTP thread at scrape time.
    let counters = Counters::open_pinned(&pin_dir).context("opening the counter map")?;
    let metrics = Arc::new(Metrics::new().with_datapath(counters));
    metrics.set_map_capacities(&config.maps);
    metrics.set_map_entries(map_names::PREFILTER_DENY, written.entries);
    // Conntrack garbage collection runs on its own thread, with its own handles: a pass over
    // full tables takes seconds the loop must not wait for.
    let _gc = GcThread::spawn(
        dataplane
            .conntrack
            .try_clone()
            .context("opening the conntrack maps for garbage collection")?,
        config.conntrack.clone(),
        gc_reporter(
            metrics.clone(),
            // Conntrack evictions are derived from the creation counters.
            Counters::open_pinned(&pin_dir).context("opening the counter map")?,
            config.services.external_return == crate::config::ExternalReturn::Dsr,
        ),
    )
    .context("starting the conntrack garbage collector")?;
    let health = Arc::new(Health::new(
        (config.poll_interval * STALL_POLLS).max(MIN_STALL),
    ));
    health.beat();
    let _ops = OpsServer::start(
        config.metrics_listen,
        Ops {
            metrics: metrics.clone(),
            health: health.clone(),
        },
        http_limits,
    )
    .with_context(|| format!("serving metrics on {}", config.metrics_listen))?;
    let _healthz = HealthzServer::start(
        config.healthz_listen,
        health.clone(),
        http_limits,
        Some(metrics.clone()),
    )
    .context("starting the healthz server")?;
    let health_checks = HealthCheckServer::start(
        HealthCheckOptions {
            bind: health_check::default_bind_addresses(),
            reserved: config.reserved_health_check_ports(),
            limits: http_limits,
        },
        Some(metrics.clone()),
        Some(health.clone()),
    )
    .context("starting the health-check server")?;

    let mut reconciler = Reconciler::new(
        Limits {
            max_endpoints_per_service: config.max_endpoints_per_service,
            node_port_range: config.services.node_port_range,
            capacity: Footprint::of(&config.maps),
        },
        Some(metrics.clone()),
    )
    .with_compile_options(CompileOptions {
        node_name: config.node_name.clone(),
        maglev: config.services.external_load_balancing == LoadBalancing::Maglev,
        maglev_min_size: config.services.maglev_table_size,
    });
    let mut policy = PolicyReconciler::new(&config.node_name, config.policy.enabled);
    if !config.policy.enabled {
        info!("network policy is off ([policy] enabled = false): the policy maps are emptied");
    }
    let mut source = match config.source {
        SourceKind::File => {
            let path = config
                .state_path
                .clone()
                .context("the file source needs state_path")?;
            let source = FileSource::new(&path);
            let watch = match source.watch_fd() {
                Some(fd) => {
                    use std::os::fd::AsRawFd;
                    // SAFETY: the descriptor belongs to `source`'s inotify instance, which lives
                    // in the same `DesiredState::File` and is dropped after `watch` (fields drop
                    // in declaration order), so it stays open while registered.
                    let registered = unsafe {
                        tokio::io::unix::AsyncFd::register_with_interest(
                            fd.as_raw_fd(),
                            tokio::io::Interest::READABLE,
                        )
                    };
                    Some(
                        registered
                            .map_err(std::io::Error::from)
                            .context("registering the inotify descriptor")?,
                    )
                }
                None => None,
            };
            DesiredState::File {
                watch,
                source: Box::new(source),
                started: false,
            }
        }
        SourceKind::Kubernetes => {
            let client = crate::kubernetes::client(config.kubeconfig.as_deref())
                .await
                .context("connecting to the Kubernetes API")?;
            info!("watching the Kubernetes API");
            DesiredState::Kubernetes {
                source: Box::new(KubeSource::start(
                    client,
                    &config.node_name,
                    OptionalKinds {
                        policy: config.policy.enabled,
                        deny_lists: config.prefilter.enabled,
                    },
                )),
                node: None,
            }
        }
    };
    let mut drift = DriftWatch::start(&pin_dir, config.drift_check_interval)
        .context("starting the drift check")?;
    let mut foreign = BTreeSet::new();
    // Set when the last pass could not finish, so the next tick retries even without a change.
    let mut retry = true;
    let mut poll = tokio::time::interval(config.poll_interval);
    let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut interfaces = InterfaceSync::subscribed();
    let mut tunnel_peers = None;

    loop {
        tokio::select! {
            _ = poll.tick() => {
                health.beat();
                interfaces.sync(&config, &mut dataplane, &health, &metrics);
                if source.poll(retry, false, &config.node_name, &metrics, &health, &mut |e| reconciler.stage(&e)) {
                    drift.writing();
                    retry = apply(&mut reconciler, &mut policy, &mut deny_lists, &mut dataplane, &mut node_config, &health, &metrics, &mut tunnel_peers);
                    health_checks.update(health_check::desired(reconciler.intent(), &config.node_name));
                }
            }
            _ = source.changed() => {
                health.beat();
                if source.poll(retry, true, &config.node_name, &metrics, &health, &mut |e| reconciler.stage(&e)) {
                    drift.writing();
                    retry = apply(&mut reconciler, &mut policy, &mut deny_lists, &mut dataplane, &mut node_config, &health, &metrics, &mut tunnel_peers);
                    health_checks.update(health_check::desired(reconciler.intent(), &config.node_name));
                }
            }
            actual = drift.next() => {
                drift.writing();
                repair_drift(&mut reconciler, &mut dataplane, &actual.services, &node_config, &metrics);
                if let Some(actual) = &actual.policy {
                    match policy.repair_drift(&mut dataplane.policy, actual, Some(&metrics)) {
                        Ok(0) => {}
                        Ok(writes) => warn!(writes, "policy map entries were changed outside the agent; written back"),
                        Err(e) => warn!(error = %e, "repairing drifted policy map entries failed; the next pass rereads the maps"),
                    }
                }
                report_foreign_programs(&mut dataplane, &mut foreign, &metrics);
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    if config.detach_on_exit {
        info!("stopping: detaching programs (detach_on_exit), leaving maps pinned");
        let attached: Vec<String> = dataplane.attached_interfaces().map(str::to_owned).collect();
        for interface in attached {
            dataplane.detach(&interface);
        }
        interfaces.sync_prefilter(&config, &mut dataplane, &BTreeSet::new());
        dataplane.detach_host_services();
    } else {
        info!("stopping: programs stay attached and keep forwarding; the next agent adopts them");
    }
    Ok(())
}

/// What each conntrack garbage-collection pass reports, on the collector's thread: the tables'
/// sizes, what was reclaimed, and the evictions estimated from both.
fn gc_reporter(
    metrics: Arc<Metrics>,
    created_counters: Counters,
    dsr: bool,
) -> impl FnMut(GcOutcome) + Send + 'static {
    let mut evictions = EvictionEstimate::default();
    // Read before each scan: entries created during it can only make the estimate low.
    let mut created = created_counters
        .read()
        .map(|rows| entries_created(&rows, dsr));
    move |(result, took)| {
        match result {
            Ok(report) => {
                let present = report.present();
                if let Ok(created) = created {
                    metrics.conntrack_evictions.inc_by(evictions.observe(
                        created,
                        report.reclaimed.total() as u64,
                        present.total() as u64,
                    ));
                }
                metrics.set_conntrack_entries("established", present.established);
                metrics.set_conntrack_entries("new", present.new);
                metrics.set_map_entries(map_names::CONNTRACK, present.established);
                metrics.set_map_entries(map_names::CT_NEW, present.new);
                metrics
                    .conntrack_reclaimed
                    .inc_by(report.reclaimed.total() as u64);
                if report.reclaimed.total() > 0 {
                    info!(scanned = ?report.scanned, reclaimed = ?report.reclaimed, ?took, "conntrack gc");
                } else {
                    debug!(scanned = ?report.scanned, ?took, "conntrack gc");
                }
            }
            Err(e) => warn!(error = %e, "conntrack gc failed"),
        }
        created = created_counters
            .read()
            .map(|rows| entries_created(&rows, dsr));
    }
}

/// Where desired state comes from: both sources hand over per-object events.
enum DesiredState {
    File {
        /// The inotify descriptor of `source` in the reactor; None when the file source polls.
        /// Declared before `source`: it must be dropped (deregistered) before the descriptor
        /// closes.
        watch: Option<tokio::io::unix::AsyncFd<std::os::fd::RawFd>>,
        source: Box<FileSource>,
        /// The first full read is done.
        started: bool,
    },
    Kubernetes {
        source: Box<KubeSource>,
        /// This node as last logged, to log changes of its identity once.
        node: Option<NodeIdentity>,
    },
}

impl DesiredState {
    /// Resolves when the source has news: inotify saw a write, or a watcher an event. Never
    /// for a file source without inotify (the poll tick looks at it).
    async fn changed(&self) {
        match self {
            DesiredState::File {
                watch: Some(fd), ..
            } => match fd.readable().await {
                // The events are read (until the descriptor would block) by `poll`.
                Ok(mut guard) => guard.clear_ready(),
                Err(e) => {
                    warn!(error = %e, "waiting on inotify");
                    std::future::pending().await
                }
            },
            DesiredState::File { .. } => std::future::pending().await,
            DesiredState::Kubernetes { source, .. } => source.changed().await,
        }
    }

    /// Hands what changed to `stage`, event by event; true when a pass is due (news, or a
    /// failed pass to retry), which `health` learns as a queued update. `woken` says the source
    /// signalled news.
    fn poll(
        &mut self,
        retry: bool,
        woken: bool,
        node_name: &str,
        metrics: &Metrics,
        health: &Health,
        stage: &mut dyn FnMut(ObjectEvent),
    ) -> bool {
        let due = self.take_changes(retry, woken, node_name, metrics, health, stage);
        if due {
            health.queued_update();
        }
        due
    }

    fn take_changes(
        &mut self,
        retry: bool,
        woken: bool,
        node_name: &str,
        metrics: &Metrics,
        health: &Health,
        stage: &mut dyn FnMut(ObjectEvent),
    ) -> bool {
        match self {
            DesiredState::File {
                watch,
                source,
                started,
            } => {
                let mut news = false;
                let mut sink = |e: ObjectEvent| {
                    news = true;
                    stage(e);
                };
                let errors = if !*started {
                    *started = true;
                    source.scan_into(&mut sink)
                } else if woken || watch.is_none() || source.events_pending() {
                    source.changes_into(&mut sink)
                } else {
                    source.rescan_if_due(RESCAN_EVERY, &mut sink)
                };
                for e in &errors {
                    // That file keeps what it contributed last: the rest applies.
                    warn!(error = %e, "state file unreadable; keeping its last good objects");
                    metrics.source_errors.inc();
                }
                news || retry
            }
            DesiredState::Kubernetes { source, node } => {
                if !source.is_ready() {
                    debug!(waiting_for = ?source.unlisted(), "Kubernetes source not listed yet");
                    return false;
                }
                let identity = source.node_identity();
                if identity != *node {
                    match &identity {
                        Some(id) => {
                            info!(
                                node = %id.name,
                                addresses = ?id.addresses,
                                pod_cidrs = ?id.pod_cidrs,
                                to_be_deleted = id.to_be_deleted,
                                "node identity from the Node object"
                            );
                            health.set_node_eligible(!id.to_be_deleted);
                        }
                        None => warn!(node = node_name, "no Node object with this node's name"),
                    }
                    *node = identity;
                }
                let events = source.take_events();
                let news = !events.is_empty();
                events.into_iter().for_each(stage);
                news || retry
            }
        }
    }
}

/// One reconcile pass; returns whether the next tick should try again. `peers` is the tunnel
/// peer set last written (None until written), so the map is read and written only when the
/// Nodes' addresses change. A pass that fails to write makes the node unready (saying why) until
/// one succeeds.
#[allow(clippy::too_many_arguments)]
fn apply(
    reconciler: &mut Reconciler,
    policy: &mut PolicyReconciler,
    deny_lists: &mut DenyListReconciler,
    dataplane: &mut Dataplane,
    node_config: &mut weir_common::NodeConfig,
    health: &Health,
    metrics: &Metrics,
    peers: &mut Option<BTreeSet<HostAddrKey>>,
) -> bool {
    // Before the services: the deny-list objects refused for capacity are reported with this
    // pass's other rejections.
    let deny_list = deny_lists
        .apply(reconciler, &mut dataplane.prefilter, Some(metrics))
        .map_err(|e| {
            error!(error = %e, "writing the pre-filter's deny-list failed; will retry");
            format!("pre-filter deny-list: {e}")
        });
    // The source staged its events already.
    let services = reconciler
        .apply_events(&mut dataplane.services, &[])
        .map(drop)
        .map_err(|e| {
            error!(error = %e, "applying desired state failed; will retry");
            e.to_string()
        });
    // Flows stuck on endpoints that stopped serving end now, not at their own timeout.
    let retired = reconciler.take_retired();
    // Connected UDP sockets of host processes (host services) too: aborted, they reconnect.
    match dataplane.abort_retired_sockets(&retired) {
        Ok(0) => {}
        Ok(aborted) => info!(
            sockets = aborted,
            "aborted host sockets connected to endpoints that stopped serving"
        ),
        Err(e) => {
            warn!(error = %e, "aborting host sockets of retired endpoints failed; they recover when their applications reconnect")
        }
    }
    match crate::conntrack::end_retired_flows(&mut dataplane.conntrack, &retired) {
        Ok(0) => {}
        Ok(ended) => info!(
            entries = ended,
            "ended the flows of endpoints that stopped serving"
        ),
        Err(e) => warn!(error = %e, "ending the flows of retired endpoints failed"),
    }
    // Node objects come and go with the same events: the tunnel follows them.
    let wanted = node::tunnel_peers(reconciler.intent().nodes.values());
    let tunnel = if peers.as_ref() == Some(&wanted) {
        Ok(())
    } else {
        match dataplane.node.set_tunnel_peers(&wanted) {
            Ok(writes) => {
                if writes > 0 {
                    info!(writes, peers = wanted.len(), "tunnel peers updated");
                }
                metrics.set_map_entries(map_names::TUNNEL_PEERS, wanted.len());
                *peers = Some(wanted);
                Ok(())
            }
            Err(e) => {
                error!(error = %e, "updating tunnel peers failed; will retry");
                Err(format!("tunnel peers: {e}"))
            }
        }
    };
    // After the services: a policy's peers may be a new service's backends.
    let changes = reconciler.take_policy_changes();
    let policy_pass = if !changes.is_empty() || policy.needs_pass() {
        policy
            .pass(
                reconciler.policy_intents(),
                &changes,
                &mut dataplane.policy,
                &mut dataplane.node,
                node_config,
                Some(metrics),
            )
            .map(drop)
            .map_err(|e| {
                error!(error = %e, "applying network policy failed; will retry");
                format!("network policy: {e}")
            })
    } else {
        Ok(())
    };
    let outcome = deny_list.and(services).and(tunnel).and(policy_pass);
    metrics.record_pass(outcome.is_ok());
    match outcome {
        Ok(()) => {
            health.sync_succeeded();
            false
        }
        Err(reason) => {
            health.sync_failed(reason);
            true
        }
    }
}

/// Writes back what changed behind the agent's back: service map entries (against the
/// compiler's shadow), tunnel peers and the node configuration.
fn repair_drift(
    reconciler: &mut Reconciler,
    dataplane: &mut Dataplane,
    actual: &crate::state::DataplaneState,
    node_config: &weir_common::NodeConfig,
    metrics: &Metrics,
) {
    match reconciler.repair_drift(&mut dataplane.services, actual) {
        Ok(report) if report.total() > 0 => warn!(
            frontends = report.frontends,
            slots = report.slots,
            backends = report.backends,
            maglev = report.maglev,
            source_ranges = report.source_ranges,
            "service map entries were changed outside the agent; written back"
        ),
        Ok(_) => {}
        Err(e) => {
            warn!(error = %e, "repairing drifted service map entries failed; the next pass rereads the maps")
        }
    }
    let wanted = node::tunnel_peers(reconciler.intent().nodes.values());
    match dataplane.node.set_tunnel_peers(&wanted) {
        Ok(0) => {}
        Ok(writes) => {
            metrics.record_drift(weir_common::map_names::TUNNEL_PEERS, writes);
            warn!(
                writes,
                "tunnel peers were changed outside the agent; written back"
            );
        }
        Err(e) => warn!(error = %e, "checking tunnel peers failed"),
    }
    match dataplane.node.config() {
        Ok(current) if current == *node_config => {}
        Ok(_) => match dataplane.node.set_config(node_config) {
            Ok(()) => {
                metrics.record_drift(weir_common::map_names::NODE_CONFIG, 1);
                warn!("the node configuration map was changed outside the agent; written back");
            }
            Err(e) => warn!(error = %e, "rewriting the node configuration failed"),
        },
        Err(e) => warn!(error = %e, "reading the node configuration failed"),
    }
}

/// Logs each Weir program of another agent found on our interfaces once, and counts them.
fn report_foreign_programs(
    dataplane: &mut Dataplane,
    known: &mut BTreeSet<crate::dataplane::ForeignProgram>,
    metrics: &Metrics,
) {
    let found: BTreeSet<_> = match dataplane.foreign_programs() {
        Ok(found) => found.into_iter().collect(),
        Err(e) => {
            debug!(error = %e, "listing the programs on our interfaces failed");
            return;
        }
    };
    for p in found.difference(known) {
        warn!(
            interface = %p.interface,
            hook = p.hook.name(),
            program_id = p.id,
            name = %p.name,
            before_ours = p.before_ours,
            "a Weir program of another agent (another pin directory or version) is attached \
             here; remove it (bpftool net, or `weir-agent uninstall --pin-dir` of its directory)"
        );
    }
    metrics.foreign_programs.set(found.len() as i64);
    *known = found;
}

/// Keeps the program on the interfaces that should have it, as they come and go.
#[derive(Default)]
struct InterfaceSync {
    missing_logged: BTreeSet<String>,
    first_pass_done: bool,
    /// Link and address notifications; without them (the subscription failed) every tick
    /// syncs.
    events: Option<interfaces::LinkEvents>,
    /// The last pass left something to retry (an attach or a map write failed, or listing
    /// the interfaces did): the next tick syncs whatever the notifications say. A configured
    /// interface that is missing needs no retry: its creation is notified.
    retry: bool,
    last_pass: Option<std::time::Instant>,
    /// The XDP pre-filter's links on host interfaces (`[prefilter]`).
    prefilter: crate::prefilter::Attachments,
}

/// A full interface pass at least this often, notifications or not: a lost one (the socket's
/// buffer overflowed without telling) costs at most this long.
const INTERFACE_RESYNC: Duration = Duration::from_secs(10);

impl InterfaceSync {
    /// The pre-filter on exactly the `wanted` host interfaces.
    fn sync_prefilter(
        &mut self,
        config: &AgentConfig,
        dataplane: &mut Dataplane,
        wanted: &BTreeSet<String>,
    ) {
        let link_dir = dataplane.link_pin_dir().map(Path::to_owned);
        let program = match dataplane.xdp_program(program_names::PREFILTER) {
            Ok(program) => program,
            Err(e) => {
                warn!(error = %e, "the XDP pre-filter program is missing");
                return;
            }
        };
        let gone: Vec<String> = (self.prefilter.interfaces())
            .map(|(name, _)| name.to_owned())
            .filter(|name| !wanted.contains(name))
            .collect();
        for interface in gone {
            self.prefilter.detach(program, &interface);
        }
        for interface in wanted {
            if self.prefilter.is_attached(interface) {
                continue;
            }
            if let Err(e) = (self.prefilter).attach(
                program,
                interface,
                config.prefilter.mode,
                link_dir.as_deref(),
            ) {
                warn!(%interface, error = %e, "attaching the XDP pre-filter failed");
                self.retry = true;
            }
        }
    }

    fn subscribed() -> InterfaceSync {
        let events = match interfaces::LinkEvents::subscribe() {
            Ok(events) => Some(events),
            Err(e) => {
                warn!(error = %e, "no link notifications: interfaces are listed on every tick");
                None
            }
        };
        InterfaceSync {
            events,
            ..InterfaceSync::default()
        }
    }

    /// Whether this tick must look at the interfaces: the first pass, a retry, a notification,
    /// no notifications at all, or the periodic pass.
    fn due(&mut self) -> bool {
        // Read on every tick, so the notifications do not pile up.
        let notified = self.events.as_ref().is_none_or(|e| e.changed());
        let stale = self
            .last_pass
            .is_none_or(|at| at.elapsed() >= INTERFACE_RESYNC);
        notified || stale || self.retry || !self.first_pass_done
    }

    fn sync(
        &mut self,
        config: &AgentConfig,
        dataplane: &mut Dataplane,
        health: &Health,
        metrics: &Metrics,
    ) {
        if !self.due() {
            return;
        }
        self.last_pass = Some(std::time::Instant::now());
        self.retry = false;
        match node::host_addresses(&config.host_interfaces)
            .map_err(anyhow::Error::from)
            .and_then(|addrs| Ok((dataplane.node.set_host_addrs(&addrs)?, addrs.len())))
        {
            Ok((writes, addrs)) => {
                if writes > 0 {
                    info!(writes, "host addresses for NodePorts updated");
                }
                metrics.set_map_entries(map_names::HOST_ADDRS, addrs);
            }
            Err(e) => {
                warn!(error = %e, "updating host addresses failed");
                self.retry = true;
            }
        }
        let mut attach_to = config.host_interfaces.clone();
        if config.tunnel.mode != TunnelMode::None {
            attach_to.push(config.tunnel.device().to_owned());
        }
        let interfaces::Present { wanted, pods } =
            match interfaces::present(&attach_to, &config.pod_interface_prefix) {
                Ok(present) => present,
                Err(e) => {
                    warn!(error = %e, "listing interfaces failed");
                    self.retry = true;
                    return;
                }
            };
        match dataplane.node.set_pod_interfaces(&pods) {
            Ok(writes) => {
                if writes > 0 {
                    debug!(writes, pods = pods.len(), "pod interfaces updated");
                }
                metrics.set_map_entries(map_names::POD_INTERFACES, pods.len());
            }
            Err(e) => {
                warn!(error = %e, "updating pod interfaces failed");
                self.retry = true;
            }
        }
        for host in &config.host_interfaces {
            if !wanted.contains(host) && self.missing_logged.insert(host.clone()) {
                warn!(interface = %host, "configured host interface not present (yet)");
            }
        }
        let first_pass = !self.first_pass_done;
        // The pre-filter runs on the host interfaces only (not the tunnel, not pods).
        let prefiltered: BTreeSet<String> = if config.prefilter.enabled {
            (config.host_interfaces.iter())
                .filter(|h| wanted.contains(*h))
                .cloned()
                .collect()
        } else {
            BTreeSet::new()
        };
        if first_pass {
            // Links a previous agent pinned for interfaces that are gone now.
            dataplane.release_unwanted_links(&wanted);
            if let Some(dir) = dataplane.link_pin_dir().map(Path::to_owned) {
                self.prefilter.release_unwanted(&dir, &prefiltered);
            }
            self.first_pass_done = true;
        }
        self.sync_prefilter(config, dataplane, &prefiltered);
        let gone: Vec<String> = dataplane
            .attached_interfaces()
            .filter(|i| !wanted.contains(*i))
            .map(str::to_owned)
            .collect();
        for interface in gone {
            dataplane.detach(&interface);
        }
        let tunnel_device =
            (config.tunnel.mode != TunnelMode::None).then(|| config.tunnel.device());
        for interface in &wanted {
            for hook in Hook::ALL {
                let wanted_here =
                    hook == Hook::Ingress || Some(interface.as_str()) != tunnel_device;
                if !wanted_here || dataplane.is_attached(interface, hook) {
                    continue;
                }
                if let Err(e) = dataplane.attach(interface, hook) {
                    // Pod interfaces can vanish between listing and attaching; the next tick retries.
                    warn!(%interface, hook = hook.name(), error = %e, "attach failed");
                    self.retry = true;
                }
            }
        }
        if first_pass {
            // The links run this agent's programs now: maps it replaced are unused.
            metrics.record_carry_over(&dataplane.finish_carry_over());
        }
        let unattached: Vec<String> = config
            .host_interfaces
            .iter()
            .filter(|h| !dataplane.is_attached(h, Hook::Ingress))
            .cloned()
            .collect();
        health.set_unattached_host_interfaces(unattached);
        metrics
            .attached_interfaces
            .set(dataplane.attached_interfaces().count() as i64);
    }
}

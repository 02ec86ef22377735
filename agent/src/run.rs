//! The agent's main loop.

use std::collections::BTreeSet;

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{debug, error, info, warn};

use crate::compile::CompileOptions;
use crate::config::{AgentConfig, LoadBalancing};
use crate::conntrack::collect_garbage;
use crate::dataplane::{Dataplane, LoadOptions};
use crate::interfaces;
use crate::node;
use crate::reconcile::Reconciler;
use crate::source::{read_objects, ChangeDetector};

pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let pin_dir = config.versioned_pin_dir();
    let mut dataplane = Dataplane::load(&LoadOptions {
        pin_dir: Some(pin_dir.clone()),
        ..Default::default()
    })
    .context("loading the data plane")?;
    info!(node = %config.node_name, pin_dir = %pin_dir.display(), "data plane loaded");

    let tunnel_ifindex = node::ensure_tunnel(&config.tunnel)
        .await
        .context("setting up the tunnel device")?;
    dataplane
        .node
        .set_config(&node::node_config(&config, tunnel_ifindex))
        .context("writing the node configuration")?;

    let mut reconciler = Reconciler::new(CompileOptions {
        node_name: config.node_name.clone(),
        maglev: config.services.external_load_balancing == LoadBalancing::Maglev,
    });
    let mut changes = ChangeDetector::default();
    // Set when the last pass could not finish, so the next tick retries even without a change.
    let mut retry = true;
    let mut poll = tokio::time::interval(config.poll_interval);
    let mut gc = tokio::time::interval(config.conntrack.gc_interval);
    let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut missing_host_interfaces_logged = BTreeSet::new();

    loop {
        tokio::select! {
            _ = poll.tick() => {
                sync_interfaces(&config, &mut dataplane, &mut missing_host_interfaces_logged);
                if changes.changed(&config.state_path) || retry {
                    retry = match read_objects(&config.state_path) {
                        Ok(objects) => match reconciler.reconcile(&mut dataplane.services, &objects) {
                            Ok(_) => false,
                            Err(e) => {
                                error!(error = %e, "applying desired state failed; will retry");
                                true
                            }
                        },
                        Err(e) => {
                            // The whole source is unreadable: keep the last good state in the maps.
                            warn!(error = %e, "state source unreadable; keeping last good state");
                            false
                        }
                    };
                }
            }
            _ = gc.tick() => match collect_garbage(&mut dataplane.conntrack, &config.conntrack) {
                Ok(report) if report.reclaimed > 0 => {
                    info!(scanned = report.scanned, reclaimed = report.reclaimed, "conntrack gc");
                }
                Ok(report) => debug!(scanned = report.scanned, "conntrack gc"),
                Err(e) => warn!(error = %e, "conntrack gc failed"),
            },
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    info!("stopping: detaching programs, leaving maps pinned for the next agent");
    let attached: Vec<String> = dataplane.attached_interfaces().map(str::to_owned).collect();
    for interface in attached {
        dataplane.detach(&interface);
    }
    Ok(())
}

fn sync_interfaces(config: &AgentConfig, dataplane: &mut Dataplane, logged: &mut BTreeSet<String>) {
    match node::host_addresses(&config.host_interfaces)
        .map_err(anyhow::Error::from)
        .and_then(|addrs| Ok(dataplane.node.set_host_addrs(&addrs)?))
    {
        Ok(0) => {}
        Ok(writes) => info!(writes, "host addresses for NodePorts updated"),
        Err(e) => warn!(error = %e, "updating host addresses failed"),
    }
    let mut attach_to = config.host_interfaces.clone();
    if config.tunnel.mode != crate::config::TunnelMode::None {
        attach_to.push(config.tunnel.interface.clone());
    }
    let wanted = match interfaces::wanted(&attach_to, &config.pod_interface_prefix) {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "listing interfaces failed");
            return;
        }
    };
    for host in &config.host_interfaces {
        if !wanted.contains(host) && logged.insert(host.clone()) {
            warn!(interface = %host, "configured host interface not present (yet)");
        }
    }
    let gone: Vec<String> = dataplane
        .attached_interfaces()
        .filter(|i| !wanted.contains(*i))
        .map(str::to_owned)
        .collect();
    for interface in gone {
        dataplane.detach(&interface);
    }
    for interface in wanted {
        if !dataplane.is_attached(&interface) {
            if let Err(e) = dataplane.attach_ingress(&interface) {
                // Pod interfaces can vanish between listing and attaching; the next tick retries.
                warn!(%interface, error = %e, "attach failed");
            }
        }
    }
}

//! `weir-agent status`: the one screen an operator reads first. What the kernel offers and which
//! fallbacks that forces, which interfaces carry Weir's program and how, how full the maps are,
//! and what the running agent says of itself (readiness, last sync, rejected objects), from its
//! own endpoints. Everything but the last works while no agent runs: it reads the pins.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use weir_common::map_names;

use crate::config::AgentConfig;
use crate::dataplane::{self, AttachMode, Hook, MapFill};

/// A map this full is a warning: new flows (or objects) are about to be refused or evicted.
const NEARLY_FULL: f64 = 0.9;
/// The agent's own endpoints must answer within this.
const AGENT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize)]
pub struct Status {
    pub node_name: String,
    pub pin_dir: PathBuf,
    pub kernel: Kernel,
    pub interfaces: Vec<InterfaceHooks>,
    pub maps: Vec<MapFill>,
    /// Maps that could not be read (no agent ran here yet, or another layout version).
    pub unreadable_maps: Vec<(String, String)>,
    pub agent: Result<AgentReport, String>,
    /// What needs a person's attention, worst first.
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Kernel {
    pub release: String,
    /// "tcx" (6.6+) or "clsact" (netlink filters, older kernels).
    pub attach_mode: &'static str,
    pub btf: bool,
    /// Host services can tell network namespaces apart (SO_NETNS_COOKIE, 5.14+).
    pub netns_cookie: bool,
    /// What Weir does differently on this kernel.
    pub fallbacks: Vec<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct InterfaceHooks {
    pub interface: String,
    /// Weir programs on its TCX ingress, in the order they run: (id, name).
    pub tcx_programs: Vec<(u32, String)>,
    /// An ingress link pinned by an agent with this pin directory.
    pub pinned_link: bool,
    /// Weir programs on its TCX egress (`weir_egress`; none on the tunnel device).
    pub tcx_egress_programs: Vec<(u32, String)>,
    pub pinned_egress_link: bool,
    /// The XDP pre-filter's link, pinned by an agent with this pin directory.
    pub pinned_prefilter_link: bool,
}

/// What the running agent reports on its metrics port.
#[derive(Debug, Default, Serialize)]
pub struct AgentReport {
    pub ready: bool,
    /// `/readyz`'s body: why not ready.
    pub readiness: String,
    pub last_sync_unix: Option<f64>,
    pub last_sync_duration_s: Option<f64>,
    pub reconcile_errors: f64,
    /// (kind, reason, objects) rejected by the latest pass.
    pub rejected: Vec<(String, String, f64)>,
    pub drift_repaired: f64,
    pub foreign_programs: f64,
    pub conntrack_evictions: f64,
    /// NetworkPolicies selecting this node's pods, the pods they isolate, and rule entries.
    pub policies: f64,
    pub policy_endpoints: f64,
    pub policy_rule_entries: f64,
}

pub fn gather(config: &AgentConfig) -> Status {
    let pin_dir = config.versioned_pin_dir();
    let kernel = kernel();
    let interfaces = interfaces(&config.link_pin_dir());
    let mut maps = Vec::new();
    let mut unreadable_maps = Vec::new();
    for (name, fill) in dataplane::fill_levels(&pin_dir) {
        match fill {
            Ok(fill) => maps.push(fill),
            Err(e) => unreadable_maps.push((name.to_owned(), e.to_string())),
        }
    }
    let agent = agent_report(config.metrics_listen);
    let warnings = warnings(&maps, &unreadable_maps, &interfaces, &agent, config);
    Status {
        node_name: config.node_name.clone(),
        pin_dir,
        kernel,
        interfaces,
        maps,
        unreadable_maps,
        agent,
        warnings,
    }
}

fn kernel() -> Kernel {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let mode = AttachMode::for_running_kernel();
    let netns_cookie = dataplane::current_netns_cookie() != 0;
    let mut fallbacks = Vec::new();
    if mode == AttachMode::Netlink {
        fallbacks.push(
            "no TCX (before 6.6): the ingress program is a clsact filter at a fixed priority",
        );
    }
    if !netns_cookie {
        fallbacks.push(
            "no SO_NETNS_COOKIE (before 5.14): host services translate sockets of every network \
             namespace in the cgroup",
        );
    }
    Kernel {
        release,
        attach_mode: match mode {
            AttachMode::Tcx => "tcx",
            AttachMode::Netlink => "clsact",
        },
        btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
        netns_cookie,
        fallbacks,
    }
}

/// Every interface of this network namespace with a Weir program on it, or a link pinned for it.
fn interfaces(link_dir: &Path) -> Vec<InterfaceHooks> {
    let names: Vec<String> = nix::net::if_::if_nameindex()
        .map(|list| {
            list.iter()
                .filter_map(|i| i.name().to_str().ok().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    names
        .into_iter()
        .filter_map(|interface| {
            let weir_programs = |hook| -> Vec<(u32, String)> {
                dataplane::tcx_programs(&interface, hook)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|(_, name)| name.starts_with("weir_"))
                    .collect()
            };
            let pinned = |hook| {
                link_dir
                    .join(dataplane::link_pin_name(&interface, hook))
                    .exists()
            };
            let tcx_programs = weir_programs(Hook::Ingress);
            let pinned_link = pinned(Hook::Ingress);
            let tcx_egress_programs = weir_programs(Hook::Egress);
            let pinned_egress_link = pinned(Hook::Egress);
            let pinned_prefilter_link = link_dir
                .join(crate::prefilter::link_pin_name(&interface))
                .exists();
            (!tcx_programs.is_empty() || pinned_link).then_some(InterfaceHooks {
                interface,
                tcx_programs,
                pinned_link,
                tcx_egress_programs,
                pinned_egress_link,
                pinned_prefilter_link,
            })
        })
        .collect()
}

/// Asks the agent's metrics port (a wildcard listen address is asked on loopback).
fn agent_report(listen: SocketAddr) -> Result<AgentReport, String> {
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let (ready_code, readiness) = http_get(addr, "/readyz")?;
    let (_, metrics) = http_get(addr, "/metrics")?;
    let samples = parse_samples(&metrics);
    let one = |name: &str| {
        samples
            .iter()
            .find(|(n, labels, _)| n == name && labels.is_empty())
            .map(|(_, _, v)| *v)
    };
    let sum = |name: &str| {
        samples
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, _, v)| v)
            .sum::<f64>()
    };
    let rejected = samples
        .iter()
        .filter(|(n, _, v)| n == "weir_rejected_objects_current" && *v > 0.0)
        .map(|(_, labels, v)| (label(labels, "kind"), label(labels, "reason"), *v))
        .collect();
    Ok(AgentReport {
        ready: ready_code == 200,
        readiness: readiness.trim().to_owned(),
        last_sync_unix: one("weir_last_sync_timestamp_seconds").filter(|t| *t > 0.0),
        last_sync_duration_s: one("weir_last_sync_duration_seconds"),
        reconcile_errors: sum("weir_reconcile_errors_total"),
        rejected,
        drift_repaired: sum("weir_drift_repaired_total"),
        foreign_programs: sum("weir_foreign_programs"),
        conntrack_evictions: sum("weir_conntrack_evictions_total"),
        policies: sum("weir_policies"),
        policy_endpoints: sum("weir_policy_endpoints"),
        policy_rule_entries: sum("weir_policy_rule_entries"),
    })
}

/// One plain HTTP/1.0 GET: (status code, body).
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let fail = |e: std::io::Error| format!("the agent at {addr} does not answer: {e}");
    let mut stream = TcpStream::connect_timeout(&addr, AGENT_TIMEOUT).map_err(fail)?;
    stream.set_read_timeout(Some(AGENT_TIMEOUT)).map_err(fail)?;
    stream
        .set_write_timeout(Some(AGENT_TIMEOUT))
        .map_err(fail)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(fail)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(fail)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("the agent at {addr} sent no HTTP response to {path}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("the agent at {addr} sent a malformed status line"))?;
    Ok((code, body.to_owned()))
}

/// One sample of the Prometheus text format: name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// Prometheus text format samples. Comments and malformed lines are skipped.
fn parse_samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)),
                None => (series, Vec::new()),
            };
            Some((name.to_owned(), labels, value))
        })
        .collect()
}

fn parse_labels(text: &str) -> Vec<(String, String)> {
    text.split(',')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
        })
        .collect()
}

fn label(labels: &[(String, String)], key: &str) -> String {
    labels
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

fn warnings(
    maps: &[MapFill],
    unreadable: &[(String, String)],
    interfaces: &[InterfaceHooks],
    agent: &Result<AgentReport, String>,
    config: &AgentConfig,
) -> Vec<String> {
    let mut out = Vec::new();
    match agent {
        Err(e) => out.push(e.clone()),
        Ok(a) if !a.ready => out.push(format!("the agent is not ready: {}", a.readiness)),
        Ok(_) => {}
    }
    for m in maps {
        if m.capacity > 0 && m.entries as f64 >= NEARLY_FULL * f64::from(m.capacity) {
            let what = if m.name == map_names::CONNTRACK {
                "conntrack near full: new flows evict old ones"
            } else if m.name == map_names::CT_NEW {
                "many unanswered flows (a SYN flood?): they evict each other, established ones \
                 are not touched"
            } else {
                "near full: objects that do not fit are refused"
            };
            out.push(format!(
                "{} holds {} of {} entries ({what})",
                m.name, m.entries, m.capacity
            ));
        }
    }
    if !unreadable.is_empty() {
        out.push(format!(
            "{} map(s) unreadable under {} (no agent has run with this layout version?)",
            unreadable.len(),
            config.versioned_pin_dir().display()
        ));
    }
    for host in &config.host_interfaces {
        let hooked = interfaces
            .iter()
            .any(|i| &i.interface == host && (!i.tcx_programs.is_empty() || i.pinned_link));
        if !hooked && AttachMode::for_running_kernel() == AttachMode::Tcx {
            out.push(format!("host interface {host} carries no Weir program"));
        }
    }
    for i in interfaces {
        for (hook, programs) in [
            ("ingress", &i.tcx_programs),
            ("egress", &i.tcx_egress_programs),
        ] {
            if programs.len() > 1 {
                out.push(format!(
                    "{} carries {} Weir programs at {hook}: one is another agent's (stale pin directory?)",
                    i.interface,
                    programs.len()
                ));
            }
        }
    }
    if let Ok(a) = agent {
        if a.foreign_programs > 0.0 {
            out.push(format!(
                "the agent reports {} foreign Weir program(s) on its interfaces",
                a.foreign_programs
            ));
        }
        for (kind, reason, n) in &a.rejected {
            out.push(format!("{n} {kind} object(s) rejected: {reason}"));
        }
    }
    out
}

/// The screen.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let line = |out: &mut String, text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    line(&mut out, format!("Node:        {}", status.node_name));
    line(
        &mut out,
        format!("Pin dir:     {}", status.pin_dir.display()),
    );
    let k = &status.kernel;
    line(
        &mut out,
        format!(
            "Kernel:      {} (attach: {}, BTF: {}, netns cookie: {})",
            k.release,
            k.attach_mode,
            yes_no(k.btf),
            yes_no(k.netns_cookie)
        ),
    );
    for f in &k.fallbacks {
        line(&mut out, format!("  fallback:  {f}"));
    }
    match &status.agent {
        Ok(a) => {
            line(
                &mut out,
                format!(
                    "Agent:       {}{}",
                    if a.ready { "ready" } else { "NOT READY" },
                    if a.ready {
                        String::new()
                    } else {
                        format!(" ({})", a.readiness)
                    }
                ),
            );
            let last = match (a.last_sync_unix, a.last_sync_duration_s) {
                (Some(at), Some(took)) => {
                    let ago = std::time::UNIX_EPOCH
                        .elapsed()
                        .map(|now| now.as_secs_f64() - at)
                        .unwrap_or(0.0);
                    format!("{ago:.0}s ago, took {:.1} ms", took * 1000.0)
                }
                _ => "none yet".into(),
            };
            line(&mut out, format!("Last sync:   {last}"));
            line(
                &mut out,
                format!(
                    "Errors:      {} failed passes, {} drifted entries repaired, {} conntrack evictions",
                    a.reconcile_errors, a.drift_repaired, a.conntrack_evictions
                ),
            );
            line(
                &mut out,
                format!(
                    "Policy:      {} policies isolate {} pods here, {} rule entries",
                    a.policies, a.policy_endpoints, a.policy_rule_entries
                ),
            );
            if a.rejected.is_empty() {
                line(&mut out, "Rejected:    none".into());
            }
            for (kind, reason, n) in &a.rejected {
                line(&mut out, format!("Rejected:    {n} {kind} ({reason})"));
            }
        }
        Err(e) => line(&mut out, format!("Agent:       unreachable: {e}")),
    }
    line(&mut out, "Interfaces:".into());
    if status.interfaces.is_empty() {
        line(&mut out, "  (none carries a Weir program)".into());
    }
    let hooked = |programs: &[(u32, String)], pinned: bool| {
        let names: Vec<String> = programs
            .iter()
            .map(|(id, name)| format!("{name}#{id}"))
            .collect();
        format!(
            "{}{}",
            if names.is_empty() {
                "-".into()
            } else {
                names.join(" then ")
            },
            if pinned { " (pinned link)" } else { "" }
        )
    };
    for i in &status.interfaces {
        line(
            &mut out,
            format!(
                "  {:<16} tcx ingress: {}, egress: {}{}",
                i.interface,
                hooked(&i.tcx_programs, i.pinned_link),
                hooked(&i.tcx_egress_programs, i.pinned_egress_link),
                if i.pinned_prefilter_link {
                    "; xdp: weir_prefilter (pinned link)"
                } else {
                    ""
                },
            ),
        );
    }
    if status.kernel.attach_mode == "clsact" {
        line(
            &mut out,
            "  (clsact filters are not listed: `tc filter show dev IF ingress`)".into(),
        );
    }
    line(&mut out, "Maps:".into());
    for m in &status.maps {
        let percent = if m.capacity == 0 {
            0.0
        } else {
            100.0 * m.entries as f64 / f64::from(m.capacity)
        };
        line(
            &mut out,
            format!(
                "  {:<20} {:>9} / {:<9} {percent:5.1}%",
                m.name, m.entries, m.capacity
            ),
        );
    }
    for (name, error) in &status.unreadable_maps {
        line(&mut out, format!("  {name:<20} unreadable: {error}"));
    }
    if status.warnings.is_empty() {
        line(&mut out, "Warnings:    none".into());
    } else {
        line(&mut out, "Warnings:".into());
        for w in &status.warnings {
            line(&mut out, format!("  ! {w}"));
        }
    }
    out
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_samples_parse_with_and_without_labels() {
        let text = "# HELP x y\nweir_services 3\n\
                    weir_rejected_objects_current{kind=\"Service\",reason=\"frontend_taken\"} 2\n\
                    garbage\n";
        let samples = parse_samples(text);
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0], ("weir_services".into(), vec![], 3.0));
        assert_eq!(label(&samples[1].1, "reason"), "frontend_taken");
        assert_eq!(samples[1].2, 2.0);
    }
}

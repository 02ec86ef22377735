//! The checks a scenario can ask for. Each returns a one-line account of what it saw, or why it
//! failed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::agent::{self, Agents};
use crate::backend::{tail, Cmd, Lab};
use crate::scenario::{CheckSpec, ConntrackCheck, Protocol, Scenario, TrafficCheck};
use crate::topology::{HostId, Plan};

/// Per request: generous for a namespace lab, and still bounded.
const CLIENT_TIMEOUT_S: u32 = 3;
const EXEC_TIMEOUT: Duration = Duration::from_secs(8);
const RECLAIM_POLL: Duration = Duration::from_millis(500);
/// Failures quoted in a report; the rest are counted.
const QUOTED: usize = 3;
const GIVE_UP_AFTER: usize = 3;
/// However many requests a check asks for, it ends by then.
const TRAFFIC_DEADLINE: Duration = Duration::from_secs(180);

pub struct CheckCtx<'a> {
    pub lab: &'a mut dyn Lab,
    pub plan: &'a Plan,
    pub scenario: &'a Scenario,
    /// Service name -> endpoint pod names.
    pub endpoints: &'a BTreeMap<String, Vec<String>>,
    pub agents: Option<&'a Agents>,
}

pub fn run(ctx: &mut CheckCtx<'_>, check: &CheckSpec) -> Result<String, String> {
    match check {
        CheckSpec::Http(t) => traffic(ctx, t, Protocol::Tcp),
        CheckSpec::Udp(t) => traffic(ctx, t, Protocol::Udp),
        CheckSpec::Conntrack(c) => conntrack(ctx, c),
    }
}

/// The servers answer `pod=<name> client=<address>`.
pub fn parse_answer(text: &str) -> Option<(String, String)> {
    let line = text.lines().find(|l| l.starts_with("pod="))?;
    let mut pod = None;
    let mut client = None;
    for field in line.split_whitespace() {
        if let Some(v) = field.strip_prefix("pod=") {
            pod = Some(v.to_owned());
        } else if let Some(v) = field.strip_prefix("client=") {
            client = Some(v.to_owned());
        }
    }
    Some((pod?, client?))
}

fn client_cmd(proto: Protocol, ip: Ipv4Addr, port: u16) -> Cmd {
    match proto {
        Protocol::Tcp => Cmd::new("curl")
            .arg("-sS")
            .arg("--max-time")
            .arg(CLIENT_TIMEOUT_S.to_string())
            .arg(format!("http://{ip}:{port}/")),
        // -t1: after sending, wait up to a second for the answer; UDP has no end-of-stream.
        Protocol::Udp => Cmd::new("socat")
            .arg(format!("-T{CLIENT_TIMEOUT_S}"))
            .arg("-t1")
            .arg("-")
            .arg(format!("UDP4:{ip}:{port}"))
            .stdin("ping\n"),
    }
}

/// One request; Ok((pod, client seen)) or why there was no answer.
fn request(
    lab: &mut dyn Lab,
    from: HostId,
    proto: Protocol,
    ip: Ipv4Addr,
    port: u16,
) -> Result<(String, String), String> {
    let out = lab
        .exec(from, &client_cmd(proto, ip, port), EXEC_TIMEOUT)
        .map_err(|e| e.to_string())?;
    if !out.success() {
        return Err(format!("{}: {}", out.status(), tail(out.stderr.trim(), 1)));
    }
    parse_answer(&out.stdout).ok_or_else(|| {
        if out.stdout.trim().is_empty() {
            "no answer".to_owned()
        } else {
            format!("unexpected answer {:?}", tail(&out.stdout, 1))
        }
    })
}

fn traffic(ctx: &mut CheckCtx<'_>, t: &TrafficCheck, proto: Protocol) -> Result<String, String> {
    let plan = ctx.plan;
    // Names were validated with the scenario.
    let from = plan.host(&t.from).ok_or("unknown client")?;
    let client_ip = plan.ip(from).ok_or("client without an address")?;
    let (ip, expected): (Ipv4Addr, Vec<String>) = match (&t.service, &t.pod) {
        (Some(svc), _) => {
            let svc = ctx.scenario.service(svc).ok_or("unknown service")?;
            (
                svc.cluster_ip,
                ctx.endpoints.get(&svc.name).cloned().unwrap_or_default(),
            )
        }
        (None, Some(pod)) => {
            let pod = plan.pod(pod).ok_or("unknown pod")?;
            (pod.ip, vec![pod.name.clone()])
        }
        (None, None) => return Err("no target".into()),
    };

    let mut answers: BTreeMap<String, u32> = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    let mut rewritten: BTreeSet<String> = BTreeSet::new();
    let mut sent = 0;
    let mut deadline_hit = false;
    let started = Instant::now();
    for _ in 0..t.requests {
        // Once every request must be answered, a few failures settle the verdict; the rest
        // would only add timeouts to wait for.
        if t.expect.all_answered && failures.len() >= GIVE_UP_AFTER {
            break;
        }
        if started.elapsed() >= TRAFFIC_DEADLINE {
            deadline_hit = true;
            break;
        }
        sent += 1;
        match request(ctx.lab, from, proto, ip, t.port) {
            Ok((pod, seen)) => {
                // A pod reaching itself through a service (hairpin) is masqueraded by kube-proxy
                // too, so only answers from other pods have to show the client's address.
                if pod != t.from && seen != client_ip.to_string() {
                    rewritten.insert(format!("{pod} saw {seen}"));
                }
                *answers.entry(pod).or_default() += 1;
            }
            Err(why) => failures.push(why),
        }
    }

    let answered: usize = answers.values().map(|n| *n as usize).sum();
    let spread = if answers.is_empty() {
        "no answers".to_owned()
    } else {
        answers
            .iter()
            .map(|(pod, n)| format!("{pod}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut problems = Vec::new();
    if deadline_hit {
        problems.push(format!(
            "stopped after {} with {sent} of {} requests sent",
            humantime::format_duration(TRAFFIC_DEADLINE),
            t.requests
        ));
    }
    if t.expect.all_answered && !failures.is_empty() {
        let stopped = if sent < t.requests as usize {
            format!(", stopped after {sent} of {}", t.requests)
        } else {
            String::new()
        };
        problems.push(format!(
            "{} of {sent} unanswered{stopped} (first: {})",
            failures.len(),
            failures[0]
        ));
    }
    let strangers: Vec<&String> = answers.keys().filter(|p| !expected.contains(p)).collect();
    if !strangers.is_empty() {
        problems.push(format!(
            "answered by {strangers:?}, which are not endpoints (expected {expected:?})"
        ));
    }
    if t.expect.all_backends_used {
        let unused: Vec<&String> = expected
            .iter()
            .filter(|p| !answers.contains_key(*p))
            .collect();
        if !unused.is_empty() {
            problems.push(format!("never answered: {unused:?}"));
        }
    }
    if t.expect.client_ip_preserved && !rewritten.is_empty() {
        let quoted: Vec<&String> = rewritten.iter().take(QUOTED).collect();
        problems.push(format!("client address {client_ip} rewritten: {quoted:?}"));
    }
    if answered == 0 && problems.is_empty() {
        let first = failures.first().map_or("none", String::as_str);
        problems.push(format!("no answers at all (first failure: {first})"));
    }

    let mut summary = format!("{answered}/{sent} answered; {spread}");
    if t.expect.client_ip_preserved && rewritten.is_empty() && answered > 0 {
        summary.push_str(&format!("; client {client_ip} preserved"));
    }
    if problems.is_empty() {
        Ok(summary)
    } else {
        Err(format!("{}; seen: {summary}", problems.join("; ")))
    }
}

/// One row of `dump conntrack --json`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct CtEntry {
    pub kind: String,
    pub proto: String,
    pub src: String,
    pub dst: String,
    #[serde(default)]
    pub nat: String,
    #[serde(default)]
    pub idle_s: Option<f64>,
    #[serde(default)]
    pub state: String,
}

impl CtEntry {
    fn key(&self) -> (String, String, String, String) {
        (
            self.kind.clone(),
            self.proto.clone(),
            self.src.clone(),
            self.dst.clone(),
        )
    }

    fn short(&self) -> String {
        let idle = self
            .idle_s
            .map_or(String::new(), |s| format!(" idle {s:.1}s"));
        format!(
            "{} {} {} -> {} nat {} {}{idle}",
            self.kind, self.proto, self.src, self.dst, self.nat, self.state
        )
    }
}

/// The address part of "ip:port" or "[v6]:port".
pub fn addr_ip(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Entries of `client`'s flows to a service: forward ones leave the client for the cluster IP
/// (or, already translated, a backend); reverse ones mention the client and the service side.
pub fn flow_entries<'e>(
    entries: &'e [CtEntry],
    proto: &str,
    client: &str,
    service_side: &BTreeSet<String>,
) -> (Vec<&'e CtEntry>, Vec<&'e CtEntry>) {
    let mentions =
        |e: &CtEntry, ip: &str| [&e.src, &e.dst, &e.nat].iter().any(|a| addr_ip(a) == ip);
    let towards_service = |e: &CtEntry| service_side.iter().any(|ip| mentions(e, ip));
    let forward = entries
        .iter()
        .filter(|e| {
            e.kind == "forward"
                && e.proto == proto
                && addr_ip(&e.src) == client
                && towards_service(e)
        })
        .collect();
    let reverse = entries
        .iter()
        .filter(|e| {
            e.kind == "reverse" && e.proto == proto && mentions(e, client) && towards_service(e)
        })
        .collect();
    (forward, reverse)
}

fn read_conntrack(
    lab: &mut dyn Lab,
    agents: &Agents,
    node: HostId,
) -> Result<Vec<CtEntry>, String> {
    let agent = agents
        .nodes
        .iter()
        .find(|a| a.node == node)
        .ok_or_else(|| format!("no agent on {node}"))?;
    let json = agent::dump(lab, &agents.binary, agent, "conntrack")?;
    serde_json::from_str(&json).map_err(|e| {
        format!(
            "unreadable `dump conntrack` output ({e}): {}",
            tail(&json, 3)
        )
    })
}

fn conntrack(ctx: &mut CheckCtx<'_>, c: &ConntrackCheck) -> Result<String, String> {
    let agents = ctx
        .agents
        .ok_or("the agent is not running in this scenario")?;
    let plan = ctx.plan;
    let from = plan.host(&c.from).ok_or("unknown client")?;
    let client_ip = plan.ip(from).ok_or("client without an address")?;
    let node = match &c.node {
        Some(n) => plan.host(n).ok_or("unknown node")?,
        None => HostId::Node(from.node().ok_or("client is on no node")?),
    };
    let svc = ctx.scenario.service(&c.service).ok_or("unknown service")?;
    let mut service_side: BTreeSet<String> = BTreeSet::from([svc.cluster_ip.to_string()]);
    for pod in ctx.endpoints.get(&svc.name).into_iter().flatten() {
        if let Some(p) = plan.pod(pod) {
            service_side.insert(p.ip.to_string());
        }
    }

    // Fresh flows of our own, so the entries exist whatever ran before. UDP first: its exchange
    // takes a second, and the TCP entries, closing right away, have the shorter life.
    let mut ports = svc.ports.clone();
    ports.sort_by_key(|p| p.protocol == Protocol::Tcp);
    for p in &ports {
        request(ctx.lab, from, p.protocol, svc.cluster_ip, p.port).map_err(|why| {
            format!(
                "could not open a {} flow to {}:{}: {why}",
                p.protocol.lower(),
                svc.cluster_ip,
                p.port
            )
        })?;
    }
    let snapshot = read_conntrack(ctx.lab, agents, node)?;
    let protos: BTreeSet<&str> = ports.iter().map(|p| p.protocol.lower()).collect();
    let client = client_ip.to_string();
    let mut tracked: BTreeSet<(String, String, String, String)> = BTreeSet::new();
    let mut found = Vec::new();
    for proto in &protos {
        let (fwd, rev) = flow_entries(&snapshot, proto, &client, &service_side);
        if fwd.is_empty() || rev.is_empty() {
            let sample: Vec<String> = snapshot.iter().take(6).map(CtEntry::short).collect();
            return Err(format!(
                "{node} tracks {} forward and {} reverse {proto} entries for {client} -> {}; its table has {} entries: {sample:?}",
                fwd.len(),
                rev.len(),
                c.service,
                snapshot.len()
            ));
        }
        found.push(format!(
            "{proto} {} forward + {} reverse",
            fwd.len(),
            rev.len()
        ));
        tracked.extend(fwd.iter().chain(&rev).map(|e| e.key()));
    }
    let mut summary = format!("{node}: {}", found.join(", "));

    if let Some(within) = c.reclaimed_within {
        let started = Instant::now();
        loop {
            let now = read_conntrack(ctx.lab, agents, node)?;
            let left: Vec<&CtEntry> = now.iter().filter(|e| tracked.contains(&e.key())).collect();
            if left.is_empty() {
                summary.push_str(&format!(
                    "; all reclaimed after {:.1}s",
                    started.elapsed().as_secs_f64()
                ));
                break;
            }
            if started.elapsed() >= within {
                let sample: Vec<String> = left.iter().take(QUOTED * 2).map(|e| e.short()).collect();
                return Err(format!(
                    "{summary}; {} entries still there after {}: {sample:?}",
                    left.len(),
                    humantime::format_duration(within)
                ));
            }
            std::thread::sleep(RECLAIM_POLL);
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        assert_eq!(
            parse_answer("pod=n1p1 client=198.19.1.10\n"),
            Some(("n1p1".into(), "198.19.1.10".into()))
        );
        assert_eq!(parse_answer("<html>"), None);
        assert_eq!(parse_answer("pod=n1p1\n"), None);
    }

    #[test]
    fn addresses() {
        assert_eq!(addr_ip("198.19.1.10:8080"), "198.19.1.10");
        assert_eq!(addr_ip("[fd00::1]:80"), "fd00::1");
        assert_eq!(addr_ip("198.19.1.10"), "198.19.1.10");
    }

    #[test]
    fn picks_the_clients_flows() {
        let entries: Vec<CtEntry> = serde_json::from_str(
            r#"[
  {"kind":"forward","proto":"tcp","src":"198.19.1.10:40000","dst":"198.18.100.10:80","nat":"198.19.2.10:8080","idle_s":0.4,"state":"closing"},
  {"kind":"reverse","proto":"tcp","src":"198.19.2.10:8080","dst":"198.19.1.10:40000","nat":"198.18.100.10:80","idle_s":0.4,"state":"closing"},
  {"kind":"forward","proto":"udp","src":"198.19.1.10:40001","dst":"198.18.100.10:53","nat":"198.19.2.11:5353","idle_s":1.0,"state":"udp"},
  {"kind":"forward","proto":"tcp","src":"198.19.1.11:40000","dst":"198.18.100.10:80","nat":"198.19.2.10:8080","idle_s":0.4,"state":"closing"},
  {"kind":"forward","proto":"tcp","src":"198.19.1.10:40002","dst":"198.18.100.99:80","nat":"198.19.9.9:8080","idle_s":0.4,"state":"closing"}
]"#,
        )
        .unwrap();
        let side = BTreeSet::from([
            "198.18.100.10".to_owned(),
            "198.19.2.10".to_owned(),
            "198.19.2.11".to_owned(),
        ]);
        let (f, r) = flow_entries(&entries, "tcp", "198.19.1.10", &side);
        assert_eq!((f.len(), r.len()), (1, 1));
        let (f, r) = flow_entries(&entries, "udp", "198.19.1.10", &side);
        assert_eq!((f.len(), r.len()), (1, 0));
    }
}

//! The checks a scenario can ask for. Each returns a one-line account of what it saw, or why it
//! failed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::Deserialize;

use weir_lab_cluster::agent::{self, Agents};
use weir_lab_core::backend::{tail, Cmd, Lab};
use weir_lab_core::scenario::{
    CheckSpec, ConntrackCheck, CounterCheck, Family, FrontendCheck, HealthCheckSpec, Protocol,
    RejectedCheck, Scenario, TrafficCheck, Via,
};
use weir_lab_core::topology::{HostId, Plan};

/// Per request: generous for a namespace lab, and still bounded.
const CLIENT_TIMEOUT_S: u32 = 3;
/// An upload may first have to learn its path MTU.
const UPLOAD_TIMEOUT_S: u32 = 6;
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
    /// Every node's data-path counters when the current checks (or step) began, for counter
    /// checks.
    pub counter_marks: Option<&'a CounterMarks>,
}

/// Node -> counter name -> value.
pub type CounterMarks = BTreeMap<HostId, BTreeMap<String, u64>>;

pub fn run(ctx: &mut CheckCtx<'_>, check: &CheckSpec) -> Result<String, String> {
    match check {
        CheckSpec::Http(t) => traffic(ctx, t, Protocol::Tcp),
        CheckSpec::Udp(t) => traffic(ctx, t, Protocol::Udp),
        CheckSpec::Conntrack(c) => conntrack(ctx, c),
        CheckSpec::HealthCheck(h) => health_check(ctx, h),
        CheckSpec::Frontend(f) => frontend(ctx, f),
        CheckSpec::Rejected(r) => rejected(ctx, r),
        CheckSpec::Counter(c) => counter(ctx, c),
        CheckSpec::Reachability(r) => crate::reachability::run(ctx, r),
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
            client = Some(normalize_client(v));
        }
    }
    Some((pod?, client?))
}

/// Servers print IPv6 peers bracketed and fully expanded (socat) or v4-mapped (a dual-stack
/// socket); the checks compare addresses in their canonical form.
fn normalize_client(raw: &str) -> String {
    let plain = raw.trim_start_matches('[');
    let plain = plain.split(']').next().unwrap_or(plain);
    match plain.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => v6.to_string(),
        },
        Ok(v4) => v4.to_string(),
        Err(_) => plain.to_owned(),
    }
}

/// `ip:port` as URLs and socat want it: IPv6 bracketed.
fn host_port(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// How a client request is shaped beyond its target.
#[derive(Clone, Copy, Debug, Default)]
struct ClientOptions {
    /// HTTP: a POST of this many bytes.
    upload_bytes: Option<u32>,
    /// UDP: the datagram's size.
    size: Option<u32>,
    /// The client's source port (every request from the same one).
    source_port: Option<u16>,
    /// UDP: the datagram's fragments are sent first fragment last.
    first_fragment_last: bool,
}

fn client_cmd(proto: Protocol, ip: IpAddr, port: u16, options: ClientOptions) -> Cmd {
    let ClientOptions {
        upload_bytes,
        size,
        source_port,
        first_fragment_last,
    } = options;
    let target = host_port(ip, port);
    // socat's address options: a fixed source port is rebound by every request.
    let bind = source_port.map_or(String::new(), |p| format!(",sourceport={p},reuseaddr"));
    match proto {
        // No "Expect: 100-continue": the body goes at once, in full-sized segments.
        Protocol::Tcp if upload_bytes.is_some() => Cmd::new("sh").arg("-c").arg(format!(
            "head -c {} /dev/zero | curl -sS -g --max-time {} -H Expect: --data-binary @- http://{target}/",
            upload_bytes.unwrap_or(0),
            UPLOAD_TIMEOUT_S,
        )),
        // A fixed source port: socat, which rebinds it for every request (curl would not), and
        // HTTP/1.0, so the server closes first and keeps the TIME_WAIT, not the client.
        Protocol::Tcp if source_port.is_some() => Cmd::new("socat")
            .arg(format!("-T{CLIENT_TIMEOUT_S}"))
            .arg("-")
            .arg(if ip.is_ipv6() {
                format!("TCP6:{target}{bind}")
            } else {
                format!("TCP4:{target}{bind}")
            })
            .stdin(b"GET / HTTP/1.0\r\n\r\n".to_vec()),
        Protocol::Tcp => Cmd::new("curl")
            .arg("-sS")
            .arg("-g")
            .arg("--max-time")
            .arg(CLIENT_TIMEOUT_S.to_string())
            .arg(format!("http://{target}/")),
        // This very executable, as the probes run it: on a VM it shares the host's path.
        Protocol::Udp => {
            let lab = std::env::current_exe()
                .map_or_else(|_| "weir-lab".into(), |p| p.display().to_string());
            let cmd = if first_fragment_last {
                Cmd::new(lab)
                    .args(["probe", "first-fragment-last"])
                    .arg(target)
                    .arg("--size")
                    .arg(size.unwrap_or(0).to_string())
            } else {
                let cmd = Cmd::new(lab).args(["probe", "udp"]).arg(target);
                let cmd = match size {
                    Some(size) => cmd.arg("--size").arg(size.to_string()),
                    None => cmd,
                };
                match source_port {
                    Some(port) => cmd.arg("--source-port").arg(port.to_string()),
                    None => cmd,
                }
            };
            cmd.arg("--timeout").arg(format!("{CLIENT_TIMEOUT_S}s"))
        }
    }
}

/// One request; Ok((pod, client seen)) or why there was no answer.
fn request(
    lab: &mut dyn Lab,
    from: HostId,
    proto: Protocol,
    (ip, port): (IpAddr, u16),
    upload_bytes: Option<u32>,
) -> Result<(String, String), String> {
    let options = ClientOptions {
        upload_bytes,
        ..ClientOptions::default()
    };
    request_sized(lab, from, proto, (ip, port), options).map(|(answer, _)| answer)
}

/// [`request`] shaped by `options`; also says how long the client took.
fn request_sized(
    lab: &mut dyn Lab,
    from: HostId,
    proto: Protocol,
    (ip, port): (IpAddr, u16),
    options: ClientOptions,
) -> Result<((String, String), Duration), String> {
    let out = lab
        .exec(from, &client_cmd(proto, ip, port, options), EXEC_TIMEOUT)
        .map_err(|e| e.to_string())?;
    let took = out.duration;
    if !out.success() {
        return Err(format!(
            "{}: {} (after {} ms)",
            out.status(),
            tail(out.stderr.trim(), 1),
            took.as_millis()
        ));
    }
    let answer = parse_answer(&out.stdout).ok_or_else(|| {
        if out.stdout.trim().is_empty() {
            "no answer".to_owned()
        } else {
            format!("unexpected answer {:?}", tail(&out.stdout, 1))
        }
    })?;
    Ok((answer, took))
}

/// How long a failed request took: curl's own count ("... port 80 after 6 ms: ...") when it
/// gives one, else the "(after N ms)" [`request_sized`] appends, which also holds the time to
/// start the client (long on a VM).
fn failure_ms(failure: &str) -> Option<u64> {
    let ms_after = |text: &str| -> Option<u64> {
        let (number, _) = text.split_once(" ms")?;
        number.parse().ok()
    };
    let own = failure
        .match_indices(" after ")
        .filter(|(i, _)| !failure[..*i].ends_with('('))
        .find_map(|(i, m)| ms_after(&failure[i + m.len()..]));
    own.or_else(|| ms_after(failure.rsplit_once("(after ")?.1))
}

/// A request that failed at once because the other side refused it: curl's "couldn't
/// connect" (exit 7, ECONNREFUSED on the socket, unlike a timeout's exit 28), socat's
/// "Connection refused" (an ICMP port unreachable came back).
fn is_refusal(failure: &str) -> bool {
    failure.starts_with("exit 7:") || failure.contains("Connection refused")
}

/// Where a traffic check sends its requests and which address the client sends them from.
struct Target {
    ip: IpAddr,
    port: u16,
    client_ip: IpAddr,
    /// The pods that may answer.
    expected: Vec<String>,
}

fn target(ctx: &CheckCtx<'_>, t: &TrafficCheck, from: HostId) -> Result<Target, String> {
    let plan = ctx.plan;
    let client_ip = match (t.family, t.network) {
        (Family::Ipv6, _) => plan.ip6(from).map(IpAddr::V6),
        (Family::Ipv4, network) => plan.ip_on(from, network).map(IpAddr::V4),
    }
    .ok_or("client without an address of the check's family and network")?;
    let want_v6 = t.family == Family::Ipv6;
    match (&t.service, &t.pod) {
        (Some(svc), _) => {
            let svc = ctx.scenario.service(svc).ok_or("unknown service")?;
            let mut expected = ctx.endpoints.get(&svc.name).cloned().unwrap_or_default();
            if !t.expect.backends.is_empty() {
                expected.retain(|p| t.expect.backends.contains(p));
            }
            // Absent when a step dropped it and the check expects silence there.
            let port = svc.ports.iter().find(|p| p.port == t.port);
            let (ip, port) = match t.via {
                Via::ClusterIp => (
                    svc.cluster_ip_of(t.family)
                        .ok_or("no cluster IP of the family")?,
                    t.port,
                ),
                Via::NodePort => {
                    let node = plan
                        .host(t.node.as_deref().ok_or("no node")?)
                        .ok_or("unknown node")?;
                    let ip = if want_v6 {
                        plan.ip6(node).map(IpAddr::V6)
                    } else {
                        plan.ip_on(node, t.network).map(IpAddr::V4)
                    }
                    .ok_or("node without an address of the family")?;
                    (ip, port.and_then(|p| p.node_port).ok_or("no node port")?)
                }
                Via::ExternalIp | Via::LoadBalancer => {
                    let ips = if t.via == Via::ExternalIp {
                        &svc.external_ips
                    } else {
                        &svc.load_balancer_ips
                    };
                    let ip = ips
                        .iter()
                        .find(|ip| ip.is_ipv6() == want_v6)
                        .ok_or("no address of the family")?;
                    (*ip, t.port)
                }
            };
            Ok(Target {
                ip,
                port,
                client_ip,
                expected,
            })
        }
        (None, Some(pod)) => {
            let pod = plan.pod(pod).ok_or("unknown pod")?;
            let ip = if want_v6 {
                IpAddr::V6(pod.ip6.ok_or("pod without IPv6")?)
            } else {
                IpAddr::V4(pod.ip)
            };
            Ok(Target {
                ip,
                port: t.port,
                client_ip,
                expected: vec![pod.name.clone()],
            })
        }
        (None, None) => Err("no target".into()),
    }
}

/// Makes the underlay deliver datagrams tunnelled to `node` first fragment last (see
/// `frame_delay`); returns the node's number. The delayer logs beside the node's agent.
fn delay_first_fragments(ctx: &mut CheckCtx<'_>, node: &str) -> Result<u8, String> {
    let Some(host @ HostId::Node(index)) = ctx.plan.host(node) else {
        return Err(format!(
            "tunnel_first_fragment_last: {node:?} is not a node"
        ));
    };
    let agent_log = ctx
        .agents
        .and_then(|agents| agents.nodes.iter().find(|a| a.node == host))
        .map(|agent| agent.log.clone())
        .ok_or("tunnel_first_fragment_last needs the agent")?;
    let log = agent_log.with_file_name(format!("delay-frames-{node}.log"));
    ctx.lab
        .delay_first_fragments(index, weir_lab_backends::frame_delay::VXLAN_PORT, &log)
        .map_err(|e| format!("delaying first fragments towards {node}: {e}"))?;
    Ok(index)
}

/// Packets node `node`'s tunnel device has received so far.
fn tunnel_rx_packets(lab: &mut dyn Lab, node: HostId, device: &str) -> Result<u64, String> {
    #[derive(Deserialize)]
    struct Link {
        stats64: Stats,
    }
    #[derive(Deserialize)]
    struct Stats {
        rx: Counters,
    }
    #[derive(Deserialize)]
    struct Counters {
        packets: u64,
    }
    let cmd = Cmd::new("ip")
        .arg("-j")
        .arg("-s")
        .arg("link")
        .arg("show")
        .arg("dev")
        .arg(device);
    let out = lab
        .exec_ok(node, &cmd, EXEC_TIMEOUT)
        .map_err(|e| format!("reading {node}'s {device} counters: {e}"))?;
    let links: Vec<Link> = serde_json::from_str(&out.stdout)
        .map_err(|e| format!("unreadable `{cmd}` output on {node}: {e}"))?;
    links
        .first()
        .map(|l| l.stats64.rx.packets)
        .ok_or_else(|| format!("{node} has no {device}"))
}

/// The path MTU `host`'s kernel has learnt towards `ip` (a route exception), if any.
fn route_mtu(lab: &mut dyn Lab, host: HostId, ip: IpAddr) -> Result<Option<u32>, String> {
    let family = if ip.is_ipv6() { "-6" } else { "-4" };
    let cmd = Cmd::new("ip")
        .arg(family)
        .arg("-o")
        .arg("route")
        .arg("get")
        .arg(ip.to_string());
    let out = lab
        .exec_ok(host, &cmd, EXEC_TIMEOUT)
        .map_err(|e| format!("reading {host}'s route to {ip}: {e}"))?;
    Ok(parse_route_mtu(&out.stdout))
}

/// `ip -o route get` prints "... cache expires 598sec mtu 1450 ..." once a path MTU is known.
fn parse_route_mtu(text: &str) -> Option<u32> {
    let mut words = text.split_whitespace();
    while let Some(word) = words.next() {
        if word == "mtu" {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// Requests over one keep-alive connection to a load-balancer (or external) IP, paced; half-way
/// through, the client's route to the IP moves to another node. Every answer must come from one
/// backend over that one connection: the new ingress node picked the backend the old one had.
fn ingress_switch(
    ctx: &mut CheckCtx<'_>,
    t: &TrafficCheck,
    from: HostId,
    ip: IpAddr,
    port: u16,
    expected: &[String],
) -> Result<String, String> {
    const PACE_PER_S: u32 = 4;
    let plan = ctx.plan;
    let to_name = t
        .switch_ingress_to
        .as_deref()
        .ok_or("no node to switch to")?;
    let to = plan.host(to_name).ok_or("unknown node")?;
    let via = if ip.is_ipv6() {
        plan.ip6(to).map(IpAddr::V6)
    } else {
        plan.ip(to).map(IpAddr::V4)
    }
    .ok_or("node without an address of the family")?;
    let url = format!("http://{}/", host_port(ip, port));
    let urls = vec![url.as_str(); t.requests as usize].join(" ");
    let prefix = if ip.is_ipv6() { "128" } else { "32" };
    let family = if ip.is_ipv6() { "-6" } else { "-4" };
    // curl writes one line per answer and then how it got it (0 connections: reused).
    let half_s = f64::from(t.requests) / f64::from(PACE_PER_S) / 2.0;
    let script = format!(
        "curl -sS -g --max-time 30 --rate {PACE_PER_S}/s -w ' connects=%{{num_connects}}\n' {urls} &          sleep {half_s:.2}; ip {family} route replace {ip}/{prefix} via {via}; wait $!"
    );
    let out = ctx
        .lab
        .exec(
            from,
            &Cmd::new("sh").arg("-c").arg(script),
            Duration::from_secs(40),
        )
        .map_err(|e| e.to_string())?;
    let mut pods: BTreeMap<String, u32> = BTreeMap::new();
    let mut connects = 0;
    let mut answered = 0;
    for line in out.stdout.lines() {
        if let Some((pod, _)) = parse_answer(line) {
            *pods.entry(pod).or_default() += 1;
            answered += 1;
        }
        if let Some((_, n)) = line.rsplit_once("connects=") {
            connects += n.trim().parse::<u32>().unwrap_or(0);
        }
    }
    let spread = pods
        .iter()
        .map(|(pod, n)| format!("{pod}={n}"))
        .collect::<Vec<_>>()
        .join(" ");
    let seen = format!(
        "{answered}/{} answered over {connects} connection(s) to {url} with the route moved to {to} ({via}) half-way; {spread}",
        t.requests
    );
    let mut problems = Vec::new();
    if answered != t.requests as usize {
        problems.push(format!(
            "{} unanswered ({})",
            t.requests as usize - answered,
            tail(out.stderr.trim(), 1)
        ));
    }
    if connects != 1 {
        problems.push("the connection did not survive the move".to_owned());
    }
    if pods.len() > 1 {
        problems.push("answers came from more than one backend".to_owned());
    }
    if let Some(stranger) = pods.keys().find(|p| !expected.contains(p)) {
        problems.push(format!("{stranger} is not an endpoint"));
    }
    if problems.is_empty() {
        Ok(seen)
    } else {
        Err(format!("{}; seen: {seen}", problems.join("; ")))
    }
}

fn traffic(ctx: &mut CheckCtx<'_>, t: &TrafficCheck, proto: Protocol) -> Result<String, String> {
    let plan = ctx.plan;
    // Names were validated with the scenario.
    let from = plan.host(&t.from).ok_or("unknown client")?;
    let Target {
        ip,
        port,
        client_ip,
        expected,
    } = target(ctx, t, from)?;
    if t.switch_ingress_to.is_some() {
        return ingress_switch(ctx, t, from, ip, port, &expected);
    }
    let device = ctx.scenario.agent.tunnel.device();
    let tunnel_node = match &t.tunnel_replies {
        Some(tr) => Some(plan.host(&tr.node).ok_or("unknown node")?),
        None => None,
    };
    let rx_before = match tunnel_node {
        Some(node) => Some(tunnel_rx_packets(ctx.lab, node, device)?),
        None => None,
    };
    let reordered_at = match &t.tunnel_first_fragment_last {
        Some(node) => Some(delay_first_fragments(ctx, node)?),
        None => None,
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
        let options = ClientOptions {
            upload_bytes: t.upload_bytes,
            size: t.size,
            source_port: t.source_port,
            first_fragment_last: t.first_fragment_last,
        };
        match request_sized(ctx.lab, from, proto, (ip, port), options) {
            Ok(((pod, seen), _)) => {
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

    if let Some(node) = reordered_at {
        ctx.lab
            .restore_fragment_order(node)
            .map_err(|e| format!("restoring the underlay's order: {e}"))?;
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
    if t.expect.none_answered && answered > 0 {
        problems.push(format!(
            "{answered} of {sent} answered, where the traffic must be dropped"
        ));
    }
    if let Some(within) = t.expect.refused_within {
        let slow: Vec<&String> = failures
            .iter()
            .filter(|f| {
                is_refusal(f) && failure_ms(f).is_none_or(|ms| ms > within.as_millis() as u64)
            })
            .collect();
        if !slow.is_empty() {
            problems.push(format!(
                "{} refusal(s) slower than {} (first: {})",
                slow.len(),
                humantime::format_duration(within),
                slow[0]
            ));
        }
    }
    if t.expect.refusal() {
        let refused = failures.iter().filter(|f| is_refusal(f)).count();
        if answered > 0 || refused < failures.len() || failures.is_empty() {
            let first = failures
                .iter()
                .find(|f| !is_refusal(f))
                .map_or("", String::as_str);
            problems.push(format!(
                "{refused} of {sent} refused, {answered} answered{}",
                if first.is_empty() {
                    String::new()
                } else {
                    format!(" (other failure: {first})")
                }
            ));
        }
    }
    if t.expect.same_backend && answers.len() > 1 {
        problems.push(format!(
            "answers from {} endpoints, where affinity keeps one",
            answers.len()
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
    let mut tunnel_note = String::new();
    if let (Some(node), Some(before), Some(tr)) = (tunnel_node, rx_before, &t.tunnel_replies) {
        let received = tunnel_rx_packets(ctx.lab, node, device)?.saturating_sub(before);
        tunnel_note = format!("; {node}'s {device} received {received} packets");
        // Each answered exchange brings at least one reply packet back through the tunnel
        // when replies return through the ingress node.
        if tr.seen && received < answered as u64 {
            problems.push(format!(
                "{node}'s {device} received {received} packets for {answered} answers: the replies did not come back through it"
            ));
        }
        if !tr.seen && received > 0 {
            problems.push(format!(
                "{node}'s {device} received {received} packets: replies came back through the ingress node"
            ));
        }
    }
    if let Some(want) = t.learned_mtu {
        match route_mtu(ctx.lab, from, ip)? {
            Some(mtu) if mtu == want => {
                tunnel_note.push_str(&format!("; {from} learnt path MTU {mtu} towards {ip}"));
            }
            Some(mtu) => problems.push(format!(
                "{from}'s route to {ip} has path MTU {mtu}, where {want} was to be learnt"
            )),
            None => problems.push(format!(
                "{from}'s route to {ip} learnt no path MTU (no ICMP fragmentation needed / packet too big arrived; {want} expected)"
            )),
        }
    }
    if answered == 0 && problems.is_empty() && !t.expect.none_answered && !t.expect.refusal() {
        let first = failures.first().map_or("none", String::as_str);
        problems.push(format!("no answers at all (first failure: {first})"));
    }

    let mut summary = format!(
        "{answered}/{sent} answered from {client_ip} to {}; {spread}",
        host_port(ip, port)
    );
    summary.push_str(&tunnel_note);
    if t.expect.refusal() && !failures.is_empty() {
        summary.push_str(&format!("; {} refused ({})", failures.len(), failures[0]));
    }
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
    let cluster_ip = svc.cluster_ip.ok_or("the service has no IPv4 cluster IP")?;
    let mut service_side: BTreeSet<String> = BTreeSet::from([cluster_ip.to_string()]);
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
        request(
            ctx.lab,
            from,
            p.protocol,
            (IpAddr::V4(cluster_ip), p.port),
            None,
        )
        .map_err(|why| {
            format!(
                "could not open a {} flow to {}:{}: {why}",
                p.protocol.lower(),
                cluster_ip,
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

/// The health-check node port as a cloud load balancer probes it: the status code, and the
/// local endpoint count in the JSON body kube-proxy's server writes.
fn health_check(ctx: &mut CheckCtx<'_>, h: &HealthCheckSpec) -> Result<String, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Body {
        local_endpoints: u32,
    }
    let plan = ctx.plan;
    let from = plan.host(&h.from).ok_or("unknown client")?;
    let node = plan.host(&h.node).ok_or("unknown node")?;
    let svc = ctx.scenario.service(&h.service).ok_or("unknown service")?;
    let port = svc.health_check_node_port.ok_or("no health check port")?;
    let ip = plan.ip(node).ok_or("node without an address")?;
    let url = format!("http://{}/", host_port(IpAddr::V4(ip), port));
    let cmd = Cmd::new("curl")
        .arg("-sS")
        .arg("--max-time")
        .arg(CLIENT_TIMEOUT_S.to_string())
        .arg("-w")
        .arg("\n%{http_code}")
        .arg(&url);
    let out = ctx
        .lab
        .exec(from, &cmd, EXEC_TIMEOUT)
        .map_err(|e| e.to_string())?;
    if !out.success() {
        return Err(format!(
            "{url}: {}: {}",
            out.status(),
            tail(out.stderr.trim(), 1)
        ));
    }
    let (body, status) = out
        .stdout
        .trim_end()
        .rsplit_once('\n')
        .ok_or_else(|| format!("{url}: unexpected answer {:?}", out.stdout))?;
    let status: u16 = status
        .trim()
        .parse()
        .map_err(|_| format!("{url}: no status in {:?}", out.stdout))?;
    let parsed: Body = serde_json::from_str(body)
        .map_err(|e| format!("{url}: body {body:?} is not kube-proxy's JSON: {e}"))?;
    let seen = format!(
        "{url} answered {status} with localEndpoints {}",
        parsed.local_endpoints
    );
    if status != h.status || parsed.local_endpoints != h.local_endpoints {
        return Err(format!(
            "{seen}; want {} with {}",
            h.status, h.local_endpoints
        ));
    }
    Ok(seen)
}

/// The agents a check reads: the one of `node`, or every node's.
fn agents_of<'a>(
    ctx: &CheckCtx<'a>,
    node: Option<&str>,
) -> Result<Vec<&'a weir_lab_cluster::agent::NodeAgent>, String> {
    let agents = ctx
        .agents
        .ok_or("the agent is not running in this scenario")?;
    match node {
        None => Ok(agents.nodes.iter().collect()),
        Some(name) => {
            let id = ctx.plan.host(name).ok_or("unknown node")?;
            let agent = agents
                .nodes
                .iter()
                .find(|a| a.node == id)
                .ok_or_else(|| format!("no agent on {name}"))?;
            Ok(vec![agent])
        }
    }
}

/// Polls `look` on every agent until it returns Ok for all of them, or `within` has passed:
/// the agents react to a change in their own time.
fn poll_agents(
    ctx: &mut CheckCtx<'_>,
    node: Option<&str>,
    within: Duration,
    mut look: impl FnMut(
        &mut dyn Lab,
        &Agents,
        &weir_lab_cluster::agent::NodeAgent,
    ) -> Result<String, String>,
) -> Result<String, String> {
    let targets = agents_of(ctx, node)?;
    let agents = ctx
        .agents
        .ok_or("the agent is not running in this scenario")?;
    let started = Instant::now();
    loop {
        let mut seen = Vec::new();
        let mut failed = None;
        for agent in &targets {
            match look(ctx.lab, agents, agent) {
                Ok(s) => seen.push(format!("{}: {s}", agent.node)),
                Err(why) => {
                    failed = Some(format!("{}: {why}", agent.node));
                    break;
                }
            }
        }
        match failed {
            None => {
                return Ok(format!(
                    "{} (after {:.1}s)",
                    seen.join("; "),
                    started.elapsed().as_secs_f64()
                ))
            }
            Some(why) if started.elapsed() >= within => {
                return Err(format!(
                    "{why} (still after {})",
                    humantime::format_duration(within)
                ))
            }
            Some(_) => std::thread::sleep(AGENT_POLL),
        }
    }
}

const AGENT_POLL: Duration = Duration::from_millis(250);

fn frontend(ctx: &mut CheckCtx<'_>, f: &FrontendCheck) -> Result<String, String> {
    let ip = match (&f.service, f.address) {
        (Some(name), _) => {
            let svc = ctx.scenario.service(name).ok_or("unknown service")?;
            Some(
                svc.cluster_ip_of(f.family)
                    .ok_or("no cluster IP of the family")?,
            )
        }
        (None, ip) => ip,
    };
    let port = f.port;
    let proto = f.protocol.lower();
    poll_agents(ctx, f.node.as_deref(), f.within, |lab, agents, agent| {
        let json = agent::dump(lab, &agents.binary, agent, "services")?;
        let dumped: Vec<agent::DumpedService> = serde_json::from_str(&json)
            .map_err(|e| format!("unreadable `dump services` output: {e}"))?;
        let matching: Vec<&agent::DumpedService> = dumped
            .iter()
            .filter(|d| d.proto == proto)
            .filter(|d| match d.frontend.parse::<std::net::SocketAddr>() {
                Ok(addr) => addr.port() == port && ip.is_none_or(|ip| addr.ip() == ip),
                Err(_) => false,
            })
            .collect();
        let shown: Vec<String> = matching
            .iter()
            .map(|d| {
                format!(
                    "{}/{} with {} backends",
                    d.frontend,
                    d.proto,
                    d.backend_count.unwrap_or(d.backends.len())
                )
            })
            .collect();
        match (f.present, matching.first()) {
            (false, None) => Ok("absent".to_owned()),
            (false, Some(_)) => Err(format!("present: {}", shown.join(", "))),
            (true, None) => Err(format!("absent ({} frontends programmed)", dumped.len())),
            (true, Some(d)) => {
                let count = d.backend_count.unwrap_or(d.backends.len());
                match f.backends {
                    Some(want) if want != count => {
                        Err(format!("{}, want {want} backends", shown.join(", ")))
                    }
                    _ => Ok(shown.join(", ")),
                }
            }
        }
    })
}

/// `weir_rejected_objects_current{kind="K",reason="R"} N` rows of an agent's /metrics.
pub fn rejected_objects(metrics: &str) -> BTreeMap<(String, String), u64> {
    let mut out = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("weir_rejected_objects_current{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        let label = |name: &str| {
            labels.split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k.trim() == name).then(|| v.trim().trim_matches('"').to_owned())
            })
        };
        let (Some(kind), Some(reason)) = (label("kind"), label("reason")) else {
            continue;
        };
        let value = value.trim().parse::<f64>().unwrap_or(0.0) as u64;
        out.insert((kind, reason), value);
    }
    out
}

fn rejected(ctx: &mut CheckCtx<'_>, r: &RejectedCheck) -> Result<String, String> {
    let key = (r.object_kind.clone(), r.reason.clone());
    poll_agents(ctx, r.node.as_deref(), r.within, |lab, _, agent| {
        let url = format!("http://{}/metrics", agent::METRICS_ADDR);
        let out = lab
            .exec(
                agent.node,
                &Cmd::new("curl")
                    .arg("-sS")
                    .arg("--max-time")
                    .arg("3")
                    .arg(&url),
                EXEC_TIMEOUT,
            )
            .map_err(|e| e.to_string())?;
        if !out.success() {
            return Err(format!("{url}: {}", tail(out.stderr.trim(), 1)));
        }
        let count = rejected_objects(&out.stdout)
            .get(&key)
            .copied()
            .unwrap_or(0);
        if count != r.count {
            return Err(format!(
                "{count} {} rejected for {}, want {}",
                r.object_kind, r.reason, r.count
            ));
        }
        if let Some(text) = &r.log_contains {
            let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
            if !log.contains(text.as_str()) {
                return Err(format!(
                    "its log {} does not say {text:?}",
                    agent.log.display()
                ));
            }
        }
        Ok(format!(
            "{count} {} rejected for {}",
            r.object_kind, r.reason
        ))
    })
}

/// Every node's counters now.
pub fn read_counters(lab: &mut dyn Lab, agents: &Agents) -> Result<CounterMarks, String> {
    let mut marks = CounterMarks::new();
    for agent in &agents.nodes {
        let json = agent::dump(lab, &agents.binary, agent, "counters")?;
        let values: BTreeMap<String, u64> = serde_json::from_str(&json)
            .map_err(|e| format!("unreadable `dump counters` output: {e}"))?;
        marks.insert(agent.node, values);
    }
    Ok(marks)
}

/// Every node's counters now, if one of `checks` compares against them: read when the checks
/// (or a step) begin.
pub fn counter_marks(
    lab: &mut dyn Lab,
    agents: Option<&Agents>,
    checks: &[CheckSpec],
) -> Option<CounterMarks> {
    if !checks.iter().any(|c| matches!(c, CheckSpec::Counter(_))) {
        return None;
    }
    match read_counters(lab, agents?) {
        Ok(marks) => Some(marks),
        Err(e) => {
            // The counter checks then fail, saying no counters were read.
            tracing::warn!("reading counters: {e}");
            None
        }
    }
}

fn counter(ctx: &mut CheckCtx<'_>, c: &CounterCheck) -> Result<String, String> {
    let marks = ctx
        .counter_marks
        .ok_or("no counters were read when the checks began")?;
    let agents = ctx
        .agents
        .ok_or("the agent is not running in this scenario")?;
    let node = ctx.plan.host(&c.node).ok_or("unknown node")?;
    let before = marks
        .get(&node)
        .and_then(|m| m.get(&c.counter))
        .copied()
        .ok_or_else(|| format!("{node} has no counter {:?}", c.counter))?;
    let now = read_counters(ctx.lab, agents)?;
    let after = now
        .get(&node)
        .and_then(|m| m.get(&c.counter))
        .copied()
        .ok_or_else(|| format!("{node} has no counter {:?}", c.counter))?;
    let moved = after.saturating_sub(before);
    let seen = format!("{} on {node}: {before} -> {after} (+{moved})", c.counter);
    if c.unchanged && moved > 0 {
        return Err(format!("{seen}, where it must not move"));
    }
    if !c.unchanged && moved < c.at_least {
        return Err(format!("{seen}, want at least +{}", c.at_least));
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_mtu() {
        assert_eq!(
            parse_route_mtu(
                "198.18.0.1 dev eth0 src 198.18.0.201 uid 0 \\    cache expires 598sec mtu 1450 "
            ),
            Some(1450)
        );
        assert_eq!(
            parse_route_mtu("198.18.0.1 dev eth0 src 198.18.0.201 uid 0 \\    cache "),
            None
        );
    }

    #[test]
    fn answers() {
        assert_eq!(
            parse_answer("pod=n1p1 client=198.19.1.10\n"),
            Some(("n1p1".into(), "198.19.1.10".into()))
        );
        assert_eq!(
            parse_answer("pod=n1p1 client=[fd00:19:1::a]:40000\n"),
            Some(("n1p1".into(), "fd00:19:1::a".into()))
        );
        assert_eq!(
            parse_answer("pod=n1p1 client=::ffff:198.18.0.201\n"),
            Some(("n1p1".into(), "198.18.0.201".into()))
        );
        assert_eq!(
            parse_answer("pod=n1p1 client=[fd00:0019:0001:0000:0000:0000:0000:000a]\n"),
            Some(("n1p1".into(), "fd00:19:1::a".into()))
        );
        assert_eq!(parse_answer("<html>"), None);
        assert_eq!(parse_answer("pod=n1p1\n"), None);
    }

    #[test]
    fn rejected_objects_from_metrics() {
        let text = "# HELP weir_rejected_objects_current ...\n\
                    weir_rejected_objects_current{kind=\"Service\",reason=\"node_port_out_of_range\"} 1\n\
                    weir_rejected_objects_current{kind=\"File\",reason=\"unparsable\"} 0\n\
                    weir_rejected_objects_total{kind=\"Service\",reason=\"x\"} 7\n";
        let got = rejected_objects(text);
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[&("Service".to_owned(), "node_port_out_of_range".to_owned())],
            1
        );
    }

    #[test]
    fn refusal_timing_and_datagrams() {
        assert_eq!(
            failure_ms("exit 7: curl: (7) Failed to connect (after 19 ms)"),
            Some(19)
        );
        assert_eq!(failure_ms("no answer"), None);
        assert_eq!(
            failure_ms("exit 7: curl: (7) Failed to connect to 198.18.100.47 port 80 after 6 ms: Couldn't connect to server (after 1143 ms)"),
            Some(6)
        );
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

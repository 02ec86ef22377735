//! `weir-agent monitor`: NetworkPolicy's verdicts on flows as they happen, from the data path's
//! ring buffer (`WEIR_MONITOR_EVENTS`), as lines a person reads or as JSON.
//!
//! The data path writes events only while a monitor holds the lease in `WEIR_MONITOR` (a pid
//! and a deadline it renews every second), so nobody pays for events nobody reads, and a
//! monitor killed without a word stops costing anything within `MONITOR_LEASE_NS`. One monitor
//! at a time: a ring buffer has one reader, and a second would steal half the events; the
//! second is refused unless told to take over.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use aya::maps::{Array, MapData, RingBuf};
use serde::Serialize;
use tokio::io::{unix::AsyncFd, Interest};
use weir_common::{
    counter, map_names, monitor_flags, MonitorConfig, MonitorEvent, MONITOR_LEASE_NS,
};

use crate::compile::{ip_of, proto_name, socket_addr};
use crate::conntrack::monotonic_now_ns;
use crate::dataplane::{open_pinned, Counters, DataplaneError};

/// How often the lease is renewed (it lasts `MONITOR_LEASE_NS`).
const RENEW_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("the monitor lease (WEIR_MONITOR): {0}")]
    Lease(#[source] aya::maps::MapError),
    #[error(
        "another monitor (pid {pid}) is watching this node (lease valid for {left:?} more); \
         a ring buffer has one reader: stop it, or pass --take-over"
    )]
    Busy { pid: u32, left: Duration },
    #[error("the monitor's lease was taken over by pid {0}")]
    TakenOver(u32),
    #[error("waiting for events: {0}")]
    Poll(#[source] std::io::Error),
    #[error("writing events: {0}")]
    Output(#[source] std::io::Error),
    #[error("an event of {0} bytes, not {size}", size = std::mem::size_of::<MonitorEvent>())]
    ShortEvent(usize),
}

/// Which verdicts to stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum VerdictFilter {
    /// Flows NetworkPolicy denies.
    #[default]
    Denied,
    /// New flows NetworkPolicy allows to or from an isolated pod.
    Allowed,
    All,
}

impl VerdictFilter {
    fn flags(self) -> u32 {
        match self {
            VerdictFilter::Denied => monitor_flags::DENIED,
            VerdictFilter::Allowed => monitor_flags::ALLOWED,
            VerdictFilter::All => monitor_flags::DENIED | monitor_flags::ALLOWED,
        }
    }
}

/// What a monitor shows: events of the verdicts asked, whose tuple (either end, or the
/// service frontend) holds one of `addresses` and one of `ports`, when given.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub verdict: VerdictFilter,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<u16>,
}

impl Filter {
    pub fn matches(&self, event: &MonitorEvent) -> bool {
        let flow = &event.flow;
        let verdict = if event.outcome == counter::POLICY_ALLOWED {
            monitor_flags::ALLOWED
        } else {
            monitor_flags::DENIED
        };
        let service = event.frontend_port_be != 0;
        let addresses_match = self.addresses.is_empty()
            || self.addresses.iter().any(|a| {
                *a == ip_of(&flow.saddr, flow.family)
                    || *a == ip_of(&flow.daddr, flow.family)
                    || (service && *a == ip_of(&event.frontend, flow.family))
            });
        let ports_match = self.ports.is_empty()
            || self.ports.iter().any(|p| {
                let p = p.to_be();
                p == flow.sport_be || p == flow.dport_be || (service && p == event.frontend_port_be)
            });
        self.verdict.flags() & verdict != 0 && addresses_match && ports_match
    }
}

/// One event as the monitor prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FlowEvent {
    /// Wall-clock time, RFC 3339 with milliseconds.
    pub time: String,
    /// `denied` or `allowed`.
    pub verdict: &'static str,
    /// The direction whose rules denied: `ingress` or `egress` (none for an allowed flow).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<&'static str>,
    pub proto: String,
    /// The flow as the pod sees it: the client's own address; for a service's flow, the
    /// chosen backend as destination.
    pub source: String,
    pub destination: String,
    /// The service frontend the client addressed, for a service's flow.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frontend: Option<String>,
    /// The policy endpoint whose rules decided, and its pod when the agent names it.
    pub endpoint: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The counter the packet went to (`dump counters`, `weir_datapath_*`).
    pub counter: &'static str,
}

impl FlowEvent {
    /// `clock`: the wall clock and the monotonic one read together, to place the event's
    /// monotonic time on the wall clock.
    pub fn new(
        raw: &MonitorEvent,
        pods: &BTreeMap<u32, String>,
        clock: (SystemTime, u64),
    ) -> FlowEvent {
        let flow = &raw.flow;
        let (wall, monotonic) = clock;
        let time = match monotonic.checked_sub(raw.time_ns) {
            Some(ago) => wall - Duration::from_nanos(ago),
            None => wall + Duration::from_nanos(raw.time_ns - monotonic),
        };
        let direction = match raw.outcome {
            counter::DROP_POLICY_INGRESS => Some("ingress"),
            counter::DROP_POLICY_EGRESS => Some("egress"),
            _ => None,
        };
        FlowEvent {
            time: humantime::format_rfc3339_millis(time).to_string(),
            verdict: if raw.outcome == counter::POLICY_ALLOWED {
                "allowed"
            } else {
                "denied"
            },
            direction,
            proto: proto_name(flow.proto),
            source: socket_addr(&flow.saddr, flow.family, flow.sport_be),
            destination: socket_addr(&flow.daddr, flow.family, flow.dport_be),
            frontend: (raw.frontend_port_be != 0)
                .then(|| socket_addr(&raw.frontend, flow.family, raw.frontend_port_be)),
            endpoint: raw.endpoint_id,
            pod: pods.get(&raw.endpoint_id).cloned(),
            counter: counter::NAMES
                .get(raw.outcome as usize)
                .copied()
                .unwrap_or("unknown"),
        }
    }

    /// `TIME VERDICT [DIRECTION] PROTO SOURCE -> DESTINATION [via FRONTEND] POD`.
    pub fn line(&self) -> String {
        let mut line = format!("{} {}", self.time, self.verdict.to_uppercase());
        if let Some(direction) = self.direction {
            line += &format!(" {direction}");
        }
        line += &format!(" {} {} -> {}", self.proto, self.source, self.destination);
        if let Some(frontend) = &self.frontend {
            line += &format!(" via {frontend}");
        }
        match &self.pod {
            Some(pod) => line += &format!(" pod {pod}"),
            None => line += &format!(" endpoint #{}", self.endpoint),
        }
        line
    }
}

/// Reads one record of the ring buffer.
pub fn decode(bytes: &[u8]) -> Result<MonitorEvent, MonitorError> {
    if bytes.len() < std::mem::size_of::<MonitorEvent>() {
        return Err(MonitorError::ShortEvent(bytes.len()));
    }
    // SAFETY: the slice holds at least one `MonitorEvent`, a #[repr(C)] plain-data type for
    // which every bit pattern is valid; the read makes no assumption about alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<MonitorEvent>()) })
}

/// The monitor's claim on the data path's events (`WEIR_MONITOR`).
struct Lease {
    map: Array<MapData, MonitorConfig>,
    config: MonitorConfig,
}

impl Lease {
    fn acquire(pin_dir: &Path, flags: u32, take_over: bool) -> Result<Lease, MonitorError> {
        let map: Array<MapData, MonitorConfig> = open_pinned(pin_dir, map_names::MONITOR)?;
        let now = monotonic_now_ns();
        let held = map.get(&0, 0).map_err(MonitorError::Lease)?;
        if held.flags != 0 && held.until_ns > now && !take_over {
            return Err(MonitorError::Busy {
                pid: held.owner_pid,
                left: Duration::from_nanos(held.until_ns - now),
            });
        }
        let mut lease = Lease {
            map,
            config: MonitorConfig {
                flags,
                owner_pid: std::process::id(),
                until_ns: 0,
            },
        };
        lease.write()?;
        Ok(lease)
    }

    /// Extends the lease, unless another monitor took it over meanwhile.
    fn renew(&mut self) -> Result<(), MonitorError> {
        let held = self.map.get(&0, 0).map_err(MonitorError::Lease)?;
        if held.owner_pid != self.config.owner_pid {
            return Err(MonitorError::TakenOver(held.owner_pid));
        }
        self.write()
    }

    fn write(&mut self) -> Result<(), MonitorError> {
        self.config.until_ns = monotonic_now_ns() + MONITOR_LEASE_NS;
        self.map.set(0, self.config, 0).map_err(MonitorError::Lease)
    }

    /// Stops the data path's events at once, if the lease is still ours.
    fn release(&mut self) {
        if let Ok(held) = self.map.get(&0, 0) {
            if held.owner_pid == self.config.owner_pid {
                let _ = self.map.set(0, MonitorConfig::default(), 0);
            }
        }
    }
}

/// How a monitor run ends.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub filter: Filter,
    pub json: bool,
    /// Stop after this many events printed.
    pub count: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Take the lease from another monitor.
    pub take_over: bool,
    /// Endpoint ids to pod names (the running agent's `/policy`).
    pub pods: BTreeMap<u32, String>,
}

/// What a run saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub printed: u64,
    /// Events the filter left out.
    pub filtered: u64,
    /// Events the data path lost to a full ring buffer while this monitor ran.
    pub lost: u64,
}

/// Streams events to `out` until the count or duration is reached, or SIGINT/SIGTERM.
pub async fn run(
    pin_dir: &Path,
    options: &Options,
    out: &mut dyn Write,
) -> Result<Summary, MonitorError> {
    let ring: RingBuf<MapData> = open_pinned(pin_dir, map_names::MONITOR_EVENTS)?;
    let counters = Counters::open_pinned(pin_dir)?;
    let lost_before = lost(&counters)?;
    // SAFETY: the ring buffer owns its map's file descriptor and keeps it open, unchanged,
    // for as long as it lives, which is as long as the `AsyncFd` that owns it.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| MonitorError::Poll(e.into()))?;
    let started = monotonic_now_ns();
    let mut lease = Lease::acquire(pin_dir, options.filter.verdict.flags(), options.take_over)?;
    let streamed = stream(&mut ring, &mut lease, options, started, out).await;
    // Released whatever happened (a lease taken over is left to its new owner).
    lease.release();
    let mut summary = streamed?;
    summary.lost = lost(&counters)?.saturating_sub(lost_before);
    Ok(summary)
}

/// `monitor_lost` summed over CPUs.
fn lost(counters: &Counters) -> Result<u64, MonitorError> {
    // `read` lists every counter in index order.
    Ok(counters.read()?[counter::MONITOR_LOST as usize].1)
}

async fn stream(
    ring: &mut AsyncFd<RingBuf<MapData>>,
    lease: &mut Lease,
    options: &Options,
    started: u64,
    out: &mut dyn Write,
) -> Result<Summary, MonitorError> {
    let mut summary = Summary::default();
    let deadline = options.duration.map(|d| tokio::time::Instant::now() + d);
    let mut renew = tokio::time::interval(RENEW_EVERY);
    renew.tick().await;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(MonitorError::Poll)?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(MonitorError::Poll)?;
    let done = |summary: &Summary| options.count.is_some_and(|c| summary.printed >= c);
    while !done(&summary) {
        let until_deadline = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ready = ring.readable_mut() => {
                let mut guard = ready.map_err(MonitorError::Poll)?;
                let clock = (SystemTime::now(), monotonic_now_ns());
                while let Some(record) = guard.get_inner_mut().next() {
                    let raw = decode(&record)?;
                    // Left from before this monitor (a buffer nobody drained): not news.
                    if raw.time_ns < started {
                        continue;
                    }
                    if !options.filter.matches(&raw) {
                        summary.filtered += 1;
                        continue;
                    }
                    let event = FlowEvent::new(&raw, &options.pods, clock);
                    let text = if options.json {
                        serde_json::to_string(&event).expect("a flow event serializes")
                    } else {
                        event.line()
                    };
                    writeln!(out, "{text}").map_err(MonitorError::Output)?;
                    summary.printed += 1;
                    if done(&summary) {
                        break;
                    }
                }
                out.flush().map_err(MonitorError::Output)?;
                guard.clear_ready();
            }
            _ = renew.tick() => lease.renew()?,
            _ = until_deadline => break,
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_common::{Addr, CtKey, FAMILY_V4, PROTO_TCP, PROTO_UDP};

    fn v4(a: [u8; 4]) -> Addr {
        Addr::from_v4(a)
    }

    fn event(outcome: u32, frontend: Option<([u8; 4], u16)>) -> MonitorEvent {
        let (frontend, frontend_port_be) =
            frontend.map_or((Addr::UNSPECIFIED, 0), |(a, p)| (v4(a), p.to_be()));
        MonitorEvent {
            time_ns: 5_000_000_000,
            flow: CtKey {
                saddr: v4([198, 18, 0, 2]),
                daddr: v4([198, 18, 1, 5]),
                sport_be: 40000u16.to_be(),
                dport_be: 8080u16.to_be(),
                proto: PROTO_TCP,
                family: FAMILY_V4,
                _pad: 0,
            },
            frontend,
            frontend_port_be,
            outcome,
            endpoint_id: 7,
            ..MonitorEvent::default()
        }
    }

    fn clock() -> (SystemTime, u64) {
        // The event happened 1.5 s before this reading.
        (
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            6_500_000_000,
        )
    }

    #[test]
    fn a_denied_service_flow_reads_as_a_line_and_as_json() {
        let raw = event(counter::DROP_POLICY_INGRESS, Some(([198, 19, 0, 10], 80)));
        let pods = BTreeMap::from([(7, "prod/db-0".to_owned())]);
        let event = FlowEvent::new(&raw, &pods, clock());
        assert_eq!(
            event.line(),
            "2027-01-15T07:59:58.500Z DENIED ingress tcp 198.18.0.2:40000 -> 198.18.1.5:8080 \
             via 198.19.0.10:80 pod prod/db-0"
        );
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["verdict"], "denied");
        assert_eq!(json["direction"], "ingress");
        assert_eq!(json["frontend"], "198.19.0.10:80");
        assert_eq!(json["counter"], "drop_policy_ingress");
    }

    #[test]
    fn an_allowed_flow_has_no_direction_and_an_unnamed_endpoint_shows_its_id() {
        let event = FlowEvent::new(
            &event(counter::POLICY_ALLOWED, None),
            &BTreeMap::new(),
            clock(),
        );
        assert_eq!(event.verdict, "allowed");
        assert!(event.direction.is_none() && event.frontend.is_none());
        assert!(
            event.line().ends_with("198.18.1.5:8080 endpoint #7"),
            "{}",
            event.line()
        );
    }

    #[test]
    fn the_filter_matches_verdict_address_and_port_on_either_end_or_the_frontend() {
        let denied = event(counter::DROP_POLICY_EGRESS, Some(([198, 19, 0, 10], 80)));
        let allowed = event(counter::POLICY_ALLOWED, None);
        let filter = |verdict, addresses: &[[u8; 4]], ports: &[u16]| Filter {
            verdict,
            addresses: addresses.iter().map(|a| IpAddr::from(*a)).collect(),
            ports: ports.to_vec(),
        };
        assert!(filter(VerdictFilter::Denied, &[], &[]).matches(&denied));
        assert!(!filter(VerdictFilter::Denied, &[], &[]).matches(&allowed));
        assert!(filter(VerdictFilter::All, &[], &[]).matches(&allowed));
        assert!(!filter(VerdictFilter::Allowed, &[], &[]).matches(&denied));
        assert!(filter(VerdictFilter::All, &[[198, 18, 0, 2]], &[]).matches(&denied));
        assert!(filter(VerdictFilter::All, &[[198, 19, 0, 10]], &[80]).matches(&denied));
        assert!(!filter(VerdictFilter::All, &[[198, 19, 0, 10]], &[]).matches(&allowed));
        assert!(filter(VerdictFilter::All, &[], &[40000]).matches(&allowed));
        assert!(!filter(VerdictFilter::All, &[], &[443]).matches(&denied));
        let mut udp = allowed;
        udp.flow.proto = PROTO_UDP;
        assert!(filter(VerdictFilter::All, &[[198, 18, 1, 5]], &[8080]).matches(&udp));
    }

    #[test]
    fn a_short_record_is_an_error() {
        assert!(matches!(
            decode(&[0; 40]),
            Err(MonitorError::ShortEvent(40))
        ));
        let raw = event(counter::POLICY_ALLOWED, None);
        // SAFETY: a plain-data struct viewed as its bytes, for the test's round trip.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&raw as *const MonitorEvent).cast::<u8>(),
                std::mem::size_of::<MonitorEvent>(),
            )
        };
        assert_eq!(decode(bytes).unwrap(), raw);
    }
}

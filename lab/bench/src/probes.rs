//! Background traffic across a scenario's steps: the client (`weir-lab probe`, run inside a pod)
//! and the verdict on what it logged.
//!
//! The client keeps one flow: a UDP socket sending a numbered datagram every interval, or one
//! TCP connection carrying an HTTP request every interval. It logs one line per event, stamped
//! with the wall clock in milliseconds (the runner stamps its steps with the same clock):
//!
//! ```text
//! 1765078800123 sent 17
//! 1765078800125 answer 17 pod=n2p0 port=5353 client=198.19.1.10:40000 req=seq-17
//! 1765078800300 error reset Connection reset by peer
//! ```
//!
//! A TCP client stops at its first error; a UDP one carries on.
//!
//! The runner marks each change of the cluster in the probe's own log: it sends the client
//! SIGUSR1, whose handler notes the time, logged as `<time> mark <n>`. The verdict places the
//! steps at those marks, so the client's clock is the only one it reads: a VM's clock may be
//! off from the host's by more than the times being judged.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use weir_lab_backends::sys;
use weir_lab_core::scenario::Protocol;
use weir_lab_core::timeline::ProbeSpec;

/// However long a run lasts, a probe ends by then.
pub const MAX_PROBE_LIFE: Duration = Duration::from_secs(900);
/// A TCP request waits this long for its answer before the probe calls it lost and stops.
const TCP_ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

/// The wall clock a probe stamps its lines with, in milliseconds (the runner's steps use it too).
pub use weir_lab_backends::sys::now_ms;

/// The signal that marks a change of the cluster in a probe's log.
pub const MARK_SIGNAL: nix::sys::signal::Signal = nix::sys::signal::Signal::SIGUSR1;

/// Logs the marks taken since the last call, each with the time its signal arrived.
fn log_marks(out: &mut impl Write, logged: &mut usize) {
    let first = *logged;
    for (n, at) in sys::signal_times_since(logged).into_iter().enumerate() {
        let _ = writeln!(out, "{at} mark {}", first + n + 1);
    }
    let _ = out.flush();
}

fn log(out: &mut impl Write, line: std::fmt::Arguments<'_>) {
    // The log is the probe's only output: a write that fails leaves nothing to tell anyone.
    let _ = writeln!(out, "{} {line}", now_ms());
    let _ = out.flush();
}

/// Runs the client until `life` has passed (or, for TCP, until its connection fails).
pub fn run_client(
    kind: Protocol,
    target: SocketAddr,
    interval: Duration,
    size: Option<u32>,
    life: Duration,
    out: &mut impl Write,
) -> std::io::Result<()> {
    sys::record_signal_times(MARK_SIGNAL)?;
    log(out, format_args!("start"));
    match kind {
        Protocol::Udp => udp_client(target, interval, size, life, out),
        Protocol::Tcp => tcp_client(target, interval, life, out),
    }
}

fn udp_client(
    target: SocketAddr,
    interval: Duration,
    size: Option<u32>,
    life: Duration,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let bind: SocketAddr = if target.is_ipv6() {
        "[::]:0".parse().expect("literal address")
    } else {
        "0.0.0.0:0".parse().expect("literal address")
    };
    let socket = UdpSocket::bind(bind)?;
    // Connected: an ICMP port unreachable comes back as ECONNREFUSED on the next receive.
    socket.connect(target)?;
    let started = Instant::now();
    let mut buf = vec![0u8; 65_536];
    let mut seq: u64 = 0;
    let mut marks = 0;
    while started.elapsed() < life {
        log_marks(out, &mut marks);
        seq += 1;
        let mut datagram = format!("seq-{seq} ").into_bytes();
        datagram.resize(size.unwrap_or(64).max(16) as usize - 1, b'x');
        datagram.push(b'\n');
        match socket.send(&datagram) {
            Ok(_) => log(out, format_args!("sent {seq}")),
            Err(e) => log(out, format_args!("error send {e}")),
        }
        let next = Instant::now() + interval;
        loop {
            let left = next.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            socket.set_read_timeout(Some(left))?;
            match socket.recv(&mut buf) {
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    let line = text.lines().next().unwrap_or("");
                    let answered = line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("req=seq-"))
                        .unwrap_or("?");
                    log(out, format_args!("answer {answered} {line}"));
                }
                // A mark's signal interrupts the wait (sockets with a timeout are not restarted).
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    log(out, format_args!("error refused {e}"));
                }
                Err(e) => log(out, format_args!("error recv {e}")),
            }
        }
    }
    Ok(())
}

fn tcp_client(
    target: SocketAddr,
    interval: Duration,
    life: Duration,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let stream = match TcpStream::connect_timeout(&target, TCP_ANSWER_TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            log(out, format_args!("error {} {e}", error_kind(&e)));
            return Ok(());
        }
    };
    stream.set_read_timeout(Some(TCP_ANSWER_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let started = Instant::now();
    let mut seq: u64 = 0;
    let mut marks = 0;
    while started.elapsed() < life {
        log_marks(out, &mut marks);
        seq += 1;
        let next = Instant::now() + interval;
        let request = format!("GET /?seq={seq} HTTP/1.1\r\nHost: probe\r\n\r\n");
        if let Err(e) = writer.write_all(request.as_bytes()) {
            log(out, format_args!("error {} {e}", error_kind(&e)));
            return Ok(());
        }
        log(out, format_args!("sent {seq}"));
        match read_response(&mut reader) {
            Ok(body) => {
                let line = body.lines().next().unwrap_or("").to_owned();
                log(out, format_args!("answer {seq} {line}"));
            }
            Err(e) => {
                log_marks(out, &mut marks);
                log(out, format_args!("error {} {e}", error_kind(&e)));
                return Ok(());
            }
        }
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    Ok(())
}

fn error_kind(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted => "reset",
        K::ConnectionRefused => "refused",
        K::WouldBlock | K::TimedOut => "timeout",
        K::UnexpectedEof => "closed",
        _ => "other",
    }
}

/// One HTTP/1.1 response with a Content-Length (nginx's `return 200 "..."`); its body.
fn read_response(reader: &mut impl BufRead) -> std::io::Result<String> {
    let mut length = 0usize;
    let mut first = true;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if first && !line.starts_with("HTTP/1.1 200") {
            return Err(std::io::Error::other(format!("status {}", line.trim())));
        }
        first = false;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; length.min(65_536)];
    reader.read_exact(&mut body)?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// One line of a probe's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeEvent {
    Sent {
        at: u64,
        seq: u64,
    },
    /// `seq` is None when the answer did not say which request it answers.
    Answer {
        at: u64,
        seq: Option<u64>,
        pod: String,
        port: Option<u16>,
    },
    Error {
        at: u64,
        kind: String,
        text: String,
    },
    /// The runner's `n`th change of the cluster (1-based) reached the client then.
    Mark {
        at: u64,
        n: usize,
    },
}

impl ProbeEvent {
    pub fn at(&self) -> u64 {
        match self {
            ProbeEvent::Sent { at, .. }
            | ProbeEvent::Answer { at, .. }
            | ProbeEvent::Error { at, .. }
            | ProbeEvent::Mark { at, .. } => *at,
        }
    }
}

pub fn parse_log(text: &str) -> Vec<ProbeEvent> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.splitn(3, ' ');
            let at: u64 = words.next()?.parse().ok()?;
            let what = words.next()?;
            let rest = words.next().unwrap_or("");
            match what {
                "sent" => Some(ProbeEvent::Sent {
                    at,
                    seq: rest.trim().parse().ok()?,
                }),
                "answer" => {
                    let (seq, answer) = rest.split_once(' ').unwrap_or((rest, ""));
                    let field = |name: &str| {
                        answer
                            .split_whitespace()
                            .find_map(|w| w.strip_prefix(name))
                            .map(str::to_owned)
                    };
                    Some(ProbeEvent::Answer {
                        at,
                        seq: seq.parse().ok(),
                        pod: field("pod=")?,
                        port: field("port=").and_then(|p| p.parse().ok()),
                    })
                }
                "mark" => Some(ProbeEvent::Mark {
                    at,
                    n: rest.trim().parse().ok()?,
                }),
                "error" => {
                    let (kind, text) = rest.split_once(' ').unwrap_or((rest, ""));
                    Some(ProbeEvent::Error {
                        at,
                        kind: kind.to_owned(),
                        text: text.to_owned(),
                    })
                }
                _ => None,
            }
        })
        .collect()
}

/// From when (wall clock, ms) which pods served the probe's Service: the state at the probe's
/// start, then after each step's actions.
pub type ServingTimeline = Vec<(u64, BTreeSet<String>)>;

fn serving_at(timeline: &ServingTimeline, at: u64) -> Option<&BTreeSet<String>> {
    timeline
        .iter()
        .rev()
        .find(|(from, _)| *from <= at)
        .map(|(_, pods)| pods)
}

/// What a probe's log adds up to.
#[derive(Debug, Default)]
struct Tally {
    /// seq -> when it was sent.
    sent: BTreeMap<u64, u64>,
    answered: BTreeSet<u64>,
    /// pod -> (answers, when the last came).
    by_pod: BTreeMap<String, (u32, u64)>,
    /// Answers from endpoints removed more than the settle time before.
    from_removed: Vec<String>,
    /// (when, kind, text).
    errors: Vec<(u64, String, String)>,
}

fn tally(events: &[ProbeEvent], timeline: &ServingTimeline, settle: u64) -> Tally {
    let start = timeline.first().map_or(0, |(t, _)| *t);
    let mut t = Tally::default();
    for event in events {
        match event {
            ProbeEvent::Sent { at, seq } => {
                t.sent.insert(*seq, *at);
            }
            ProbeEvent::Answer { at, seq, pod, port } => {
                t.answered.extend(*seq);
                let entry = t.by_pod.entry(pod.clone()).or_default();
                entry.0 += 1;
                entry.1 = *at;
                // Removed long enough ago that the agents had time to react, and not back.
                let gone = |at: u64| serving_at(timeline, at).is_some_and(|s| !s.contains(pod));
                if gone(at.saturating_sub(settle)) && gone(*at) {
                    let port = port.map_or(String::new(), |p| format!(":{p}"));
                    t.from_removed
                        .push(format!("{pod}{port} at +{} ms", at.saturating_sub(start)));
                }
            }
            ProbeEvent::Error { at, kind, text } => {
                t.errors.push((*at, kind.clone(), text.clone()))
            }
            ProbeEvent::Mark { .. } => {}
        }
    }
    t
}

/// The serving timeline on the probe's own clock: the state at its first event, then each change
/// at its mark. None when the marks do not match the changes (a signal lost): the caller keeps
/// the runner's clock then.
pub fn on_probe_clock(events: &[ProbeEvent], noted: &ServingTimeline) -> Option<ServingTimeline> {
    let first = events.first()?.at();
    let marks: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            ProbeEvent::Mark { at, .. } => Some(*at),
            _ => None,
        })
        .collect();
    if marks.len() + 1 != noted.len() {
        return None;
    }
    let times = std::iter::once(first).chain(marks);
    Some(
        times
            .zip(noted)
            .map(|(at, (_, pods))| (at, pods.clone()))
            .collect(),
    )
}

/// The verdict on one probe's log; `stopped` is when the runner stopped it (on the timeline's
/// clock).
pub fn judge(
    probe: &ProbeSpec,
    events: &[ProbeEvent],
    timeline: &ServingTimeline,
    stopped: u64,
) -> Result<String, String> {
    let settle = probe.expect.settle.as_millis() as u64;
    let start = timeline.first().map_or(0, |(t, _)| *t);
    let t = tally(events, timeline, settle);
    // Requests sent just before the stop may have had no time for their answer.
    let judged_until = stopped.saturating_sub((probe.interval.as_millis() as u64 * 3).max(1000));
    let ended_by_error = probe.kind == Protocol::Tcp && !t.errors.is_empty();
    let last_sent = t.sent.keys().next_back().copied();
    let lost: Vec<u64> = t
        .sent
        .iter()
        .filter(|(seq, at)| **at <= judged_until && !t.answered.contains(seq))
        // The request a TCP connection's reset ended is the reset's, not a loss.
        .filter(|(seq, _)| !(ended_by_error && Some(**seq) == last_sent))
        .map(|(seq, _)| *seq)
        .collect();
    let spread: Vec<String> = t
        .by_pod
        .iter()
        .map(|(pod, (n, last))| format!("{pod} x{n} (last +{} ms)", last.saturating_sub(start)))
        .collect();
    let mut summary = format!(
        "{} sent, {} answered, {} lost; {}",
        t.sent.len(),
        t.answered.len(),
        lost.len(),
        if spread.is_empty() {
            "no answers".to_owned()
        } else {
            spread.join(", ")
        }
    );
    let mut problems = Vec::new();
    if lost.len() as u32 > probe.expect.max_lost {
        let first: Vec<String> = lost.iter().take(5).map(u64::to_string).collect();
        problems.push(format!(
            "{} lost, at most {} allowed (first: {})",
            lost.len(),
            probe.expect.max_lost,
            first.join(", ")
        ));
    }
    if !t.from_removed.is_empty() {
        let first: Vec<&str> = t.from_removed.iter().take(3).map(String::as_str).collect();
        problems.push(format!(
            "answers from endpoints removed more than {settle} ms before: {}",
            first.join(", ")
        ));
    }
    if t.answered.is_empty() {
        problems.push("no answer at all".to_owned());
    }
    match probe.kind {
        Protocol::Udp => udp_verdict(events, timeline, settle, &t, &mut summary, &mut problems),
        Protocol::Tcp => tcp_verdict(probe, events, timeline, &t, &mut summary, &mut problems),
    }
    if problems.is_empty() {
        Ok(summary)
    } else {
        Err(format!("{}; seen: {summary}", problems.join("; ")))
    }
}

/// A UDP flow carries on across the steps: answers after the last one.
fn udp_verdict(
    events: &[ProbeEvent],
    timeline: &ServingTimeline,
    settle: u64,
    t: &Tally,
    summary: &mut String,
    problems: &mut Vec<String>,
) {
    let last_step = timeline.last().map_or(0, |(t, _)| *t);
    let after = events
        .iter()
        .any(|e| matches!(e, ProbeEvent::Answer { at, .. } if *at > last_step + settle));
    if timeline.len() > 1 && !after {
        problems.push("no answer after the last step".to_owned());
    }
    if let Some((_, kind, text)) = t.errors.first() {
        summary.push_str(&format!(
            "; {} error(s), first: {kind} {text}",
            t.errors.len()
        ));
    }
}

/// A TCP connection lasts to the end, or (with `reset_within`) is reset soon after the step that
/// removed the endpoint it started on.
fn tcp_verdict(
    probe: &ProbeSpec,
    events: &[ProbeEvent],
    timeline: &ServingTimeline,
    t: &Tally,
    summary: &mut String,
    problems: &mut Vec<String>,
) {
    let start = timeline.first().map_or(0, |(t, _)| *t);
    let first_pod = events.iter().find_map(|e| match e {
        ProbeEvent::Answer { pod, .. } => Some(pod.clone()),
        _ => None,
    });
    let removed_at = first_pod.as_ref().and_then(|pod| {
        timeline
            .iter()
            .find(|(_, pods)| !pods.contains(pod))
            .map(|(t, _)| *t)
    });
    match (probe.expect.reset_within, t.errors.first(), removed_at) {
        (None, None, _) => summary.push_str("; the connection lasted"),
        (None, Some((at, kind, text)), _) => problems.push(format!(
            "the connection ended at +{} ms ({kind}: {text}) where it must last",
            at.saturating_sub(start)
        )),
        (Some(_), _, None) => problems.push("no step removed the connection's endpoint".to_owned()),
        (Some(_), None, Some(_)) => {
            problems.push("the connection never ended, where a reset was due".to_owned())
        }
        (Some(within), Some((at, kind, text)), Some(removed)) => {
            let after = at.saturating_sub(removed);
            summary.push_str(&format!(
                "; {kind} {after} ms after its endpoint {} left",
                first_pod.as_deref().unwrap_or("?")
            ));
            if kind != "reset" && kind != "refused" {
                problems.push(format!("ended by {kind} ({text}), not by a reset"));
            } else if *at < removed {
                problems.push(format!(
                    "reset {} ms before its endpoint left",
                    removed - at
                ));
            } else if after > within.as_millis() as u64 {
                problems.push(format!(
                    "reset after {after} ms, more than {}",
                    humantime::format_duration(within)
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_lab_core::timeline::ProbeExpect;

    fn probe(kind: Protocol) -> ProbeSpec {
        ProbeSpec {
            name: None,
            kind,
            from: "n1p0".into(),
            service: "echo".into(),
            port: 53,
            family: weir_lab_core::scenario::Family::Ipv4,
            interval: Duration::from_millis(100),
            size: None,
            expect: ProbeExpect::default(),
        }
    }

    fn pods(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_the_log() {
        let events = parse_log(
            "1000 sent 1\n1002 answer 1 pod=n2p0 port=5353 client=198.19.1.10:4000 req=seq-1\n\
             1100 error reset Connection reset by peer (os error 104)\ngarbage\n",
        );
        assert_eq!(
            events,
            [
                ProbeEvent::Sent { at: 1000, seq: 1 },
                ProbeEvent::Answer {
                    at: 1002,
                    seq: Some(1),
                    pod: "n2p0".into(),
                    port: Some(5353)
                },
                ProbeEvent::Error {
                    at: 1100,
                    kind: "reset".into(),
                    text: "Connection reset by peer (os error 104)".into()
                },
            ]
        );
    }

    /// A UDP sender every 100 ms; n2p0 leaves at 2000 ms, answers move to n2p1 by 2300 ms.
    fn udp_log(removed_answers_until: u64) -> Vec<ProbeEvent> {
        let mut events = Vec::new();
        for seq in 1..=50u64 {
            let at = 1000 + seq * 100;
            events.push(ProbeEvent::Sent { at, seq });
            let pod = if at < removed_answers_until {
                "n2p0"
            } else {
                "n2p1"
            };
            events.push(ProbeEvent::Answer {
                at: at + 1,
                seq: Some(seq),
                pod: pod.into(),
                port: Some(5353),
            });
        }
        events
    }

    #[test]
    fn steps_on_the_probes_clock() {
        let events = parse_log(
            "5000 start\n5001 sent 1\n5002 answer 1 pod=a port=1 client=x\n5400 mark 1\n5500 sent 2\n",
        );
        assert_eq!(events[2], ProbeEvent::Mark { at: 5400, n: 1 });
        // The runner's clock is 3 s ahead of the probe's.
        let noted = vec![(8000, pods(&["a", "b"])), (8390, pods(&["b"]))];
        let timeline = on_probe_clock(&events, &noted).unwrap();
        assert_eq!(
            timeline,
            vec![(5001, pods(&["a", "b"])), (5400, pods(&["b"]))]
        );
        // A mark short: no timeline of its own.
        let extra = vec![noted[0].clone(), noted[1].clone(), (9000, pods(&["a"]))];
        assert!(on_probe_clock(&events, &extra).is_none());
    }

    #[test]
    fn udp_across_a_removal() {
        let timeline = vec![(1000, pods(&["n2p0", "n2p1"])), (2000, pods(&["n2p1"]))];
        let ok = judge(&probe(Protocol::Udp), &udp_log(2300), &timeline, 6200).unwrap();
        assert!(ok.contains("0 lost"), "{ok}");
        // Still answering from the removed endpoint 2 s after its removal.
        let err = judge(&probe(Protocol::Udp), &udp_log(4000), &timeline, 6200).unwrap_err();
        assert!(err.contains("removed"), "{err}");
        // A lost datagram.
        let mut events = udp_log(2300);
        events.retain(|e| !matches!(e, ProbeEvent::Answer { seq: Some(20), .. }));
        let err = judge(&probe(Protocol::Udp), &events, &timeline, 6200).unwrap_err();
        assert!(err.contains("1 lost"), "{err}");
    }

    #[test]
    fn tcp_reset_promptly() {
        let mut p = probe(Protocol::Tcp);
        p.expect.reset_within = Some(Duration::from_secs(1));
        let timeline = vec![(1000, pods(&["n2p0", "n2p1"])), (2000, pods(&["n2p1"]))];
        let mut events = Vec::new();
        for seq in 1..=12u64 {
            events.push(ProbeEvent::Sent {
                at: 1000 + seq * 100,
                seq,
            });
            if seq < 12 {
                events.push(ProbeEvent::Answer {
                    at: 1001 + seq * 100,
                    seq: Some(seq),
                    pod: "n2p0".into(),
                    port: Some(8080),
                });
            }
        }
        let mut reset = events.clone();
        reset.push(ProbeEvent::Error {
            at: 2250,
            kind: "reset".into(),
            text: "Connection reset by peer".into(),
        });
        let ok = judge(&p, &reset, &timeline, 6000).unwrap();
        assert!(ok.contains("reset 250 ms after"), "{ok}");
        let mut late = events.clone();
        late.push(ProbeEvent::Error {
            at: 4000,
            kind: "reset".into(),
            text: "x".into(),
        });
        assert!(judge(&p, &late, &timeline, 6000).is_err());
        assert!(judge(&p, &events, &timeline, 6000).is_err());
    }
}

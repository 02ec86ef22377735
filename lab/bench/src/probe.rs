//! Small measuring tools the benches run on a lab's hosts (`weir-lab probe ...`, through
//! [`Lab::exec`](weir_lab_core::backend::Lab::exec) and [`Lab::spawn`](weir_lab_core::backend::Lab::spawn), so
//! they run inside the host's network namespace, or VM, like any other workload):
//!
//! - `connect`: times blocking TCP connects to one address, pinned to one CPU;
//! - `listen`: TCP listeners with `TCP_DEFER_ACCEPT` that never accept, so a connect measures
//!   the network path (SYN, SYN-ACK through the service translation) and no server wake-up;
//! - `measure`: runs a command and reports its wall time, CPU seconds and peak RSS.
//!
//! Each prints one JSON object on stdout for the bench to read.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::SocketAddrV4;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
use nix::sys::time::TimeVal;
use serde::{Deserialize, Serialize};

/// The line `listen` prints once every socket listens.
pub const LISTENING: &str = "listening";
/// A connect probe never runs longer than this, whatever the count.
const MAX_PROBE_TIME: Duration = Duration::from_secs(120);

#[derive(Debug, clap::Subcommand)]
pub enum ProbeCommand {
    /// Time `count` TCP connects to TARGET (after `warmup` untimed ones).
    Connect(ConnectArgs),
    /// Listen on TCP ports with TCP_DEFER_ACCEPT and never accept; runs until killed.
    Listen(ListenArgs),
    /// Run a command; report wall time, CPU seconds and peak RSS.
    Measure(MeasureArgs),
    /// Keep one flow to TARGET, a request every interval, logging each send, answer and error
    /// (a scenario's `[[probes]]`); runs until stopped or `--life` has passed.
    Stream(StreamArgs),
    /// One UDP datagram to TARGET whose fragments are sent first fragment last; prints the
    /// answer (a UDP check's `first_fragment_last`).
    FirstFragmentLast(FirstFragmentLastArgs),
    /// One UDP datagram to TARGET; prints the answer as soon as it is in (a UDP check).
    Udp(UdpArgs),
    /// Sends the IPv4 frames arriving on one interface out of another, each `delay` later
    /// (a UDP check's `tunnel_first_fragment_last`, on the lab's fabric); runs until stopped
    /// or `--life` has passed.
    DelayFrames(DelayFramesArgs),
    /// Tries every TARGET at once (a TCP connect, or a UDP datagram and its answer) and prints
    /// one line per target, in order: `connected` or why not (a reachability check's row).
    Reach(ReachArgs),
    /// Sends small UDP datagrams to TARGET as fast as one thread can for `seconds`; prints
    /// what it sent (`bench prefilter`'s flood).
    Flood(FloodArgs),
}

#[derive(Debug, clap::Args)]
pub struct FloodArgs {
    pub target: std::net::SocketAddr,
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Pin the sender to this CPU.
    #[arg(long)]
    pub cpu: Option<usize>,
}

/// What `probe flood` prints.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct FloodReport {
    pub sent: u64,
    /// Sends the kernel refused (a full queue).
    pub failed: u64,
    pub seconds: f64,
}

/// The longest flood a typo can ask for.
const MAX_FLOOD: Duration = Duration::from_secs(30);

/// Unconnected sends, so no ICMP error the target sends back fails a send.
pub fn flood(target: std::net::SocketAddr, duration: Duration) -> Result<FloodReport, ProbeError> {
    let bind: std::net::SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().expect("an address")
    } else {
        "[::]:0".parse().expect("an address")
    };
    let socket = std::net::UdpSocket::bind(bind).map_err(io("binding the flood socket"))?;
    let payload = [0u8; 18];
    let duration = duration.min(MAX_FLOOD);
    let started = std::time::Instant::now();
    let (mut sent, mut failed) = (0u64, 0u64);
    loop {
        // The clock is read once per batch: it costs as much as a send.
        for _ in 0..256 {
            match socket.send_to(&payload, target) {
                Ok(_) => sent += 1,
                Err(_) => failed += 1,
            }
        }
        if started.elapsed() >= duration {
            break;
        }
    }
    Ok(FloodReport {
        sent,
        failed,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[derive(Debug, clap::Args)]
pub struct ReachArgs {
    pub targets: Vec<std::net::SocketAddr>,
    #[arg(long)]
    pub udp: bool,
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// What `probe reach` prints for a target it reached.
pub const REACHED: &str = "connected";

/// Tries every target in a thread of its own; the answers in the targets' order.
pub fn reach(targets: &[std::net::SocketAddr], udp: bool, timeout: Duration) -> Vec<String> {
    let timeout = timeout.min(Duration::from_secs(10));
    std::thread::scope(|scope| {
        let tries: Vec<_> = targets
            .iter()
            .map(|target| scope.spawn(move || reach_one(*target, udp, timeout)))
            .collect();
        tries
            .into_iter()
            .map(|t| match t.join() {
                Ok(Ok(())) => REACHED.to_owned(),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "the probe's thread panicked".to_owned(),
            })
            .collect()
    })
}

fn reach_one(target: std::net::SocketAddr, udp: bool, timeout: Duration) -> std::io::Result<()> {
    if !udp {
        // Closed at once with an RST (linger 0): no TIME_WAIT left behind.
        let stream = std::net::TcpStream::connect_timeout(&target, timeout)?;
        linger_zero(&stream);
        return Ok(());
    }
    let bind: std::net::SocketAddr = if target.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(bind)?;
    socket.connect(target)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send(b"reach")?;
    let mut answer = [0u8; 2048];
    socket.recv(&mut answer).map(drop)
}

/// Sets SO_LINGER 0 on the stream, so that closing it sends an RST. (If it fails, the
/// connection closes normally: the probe's answer is the same.)
fn linger_zero(stream: &std::net::TcpStream) {
    let _ = nix::sys::socket::setsockopt(
        stream,
        nix::sys::socket::sockopt::Linger,
        &nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
}

#[derive(Debug, clap::Args)]
pub struct DelayFramesArgs {
    /// Where the frames to delay arrive.
    #[arg(long)]
    pub from: String,
    /// Where they leave, past its qdisc and tc filters.
    #[arg(long)]
    pub to: String,
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    pub delay: Duration,
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub life: Duration,
}

#[derive(Debug, clap::Args)]
pub struct UdpArgs {
    pub target: std::net::SocketAddr,
    /// The datagram's size in bytes.
    #[arg(long)]
    pub size: Option<u32>,
    /// The client's port.
    #[arg(long)]
    pub source_port: Option<u16>,
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, clap::Args)]
pub struct FirstFragmentLastArgs {
    pub target: std::net::SocketAddr,
    /// The datagram's size in bytes: more than the path MTU.
    #[arg(long)]
    pub size: u32,
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, clap::Args)]
pub struct StreamArgs {
    pub target: std::net::SocketAddr,
    /// "udp" or "tcp".
    #[arg(long)]
    pub udp: bool,
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// UDP datagram size in bytes.
    #[arg(long)]
    pub size: Option<u32>,
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    pub life: Duration,
}

#[derive(Debug, clap::Args)]
pub struct ConnectArgs {
    pub target: SocketAddrV4,
    #[arg(long, default_value_t = 1000)]
    pub count: u32,
    #[arg(long, default_value_t = 50)]
    pub warmup: u32,
    /// Pin to this CPU, so the client and the softirq work it triggers share one core.
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Per-connect limit; a connect that takes longer counts as failed.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, clap::Args)]
pub struct ListenArgs {
    #[arg(long = "port", required = true)]
    pub ports: Vec<u16>,
}

#[derive(Debug, clap::Args)]
pub struct MeasureArgs {
    /// Feed this file to the command's stdin.
    #[arg(long)]
    pub stdin: Option<PathBuf>,
    #[arg(required = true, last = true)]
    pub command: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{what}: {source}")]
    Sys { what: String, source: nix::Error },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Reorder(#[from] crate::reorder::ReorderError),
    #[error(transparent)]
    Delay(#[from] weir_lab_backends::frame_delay::DelayError),
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> ProbeError {
    let what = what.into();
    move |source| ProbeError::Sys { what, source }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ProbeError {
    let what = what.into();
    move |source| ProbeError::Io { what, source }
}

/// What `connect` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectReport {
    pub target: String,
    /// Connect latencies in nanoseconds, in the order measured.
    pub samples_ns: Vec<u64>,
    pub failures: u32,
    #[serde(default)]
    pub first_error: Option<String>,
    pub cpu: Option<usize>,
}

/// What `measure` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MeasureReport {
    pub command: String,
    pub exit_code: Option<i32>,
    pub wall_s: f64,
    pub user_s: f64,
    pub sys_s: f64,
    /// The child's peak resident set (getrusage ru_maxrss).
    pub max_rss_kib: u64,
    pub stderr: String,
}

impl MeasureReport {
    pub fn cpu_s(&self) -> f64 {
        self.user_s + self.sys_s
    }
}

pub fn run(cmd: &ProbeCommand) -> Result<(), ProbeError> {
    let json = match cmd {
        ProbeCommand::Connect(a) => {
            if let Some(cpu) = a.cpu {
                pin_to_cpu(cpu)?;
            }
            serde_json::to_string(&connect_samples(
                a.target, a.count, a.warmup, a.timeout, a.cpu,
            ))
        }
        ProbeCommand::Listen(a) => {
            let _sockets = listen_deferred(&a.ports)?;
            println!("{LISTENING} on {:?}", a.ports);
            std::io::stdout().flush().map_err(io("stdout"))?;
            // Never accepts: the kernel completes handshakes on its own, and the client's RST
            // removes each request again. Ends when the lab stops it.
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        ProbeCommand::Measure(a) => serde_json::to_string(&measure(a)?),
        ProbeCommand::Stream(a) => {
            let kind = if a.udp {
                weir_lab_core::scenario::Protocol::Udp
            } else {
                weir_lab_core::scenario::Protocol::Tcp
            };
            let life = a.life.min(crate::probes::MAX_PROBE_LIFE);
            let mut out = std::io::stdout().lock();
            return crate::probes::run_client(kind, a.target, a.interval, a.size, life, &mut out)
                .map_err(io(format!("stream to {}", a.target)));
        }
        ProbeCommand::FirstFragmentLast(a) => {
            return Ok(crate::reorder::run(a.target, a.size, a.timeout)?);
        }
        ProbeCommand::DelayFrames(a) => {
            return Ok(weir_lab_backends::frame_delay::run(
                &a.from, &a.to, a.delay, a.life,
            )?);
        }
        ProbeCommand::Flood(a) => {
            if let Some(cpu) = a.cpu {
                pin_to_cpu(cpu)?;
            }
            serde_json::to_string(&flood(a.target, a.duration)?)
        }
        ProbeCommand::Reach(a) => {
            let mut out = std::io::stdout().lock();
            for line in reach(&a.targets, a.udp, a.timeout) {
                writeln!(out, "{line}").map_err(io("stdout"))?;
            }
            return out.flush().map_err(io("stdout"));
        }
        ProbeCommand::Udp(a) => {
            return Ok(crate::reorder::run_plain(
                a.target,
                a.size,
                a.source_port,
                a.timeout,
            )?);
        }
    };
    // Reports are plain data: they always serialize.
    println!("{}", json.expect("report serializes"));
    Ok(())
}

pub fn pin_to_cpu(cpu: usize) -> Result<(), ProbeError> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).map_err(sys(format!("cpu {cpu}")))?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .map_err(sys(format!("pinning to cpu {cpu}")))
}

/// One blocking connect per sample, timed around the connect call alone. The socket closes with
/// SO_LINGER 0 (an RST), which leaves no TIME_WAIT behind and removes the server's half-open
/// request at once, so thousands of connects do not pile up state.
pub fn connect_samples(
    target: SocketAddrV4,
    count: u32,
    warmup: u32,
    timeout: Duration,
    cpu: Option<usize>,
) -> ConnectReport {
    let mut report = ConnectReport {
        target: target.to_string(),
        samples_ns: Vec::with_capacity(count as usize),
        failures: 0,
        first_error: None,
        cpu,
    };
    let started = Instant::now();
    for i in 0..warmup.saturating_add(count) {
        if started.elapsed() > MAX_PROBE_TIME {
            report.first_error.get_or_insert(format!(
                "stopped after {}",
                humantime::format_duration(MAX_PROBE_TIME)
            ));
            break;
        }
        match connect_once(target, timeout) {
            Ok(took) if i >= warmup => report.samples_ns.push(took.as_nanos() as u64),
            Ok(_) => {}
            Err(e) => {
                report.failures += 1;
                report.first_error.get_or_insert(e.to_string());
            }
        }
    }
    report
}

fn connect_once(target: SocketAddrV4, timeout: Duration) -> Result<Duration, ProbeError> {
    let fd: OwnedFd = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(sys("socket"))?;
    socket::setsockopt(
        &fd,
        sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .map_err(sys("SO_LINGER"))?;
    // A blocking connect gives up after SO_SNDTIMEO.
    let limit = TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
    socket::setsockopt(&fd, sockopt::SendTimeout, &limit).map_err(sys("SO_SNDTIMEO"))?;
    let addr = SockaddrIn::from(target);
    let t0 = Instant::now();
    let result = socket::connect(fd.as_raw_fd(), &addr);
    let took = t0.elapsed();
    result.map_err(sys(format!("connect {target}")))?;
    Ok(took)
}

/// Listening sockets on 0.0.0.0 with TCP_DEFER_ACCEPT: the kernel holds a connection back from
/// accept until data arrives, and these clients never send any.
pub fn listen_deferred(ports: &[u16]) -> Result<Vec<OwnedFd>, ProbeError> {
    let mut out = Vec::new();
    for port in ports {
        let fd = socket::socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(sys("socket"))?;
        socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(sys("SO_REUSEADDR"))?;
        set_defer_accept(&fd, 30)?;
        let addr = SockaddrIn::new(0, 0, 0, 0, *port);
        socket::bind(fd.as_raw_fd(), &addr).map_err(sys(format!("bind port {port}")))?;
        socket::listen(&fd, socket::Backlog::MAXCONN)
            .map_err(sys(format!("listen port {port}")))?;
        out.push(fd);
    }
    Ok(out)
}

/// nix has no wrapper for TCP_DEFER_ACCEPT.
fn set_defer_accept(fd: &impl AsFd, seconds: libc::c_int) -> Result<(), ProbeError> {
    weir_lab_backends::sys::set_int_option(fd, libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, seconds)
        .map_err(io("TCP_DEFER_ACCEPT"))
}

/// Runs the command as this process's only child; once it is reaped, RUSAGE_CHILDREN is its
/// usage alone.
pub fn measure(args: &MeasureArgs) -> Result<MeasureReport, ProbeError> {
    let (program, rest) = args.command.split_first().expect("clap requires a command");
    let stdin = match &args.stdin {
        Some(p) => Stdio::from(File::open(p).map_err(io(format!("opening {}", p.display())))?),
        None => Stdio::null(),
    };
    let mut stderr = tempfile::tempfile().map_err(io("stderr file"))?;
    let before = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .map_err(sys("getrusage"))?;
    let mut command = Command::new(program);
    command
        .args(rest)
        .stdin(stdin)
        .stdout(Stdio::null())
        .stderr(stderr.try_clone().map_err(io("stderr file"))?);
    // The measured command goes when the probe goes (the lab kills the probe when it stops or
    // times out), so a long iptables-restore cannot outlive its bench.
    weir_lab_backends::sys::prepare_child(&mut command, None);
    let started = Instant::now();
    let status = command.status().map_err(io(format!("running {program}")))?;
    let wall = started.elapsed();
    let after = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .map_err(sys("getrusage"))?;
    let secs = |t: TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    let mut text = String::new();
    let _ = stderr.seek(SeekFrom::Start(0));
    let _ = stderr.read_to_string(&mut text);
    Ok(MeasureReport {
        command: args.command.join(" "),
        exit_code: status.code(),
        wall_s: wall.as_secs_f64(),
        user_s: secs(after.user_time()) - secs(before.user_time()),
        sys_s: secs(after.system_time()) - secs(before.system_time()),
        max_rss_kib: after.max_rss().max(0) as u64,
        stderr: text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a thread of its own in a fresh network namespace with loopback up, so test
    /// traffic never touches the host's; the namespace goes with the thread.
    fn in_throwaway_netns(f: impl FnOnce() + Send + 'static) {
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            // Children start in the namespace of the thread that forks them.
            let up = Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .unwrap();
            assert!(up.success());
            f();
        })
        .join()
        .unwrap();
    }

    #[test]
    fn connects_to_a_deferred_listener_and_counts_refusals() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs root for a network namespace");
            return;
        }
        in_throwaway_netns(connect_and_refuse);
    }

    fn connect_and_refuse() {
        let port = 20_000;
        let _socks = listen_deferred(&[port]).unwrap();
        let target = SocketAddrV4::new([127, 0, 0, 1].into(), port);
        let report = connect_samples(target, 20, 2, Duration::from_secs(1), None);
        assert_eq!(report.failures, 0, "{:?}", report.first_error);
        assert_eq!(report.samples_ns.len(), 20);
        assert!(report.samples_ns.iter().all(|ns| *ns > 0));

        drop(_socks);
        let refused = connect_samples(target, 3, 0, Duration::from_secs(1), None);
        assert_eq!(refused.failures, 3);
        assert!(refused.first_error.unwrap().contains("ECONNREFUSED"));
    }

    #[test]
    fn measures_a_child() {
        let args = MeasureArgs {
            stdin: None,
            command: vec!["sh".into(), "-c".into(), "echo oops >&2; exit 3".into()],
        };
        let r = measure(&args).unwrap();
        assert_eq!(r.exit_code, Some(3));
        assert_eq!(r.stderr, "oops\n");
        assert!(r.wall_s > 0.0 && r.max_rss_kib > 0);
    }
}

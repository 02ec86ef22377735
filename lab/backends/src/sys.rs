//! The lab's one boundary with the operating system: every process helper both backends (and
//! the tools they run on hosts) use, the socket and signal calls nix does not wrap, and so
//! every `unsafe` block of the lab, each with the precondition it relies on.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::mem::size_of;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tracing::debug;

use weir_lab_core::backend::{tail, BackendError, Cmd, Output};

/// Where `ip netns` keeps its named network namespaces (the lab's fabric and hosts).
pub const NETNS_DIR: &str = "/run/netns";
/// Plumbing commands (ip, tc, sysctl) finish in milliseconds; this only guards against a hang.
pub const PLUMBING_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopped process gets to exit on SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

/// Sets up a child between fork and exec: it dies with the process that starts it, the lab or
/// a tool the lab runs (so a crashed or interrupted lab leaves no workloads behind, and with
/// them goes every namespace), and joins `netns`.
pub fn prepare_child(command: &mut Command, netns: Option<RawFd>) {
    prepare_child_in(command, netns, None);
}

/// [`prepare_child`], also moving the child into the cgroup whose `cgroup.procs` is open as
/// `cgroup_procs` before it execs, so nothing it does runs outside that cgroup.
pub fn prepare_child_in(command: &mut Command, netns: Option<RawFd>, cgroup_procs: Option<RawFd>) {
    let lab_pid = std::process::id() as libc::pid_t;
    // SAFETY: the hook runs in the forked child before exec, where only async-signal-safe work is
    // allowed: it makes three plain system calls and builds errors without allocating. The fd
    // stays open in the parent until spawn returns, so it is valid in the child.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The lab may have died between fork and prctl; then nothing would kill us.
            if libc::getppid() != lab_pid {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            if let Some(fd) = netns {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(fd) = cgroup_procs {
                // "0" moves the writer: this child.
                let zero = b"0";
                if libc::write(fd, zero.as_ptr().cast(), zero.len()) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Starts `cmd` as `host`'s long-running process: in its own process group, in the network
/// namespace at `netns` (and the cgroup2 directory `cgroup`), its stdout and stderr appended to
/// `log`, dying with this process.
pub fn spawn_logged(
    host: &str,
    netns: &Path,
    cgroup: Option<&Path>,
    cmd: &Cmd,
    log: &Path,
) -> Result<Child, BackendError> {
    let spawn_err = |source| BackendError::Spawn {
        host: host.to_owned(),
        command: cmd.to_string(),
        source,
    };
    let ns_file = File::open(netns).map_err(spawn_err)?;
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|source| BackendError::Io {
            context: format!("opening {}", log.display()),
            source,
        })?;
    let procs_file = cgroup
        .map(|c| OpenOptions::new().write(true).open(c.join("cgroup.procs")))
        .transpose()
        .map_err(spawn_err)?;
    let mut command = Command::new(&cmd.program);
    command
        .args(&cmd.args)
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().map_err(spawn_err)?)
        .stderr(log_file)
        .process_group(0);
    prepare_child_in(
        &mut command,
        Some(ns_file.as_raw_fd()),
        procs_file.as_ref().map(|f| f.as_raw_fd()),
    );
    // The descriptors stay open until spawn returns: the child's pre-exec hook uses them.
    command.spawn().map_err(spawn_err)
}

/// Runs a command to completion in its own process group, killing the group on timeout.
/// Output goes to anonymous files, so a chatty command cannot block on a full pipe while we
/// wait for it.
pub fn run(
    host: &str,
    netns: Option<&Path>,
    cmd: &Cmd,
    timeout: Duration,
    must_succeed: bool,
) -> Result<Output, BackendError> {
    run_in(host, netns, None, cmd, timeout, must_succeed)
}

/// [`run`] in cgroup `cgroup` (a cgroup2 directory) too.
pub fn run_in(
    host: &str,
    netns: Option<&Path>,
    cgroup: Option<&Path>,
    cmd: &Cmd,
    timeout: Duration,
    must_succeed: bool,
) -> Result<Output, BackendError> {
    let spawn_err = |source| BackendError::Spawn {
        host: host.to_owned(),
        command: cmd.to_string(),
        source,
    };
    let ns_file = netns.map(File::open).transpose().map_err(spawn_err)?;
    let procs_file = cgroup
        .map(|c| OpenOptions::new().write(true).open(c.join("cgroup.procs")))
        .transpose()
        .map_err(spawn_err)?;
    let mut out = tempfile::tempfile().map_err(spawn_err)?;
    let mut err = tempfile::tempfile().map_err(spawn_err)?;
    let mut command = Command::new(&cmd.program);
    command
        .args(&cmd.args)
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        .stdin(if cmd.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(out.try_clone().map_err(spawn_err)?)
        .stderr(err.try_clone().map_err(spawn_err)?)
        .process_group(0);
    prepare_child_in(
        &mut command,
        ns_file.as_ref().map(|f| f.as_raw_fd()),
        procs_file.as_ref().map(|f| f.as_raw_fd()),
    );
    let started = Instant::now();
    let mut child = command.spawn().map_err(spawn_err)?;
    drop(ns_file);
    drop(procs_file);
    if let (Some(input), Some(mut stdin)) = (&cmd.stdin, child.stdin.take()) {
        // Inputs are a line or two, well below a pipe's buffer, so this cannot block; a child
        // that exits without reading gives EPIPE, which only means it did not want the input.
        if let Err(e) = stdin.write_all(input) {
            debug!(%host, command = %cmd, "writing stdin: {e}");
        }
    }
    let mut pause = Duration::from_millis(1);
    let status = loop {
        let polled = child.try_wait().map_err(|source| BackendError::Io {
            context: format!("{host}: waiting for `{cmd}`"),
            source,
        })?;
        if let Some(status) = polled {
            break status;
        }
        if started.elapsed() >= timeout {
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
            debug!(%host, command = %cmd, "timed out");
            return Err(BackendError::Timeout {
                host: host.to_owned(),
                command: cmd.to_string(),
                after: timeout,
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    };
    let output = Output {
        code: status.code(),
        stdout: read_all(&mut out),
        stderr: read_all(&mut err),
        duration: started.elapsed(),
    };
    debug!(%host, command = %cmd, status = %output.status(), elapsed = ?output.duration, "ran");
    if must_succeed && !output.success() {
        return Err(BackendError::Failed {
            host: host.to_owned(),
            command: cmd.to_string(),
            status: output.status(),
            stderr: tail(&output.stderr, 5),
        });
    }
    Ok(output)
}

fn read_all(file: &mut File) -> String {
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(0)).is_ok() {
        let _ = file.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Signals a child we still hold (not yet waited for, so its PID cannot have been reused).
pub fn send_signal(child: &Child, signal: Signal) -> std::io::Result<()> {
    nix::sys::signal::kill(Pid::from_raw(child.id() as i32), signal).map_err(std::io::Error::from)
}

/// SIGTERM to the whole process group, SIGKILL after `grace`. The group is signalled while its
/// leader is still unreaped, so the group id cannot have been reused by then.
pub fn stop_group(child: &mut Child, grace: Duration) -> std::io::Result<()> {
    let pgid = Pid::from_raw(child.id() as i32);
    if child.try_wait()?.is_some() {
        // Forked helpers (socat's per-datagram children) may outlive their leader.
        let _ = killpg(pgid, Signal::SIGKILL);
        return Ok(());
    }
    let _ = killpg(pgid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            let _ = killpg(pgid, Signal::SIGKILL);
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = killpg(pgid, Signal::SIGKILL);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("pid {} survived SIGKILL", child.id()),
    ))
}

/// Milliseconds since the Unix epoch by the wall clock (`clock_gettime`, async-signal-safe):
/// the clock the lab's logs and a probe's marks share.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Arrivals of the signal [`record_signal_times`] watches that are kept; later ones are counted
/// but their times dropped.
pub const MAX_SIGNAL_TIMES: usize = 256;
static SIGNAL_TIMES: [AtomicU64; MAX_SIGNAL_TIMES] =
    [const { AtomicU64::new(0) }; MAX_SIGNAL_TIMES];
static SIGNALS_TAKEN: AtomicUsize = AtomicUsize::new(0);

extern "C" fn note_signal_time(_: libc::c_int) {
    // Only atomics and clock_gettime (async-signal-safe) in here.
    let n = SIGNALS_TAKEN.fetch_add(1, Ordering::SeqCst);
    if let Some(slot) = SIGNAL_TIMES.get(n) {
        slot.store(now_ms(), Ordering::SeqCst);
    }
}

/// From now on, notes the time ([`now_ms`]) of every arrival of `signal` in this process,
/// instead of its default action; read them with [`signal_times_since`]. For one signal per
/// process (a second call replaces the first's handler, and the times are shared).
pub fn record_signal_times(signal: Signal) -> std::io::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    let action = SigAction::new(
        SigHandler::Handler(note_signal_time),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: `note_signal_time` only touches atomics and reads the clock, both
    // async-signal-safe; the handler it may replace is the lab's own (this function's).
    unsafe { sigaction(signal, &action) }.map_err(std::io::Error::from)?;
    Ok(())
}

/// The times of the signals noted since the first `seen` (kept ones only); advances `seen`.
pub fn signal_times_since(seen: &mut usize) -> Vec<u64> {
    let taken = SIGNALS_TAKEN.load(Ordering::SeqCst).min(MAX_SIGNAL_TIMES);
    let times = (*seen..taken)
        .map(|i| SIGNAL_TIMES[i].load(Ordering::SeqCst))
        .collect();
    *seen = taken.max(*seen);
    times
}

/// Sets an integer socket option (`level`, `name`) nix has no wrapper for.
pub fn set_int_option(
    socket: &impl AsFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: the descriptor is borrowed, so open for the call; the value points at a live
    // c_int whose size is passed alongside.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Reads an integer socket option (`level`, `name`) nix has no wrapper for.
pub fn int_option(
    socket: &impl AsFd,
    level: libc::c_int,
    name: libc::c_int,
) -> std::io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the descriptor is borrowed, so open for the call; `value` and `len` are a live
    // c_int and its size, which the kernel writes at most.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Takes ownership of a descriptor a system call just returned (negative: its error).
fn owned_fd(fd: libc::c_int) -> std::io::Result<OwnedFd> {
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a non-negative result of socket(2), just opened and owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An `AF_PACKET` raw socket bound to interface `ifindex`, receiving frames of `protocol`
/// (an ethertype; 0: none, a socket that only sends).
pub fn packet_socket(ifindex: u32, protocol: u16) -> std::io::Result<OwnedFd> {
    // SAFETY: plain integer arguments; the result is checked before use.
    let socket = owned_fd(unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(protocol.to_be()),
        )
    })?;
    // SAFETY: sockaddr_ll is plain integers and arrays, for which all zeroes is a valid value;
    // the fields that matter are set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol.to_be();
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: the descriptor is open; the address is a live sockaddr_ll passed with its size.
    let bound = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if bound < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(socket)
}

/// The next frame a packet socket received into `frame`: its length and packet type
/// (`PACKET_HOST`, `PACKET_OUTGOING`, ...).
pub fn receive_frame(socket: &OwnedFd, frame: &mut [u8]) -> std::io::Result<(usize, u8)> {
    // SAFETY: sockaddr_ll is plain integers and arrays, for which all zeroes is a valid value;
    // the kernel fills it in.
    let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    let mut from_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: the descriptor is open; the buffer and the address are live and writable for the
    // lengths given.
    let len = unsafe {
        libc::recvfrom(
            socket.as_raw_fd(),
            frame.as_mut_ptr().cast(),
            frame.len(),
            0,
            (&mut from as *mut libc::sockaddr_ll).cast(),
            &mut from_len,
        )
    };
    if len < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((len as usize, from.sll_pkttype))
}

/// Sends `data` on a connected or bound socket (a packet socket: out of its interface).
pub fn send(socket: &OwnedFd, data: &[u8]) -> std::io::Result<usize> {
    // SAFETY: the descriptor is open and the buffer holds `data.len()` initialised bytes.
    let sent = unsafe { libc::send(socket.as_raw_fd(), data.as_ptr().cast(), data.len(), 0) };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(sent as usize)
}

/// A raw socket that sends whole IP packets as given (IPPROTO_RAW implies the header is ours).
pub fn raw_ip_socket(v6: bool) -> std::io::Result<OwnedFd> {
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain integer arguments; the result is checked before use.
    owned_fd(unsafe {
        libc::socket(
            family,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    })
}

/// Sends one whole IP packet on a [`raw_ip_socket`] towards `target`. The address's port is 0:
/// on an IPPROTO_RAW socket it would name a protocol.
pub fn send_raw_packet(raw: &OwnedFd, target: IpAddr, packet: &[u8]) -> std::io::Result<usize> {
    let sent = match target {
        IpAddr::V4(ip) => {
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(ip.octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: the descriptor is open; the buffer and the address are live for the
            // lengths given.
            unsafe {
                libc::sendto(
                    raw.as_raw_fd(),
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&addr as *const libc::sockaddr_in).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
        }
        IpAddr::V6(ip) => {
            let addr = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: ip.octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: the descriptor is open; the buffer and the address (a sockaddr_in6 this
            // time) are live for the lengths given.
            unsafe {
                libc::sendto(
                    raw.as_raw_fd(),
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&addr as *const libc::sockaddr_in6).cast(),
                    size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        }
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(sent as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_times_out_and_kills() {
        let cmd = Cmd::new("sleep").arg("5");
        let started = Instant::now();
        let r = run("test", None, &cmd, Duration::from_millis(200), false);
        assert!(matches!(r, Err(BackendError::Timeout { .. })));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn run_captures_output_and_stdin() {
        let cmd = Cmd::new("sh")
            .arg("-c")
            .arg("cat; echo err >&2; exit 3")
            .stdin("hello\n");
        let out = run("test", None, &cmd, Duration::from_secs(5), false).unwrap();
        assert_eq!(out.stdout, "hello\n");
        assert_eq!(out.stderr, "err\n");
        assert_eq!(out.code, Some(3));
    }
}

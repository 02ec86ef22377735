//! The lab's one boundary with the operating system's processes: every process helper both
//! backends (and the tools they run on hosts) use, and every `unsafe` block of the lab, each
//! with the precondition it relies on.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
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

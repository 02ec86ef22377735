//! Backends build a lab from a [`Plan`] and run things on its hosts.
//!
//! The interface speaks of hosts (nodes, pods, external clients), not of namespaces, so a
//! backend built on virtual machines can slot in behind it: there a node is a VM and a pod a
//! namespace inside it, and files live on a folder shared with the guests at the same path.
//! This module names no backend: `weir_lab_backends::instantiate` is the one place that knows
//! them.

use std::fmt;
use std::path::Path;
use std::time::Duration;

pub use nix::sys::signal::Signal;

use crate::topology::{HostId, Plan};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{host}: `{command}` did not finish within {}", humantime::format_duration(*.after))]
    Timeout {
        host: String,
        command: String,
        after: Duration,
    },
    #[error("{host}: `{command}` failed ({status}): {stderr}")]
    Failed {
        host: String,
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{host}: starting `{command}`: {source}")]
    Spawn {
        host: String,
        command: String,
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("no host {0} in this lab")]
    NoSuchHost(HostId),
    #[error("no process {0:?} in this lab")]
    NoSuchProcess(ProcId),
    #[error("teardown left things behind: {0}")]
    Teardown(String),
    #[error("this backend cannot {0}")]
    Unsupported(&'static str),
}

/// A command to run on a host: a program and its arguments, never a shell line, so arguments
/// need no quoting.
#[derive(Clone, Debug, Default)]
pub struct Cmd {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub stdin: Option<Vec<u8>>,
}

impl Cmd {
    pub fn new(program: impl Into<String>) -> Cmd {
        Cmd {
            program: program.into(),
            ..Cmd::default()
        }
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Cmd {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Cmd {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn stdin(mut self, input: impl Into<Vec<u8>>) -> Cmd {
        self.stdin = Some(input.into());
        self
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.program)?;
        for a in &self.args {
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"$\\".contains(c)) {
                write!(f, " '{}'", a.replace('\'', r"'\''"))?;
            } else {
                write!(f, " {a}")?;
            }
        }
        Ok(())
    }
}

/// What a finished command left behind.
#[derive(Clone, Debug)]
pub struct Output {
    /// None when a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub duration: Duration,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    pub fn status(&self) -> String {
        match self.code {
            Some(c) => format!("exit {c}"),
            None => "killed by a signal".to_owned(),
        }
    }
}

/// A long-running process started with [`Lab::spawn`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProcId(pub u32);

/// A built lab. Dropping it must tear it down, also after a failure half way through a run.
pub trait Lab {
    fn plan(&self) -> &Plan;

    /// Runs `cmd` on `host` to completion; kills it (and anything it started) after `timeout`.
    /// A non-zero exit is not an error here: see [`Output::success`] and [`Lab::exec_ok`].
    fn exec(&mut self, host: HostId, cmd: &Cmd, timeout: Duration) -> Result<Output, BackendError>;

    /// Starts a long-running process on `host`, its stdout and stderr appended to `log`.
    fn spawn(&mut self, host: HostId, cmd: &Cmd, log: &Path) -> Result<ProcId, BackendError>;

    /// None while `proc` runs; its exit description once it has ended.
    fn exited(&mut self, proc: ProcId) -> Result<Option<String>, BackendError>;

    /// Sends one signal to `proc` itself (not to what it started), which stays tracked: see
    /// [`Lab::exited`] for how it ended and [`Lab::stop`] to release it.
    fn signal(&mut self, proc: ProcId, signal: Signal) -> Result<(), BackendError>;

    /// Stops `proc` and everything it started: politely first, then for good.
    fn stop(&mut self, proc: ProcId) -> Result<(), BackendError>;

    /// Replaces a file as one step (write aside, then rename), so readers never see half of it.
    fn write_file(
        &mut self,
        host: HostId,
        path: &Path,
        contents: &[u8],
    ) -> Result<(), BackendError>;

    /// The cgroup (v2) that processes run on node `node` belong to, as seen from the machine
    /// the lab runs on, if the backend gives nodes their own: where a node's agent attaches its
    /// connect-time hooks.
    fn node_cgroup(&self, _node: u8) -> Option<std::path::PathBuf> {
        None
    }

    /// Makes the underlay deliver each datagram tunnelled to node `node` (VXLAN over IPv4 to
    /// `vxlan_port`) first fragment last, until [`Lab::restore_fragment_order`]: see
    /// `weir_lab_backends::frame_delay`. The delayer's output goes to `log`.
    fn delay_first_fragments(
        &mut self,
        node: u8,
        vxlan_port: u16,
        log: &Path,
    ) -> Result<(), BackendError> {
        let _ = (node, vxlan_port, log);
        Err(BackendError::Unsupported(
            "delay first fragments on the underlay",
        ))
    }

    /// Undoes [`Lab::delay_first_fragments`] for node `node`; nothing if it was not done.
    fn restore_fragment_order(&mut self, node: u8) -> Result<(), BackendError> {
        let _ = node;
        Ok(())
    }

    /// Stops every process and removes every host. Idempotent.
    fn teardown(&mut self) -> Result<(), BackendError>;

    /// How many times slower than the host's own kernel this lab runs programs (emulated
    /// CPUs): readiness waits written for namespaces are stretched by it. Checks keep theirs.
    fn slowdown(&self) -> u32 {
        1
    }

    /// CPU time the lab's hosts have used so far, as the host machine accounts it (a VM's
    /// QEMU process), or None where the lab's work cannot be told apart from the rest of the
    /// machine (namespaces share the host's kernel with everything else).
    fn cpu_time(&mut self) -> Option<Duration> {
        None
    }

    /// [`Lab::exec`] that fails unless the command exits 0.
    fn exec_ok(
        &mut self,
        host: HostId,
        cmd: &Cmd,
        timeout: Duration,
    ) -> Result<Output, BackendError> {
        let out = self.exec(host, cmd, timeout)?;
        if out.success() {
            Ok(out)
        } else {
            Err(BackendError::Failed {
                host: host.to_string(),
                command: cmd.to_string(),
                status: out.status(),
                stderr: out.stderr.trim().to_owned(),
            })
        }
    }
}

/// Builds labs.
pub trait Backend {
    fn name(&self) -> &'static str;

    /// Builds every host of `plan`, wired as the plan says. `work_dir` is where the backend may
    /// keep files of its own for this lab.
    fn create(&self, plan: &Plan, work_dir: &Path) -> Result<Box<dyn Lab>, BackendError>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Network namespaces on the host kernel: fast, no VMs.
    Netns,
    /// One QEMU VM per node ($WEIR_LAB_KERNEL of kernels/matrix.toml, default debian-6.1).
    Qemu,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendKind::Netns => f.write_str("netns"),
            BackendKind::Qemu => f.write_str("qemu"),
        }
    }
}

/// Keeps error messages short when a command prints pages.
pub fn tail(text: &str, max_lines: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    let start = lines.len().saturating_sub(max_lines);
    lines[start..].join("\n")
}

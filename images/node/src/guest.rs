//! The guest side of the control port: boots the VM far enough to be a Weir node, then runs
//! the lab's commands. [`Server`] also runs on a host over stdio, which is how it is tested.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::proto::{Command, Op, Reply, Request, Response};
use crate::sys;

/// Serves requests one at a time, tracking the programs it spawned.
#[derive(Default)]
pub struct Server {
    spawned: BTreeMap<u32, Child>,
    /// Filled in at boot, reported by ping.
    pub modules_loaded: usize,
    pub module_errors: Vec<String>,
}

impl Server {
    pub fn new() -> Server {
        Server::default()
    }

    /// Reads requests from `input` and answers on `output` until `input` ends (or poweroff).
    /// `eof_is_final` is false for the VM's port, where EOF only means the host is not (yet)
    /// connected.
    pub fn serve(
        &mut self,
        input: impl Read,
        mut output: impl Write,
        eof_is_final: bool,
    ) -> std::io::Result<()> {
        let mut reader = BufReader::new(input);
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader.read_line(&mut line)?;
            if n == 0 {
                if eof_is_final {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(50));
                self.reap_orphans();
                continue;
            }
            if line.trim().is_empty() {
                continue;
            }
            let response = match serde_json::from_str::<Request>(&line) {
                Ok(req) => {
                    let poweroff = req.op == Op::Poweroff;
                    let reply = self.handle(req.op);
                    let r = Response { id: req.id, reply };
                    if poweroff {
                        write_response(&mut output, &r)?;
                        self.kill_all();
                        sys::poweroff();
                    }
                    r
                }
                Err(e) => Response {
                    id: 0,
                    reply: Reply::Error {
                        message: format!("unreadable request: {e}"),
                    },
                },
            };
            write_response(&mut output, &response)?;
            self.reap_orphans();
        }
    }

    pub fn handle(&mut self, op: Op) -> Reply {
        let result = match op {
            Op::Ping => Ok(Reply::Pong {
                release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
                uptime_ms: sys::uptime_ms(),
                modules_loaded: self.modules_loaded,
                module_errors: self.module_errors.clone(),
            }),
            Op::Exec {
                command,
                timeout_ms,
            } => exec(&command, Duration::from_millis(timeout_ms)),
            Op::Spawn { command, log } => self.spawn(&command, &log),
            Op::Status { pid } => self.status(pid),
            Op::Stop { pid, grace_ms } => self.stop(pid, Duration::from_millis(grace_ms)),
            Op::Signal { pid, signal } => self.signal(pid, signal),
            Op::WriteFile { path, contents } => write_atomically(Path::new(&path), &contents)
                .map(|()| Reply::Done)
                .map_err(|e| format!("writing {path}: {e}")),
            Op::Probe => Ok(Reply::Probe {
                features: Box::new(crate::probe::probe()),
            }),
            Op::Poweroff => Ok(Reply::Done),
        };
        result.unwrap_or_else(|message| Reply::Error { message })
    }

    fn spawn(&mut self, command: &Command, log: &str) -> Result<Reply, String> {
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("opening {log}: {e}"))?;
        let err = log_file.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = prepare(command)?;
        cmd.stdin(Stdio::null()).stdout(log_file).stderr(err);
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", command.program))?;
        let pid = child.id();
        self.spawned.insert(pid, child);
        Ok(Reply::Spawned { pid })
    }

    fn status(&mut self, pid: u32) -> Result<Reply, String> {
        let child = self
            .spawned
            .get_mut(&pid)
            .ok_or_else(|| format!("no process {pid}"))?;
        let exited = child
            .try_wait()
            .map_err(|e| format!("waiting for {pid}: {e}"))?
            .map(describe);
        Ok(Reply::Status { exited })
    }

    fn stop(&mut self, pid: u32, grace: Duration) -> Result<Reply, String> {
        let mut child = self
            .spawned
            .remove(&pid)
            .ok_or_else(|| format!("no process {pid}"))?;
        stop_group(&mut child, grace).map_err(|e| format!("stopping {pid}: {e}"))?;
        Ok(Reply::Done)
    }

    fn signal(&mut self, pid: u32, signal: i32) -> Result<Reply, String> {
        if !self.spawned.contains_key(&pid) {
            return Err(format!("no process {pid}"));
        }
        sys::kill(pid, signal).map_err(|e| format!("signal {signal} to {pid}: {e}"))?;
        Ok(Reply::Done)
    }

    /// Before poweroff: no grace, the VM is going away; only its shared-folder writes matter,
    /// and poweroff syncs those.
    fn kill_all(&mut self) {
        for (pid, mut child) in std::mem::take(&mut self.spawned) {
            let _ = sys::killpg(pid, libc::SIGKILL);
            let _ = child.wait();
        }
    }

    /// PID 1 inherits every orphan (nginx's workers, socat's forks); reap those, never the
    /// children a `Child` handle waits for.
    fn reap_orphans(&mut self) {
        while sys::reap_one_orphan(|pid| self.spawned.contains_key(&pid)) {}
    }
}

fn write_response(out: &mut impl Write, r: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_string(r).map_err(std::io::Error::other)?;
    line.push('\n');
    out.write_all(line.as_bytes())?;
    out.flush()
}

const GUEST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The cgroup the node's own commands run in (those not in a pod's namespace), so connect-time
/// hooks attached there serve the node and leave pods to the per-packet path. Made at boot.
pub const NODE_CGROUP: &str = "/sys/fs/cgroup/weir-node";

fn prepare(command: &Command) -> Result<std::process::Command, String> {
    let mut cmd = std::process::Command::new(&command.program);
    cmd.args(&command.args)
        .env("PATH", GUEST_PATH)
        .envs(command.env.iter().map(|(k, v)| (k, v)))
        .process_group(0);
    if let Some(ns) = &command.netns {
        let path = Path::new("/run/netns").join(ns);
        let file = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        sys::join_netns_before_exec(&mut cmd, file);
    } else if let Ok(procs) = OpenOptions::new()
        .write(true)
        .open(Path::new(NODE_CGROUP).join("cgroup.procs"))
    {
        sys::join_cgroup_before_exec(&mut cmd, procs);
    }
    Ok(cmd)
}

fn exec(command: &Command, timeout: Duration) -> Result<Reply, String> {
    let mut out = tempfile::tempfile().map_err(|e| e.to_string())?;
    let mut err = tempfile::tempfile().map_err(|e| e.to_string())?;
    let mut cmd = prepare(command)?;
    cmd.stdin(if command.stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(out.try_clone().map_err(|e| e.to_string())?)
    .stderr(err.try_clone().map_err(|e| e.to_string())?);
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", command.program))?;
    if let (Some(input), Some(mut stdin)) = (&command.stdin, child.stdin.take()) {
        // Inputs are a line or two; a child that exits without reading gives EPIPE.
        let _ = stdin.write_all(input.as_bytes());
    }
    let mut pause = Duration::from_millis(1);
    let (status, timed_out) = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break (Some(s), false);
        }
        if started.elapsed() >= timeout {
            let _ = sys::killpg(child.id(), libc::SIGKILL);
            let s = child.wait().ok();
            break (s, true);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    };
    Ok(Reply::Exited {
        code: status.and_then(|s| s.code()),
        signal: status.and_then(|s| s.signal()),
        stdout: read_all(&mut out),
        stderr: read_all(&mut err),
        duration_ms: started.elapsed().as_millis() as u64,
        timed_out,
    })
}

fn read_all(f: &mut File) -> String {
    let mut bytes = Vec::new();
    if f.seek(SeekFrom::Start(0)).is_ok() {
        let _ = f.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

fn stop_group(child: &mut Child, grace: Duration) -> std::io::Result<()> {
    let pgid = child.id();
    if child.try_wait()?.is_some() {
        let _ = sys::killpg(pgid, libc::SIGKILL);
        return Ok(());
    }
    let _ = sys::killpg(pgid, libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            let _ = sys::killpg(pgid, libc::SIGKILL);
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = sys::killpg(pgid, libc::SIGKILL);
    child.wait().map(|_| ())
}

fn write_atomically(path: &Path, contents: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(contents.as_bytes())?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// What the kernel command line tells the init (`weir.*=` parameters).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BootParams {
    pub hostname: Option<String>,
    /// eth0's address with prefix, e.g. 198.18.0.1/24.
    pub address: Option<String>,
    pub gateway: Option<String>,
    pub mtu: Option<u32>,
    /// (virtiofs tag, mount point) pairs.
    pub shares: Vec<(String, String)>,
}

impl BootParams {
    pub fn parse(cmdline: &str) -> BootParams {
        let mut p = BootParams::default();
        for word in cmdline.split_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            match key {
                "weir.hostname" => p.hostname = Some(value.to_owned()),
                "weir.ip" => p.address = Some(value.to_owned()),
                "weir.gw" => p.gateway = Some(value.to_owned()),
                "weir.mtu" => p.mtu = value.parse().ok(),
                "weir.share" => p.shares.extend(value.split(',').filter_map(|s| {
                    let (tag, path) = s.split_once(':')?;
                    Some((tag.to_owned(), path.to_owned()))
                })),
                _ => {}
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(server: &mut Server, op: Op) -> Reply {
        server.handle(op)
    }

    /// A server reaps every child of the process that is not its own spawn, as PID 1 must: two
    /// at once in one test process would reap each other's commands.
    static ONE_SERVER_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn one_server_at_a_time() -> std::sync::MutexGuard<'static, ()> {
        ONE_SERVER_AT_A_TIME
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    #[test]
    fn exec_captures_and_times_out() {
        let _serial = one_server_at_a_time();
        let mut s = Server::new();
        let r = ask(
            &mut s,
            Op::Exec {
                command: Command {
                    program: "sh".into(),
                    args: vec!["-c".into(), "cat; echo e >&2; exit 3".into()],
                    stdin: Some("in\n".into()),
                    ..Command::default()
                },
                timeout_ms: 5000,
            },
        );
        match r {
            Reply::Exited {
                code,
                stdout,
                stderr,
                timed_out,
                ..
            } => {
                assert_eq!(code, Some(3));
                assert_eq!(stdout, "in\n");
                assert_eq!(stderr, "e\n");
                assert!(!timed_out);
            }
            other => panic!("{other:?}"),
        }
        let started = Instant::now();
        let r = ask(
            &mut s,
            Op::Exec {
                command: Command {
                    program: "sleep".into(),
                    args: vec!["10".into()],
                    ..Command::default()
                },
                timeout_ms: 200,
            },
        );
        assert!(
            matches!(
                r,
                Reply::Exited {
                    timed_out: true,
                    ..
                }
            ),
            "{r:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn spawn_status_stop() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let _serial = one_server_at_a_time();
        let mut s = Server::new();
        let Reply::Spawned { pid } = ask(
            &mut s,
            Op::Spawn {
                command: Command {
                    program: "sh".into(),
                    args: vec!["-c".into(), "echo started; sleep 30".into()],
                    ..Command::default()
                },
                log: log.display().to_string(),
            },
        ) else {
            panic!("not spawned");
        };
        // The program writes to its log while it runs.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("started")
        {
            assert!(Instant::now() < deadline, "nothing in the log");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            ask(&mut s, Op::Status { pid }),
            Reply::Status { exited: None }
        );
        assert_eq!(
            ask(
                &mut s,
                Op::Stop {
                    pid,
                    grace_ms: 1000
                }
            ),
            Reply::Done
        );
        assert!(matches!(
            ask(&mut s, Op::Status { pid }),
            Reply::Error { .. }
        ));
    }

    #[test]
    fn serves_json_lines_until_eof() {
        let input =
            "{\"id\":1,\"op\":\"ping\"}\nnot json\n{\"id\":2,\"op\":\"status\",\"pid\":1}\n";
        let mut out = Vec::new();
        let _serial = one_server_at_a_time();
        Server::new()
            .serve(input.as_bytes(), &mut out, true)
            .unwrap();
        let lines: Vec<Response> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert!(matches!(lines[0].reply, Reply::Pong { .. }));
        assert!(matches!(lines[1].reply, Reply::Error { .. }));
        assert_eq!(lines[2].id, 2);
    }

    #[test]
    fn boot_params() {
        let p = BootParams::parse(
            "console=ttyS0 weir.hostname=node1 weir.ip=198.18.0.1/24 weir.gw=198.18.0.254 weir.mtu=9000 weir.share=s0:/a/b,s1:/c",
        );
        assert_eq!(p.hostname.as_deref(), Some("node1"));
        assert_eq!(p.mtu, Some(9000));
        assert_eq!(
            p.shares,
            [("s0".into(), "/a/b".into()), ("s1".into(), "/c".into())]
        );
        assert_eq!(BootParams::parse(""), BootParams::default());
    }
}

//! One VM: its QEMU process, its virtiofsd processes, its console log and its control port.
//!
//! Every wait on a VM is bounded and watches the VM while it waits: QEMU exiting (a panic with
//! `-no-reboot` ends it), a panic or oops on the console, or silence past the deadline all end
//! the wait with a [`VmError`] that names the console log, and the VM is killed by PID.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use weir_node_image::proto::{Op, Reply, Request, Response};

use super::tools::{Accel, Qemu};
use crate::sys::{prepare_child, stop_group};

/// How a VM failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{vm}: kernel panic or oops on the console: {line} (console: {console})")]
    Panicked {
        vm: String,
        line: String,
        console: PathBuf,
    },
    #[error("{vm}: QEMU exited ({status}){tail} (console: {console})")]
    Exited {
        vm: String,
        status: String,
        tail: String,
        console: PathBuf,
    },
    #[error("{vm}: no answer within {}: hung guest, killed (console: {console}){tail}", humantime::format_duration(*.after))]
    Hung {
        vm: String,
        after: Duration,
        tail: String,
        console: PathBuf,
    },
    #[error("{vm}: {message}")]
    Other { vm: String, message: String },
}

/// A share mounted in the guest at the same path it has on the host.
#[derive(Clone, Debug)]
pub struct Share {
    pub path: PathBuf,
    pub read_only: bool,
}

/// Everything needed to start one VM.
pub struct VmSpec<'a> {
    pub name: String,
    pub qemu: &'a Qemu,
    pub virtiofsd: &'a Path,
    pub accel: Accel,
    pub kernel_image: &'a Path,
    pub initrd: &'a Path,
    pub memory_mib: u32,
    pub cpus: u32,
    /// The tap device (in `netns`) the VM's eth0 is wired to, and its MAC; None for a VM
    /// without a network.
    pub tap: Option<String>,
    pub mac: String,
    pub host_mtu: u32,
    pub offloads: bool,
    /// The kernel command line's `weir.*` part.
    pub boot_params: String,
    pub shares: Vec<Share>,
    /// Where the console log, sockets and virtiofsd logs go.
    pub dir: PathBuf,
    /// The namespace QEMU runs in, which holds the tap (QEMU opens it by name there).
    pub netns: Option<&'a Path>,
}

pub struct Vm {
    pub name: String,
    qemu: Option<Child>,
    virtiofsd: Vec<Child>,
    pub console: PathBuf,
    ctl_socket: PathBuf,
    ctl: Option<(BufReader<UnixStream>, UnixStream)>,
    next_id: u64,
    started: Instant,
    /// Set once the VM failed; later requests fail fast with it.
    dead: Option<String>,
}

/// Console lines that mean the kernel is gone or broken.
const PANIC_MARKERS: &[&str] = &[
    "Kernel panic",
    "BUG: kernel NULL pointer",
    "Oops:",
    "general protection fault",
    "watchdog: BUG: soft lockup",
];

/// How long one blocking read may take before the VM's health is checked again.
const POLL: Duration = Duration::from_millis(500);

impl Vm {
    /// Starts the VM's virtiofsd processes and QEMU; does not wait for the guest (see
    /// [`Vm::wait_ready`]), so several VMs can boot at once.
    pub fn start(spec: &VmSpec<'_>) -> Result<Vm, VmError> {
        let err = |message: String| VmError::Other {
            vm: spec.name.clone(),
            message,
        };
        std::fs::create_dir_all(&spec.dir)
            .map_err(|e| err(format!("creating {}: {e}", spec.dir.display())))?;
        let console = spec.dir.join(format!("console-{}.log", spec.name));
        let ctl_socket = spec.dir.join(format!("{}.ctl.sock", spec.name));
        let mut vm = Vm {
            name: spec.name.clone(),
            qemu: None,
            virtiofsd: Vec::new(),
            console: console.clone(),
            ctl_socket: ctl_socket.clone(),
            ctl: None,
            next_id: 1,
            started: Instant::now(),
            dead: None,
        };

        let mut fs_args: Vec<String> = Vec::new();
        let mut tags = Vec::new();
        for (i, share) in spec.shares.iter().enumerate() {
            let tag = format!("weir{i}");
            let sock = spec.dir.join(format!("{}.fs{i}.sock", spec.name));
            let log = spec.dir.join(format!("virtiofsd-{}-{i}.log", spec.name));
            let log_file =
                File::create(&log).map_err(|e| err(format!("{}: {e}", log.display())))?;
            let mut cmd = Command::new(spec.virtiofsd);
            cmd.arg(format!("--socket-path={}", sock.display()))
                .arg(format!("--shared-dir={}", share.path.display()))
                // The host writes files in the run directory that the guest must see at once
                // (agent state, configs): no caching there. The read-only share holds the
                // agent binary, which does not change while a VM lives and is executed again
                // for every `dump`: cache it for good.
                .arg(if share.read_only {
                    "--cache=always"
                } else {
                    "--cache=never"
                })
                .arg("--log-level=warn")
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().map_err(|e| err(e.to_string()))?)
                .stderr(log_file)
                .process_group(0);
            if share.read_only {
                cmd.arg("--readonly");
            }
            prepare_child(&mut cmd, None);
            let child = cmd
                .spawn()
                .map_err(|e| err(format!("starting {}: {e}", spec.virtiofsd.display())))?;
            vm.virtiofsd.push(child);
            if !wait_for_path(&sock, Duration::from_secs(10)) {
                return Err(err(format!(
                    "virtiofsd did not create {} (log: {})",
                    sock.display(),
                    log.display()
                )));
            }
            fs_args.extend([
                "-chardev".into(),
                format!("socket,id=fs{i},path={}", sock.display()),
                "-device".into(),
                format!("vhost-user-fs-pci,chardev=fs{i},tag={tag}"),
            ]);
            tags.push(format!("{tag}:{}", share.path.display()));
        }

        let mem = format!("{}M", spec.memory_mib);
        let mut args: Vec<String> = vec![
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            "-no-reboot".into(),
            "-machine".into(),
            "pc".into(),
        ];
        args.extend(spec.accel.qemu_args().iter().map(|s| s.to_string()));
        args.extend([
            "-m".into(),
            mem.clone(),
            "-smp".into(),
            spec.cpus.to_string(),
        ]);
        if !spec.shares.is_empty() {
            // vhost-user devices need the guest's memory shared with virtiofsd.
            args.extend([
                "-object".into(),
                format!("memory-backend-memfd,id=mem,size={mem},share=on"),
                "-numa".into(),
                "node,memdev=mem".into(),
            ]);
        }
        let mut append = format!(
            "console=ttyS0 panic=1 oops=panic loglevel=4 rdinit=/init {}",
            spec.boot_params
        );
        if !tags.is_empty() {
            append.push_str(&format!(" weir.share={}", tags.join(",")));
        }
        let mut net = format!(
            "virtio-net-pci,netdev=net0,mac={},host_mtu={},romfile=",
            spec.mac, spec.host_mtu
        );
        if !spec.offloads {
            // No checksum offload means no segmentation offload either: the guest sends and
            // receives frames of its MTU, which is what MTU tests need.
            net.push_str(",csum=off,guest_csum=off,guest_tso4=off,guest_tso6=off,host_tso4=off,host_tso6=off");
        }
        args.extend([
            "-kernel".into(),
            spec.kernel_image.display().to_string(),
            "-initrd".into(),
            spec.initrd.display().to_string(),
            "-append".into(),
            append,
            "-chardev".into(),
            format!("file,id=con0,path={}", console.display()),
            "-serial".into(),
            "chardev:con0".into(),
            "-device".into(),
            "virtio-serial-pci".into(),
            "-chardev".into(),
            format!(
                "socket,id=ctl,path={},server=on,wait=off",
                ctl_socket.display()
            ),
            "-device".into(),
            format!(
                "virtserialport,chardev=ctl,name={}",
                weir_node_image::proto::PORT_NAME
            ),
        ]);
        if let Some(tap) = &spec.tap {
            args.extend([
                "-netdev".into(),
                format!("tap,id=net0,ifname={tap},script=no,downscript=no"),
                "-device".into(),
                net,
            ]);
        }
        args.extend(fs_args);
        for d in &spec.qemu.data_dirs {
            args.extend(["-L".into(), d.display().to_string()]);
        }
        let qemu_log = spec.dir.join(format!("qemu-{}.log", spec.name));
        let log_file =
            File::create(&qemu_log).map_err(|e| err(format!("{}: {e}", qemu_log.display())))?;
        let netns = spec
            .netns
            .map(|p| File::open(p).map_err(|e| err(format!("{}: {e}", p.display()))))
            .transpose()?;
        let mut cmd = Command::new(&spec.qemu.binary);
        cmd.args(&args)
            .env("QEMU_MODULE_DIR", &spec.qemu.module_dir)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(|e| err(e.to_string()))?)
            .stderr(log_file)
            .process_group(0);
        prepare_child(&mut cmd, netns.as_ref().map(|f| f.as_raw_fd()));
        debug!(vm = %spec.name, args = ?args, "starting QEMU");
        let child = cmd
            .spawn()
            .map_err(|e| err(format!("starting {}: {e}", spec.qemu.binary.display())))?;
        drop(netns);
        vm.qemu = Some(child);
        vm.started = Instant::now();
        Ok(vm)
    }

    pub fn pid(&self) -> Option<u32> {
        self.qemu.as_ref().map(|c| c.id())
    }

    /// User plus system time of the QEMU process (all its threads), from /proc/PID/stat.
    pub fn cpu_time(&self) -> Option<Duration> {
        let pid = self.pid()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        proc_stat_cpu(&stat)
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The failure the VM shows right now, if any: QEMU gone, or a panic on the console.
    fn health(&mut self) -> Option<VmError> {
        if let Some(q) = self.qemu.as_mut() {
            if let Ok(Some(status)) = q.try_wait() {
                let text = std::fs::read_to_string(&self.console).unwrap_or_default();
                if let Some(line) = panic_line(&text) {
                    return Some(VmError::Panicked {
                        vm: self.name.clone(),
                        line,
                        console: self.console.clone(),
                    });
                }
                return Some(VmError::Exited {
                    vm: self.name.clone(),
                    status: status.to_string(),
                    tail: console_tail(&self.console),
                    console: self.console.clone(),
                });
            }
        }
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        panic_line(&text).map(|line| VmError::Panicked {
            vm: self.name.clone(),
            line,
            console: self.console.clone(),
        })
    }

    /// Marks the VM dead and kills it by PID; returns the error for the caller to report.
    fn fail(&mut self, e: VmError) -> VmError {
        warn!("{e}");
        self.dead = Some(e.to_string());
        self.kill();
        e
    }

    /// Connects to the control port and waits for the init's first answer.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Reply, VmError> {
        let deadline = self.started + timeout;
        loop {
            if let Some(e) = self.health() {
                return Err(self.fail(e));
            }
            match UnixStream::connect(&self.ctl_socket) {
                Ok(s) => {
                    let reader = s.try_clone().map_err(|e| VmError::Other {
                        vm: self.name.clone(),
                        message: e.to_string(),
                    })?;
                    self.ctl = Some((BufReader::new(reader), s));
                    break;
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => {
                    let err = VmError::Other {
                        vm: self.name.clone(),
                        message: format!("control socket {}: {e}", self.ctl_socket.display()),
                    };
                    return Err(self.fail(err));
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        self.request(Op::Ping, left.max(Duration::from_secs(1)))
    }

    /// Sends one request and waits (at most `timeout`) for its answer, watching the VM.
    pub fn request(&mut self, op: Op, timeout: Duration) -> Result<Reply, VmError> {
        if let Some(why) = &self.dead {
            return Err(VmError::Other {
                vm: self.name.clone(),
                message: format!("VM is down: {why}"),
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut line = serde_json::to_string(&Request { id, op }).expect("requests serialize");
        line.push('\n');
        let vm = self.name.clone();
        let Some((_, writer)) = self.ctl.as_mut() else {
            return Err(VmError::Other {
                vm,
                message: "not connected".into(),
            });
        };
        if let Err(e) = writer.write_all(line.as_bytes()) {
            let e = VmError::Other {
                vm,
                message: format!("writing to the control port: {e}"),
            };
            return Err(self.fail(e));
        }
        let deadline = Instant::now() + timeout;
        let mut buf = String::new();
        loop {
            let Some((reader, _)) = self.ctl.as_mut() else {
                unreachable!("connected above");
            };
            let _ = reader.get_ref().set_read_timeout(Some(POLL));
            match reader.read_line(&mut buf) {
                Ok(0) => {
                    let e = self.health().unwrap_or_else(|| VmError::Other {
                        vm: self.name.clone(),
                        message: "control port closed".into(),
                    });
                    return Err(self.fail(e));
                }
                Ok(_) if buf.ends_with('\n') => {
                    match serde_json::from_str::<Response>(&buf) {
                        Ok(r) if r.id == id => return Ok(r.reply),
                        Ok(r) => debug!(vm = %self.name, id = r.id, "stale answer dropped"),
                        Err(e) => warn!(vm = %self.name, "unreadable answer ({e}): {buf}"),
                    }
                    buf.clear();
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => {
                    let e = VmError::Other {
                        vm: self.name.clone(),
                        message: format!("reading the control port: {e}"),
                    };
                    return Err(self.fail(e));
                }
            }
            if let Some(e) = self.health() {
                return Err(self.fail(e));
            }
            if Instant::now() >= deadline {
                let e = VmError::Hung {
                    vm: self.name.clone(),
                    after: timeout,
                    tail: console_tail(&self.console),
                    console: self.console.clone(),
                };
                return Err(self.fail(e));
            }
        }
    }

    /// Asks the guest to power off, then makes sure QEMU and virtiofsd are gone.
    pub fn shutdown(&mut self, grace: Duration) {
        if self.dead.is_none() && self.ctl.is_some() {
            let _ = self.request(Op::Poweroff, Duration::from_secs(5));
        }
        if let Some(q) = self.qemu.as_mut() {
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if matches!(q.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.kill();
    }

    /// Kills QEMU and the virtiofsd processes by PID (their process groups).
    pub fn kill(&mut self) {
        self.ctl = None;
        if let Some(mut q) = self.qemu.take() {
            if let Err(e) = stop_group(&mut q, Duration::from_millis(500)) {
                warn!(vm = %self.name, "stopping QEMU: {e}");
            }
        }
        for mut v in self.virtiofsd.drain(..) {
            if let Err(e) = stop_group(&mut v, Duration::from_millis(500)) {
                warn!(vm = %self.name, "stopping virtiofsd: {e}");
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_for_path(path: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// utime + stime of a /proc/PID/stat line. Fields count after the command name, which is in
/// parentheses and may hold spaces.
fn proc_stat_cpu(stat: &str) -> Option<Duration> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // Linux reports these in USER_HZ, which is 100 on every architecture it builds for x86.
    const USER_HZ: u64 = 100;
    Some(Duration::from_millis((utime + stime) * 1000 / USER_HZ))
}

/// The first console line that shows a panic or oops.
pub fn panic_line(console: &str) -> Option<String> {
    console
        .lines()
        .find(|l| PANIC_MARKERS.iter().any(|m| l.contains(m)))
        .map(|l| l.trim().to_owned())
}

fn console_tail(console: &Path) -> String {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    let tail = weir_lab_core::backend::tail(&text, 8);
    if tail.is_empty() {
        "; the console is empty".into()
    } else {
        format!("; console ends:\n{tail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_cpu_time() {
        let stat = "4242 (qemu-system-x86 x) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 100 0 0";
        assert_eq!(proc_stat_cpu(stat), Some(Duration::from_millis(3000)));
        assert_eq!(proc_stat_cpu("garbage"), None);
    }

    #[test]
    fn panics_are_recognised() {
        assert_eq!(
            panic_line("[ 1.0] ok\n[ 2.0] Kernel panic - not syncing: VFS\n").as_deref(),
            Some("[ 2.0] Kernel panic - not syncing: VFS")
        );
        assert_eq!(panic_line("[ 1.0] all fine\n"), None);
    }
}

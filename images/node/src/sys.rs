//! The system calls the guest init makes, wrapped once: every `unsafe` of the crate is here.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in string"))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// mount(2); `data` as the file system's option string.
pub fn mount(source: &str, target: &str, fstype: &str, data: Option<&str>) -> io::Result<()> {
    let (s, t, f) = (cstr(source)?, cstr(target)?, cstr(fstype)?);
    let d = data.map(cstr).transpose()?;
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call; data is
    // either NULL or such a string.
    check(unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            f.as_ptr(),
            0,
            d.as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    })
}

/// Loads a (decompressed) kernel module from a file; already loaded is not an error.
pub fn load_module(path: &Path) -> io::Result<()> {
    let file = std::fs::File::open(path)?;
    let params = cstr("")?;
    // SAFETY: finit_module takes an open fd, a NUL-terminated parameter string and flags;
    // both stay valid for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            0,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        Ok(())
    } else {
        Err(e)
    }
}

pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, valid for the call.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
}

/// Raises a resource limit to unlimited (5.10 charges BPF maps to RLIMIT_MEMLOCK).
pub fn unlimit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: `lim` is a valid rlimit for the duration of the call.
    check(unsafe { libc::setrlimit(resource, &lim) })
}

/// Joins the network namespace `fd` refers to. Called between fork and exec.
pub fn setns_net(fd: RawFd) -> io::Result<()> {
    // SAFETY: setns takes an fd and a namespace type; an invalid fd is reported as an error.
    check(unsafe { libc::setns(fd, libc::CLONE_NEWNET) })
}

/// Makes `cmd`'s child join the network namespace `netns` (an open /run/netns file) between
/// fork and exec.
pub fn join_netns_before_exec(cmd: &mut std::process::Command, netns: std::fs::File) {
    use std::os::unix::process::CommandExt;
    let fd = netns.as_raw_fd();
    // SAFETY: the hook runs in the forked child and only calls setns(2), which is
    // async-signal-safe. The closure owns the file, so the fd stays open until the command is
    // dropped, after the child has been spawned.
    unsafe {
        cmd.pre_exec(move || {
            let _keep_open = &netns;
            setns_net(fd)
        });
    }
}

/// Signals a whole process group.
pub fn killpg(pgid: u32, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: kill(2) on a process group id we created; no memory is involved.
    check(unsafe { libc::killpg(pgid as libc::pid_t, signal) })
}

/// Reaps one exited child that `keep` does not claim (orphans re-parented to PID 1), without
/// disturbing the children std's `Child` handles wait for. Returns false when none is left.
pub fn reap_one_orphan(keep: impl Fn(u32) -> bool) -> bool {
    // SAFETY: siginfo_t is plain data; waitid fills it. WNOWAIT leaves the child waitable.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid siginfo_t to fill.
    let rc = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if rc != 0 {
        return false;
    }
    // SAFETY: after a successful waitid with WEXITED, si_pid is set (0 if nothing is waitable).
    let pid = unsafe { info.si_pid() };
    if pid <= 0 || keep(pid as u32) {
        return false;
    }
    let mut status = 0;
    // SAFETY: reaps exactly that pid, which has exited and is ours to reap.
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    true
}

/// Syncs and powers off (as PID 1) or exits (otherwise).
pub fn poweroff() -> ! {
    // SAFETY: sync and reboot take no pointers; reboot only returns on failure.
    unsafe {
        libc::sync();
        if libc::getpid() == 1 {
            libc::reboot(libc::RB_POWER_OFF);
        }
    }
    std::process::exit(0)
}

pub fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0, |s| (s * 1000.0) as u64)
}

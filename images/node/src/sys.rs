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
            d.as_ref().map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    })
}

/// Loads a (decompressed) kernel module from a file; already loaded is not an error.
pub fn load_module(path: &Path) -> io::Result<()> {
    let file = std::fs::File::open(path)?;
    let params = cstr("")?;
    // SAFETY: finit_module takes an open fd, a NUL-terminated parameter string and flags;
    // both stay valid for the call.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
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

/// Moves the child into the cgroup whose `cgroup.procs` is open as `procs` before it execs.
pub fn join_cgroup_before_exec(cmd: &mut std::process::Command, procs: std::fs::File) {
    use std::os::unix::process::CommandExt;
    let fd = procs.as_raw_fd();
    // SAFETY: the hook runs in the forked child and only calls write(2), which is
    // async-signal-safe, on a buffer it does not allocate. The closure owns the file, so the
    // fd stays open until the command is dropped, after the child has been spawned.
    unsafe {
        cmd.pre_exec(move || {
            let _keep_open = &procs;
            // "0" moves the writer: this child.
            let zero = b"0";
            if libc::write(fd, zero.as_ptr().cast(), zero.len()) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Signals one process.
pub fn kill(pid: u32, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: kill(2) on a child we spawned and still track (not yet reaped, so the PID is
    // still ours); no memory is involved.
    check(unsafe { libc::kill(pid as libc::pid_t, signal) })
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

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0, |s| (s * 1000.0) as u64)
}

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BpfInsn {
    pub code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

/// The leading fields of `union bpf_attr` for BPF_PROG_LOAD (the rest stays zero).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    /// Room for the fields newer kernels read; they must be zero.
    _rest: [u64; 12],
}

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    _rest: [u64; 12],
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 8],
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: `attr` is a properly laid out, zero-padded bpf_attr prefix of the size passed;
    // the kernel reads (and for logs writes through pointers set up by the caller) only that.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a non-negative return of these commands is a new fd that we now own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(rc as RawFd) })
}

/// Loads a program; on failure returns the error and the verifier's log.
pub fn bpf_prog_load(
    prog_type: u32,
    expected_attach_type: u32,
    insns: &[BpfInsn],
) -> Result<std::os::fd::OwnedFd, (io::Error, String)> {
    let license = b"GPL\0";
    let mut log = vec![0u8; 1 << 16];
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        expected_attach_type,
        ..ProgLoadAttr::default()
    };
    bpf(BPF_PROG_LOAD, &mut attr).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        (e, String::from_utf8_lossy(&log[..end]).into_owned())
    })
}

pub fn bpf_map_create(
    map_type: u32,
    key: u32,
    value: u32,
    entries: u32,
    flags: u32,
) -> io::Result<()> {
    let mut attr = MapCreateAttr {
        map_type,
        key_size: key,
        value_size: value,
        max_entries: entries,
        map_flags: flags,
        ..MapCreateAttr::default()
    };
    bpf(BPF_MAP_CREATE, &mut attr).map(drop)
}

/// Creates (and at once drops, which detaches) a BPF link of `attach_type` on `ifindex`.
pub fn bpf_link_create(
    prog: &std::os::fd::OwnedFd,
    ifindex: u32,
    attach_type: u32,
) -> io::Result<()> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type,
        ..LinkCreateAttr::default()
    };
    bpf(BPF_LINK_CREATE, &mut attr).map(drop)
}

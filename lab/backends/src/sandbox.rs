//! The lab's private mount namespace: whatever it mounts (bpffs, the netns directory) is
//! invisible to the host and goes away with the lab's last process.

use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("weir-lab must run as root: it creates network namespaces and mounts bpffs")]
    NotRoot,
    #[error("the private mount namespace must be entered before any thread starts ({0} threads running)")]
    Threaded(usize),
    #[error("{what}: {source}")]
    Sys { what: String, source: nix::Error },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn sys(what: &str) -> impl FnOnce(nix::Error) -> SandboxError + '_ {
    move |source| SandboxError::Sys {
        what: what.to_owned(),
        source,
    }
}

pub fn require_root() -> Result<(), SandboxError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(SandboxError::NotRoot)
    }
}

fn thread_count() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
}

/// Enters a new mount namespace with `/` made recursively private, then mounts a fresh bpffs on
/// /sys/fs/bpf and a tmpfs on /run/netns. Children inherit all of it.
pub fn enter() -> Result<(), SandboxError> {
    require_root()?;
    // unshare(CLONE_NEWNS) also unshares the fs struct, which the kernel refuses for a
    // process whose threads share it.
    if let Some(n) = thread_count().filter(|n| *n > 1) {
        return Err(SandboxError::Threaded(n));
    }
    unshare(CloneFlags::CLONE_NEWNS).map_err(sys("unshare(CLONE_NEWNS)"))?;
    // Without this, mounts below would propagate back to the host's shared mounts.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys("making / rprivate"))?;
    mount(
        Some("bpf"),
        "/sys/fs/bpf",
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(sys("mounting bpffs on /sys/fs/bpf"))?;
    let netns = Path::new("/run/netns");
    std::fs::create_dir_all(netns).map_err(|source| SandboxError::Io {
        what: "creating /run/netns".into(),
        source,
    })?;
    mount(
        Some("tmpfs"),
        netns,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=1m"),
    )
    .map_err(sys("mounting a tmpfs on /run/netns"))?;
    // Older kernels charge BPF maps to RLIMIT_MEMLOCK; agents inherit this.
    let _ = nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_MEMLOCK,
        nix::sys::resource::RLIM_INFINITY,
        nix::sys::resource::RLIM_INFINITY,
    );
    tracing::debug!("entered a private mount namespace with its own bpffs and /run/netns");
    Ok(())
}

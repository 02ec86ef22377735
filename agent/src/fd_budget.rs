//! The agent's file-descriptor budget: the HTTP listeners can never take the descriptors the
//! data plane needs.
//!
//! What the agent holds open, besides its HTTP connections:
//! - the data plane: one descriptor per map and program (a few dozen), one per program link,
//!   which is one or two per attached interface (every pod interface of the node), and the
//!   sock_addr hooks' links;
//! - netlink sockets (the tunnel device, interface and address lookups), the inotify instance
//!   of the file source, the Kubernetes client's connections, the runtime's own (epoll, eventfd);
//! - one listening socket per healthCheckNodePort (as many as Services ask for, like
//!   kube-proxy).
//!
//! At start the soft `RLIMIT_NOFILE` is raised to the hard limit (as Go does for kube-proxy and
//! any other Go program), and the HTTP listeners together may hold at most a quarter of it in
//! connections ([`LISTENER_SHARE`]): configured caps that do not fit are lowered, with a
//! warning. With the defaults (three listeners of 64 connections) that is 192 descriptors, which
//! fits even the 1024 of an unraised limit; a container runtime's usual hard limit (524288 or
//! more) leaves the rest of the budget to the data plane many times over.

use tracing::{info, warn};

/// The HTTP listeners together may hold 1/LISTENER_SHARE of the descriptor limit.
pub const LISTENER_SHARE: u64 = 4;

/// Listeners that hold connections: the operations endpoint, kube-proxy's healthz, and the
/// healthCheckNodePorts (one budget shared by every port, so the number of Services does not
/// multiply it).
pub const LISTENERS: u64 = 3;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the soft limit in force (the
/// old one when raising failed, which is logged).
pub fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            warn!(error = %e, "reading RLIMIT_NOFILE");
            // The kernel's default soft limit: the cap computation stays conservative.
            return 1024;
        }
    };
    if soft >= hard {
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => {
            info!(from = soft, to = hard, "raised the open-file limit");
            hard
        }
        Err(e) => {
            warn!(error = %e, soft, hard, "could not raise the open-file limit");
            soft
        }
    }
}

/// The connection cap each listener gets: the configured one, lowered when the listeners
/// together would hold more than their share of `nofile` (never below one).
pub fn connection_cap(configured: usize, nofile: u64) -> usize {
    let fits = (nofile / LISTENER_SHARE / LISTENERS).max(1);
    let cap = (configured as u64).min(fits) as usize;
    if cap < configured {
        warn!(
            configured,
            cap,
            nofile,
            "http.max_connections lowered to keep the descriptor budget for the data plane"
        );
    }
    cap
}

/// Descriptors this process holds open now (for tests and diagnostics).
pub fn open_descriptors() -> std::io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_fit_a_quarter_of_the_limit() {
        assert_eq!(
            connection_cap(64, 1024),
            64,
            "the default fits an unraised limit"
        );
        assert_eq!(connection_cap(1000, 1024), 85);
        assert_eq!(connection_cap(1000, 1 << 20), 1000);
        assert_eq!(connection_cap(64, 3), 1, "never zero");
    }

    #[test]
    fn the_soft_limit_ends_at_the_hard_one() {
        use nix::sys::resource::{getrlimit, Resource};
        let raised = raise_nofile_limit();
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(raised, soft);
        assert_eq!(soft, hard);
    }
}

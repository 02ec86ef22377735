//! The lab's fabric: the network namespace on the machine the lab runs on whose bridges join
//! every host (the netns backend's namespaces, the QEMU backend's taps), and what both backends
//! do to it.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use weir_lab_core::backend::{tail, BackendError, Cmd};

use crate::sys::{
    describe, run, spawn_logged, stop_group, NETNS_DIR, PLUMBING_TIMEOUT, STOP_GRACE,
};

/// The bridge of network 1 (further networks are numbered, see [`bridge_name`]).
pub const BRIDGE: &str = "weirbr";

/// Network 1's bridge keeps its historical name; further networks are numbered.
pub fn bridge_name(network: u8) -> String {
    if network == 1 {
        BRIDGE.to_owned()
    } else {
        format!("{BRIDGE}{network}")
    }
}

/// The fabric's port towards node `node` (its first network's).
pub fn port_towards(node: u8) -> String {
    format!("n{node}")
}

/// The delays running on a lab's fabric, one per node at most: what both backends keep for
/// `Lab::delay_first_fragments` and `Lab::restore_fragment_order`.
#[derive(Default)]
pub struct FabricDelays(BTreeMap<u8, FabricDelay>);

impl FabricDelays {
    /// Delays the first fragments tunnelled to node `node`, on `port` of the namespace `fabric`.
    pub fn start(
        &mut self,
        node: u8,
        fabric: &str,
        port: &str,
        vxlan_port: u16,
        log: &Path,
    ) -> Result<(), BackendError> {
        let delay = FabricDelay::start(fabric, port, vxlan_port, log)?;
        self.0.insert(node, delay);
        Ok(())
    }

    /// Ends node `node`'s delay, if it has one.
    pub fn stop(&mut self, node: u8) -> Result<(), BackendError> {
        match self.0.remove(&node) {
            Some(delay) => delay.stop(),
            None => Ok(()),
        }
    }

    /// Ends every delay (at teardown, before the fabric goes: their devices are in it); returns
    /// what went wrong.
    pub fn stop_all(&mut self) -> Vec<String> {
        std::mem::take(&mut self.0)
            .into_values()
            .filter_map(|delay| delay.stop().err().map(|e| e.to_string()))
            .collect()
    }
}

/// Tunnelled first fragments delayed on a lab's fabric, on their way out of its port towards
/// one node (see [`crate::frame_delay`]): the port's filters, the veth pair they redirect into,
/// and the delayer reading its other end. Both backends' fabrics are namespaces on the machine
/// the lab runs on.
pub struct FabricDelay {
    fabric: String,
    port: String,
    /// Redirected into; the delayer reads the pair's other end.
    into: String,
    delayer: Child,
}

impl FabricDelay {
    /// Sets the delay up on `port` of the namespace `fabric` and starts the delayer (this
    /// executable), its output appended to `log`; returns once it reads.
    pub fn start(
        fabric: &str,
        port: &str,
        vxlan_port: u16,
        log: &Path,
    ) -> Result<FabricDelay, BackendError> {
        let (into, out_of) = (format!("{port}d0"), format!("{port}d1"));
        let ip = |args: &[&str]| {
            let cmd = Cmd::new("ip")
                .args(["-n", fabric])
                .args(args.iter().copied());
            run("lab", None, &cmd, PLUMBING_TIMEOUT, true).map(drop)
        };
        let tc = |args: &[&str]| {
            let cmd = Cmd::new("tc")
                .args(["-n", fabric])
                .args(args.iter().copied());
            run("lab", None, &cmd, PLUMBING_TIMEOUT, true).map(drop)
        };
        ip(&[
            "link", "add", &into, "type", "veth", "peer", "name", &out_of,
        ])?;
        ip(&["link", "set", &into, "up"])?;
        ip(&["link", "set", &out_of, "up"])?;
        tc(&["qdisc", "add", "dev", port, "clsact"])?;
        for matches in crate::frame_delay::first_fragment_matches(vxlan_port) {
            let mut args = vec![
                "filter", "add", "dev", port, "egress", "protocol", "ip", "u32",
            ];
            args.extend(matches.iter().map(String::as_str));
            args.extend(["action", "mirred", "egress", "redirect", "dev", &into]);
            tc(&args)?;
        }
        let lab = std::env::current_exe().map_err(|source| BackendError::Io {
            context: "finding this executable".into(),
            source,
        })?;
        let cmd = Cmd::new(lab.display().to_string()).args([
            "probe",
            "delay-frames",
            "--from",
            &out_of,
            "--to",
            port,
        ]);
        let spawn_err = |source| BackendError::Spawn {
            host: fabric.to_owned(),
            command: cmd.to_string(),
            source,
        };
        // The log is appended to: an earlier delayer's line does not count.
        let ready_lines = || {
            std::fs::read_to_string(log)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.starts_with(crate::frame_delay::READY))
                .count()
        };
        let ready_before = ready_lines();
        let delayer = spawn_logged(fabric, &Path::new(NETNS_DIR).join(fabric), None, &cmd, log)?;
        let mut delay = FabricDelay {
            fabric: fabric.to_owned(),
            port: port.to_owned(),
            into,
            delayer,
        };
        let started = Instant::now();
        while ready_lines() <= ready_before {
            let exited = delay.delayer.try_wait().map_err(spawn_err)?;
            if exited.is_some() || started.elapsed() > crate::frame_delay::READY_WAIT {
                let why = exited.map_or_else(
                    || format!("not reading after {:?}", crate::frame_delay::READY_WAIT),
                    describe,
                );
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let _ = delay.stop();
                return Err(BackendError::Failed {
                    host: fabric.to_owned(),
                    command: cmd.to_string(),
                    status: why,
                    stderr: tail(&text, 5),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(delay)
    }

    /// Stops the delayer and removes the filters and the veth pair.
    pub fn stop(mut self) -> Result<(), BackendError> {
        stop_group(&mut self.delayer, STOP_GRACE).map_err(|source| BackendError::Io {
            context: format!("stopping the delayer on {}", self.fabric),
            source,
        })?;
        for (program, args) in [
            ("tc", vec!["qdisc", "del", "dev", &self.port, "clsact"]),
            ("ip", vec!["link", "del", &self.into]),
        ] {
            let cmd = Cmd::new(program)
                .args(["-n", self.fabric.as_str()])
                .args(args);
            run("lab", None, &cmd, PLUMBING_TIMEOUT, true)?;
        }
        Ok(())
    }
}

//! What the lab and the guest init say to each other over the VM's control port: one JSON
//! object per line each way, one request at a time, every request answered exactly once.
//!
//! The port is a virtio-serial port named [`PORT_NAME`]; the guest finds it under
//! /sys/class/virtio-ports. Nothing on it is trusted beyond the lab's own VMs.

use serde::{Deserialize, Serialize};

pub const PORT_NAME: &str = "weir.ctl";
/// Printed on the console when the init is ready to serve, so boot progress is visible there.
pub const READY_BANNER: &str = "weir-node-init: ready";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Request {
    pub id: u64,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Liveness and identity.
    Ping,
    /// Runs a program to completion (in a named network namespace, or the VM's own) and kills
    /// its process group after `timeout_ms`.
    Exec {
        #[serde(flatten)]
        command: Command,
        timeout_ms: u64,
    },
    /// Starts a long-running program, stdout and stderr appended to `log`.
    Spawn {
        #[serde(flatten)]
        command: Command,
        log: String,
    },
    /// Whether a spawned program still runs.
    Status { pid: u32 },
    /// SIGTERM to the program's group, SIGKILL after `grace_ms`.
    Stop { pid: u32, grace_ms: u64 },
    /// One signal to the program itself (not its group), as `kill -s` on a node would send it;
    /// the program is still tracked, so [`Op::Status`] sees how it ended.
    Signal { pid: u32, signal: i32 },
    /// Writes a file atomically (aside, then rename).
    WriteFile { path: String, contents: String },
    /// Probes what the kernel offers Weir (see [`Features`]).
    Probe,
    /// Syncs and powers the VM off.
    Poweroff,
}

/// One probed feature.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Feature {
    pub name: String,
    pub available: bool,
    /// Why not, when not available.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// What a kernel offers Weir.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Features {
    pub release: String,
    pub btf: Feature,
    pub jit: Feature,
    pub tc_program: Feature,
    /// Host services' program type; without it host services cannot attach.
    pub sock_addr_program: Feature,
    /// TCX links; without them the agent attaches through a clsact qdisc.
    pub tcx: Feature,
    pub helpers: Vec<Feature>,
    pub maps: Vec<Feature>,
    pub modules: Vec<Feature>,
}

impl Features {
    /// How the agent attaches its programs on this kernel.
    pub fn attach_mode(&self) -> &'static str {
        if self.tcx.available {
            "tcx"
        } else {
            "clsact"
        }
    }

    /// Features Weir cannot run without (TCX and tunnel modules have fallbacks or only
    /// matter to some scenarios).
    pub fn missing_required(&self) -> Vec<&Feature> {
        [&self.btf, &self.tc_program]
            .into_iter()
            .chain(&self.helpers)
            .chain(&self.maps)
            .filter(|f| !f.available)
            .collect()
    }

    /// Whether the kernel can make what module `name` provides (entries are named after
    /// the module, maybe followed by what was made, as in "sch_ingress (clsact)").
    pub fn has_module(&self, name: &str) -> bool {
        self.modules
            .iter()
            .any(|m| m.name.split(' ').next() == Some(name) && m.available)
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Command {
    pub program: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub stdin: Option<String>,
    /// A name under /run/netns; None for the VM's own namespace.
    #[serde(default)]
    pub netns: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub id: u64,
    #[serde(flatten)]
    pub reply: Reply,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Pong {
        release: String,
        uptime_ms: u64,
        /// Modules the init loaded, and those that failed with why.
        modules_loaded: usize,
        module_errors: Vec<String>,
    },
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        stdout: String,
        stderr: String,
        duration_ms: u64,
        timed_out: bool,
    },
    Spawned {
        pid: u32,
    },
    Status {
        /// None while it runs.
        exited: Option<String>,
    },
    Done,
    Probe {
        features: Box<Features>,
    },
    Error {
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_flat_json_lines() {
        let r = Request {
            id: 7,
            op: Op::Exec {
                command: Command {
                    program: "ip".into(),
                    args: vec!["link".into()],
                    netns: Some("n1p0".into()),
                    ..Command::default()
                },
                timeout_ms: 5000,
            },
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(!line.contains('\n'));
        assert!(line.contains(r#""op":"exec""#), "{line}");
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);
        let resp = Response {
            id: 7,
            reply: Reply::Status { exited: None },
        };
        let line = serde_json::to_string(&resp).unwrap();
        assert_eq!(serde_json::from_str::<Response>(&line).unwrap(), resp);
    }
}

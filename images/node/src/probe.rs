//! What a kernel offers Weir, probed from inside the guest with the bpf(2) system call itself
//! (as `bpftool feature probe` does): program and map types, every helper Weir's programs call,
//! TCX links, BTF, and the tunnel modules.

use crate::proto::{Feature, Features};
use crate::sys::{self, BpfInsn};

const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_TCX_INGRESS: u32 = 46;
const LOOPBACK_IFINDEX: u32 = 1;

/// The program type a helper is probed with: the one Weir calls it from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CalledFrom {
    /// tc programs (`weir_ingress`, `weir_egress`).
    Tc,
    /// Host services' cgroup sock_addr programs.
    SockAddr,
}

/// The helpers `bpf/ebpf` calls (ids from include/uapi/linux/bpf.h). The agent's tests check
/// this list against the helper calls of the built object, so none goes unprobed.
pub const WEIR_HELPERS: &[(&str, i32, CalledFrom)] = &[
    ("map_lookup_elem", 1, CalledFrom::Tc),
    ("map_update_elem", 2, CalledFrom::Tc),
    ("map_delete_elem", 3, CalledFrom::Tc),
    ("ktime_get_ns", 5, CalledFrom::Tc),
    ("get_prandom_u32", 7, CalledFrom::Tc),
    ("skb_store_bytes", 9, CalledFrom::Tc),
    ("l3_csum_replace", 10, CalledFrom::Tc),
    ("l4_csum_replace", 11, CalledFrom::Tc),
    ("clone_redirect", 13, CalledFrom::Tc),
    ("skb_get_tunnel_key", 20, CalledFrom::Tc),
    ("skb_set_tunnel_key", 21, CalledFrom::Tc),
    ("redirect", 23, CalledFrom::Tc),
    ("skb_load_bytes", 26, CalledFrom::Tc),
    ("csum_diff", 28, CalledFrom::Tc),
    ("skb_change_type", 32, CalledFrom::Tc),
    ("skb_change_tail", 38, CalledFrom::Tc),
    ("skb_change_head", 43, CalledFrom::Tc),
    ("get_socket_cookie", 46, CalledFrom::SockAddr),
    ("skb_adjust_room", 50, CalledFrom::Tc),
    ("fib_lookup", 69, CalledFrom::Tc),
    ("jiffies64", 118, CalledFrom::Tc),
    ("get_netns_cookie", 122, CalledFrom::SockAddr),
    ("ringbuf_reserve", 131, CalledFrom::Tc),
    ("ringbuf_submit", 132, CalledFrom::Tc),
    ("redirect_neigh", 152, CalledFrom::Tc),
    ("redirect_peer", 155, CalledFrom::Tc),
];

/// The map types (and flags) Weir's maps use: (name, type, key, value, flags, entries). The
/// agent's tests check the types against the built object's maps.
pub const WEIR_MAPS: &[(&str, u32, u32, u32, u32, u32)] = &[
    ("hash (BPF_F_NO_PREALLOC)", 1, 8, 8, 1, 16),
    ("array", 2, 4, 8, 0, 16),
    ("percpu_array", 6, 4, 8, 0, 16),
    ("lru_hash", 9, 16, 16, 0, 16),
    ("lpm_trie (BPF_F_NO_PREALLOC)", 11, 8, 8, 1, 16),
    // A ring buffer is sized in bytes, a power-of-two number of pages.
    ("ringbuf", 27, 0, 0, 0, 4096),
];

/// What the tunnels and the qdisc need, proven by making one (a module that is built in has
/// no /sys/module entry unless it takes parameters, so presence there proves too little):
/// (name, command that creates it, command that removes it).
type DeviceProbe = (
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
);
const DEVICES: &[DeviceProbe] = &[
    (
        "vxlan",
        &[
            "ip",
            "link",
            "add",
            "weirprobe0",
            "type",
            "vxlan",
            "id",
            "42",
            "dstport",
            "4789",
        ],
        &["ip", "link", "del", "weirprobe0"],
    ),
    (
        "ipip",
        &[
            "ip",
            "link",
            "add",
            "weirprobe1",
            "type",
            "ipip",
            "remote",
            "198.18.255.1",
        ],
        &["ip", "link", "del", "weirprobe1"],
    ),
    (
        "ip6_tunnel",
        &[
            "ip",
            "link",
            "add",
            "weirprobe2",
            "type",
            "ip6tnl",
            "remote",
            "fd00::1",
        ],
        &["ip", "link", "del", "weirprobe2"],
    ),
    (
        "sch_ingress (clsact)",
        &["tc", "qdisc", "add", "dev", "lo", "clsact"],
        &["tc", "qdisc", "del", "dev", "lo", "clsact"],
    ),
];

/// Modules only checked for presence.
const MODULES: &[&str] = &["nf_conntrack"];

fn insn(code: u8, regs: u8, imm: i32) -> BpfInsn {
    BpfInsn {
        code,
        regs,
        off: 0,
        imm,
    }
}

const CALL: u8 = 0x85;
const MOV64_IMM: u8 = 0xb7;
const EXIT: u8 = 0x95;

fn feature(name: &str, result: Result<(), String>) -> Feature {
    Feature {
        name: name.to_owned(),
        available: result.is_ok(),
        detail: result.err().unwrap_or_default(),
    }
}

/// The program type and expected attach type a probe for `from` loads.
fn program_type(from: CalledFrom) -> (u32, u32) {
    match from {
        CalledFrom::Tc => (BPF_PROG_TYPE_SCHED_CLS, 0),
        CalledFrom::SockAddr => (BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT),
    }
}

/// A helper is missing when the verifier does not know it or forbids it to the program type
/// Weir calls it from; other verifier complaints (our probe passes no arguments) mean it
/// exists.
fn probe_helper(id: i32, from: CalledFrom) -> Result<(), String> {
    let prog = [insn(CALL, 0, id), insn(MOV64_IMM, 0, 0), insn(EXIT, 0, 0)];
    let (prog_type, attach_type) = program_type(from);
    match sys::bpf_prog_load(prog_type, attach_type, &prog) {
        Ok(_) => Ok(()),
        Err((e, log)) => {
            let missing = ["invalid func", "unknown func", "cannot use helper"];
            match log.lines().find(|l| missing.iter().any(|m| l.contains(m))) {
                Some(line) => Err(line.trim().to_owned()),
                None if log.is_empty() => Err(format!("bpf(PROG_LOAD): {e}")),
                None => Ok(()),
            }
        }
    }
}

fn probe_tcx() -> Result<(), String> {
    let prog = [insn(MOV64_IMM, 0, 0), insn(EXIT, 0, 0)];
    let fd = sys::bpf_prog_load(BPF_PROG_TYPE_SCHED_CLS, BPF_TCX_INGRESS, &prog)
        .map_err(|(e, log)| format!("loading a tc program: {e}: {}", log.trim()))?;
    sys::bpf_link_create(&fd, LOOPBACK_IFINDEX, BPF_TCX_INGRESS)
        .map_err(|e| format!("bpf(LINK_CREATE, BPF_TCX_INGRESS): {e}"))
}

fn run(argv: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new(argv[0])
        .args(&argv[1..])
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .map_err(|e| format!("{}: {e}", argv[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}`: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn probe_device(create: &[&str], remove: &[&str]) -> Result<(), String> {
    run(create)?;
    let _ = run(remove);
    Ok(())
}

fn probe_module(name: &str) -> Result<(), String> {
    if std::path::Path::new("/sys/module").join(name).exists() {
        Ok(())
    } else {
        Err("not loaded and not built in".into())
    }
}

/// Runs every probe; never fails as a whole (a failing probe is a missing feature).
pub fn probe() -> Features {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let btf = if std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        Ok(())
    } else {
        Err("no /sys/kernel/btf/vmlinux".into())
    };
    let jit = match std::fs::read_to_string("/proc/sys/net/core/bpf_jit_enable") {
        Ok(v) if v.trim() != "0" => Ok(()),
        Ok(_) => Err("bpf_jit_enable is 0".into()),
        Err(e) => Err(format!("bpf_jit_enable: {e}")),
    };
    let trivial_program = |from| {
        let prog = [insn(MOV64_IMM, 0, 0), insn(EXIT, 0, 0)];
        let (prog_type, attach_type) = program_type(from);
        sys::bpf_prog_load(prog_type, attach_type, &prog)
            .map(drop)
            .map_err(|(e, log)| format!("{e}: {}", log.trim()))
    };
    Features {
        release,
        btf: feature("BTF (/sys/kernel/btf/vmlinux)", btf),
        jit: feature("BPF JIT", jit),
        tc_program: feature("sched_cls programs", trivial_program(CalledFrom::Tc)),
        sock_addr_program: feature(
            "cgroup sock_addr programs (host services)",
            trivial_program(CalledFrom::SockAddr),
        ),
        tcx: feature("TCX links (6.6+)", probe_tcx()),
        helpers: WEIR_HELPERS
            .iter()
            .map(|(name, id, from)| feature(&format!("bpf_{name}"), probe_helper(*id, *from)))
            .collect(),
        maps: WEIR_MAPS
            .iter()
            .map(|(name, t, k, v, f, entries)| {
                feature(
                    name,
                    sys::bpf_map_create(*t, *k, *v, *entries, *f).map_err(|e| e.to_string()),
                )
            })
            .collect(),
        modules: DEVICES
            .iter()
            .map(|(name, create, remove)| feature(name, probe_device(create, remove)))
            .chain(MODULES.iter().map(|m| feature(m, probe_module(m))))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        let root = sys::is_root();
        if !root {
            eprintln!("SKIPPED: loading BPF programs needs root");
        }
        root
    }

    #[test]
    fn known_and_unknown_helpers() {
        if !root() {
            return;
        }
        for (name, id, from) in WEIR_HELPERS {
            assert_eq!(
                probe_helper(*id, *from),
                Ok(()),
                "bpf_{name} on the host kernel"
            );
        }
        let e = probe_helper(100_000, CalledFrom::Tc).unwrap_err();
        assert!(
            e.contains("invalid func") || e.contains("unknown func"),
            "{e}"
        );
    }

    #[test]
    fn weir_maps_can_be_created() {
        if !root() {
            return;
        }
        for (name, t, k, v, f, entries) in WEIR_MAPS {
            sys::bpf_map_create(*t, *k, *v, *entries, *f).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}

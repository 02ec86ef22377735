//! What a kernel offers Weir, probed from inside the guest with the bpf(2) system call itself
//! (as `bpftool feature probe` does): program and map types, every helper Weir's programs call,
//! TCX links, BTF, and the tunnel modules.

use crate::proto::{Feature, Features};
use crate::sys::{self, BpfInsn};

const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const LOOPBACK_IFINDEX: u32 = 1;

/// The helpers `bpf/ebpf` calls (ids from include/uapi/linux/bpf.h).
pub const WEIR_HELPERS: &[(&str, i32)] = &[
    ("map_lookup_elem", 1),
    ("map_update_elem", 2),
    ("map_delete_elem", 3),
    ("ktime_get_ns", 5),
    ("get_prandom_u32", 7),
    ("skb_store_bytes", 9),
    ("l3_csum_replace", 10),
    ("l4_csum_replace", 11),
    ("skb_load_bytes", 26),
];

/// The map types (and flags) Weir's maps use: (name, type, key, value, flags).
const WEIR_MAPS: &[(&str, u32, u32, u32, u32)] = &[
    ("hash (BPF_F_NO_PREALLOC)", 1, 8, 8, 1),
    ("percpu_array", 6, 4, 8, 0),
    ("lru_hash", 9, 16, 16, 0),
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

/// A helper is missing when the verifier does not know it or forbids it to tc programs; other
/// verifier complaints (our probe passes no arguments) mean it exists.
fn probe_helper(id: i32) -> Result<(), String> {
    let prog = [insn(CALL, 0, id), insn(MOV64_IMM, 0, 0), insn(EXIT, 0, 0)];
    match sys::bpf_prog_load(BPF_PROG_TYPE_SCHED_CLS, 0, &prog) {
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
    let tc_prog = {
        let prog = [insn(MOV64_IMM, 0, 0), insn(EXIT, 0, 0)];
        sys::bpf_prog_load(BPF_PROG_TYPE_SCHED_CLS, 0, &prog)
            .map(drop)
            .map_err(|(e, log)| format!("{e}: {}", log.trim()))
    };
    Features {
        release,
        btf: feature("BTF (/sys/kernel/btf/vmlinux)", btf),
        jit: feature("BPF JIT", jit),
        tc_program: feature("sched_cls programs", tc_prog),
        tcx: feature("TCX links (6.6+)", probe_tcx()),
        helpers: WEIR_HELPERS
            .iter()
            .map(|(name, id)| feature(&format!("bpf_{name}"), probe_helper(*id)))
            .collect(),
        maps: WEIR_MAPS
            .iter()
            .map(|(name, t, k, v, f)| {
                feature(
                    name,
                    sys::bpf_map_create(*t, *k, *v, 16, *f).map_err(|e| e.to_string()),
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
        assert_eq!(probe_helper(1), Ok(()), "bpf_map_lookup_elem exists");
        let e = probe_helper(100_000).unwrap_err();
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
        for (name, t, k, v, f) in WEIR_MAPS {
            sys::bpf_map_create(*t, *k, *v, 16, *f).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}

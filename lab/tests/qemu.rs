//! The VM lab on one real kernel (debian-6.1 of kernels/matrix.toml, cached after the first
//! download, which lab/setup.d/20-vm.sh does): the smoke scenario runs unchanged on QEMU VMs,
//! and so does ipip-ingress, which the host kernel (no ipip module) cannot run; a guest that panics or hangs is detected, killed and reported within its deadline.
//! Needs root (taps, namespaces, BPF in the guests); skipped otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use weir_kernels::{Fetcher, Matrix};
use weir_lab_backends::qemu::vm::{Vm, VmError, VmSpec};
use weir_lab_backends::qemu::{tools, Qemu};
use weir_node_image::ImageBuilder;

const KERNEL: &str = "debian-6.1";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        eprintln!("SKIPPED: the VM lab test needs root");
        false
    }
}

/// Processes whose command line names `marker` (unique per test), zombies aside.
fn leftovers(marker: &str) -> Vec<String> {
    let ps = Command::new("ps")
        .args(["-eo", "stat=,args="])
        .output()
        .unwrap();
    String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter(|l| l.contains(marker) && !l.trim_start().starts_with('Z'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn smoke_and_ipip_pass_unchanged_on_vms() {
    if !root() {
        return;
    }
    let report_dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_weir-lab"))
        .arg("run")
        .arg(workspace().join("scenarios/smoke.toml"))
        .arg(workspace().join("scenarios/ipip-ingress.toml"))
        .arg("--backend")
        .arg("qemu")
        .arg("--report-dir")
        .arg(report_dir.path())
        .env("WEIR_LAB_KERNEL", KERNEL)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "smoke and ipip-ingress on {KERNEL} VMs: {:.0} s",
        started.elapsed().as_secs_f64()
    );
    assert!(out.status.success(), "weir-lab failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("smoke passed"), "{stdout}");
    assert!(stdout.contains("ipip-ingress passed"), "{stdout}");
    assert!(
        stderr.contains("node1: ready in"),
        "boot progress is shown: {stderr}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report_dir.path().join("report.json")).unwrap())
            .unwrap();
    assert_eq!(report["backend"], "qemu");
    assert_eq!(report["passed"], true);
    let marker = report_dir.path().to_string_lossy().into_owned();
    assert!(
        leftovers(&marker).is_empty(),
        "left behind: {:?}",
        leftovers(&marker)
    );
}

struct Parts {
    qemu: Qemu,
    image: PathBuf,
    virtiofsd: PathBuf,
}

fn parts() -> Parts {
    let matrix = Matrix::load(&workspace().join("kernels/matrix.toml")).unwrap();
    let fetcher = Fetcher::new(Fetcher::default_cache_dir());
    let kernel = fetcher.fetch(matrix.get(KERNEL).unwrap()).unwrap();
    Parts {
        qemu: Qemu::fetch(&fetcher).unwrap(),
        image: kernel.image,
        virtiofsd: tools::virtiofsd().unwrap(),
    }
}

fn spec<'a>(p: &'a Parts, name: &str, initrd: &'a Path, dir: &Path) -> VmSpec<'a> {
    VmSpec {
        name: name.into(),
        qemu: &p.qemu,
        virtiofsd: &p.virtiofsd,
        accel: tools::choose_accel().0,
        kernel_image: &p.image,
        initrd,
        memory_mib: 256,
        cpus: 1,
        tap: None,
        mac: "52:54:00:57:01:01".into(),
        host_mtu: 9000,
        offloads: true,
        boot_params: String::new(),
        shares: Vec::new(),
        dir: dir.to_owned(),
        netns: None,
    }
}

#[test]
fn a_panicking_guest_is_reported_and_gone() {
    if !root() {
        return;
    }
    let p = parts();
    let dir = tempfile::tempdir().unwrap();
    // An initramfs without /init: the kernel finds no init and panics.
    let initrd = dir.path().join("empty.cpio");
    let mut b = ImageBuilder::new();
    b.bytes("/etc/hostname", 0o644, "empty\n");
    b.write(&initrd).unwrap();
    let mut vm = Vm::start(&spec(&p, "panics", &initrd, dir.path())).unwrap();
    let pid = vm.pid().unwrap();
    let started = Instant::now();
    let e = vm.wait_ready(Duration::from_secs(240)).unwrap_err();
    assert!(
        matches!(e, VmError::Panicked { .. }),
        "expected a panic, got: {e}"
    );
    assert!(e.to_string().contains("Kernel panic"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(240));
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU {pid} still runs"
    );
}

#[test]
fn a_silent_guest_is_declared_hung_and_killed() {
    if !root() {
        return;
    }
    let p = parts();
    let dir = tempfile::tempdir().unwrap();
    // An init that never opens the control port.
    let initrd = dir.path().join("silent.cpio");
    let mut b = ImageBuilder::new();
    b.program("dash").unwrap();
    b.program("busybox").unwrap();
    b.symlink("/usr/bin/sleep", "busybox");
    b.bytes(
        "/init",
        0o755,
        "#!/usr/bin/dash\necho silent init\nexec /usr/bin/sleep 3600\n",
    );
    b.write(&initrd).unwrap();
    let mut vm = Vm::start(&spec(&p, "silent", &initrd, dir.path())).unwrap();
    let pid = vm.pid().unwrap();
    let started = Instant::now();
    let e = vm.wait_ready(Duration::from_secs(20)).unwrap_err();
    assert!(
        matches!(e, VmError::Hung { .. }),
        "expected a hang, got: {e}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU {pid} still runs"
    );
}

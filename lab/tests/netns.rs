//! Runs the real weir-lab binary on the default suite: namespaces, veths, nginx, socat, curl, and
//! one real weir-agent per node (built next to weir-lab by the same `cargo test`). Needs root (it
//! creates network namespaces and loads BPF programs); skipped otherwise.

use std::path::Path;
use std::process::Command;

#[test]
fn default_suite_passes_and_leaves_nothing_behind() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: the netns lab test needs root (it creates network namespaces)");
        return;
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let report_dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_weir-lab"))
        .arg("suite")
        .arg("--scenarios")
        .arg(workspace.join("scenarios"))
        .arg("--report-dir")
        .arg(report_dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "weir-lab failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(" 0 failed"), "{stdout}");

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report_dir.path().join("report.json")).unwrap())
            .unwrap();
    assert_eq!(report["passed"], true);
    let names: Vec<&str> = report["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"routing") && names.contains(&"smoke"),
        "{names:?}"
    );

    // Workloads are children of the lab, started in their own process groups; when the lab has
    // exited none of them may remain. Their command lines name the report dir, which is unique.
    let marker = report_dir.path().to_string_lossy().into_owned();
    let ps = Command::new("ps")
        .args(["-eo", "stat=,args="])
        .output()
        .unwrap();
    let leftovers: Vec<String> = String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter(|l| l.contains(&marker) && !l.trim_start().starts_with('Z'))
        .map(str::to_owned)
        .collect();
    assert!(leftovers.is_empty(), "processes left behind: {leftovers:?}");
}

//! The benches, run small: `weir-lab bench connect` with 1 and 10 services and a few connects,
//! `weir-lab bench sync-baseline` with 20 services and two updates. They must build their labs,
//! measure every path, print their tables, write their JSON and leave nothing behind. No timing
//! is asserted: on a shared 2-vCPU machine that would only test the neighbours. Needs root
//! (namespaces, BPF); skipped otherwise.

use std::path::Path;
use std::process::{Command, Output};

fn weir_lab(args: &[&str], report_dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weir-lab"))
        .args(args)
        .arg("--report-dir")
        .arg(report_dir)
        .output()
        .unwrap()
}

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

fn iptables_legacy_present() -> bool {
    weir_lab_bench::kube_proxy::Flavor::Legacy
        .find_restore()
        .is_some()
}

#[test]
fn connect_bench_measures_every_path() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: the bench needs root (network namespaces, BPF)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "bench",
        "connect",
        "--sizes",
        "1,10",
        "--rounds",
        "2",
        "--connects",
        "30",
        "--warmup",
        "5",
    ];
    let with_iptables = iptables_legacy_present();
    if !with_iptables {
        args.push("--no-iptables");
    }
    let out = weir_lab(&args, dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("TCP connect latency to the last ClusterIP"),
        "{stdout}"
    );
    assert!(stdout.contains("weir@10 / weir@1"), "{stdout}");

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("bench-connect.json")).unwrap())
            .unwrap();
    let results = json["results"].as_array().unwrap();
    let paths: Vec<(String, u64)> = results
        .iter()
        .map(|r| {
            (
                r["path"].as_str().unwrap().to_owned(),
                r["services"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut expected = vec![
        ("direct".to_owned(), 0),
        ("weir".to_owned(), 1),
        ("weir".to_owned(), 10),
    ];
    if with_iptables {
        expected.push(("iptables-legacy".to_owned(), 1));
        expected.push(("iptables-legacy".to_owned(), 10));
    }
    for e in &expected {
        assert!(paths.contains(e), "{e:?} missing from {paths:?}");
    }
    assert_eq!(paths.len(), expected.len());
    for r in results {
        assert_eq!(r["samples"], 60, "{r}");
        assert_eq!(r["failures"], 0, "{r}");
        assert!(r["p50_us"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["p99_us"].as_f64().unwrap() >= r["p50_us"].as_f64().unwrap());
    }
    assert!(json["weir_flat_within_10_percent"].is_boolean());
    assert!(leftovers(&dir.path().to_string_lossy()).is_empty());
}

#[test]
fn sync_baseline_measures_both_sides() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: the bench needs root (network namespaces, BPF)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "bench",
        "sync-baseline",
        "--services",
        "20",
        "--repeats",
        "1",
        "--updates",
        "2",
        "--update-interval",
        "50ms",
    ];
    let with_iptables = iptables_legacy_present();
    if !with_iptables {
        args.push("--no-iptables");
    }
    let out = weir_lab(&args, dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("Sync of 20 services x 5 endpoints"),
        "{stdout}"
    );

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("bench-sync.json")).unwrap())
            .unwrap();
    let sides = json["sides"].as_array().unwrap();
    let weir = sides.iter().find(|s| s["side"] == "weir").unwrap();
    assert_eq!(weir["full"].as_array().unwrap().len(), 1);
    assert_eq!(weir["updates"].as_array().unwrap().len(), 2);
    // 20 services x (frontend + 5 cluster slots + 5 local slots + 5 backends) from empty: the
    // bench's endpoints all run on its one node, so each is also in the local slot set.
    assert_eq!(weir["full"][0]["writes"], 320, "{weir}");
    assert!(weir["full"][0]["peak_rss_kib"].as_u64().unwrap() > 0);
    if with_iptables {
        let ipt = sides
            .iter()
            .find(|s| s["side"] == "iptables-legacy")
            .unwrap();
        assert_eq!(ipt["full"].as_array().unwrap().len(), 1);
        assert_eq!(ipt["updates"].as_array().unwrap().len(), 2);
        assert_eq!(ipt["resync"].as_array().unwrap().len(), 1);
        assert!(ipt["full"][0]["wall_s"].as_f64().unwrap() > 0.0);
        assert!(
            stdout.contains("weir full / iptables-legacy full"),
            "{stdout}"
        );
    }
    assert!(leftovers(&dir.path().to_string_lossy()).is_empty());
}

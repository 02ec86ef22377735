//! The flake, as far as this machine can take it: Debian's Nix 2.8 parses every Nix file, reads
//! the lock, evaluates the pins (and they match the toolchain this machine builds with), and
//! builds the outputs that need no nixpkgs. Outputs that need nixpkgs cannot be evaluated here
//! (nixpkgs cannot be fetched): the test checks that this, and nothing else, is what stops them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Single-user Nix as root without a daemon or build users, no binary caches, a static busybox
/// as the sandbox's /bin/sh, and one quick attempt at any download.
const NIX_CONFIG: &str = "experimental-features = nix-command flakes
build-users-group =
substituters =
extra-sandbox-paths = /bin/sh=/bin/busybox
download-attempts = 1
connect-timeout = 5
warn-dirty = false";

fn nix(args: &[&str]) -> Output {
    let which = Command::new("nix").arg("--version").output();
    assert!(
        which.is_ok_and(|o| o.status.success()),
        "nix is not installed: lab/setup.d/30-dist.sh installs Debian's nix-bin and busybox-static"
    );
    Command::new("nix")
        .args(args)
        .current_dir(repository())
        .env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .unwrap()
}

fn nix_ok(args: &[&str]) -> String {
    let out = nix(args);
    assert!(
        out.status.success(),
        "nix {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn system() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "x86_64-linux",
        "aarch64" => "aarch64-linux",
        other => panic!("no flake system for {other}"),
    }
}

#[test]
fn every_nix_file_parses() {
    let root = repository();
    let mut files = vec![root.join("flake.nix")];
    for entry in std::fs::read_dir(root.join("nix")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "nix") {
            files.push(path);
        }
    }
    for file in files {
        let out = Command::new("nix-instantiate")
            .arg("--parse")
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_lock_pins_every_input_to_a_revision_and_hash() {
    let metadata: serde_json::Value =
        serde_json::from_str(&nix_ok(&["flake", "metadata", "--json", "."])).unwrap();
    let nodes = metadata["locks"]["nodes"].as_object().unwrap();
    for input in ["nixpkgs", "rust-overlay"] {
        let locked = &nodes[input]["locked"];
        let rev = locked["rev"].as_str().unwrap_or_default();
        assert_eq!(rev.len(), 40, "{input}: {locked}");
        assert!(
            locked["narHash"]
                .as_str()
                .unwrap_or_default()
                .starts_with("sha256-"),
            "{input}: {locked}"
        );
        println!("{input}: {rev}");
    }
    assert_eq!(
        nodes["rust-overlay"]["inputs"]["nixpkgs"],
        serde_json::json!(["nixpkgs"]),
        "rust-overlay must follow the one nixpkgs"
    );
}

#[test]
fn pins_evaluate_and_match_this_machines_toolchain() {
    let pins: serde_json::Value =
        serde_json::from_str(&nix_ok(&["eval", "--json", ".#lib.pins"])).unwrap();
    let llvm_major = pins["rust"]["llvmMajor"].as_u64().unwrap();
    let linker_version = pins["bpfLinker"]["version"].as_str().unwrap();
    assert_eq!(
        pins["bpfLinker"]["features"],
        serde_json::json!([format!("llvm-{llvm_major}")])
    );
    assert!(pins["kernels"][0]["attr"] == "linuxPackages_5_10");

    // The nightly the flake pins is the one this machine builds the eBPF crate with.
    if let Ok(out) = Command::new("rustc").args(["+nightly", "-vV"]).output() {
        let text = String::from_utf8_lossy(&out.stdout);
        let llvm = text
            .lines()
            .find_map(|l| l.strip_prefix("LLVM version: "))
            .expect("rustc -vV prints the LLVM version");
        assert!(
            llvm.starts_with(&format!("{llvm_major}.")),
            "flake pins LLVM {llvm_major}, nightly here has {llvm}"
        );
        println!(
            "nightly here: LLVM {llvm}; flake: nightly {}",
            pins["rust"]["nightly"]
        );
    }
    if let Ok(out) = Command::new("bpf-linker").arg("--version").output() {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(linker_version), "bpf-linker here: {text}");
    }
    // The crate hash is crates.io's checksum of the .crate cargo verified when it installed
    // bpf-linker here, when that download is still in cargo's cache.
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cargo"));
    if let Ok(registries) = std::fs::read_dir(home.join("registry/cache")) {
        for registry in registries.flatten() {
            let crate_file = registry
                .path()
                .join(format!("bpf-linker-{linker_version}.crate"));
            if crate_file.is_file() {
                let hash = nix_ok(&[
                    "hash",
                    "file",
                    "--type",
                    "sha256",
                    crate_file.to_str().unwrap(),
                ]);
                assert_eq!(hash.trim(), pins["bpfLinker"]["crateHash"]);
            }
        }
    }
}

#[test]
fn outputs_without_nixpkgs_build_for_real() {
    let system = system();
    let built: serde_json::Value = serde_json::from_str(&nix_ok(&[
        "build",
        "--no-link",
        "--json",
        &format!(".#checks.{system}.pins"),
        &format!(".#checks.{system}.manifests-shape"),
        &format!(".#packages.{system}.kubernetes-manifests"),
    ]))
    .unwrap();
    let outputs: Vec<PathBuf> = built
        .as_array()
        .unwrap()
        .iter()
        .map(|b| PathBuf::from(b["outputs"]["out"].as_str().unwrap()))
        .collect();
    assert_eq!(outputs.len(), 3);
    let bundle = std::fs::read_to_string(outputs[2].join("weir.yaml")).unwrap();
    let kinds: Vec<&str> = bundle
        .lines()
        .filter_map(|l| l.strip_prefix("kind: "))
        .collect();
    assert_eq!(
        kinds,
        [
            "CustomResourceDefinition",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet"
        ]
    );
    println!("built: {outputs:?}");
}

#[test]
fn outputs_with_nixpkgs_stop_only_at_fetching_nixpkgs() {
    let system = system();
    for output in [
        format!(".#packages.{system}.agent.drvPath"),
        format!(".#packages.{system}.oci-image.drvPath"),
        format!(".#packages.{system}.node-image-5_10.drvPath"),
        format!(".#apps.{system}.lab.program"),
        format!(".#devShells.{system}.default.drvPath"),
    ] {
        let out = nix(&["eval", "--raw", &output]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            // A machine that can fetch nixpkgs gets this far and further.
            println!(
                "{output}: evaluated to {}",
                String::from_utf8_lossy(&out.stdout)
            );
        } else {
            assert!(
                stderr.contains("unable to download") && stderr.contains("nixpkgs"),
                "{output} failed for another reason than fetching nixpkgs:\n{stderr}"
            );
            println!("{output}: NOT EVALUATED here (nixpkgs cannot be fetched)");
        }
    }
}

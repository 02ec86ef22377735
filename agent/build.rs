//! Builds the eBPF object with the nightly toolchain and bpf-linker, so a plain `cargo build` of
//! the agent always carries programs that match its own copy of weir-common.

use std::path::PathBuf;

use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let bpf_dir = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("agent crate has no parent directory"))?
        .join("bpf");
    // aya-build watches the eBPF crate; the shared types crate changes the object too.
    println!(
        "cargo:rerun-if-changed={}",
        bpf_dir.join("common").display()
    );
    let ebpf_dir = bpf_dir.join("ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [Package {
            name: "weir-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}

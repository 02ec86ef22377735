//! The programs the VM lab runs on the host: QEMU 10 (unpacked from Debian bookworm-backports
//! into the cache, since bookworm's QEMU 7.2 crashes on about a quarter of 6.12 boots),
//! virtiofsd, and the choice between KVM and TCG.

use std::path::{Path, PathBuf};

use weir_kernels::Fetcher;

use weir_lab_core::backend::BackendError;

/// Where QEMU 10 comes from, and the packages unpacked together (seabios for the BIOS,
/// qemu-system-data for its option ROMs and keymaps).
pub const QEMU_SUITE: &str = "bookworm-backports";
pub const QEMU_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-system-common",
    "qemu-system-data",
    "seabios",
];

#[derive(Clone, Debug, serde::Serialize)]
pub struct Qemu {
    pub binary: PathBuf,
    /// `-L` firmware directories.
    pub data_dirs: Vec<PathBuf>,
    /// QEMU_MODULE_DIR.
    pub module_dir: PathBuf,
}

impl Qemu {
    /// QEMU from the cache, fetched and unpacked on first use.
    pub fn fetch(fetcher: &Fetcher) -> Result<Qemu, BackendError> {
        let root = fetcher
            .apt()
            .fetch_set(
                QEMU_SUITE,
                QEMU_PACKAGES,
                "qemu",
                &fetcher.cache_dir().join("tools"),
            )
            .map_err(|e| BackendError::Io {
                context: "fetching QEMU from Debian bookworm-backports".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
        Qemu::at(&root)
    }

    /// QEMU unpacked at `root` (as `dpkg -x` lays it out).
    pub fn at(root: &Path) -> Result<Qemu, BackendError> {
        let binary = root.join("usr/bin/qemu-system-x86_64");
        if !binary.is_file() {
            return Err(BackendError::Io {
                context: format!("no QEMU at {}", binary.display()),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        Ok(Qemu {
            binary,
            data_dirs: vec![root.join("usr/share/qemu"), root.join("usr/share/seabios")],
            module_dir: root.join("usr/lib/x86_64-linux-gnu/qemu"),
        })
    }
}

/// virtiofsd from PATH or cargo's bin directory (lab/setup.d/20-vm.sh builds it).
pub fn virtiofsd() -> Result<PathBuf, BackendError> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(PathBuf::from)
        .chain(home.map(|h| h.join(".cargo/bin")))
        .chain([
            PathBuf::from("/usr/libexec"),
            PathBuf::from("/usr/lib/qemu"),
        ])
        .map(|d| d.join("virtiofsd"))
        .find(|p| p.is_file())
        .ok_or_else(|| BackendError::Io {
            context: "virtiofsd not found (lab/setup.sh builds it with cargo install)".into(),
            source: std::io::ErrorKind::NotFound.into(),
        })
}

/// How QEMU runs guest code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn qemu_args(self) -> [&'static str; 4] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => ["-accel", "tcg,thread=multi", "-cpu", "max"],
        }
    }
}

/// KVM when /dev/kvm opens and a hardware KVM module (kvm_intel, kvm_amd) provides it; TCG
/// otherwise, with the reason. A host that is itself a PVM guest has /dev/kvm from kvm_pvm,
/// which runs only PVM-enabled guest kernels: ordinary kernels need TCG there.
pub fn choose_accel() -> (Accel, String) {
    choose_accel_from(Path::new("/dev/kvm"), Path::new("/sys/module"))
}

fn choose_accel_from(dev: &Path, modules: &Path) -> (Accel, String) {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .is_err()
    {
        return (Accel::Tcg, format!("{} cannot be opened", dev.display()));
    }
    if modules.join("kvm_intel").exists() || modules.join("kvm_amd").exists() {
        return (Accel::Kvm, "hardware KVM".into());
    }
    if modules.join("kvm_pvm").exists() {
        return (
            Accel::Tcg,
            "/dev/kvm is PVM (this host is itself a guest): ordinary kernels need TCG".into(),
        );
    }
    (
        Accel::Tcg,
        "no kvm_intel or kvm_amd module behind /dev/kvm".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accel_choice() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("kvm");
        let mods = dir.path().join("module");
        std::fs::create_dir_all(&mods).unwrap();
        assert_eq!(choose_accel_from(&dev, &mods).0, Accel::Tcg);
        std::fs::write(&dev, b"").unwrap();
        std::fs::create_dir_all(mods.join("kvm_pvm")).unwrap();
        let (a, why) = choose_accel_from(&dev, &mods);
        assert_eq!(a, Accel::Tcg);
        assert!(why.contains("PVM"));
        std::fs::create_dir_all(mods.join("kvm_intel")).unwrap();
        assert_eq!(choose_accel_from(&dev, &mods).0, Accel::Kvm);
    }
}

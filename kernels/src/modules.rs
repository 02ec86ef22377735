//! Which module files a kernel needs loaded, in order, for a list of module names: `depmod`
//! builds the dependency index of an unpacked tree (Debian generates it at install time, so
//! the package does not ship it) and `modprobe --show-depends` lists the insmod order.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use crate::debian::run;
use crate::{Kernel, KernelError, Result};

const MODPROBE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, Default, Serialize)]
pub struct ModuleSet {
    /// Module files (absolute host paths, maybe compressed) in the order they must be loaded.
    pub files: Vec<PathBuf>,
    /// Asked-for modules the kernel has built in.
    pub builtin: Vec<String>,
    /// Asked-for modules the kernel has neither built in nor as a module.
    pub missing: Vec<String>,
}

/// Resolves `names` for `kernel`. A kernel without a modules tree has everything built in or
/// nothing: every name is reported missing unless `builtin.modules` says otherwise.
pub fn resolve_modules(kernel: &Kernel, names: &[String]) -> Result<ModuleSet> {
    let mut set = ModuleSet::default();
    let Some(root) = &kernel.modules_root else {
        set.missing = names.to_vec();
        return Ok(set);
    };
    let moddir = root.join("lib").join("modules").join(&kernel.release);
    if !moddir.join("modules.dep").is_file() {
        let mut cmd = Command::new("depmod");
        cmd.arg("-b").arg(root).arg(&kernel.release);
        run(cmd, MODPROBE_TIMEOUT)?;
    }
    for name in names {
        let mut cmd = Command::new("modprobe");
        cmd.arg("-d")
            .arg(root)
            .arg("-S")
            .arg(&kernel.release)
            .arg("--show-depends")
            .arg(name);
        match run(cmd, MODPROBE_TIMEOUT) {
            Ok(out) => {
                for line in out.lines() {
                    if let Some(path) = line.strip_prefix("insmod ") {
                        // Options may follow the path.
                        let path = PathBuf::from(path.split_whitespace().next().unwrap_or(""));
                        if !set.files.contains(&path) {
                            set.files.push(path);
                        }
                    } else if line.starts_with("builtin ") && !set.builtin.contains(name) {
                        set.builtin.push(name.clone());
                    }
                }
            }
            Err(KernelError::Command { detail, .. }) if detail.contains("not found") => {
                set.missing.push(name.clone());
            }
            Err(e) => return Err(e),
        }
    }
    Ok(set)
}

/// The module's name as the kernel knows it (`nf_conntrack` from `.../nf_conntrack.ko.xz`).
pub fn module_name(path: &Path) -> String {
    let file = path.file_name().map(|f| f.to_string_lossy().into_owned());
    let file = file.unwrap_or_default();
    file.split(".ko").next().unwrap_or(&file).replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names() {
        assert_eq!(
            module_name(Path::new("/x/kernel/net/netfilter/nf_conntrack.ko.xz")),
            "nf_conntrack"
        );
        assert_eq!(module_name(Path::new("ip6_tunnel.ko")), "ip6_tunnel");
        assert_eq!(module_name(Path::new("virtio-rng.ko")), "virtio_rng");
    }

    #[test]
    fn no_modules_tree_means_all_missing() {
        let k = Kernel {
            name: "k".into(),
            release: "1".into(),
            image: PathBuf::new(),
            modules_root: None,
            config: None,
            provenance: String::new(),
        };
        let s = resolve_modules(&k, &["veth".to_owned()]).unwrap();
        assert_eq!(s.missing, ["veth"]);
    }
}

//! weir-kernels: the kernel matrix as data, and the kernels themselves, fetched into a cache.
//!
//! The matrix lives in `kernels/matrix.toml`: one `[[kernel]]` per kernel, saying where it comes
//! from (a Debian suite, the running host, a local path, or the Nix flake) and what it must offer.
//! [`Fetcher::fetch`] turns an entry into a [`Kernel`]: a bootable image plus the modules tree
//! the node image draws its modules from. Debian downloads are verified against the SHA256 in
//! Debian's signed Packages index and reused from the cache afterwards; a kernel that cannot be
//! had is a [`KernelError`] that says why, never a hang (every apt call runs under a deadline).

pub mod config;
pub mod debian;
pub mod modules;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use config::KernelConfig;
pub use debian::{AptRepo, DebianPackage};
pub use modules::{resolve_modules, ModuleSet};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Matrix { path: PathBuf, message: String },
    #[error("no kernel {0:?} in the matrix")]
    NoSuchKernel(String),
    #[error("kernel {name}: {why}")]
    Unavailable { name: String, why: String },
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("`{command}` did not finish within {secs} s (network down or mirror unreachable?)")]
    Timeout { command: String, secs: u64 },
    #[error("{package} {version}: SHA256 {actual} does not match Debian's index ({expected})")]
    Checksum {
        package: String,
        version: String,
        expected: String,
        actual: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

pub type Result<T, E = KernelError> = std::result::Result<T, E>;

/// Where a kernel comes from.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "source", rename_all = "lowercase")]
pub enum Source {
    /// A Debian package, resolved in `suite` of the Debian mirror this machine already uses.
    Debian { suite: String, package: String },
    /// The kernel this machine runs: scenarios run on the network-namespace backend.
    Host,
    /// A kernel image on this machine, with the modules tree it was built with (if modular).
    Local {
        image: PathBuf,
        #[serde(default)]
        modules: Option<PathBuf>,
    },
    /// A kernel from the project's Nix flake.
    Nix {
        attr: String,
        #[serde(default)]
        why_unbuildable: Option<String>,
    },
}

/// Keys a `[[kernel]]` may have; serde cannot deny unknown keys next to a flattened enum, so
/// [`Matrix::parse`] checks them itself and a typo is an error rather than a silent default.
const ENTRY_KEYS: &[&str] = &[
    "name",
    "version",
    "source",
    "suite",
    "package",
    "image",
    "modules",
    "attr",
    "why_unbuildable",
    "requires",
    "default",
];

#[derive(Clone, Debug, Deserialize, Serialize)]
struct RawEntry {
    name: String,
    version: String,
    #[serde(flatten)]
    source: Source,
    #[serde(default)]
    modules: Option<Vec<String>>,
    #[serde(default)]
    requires: Option<Vec<String>>,
    #[serde(default = "yes")]
    default: bool,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Defaults {
    #[serde(default)]
    modules: Vec<String>,
    #[serde(default)]
    requires: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatrix {
    #[serde(default)]
    defaults: Defaults,
    #[serde(default)]
    kernel: Vec<RawEntry>,
}

/// One kernel of the matrix, with the defaults filled in.
#[derive(Clone, Debug, Serialize)]
pub struct KernelEntry {
    pub name: String,
    /// The major.minor the entry promises ("6.1"); "any" or "running" where it cannot promise.
    pub version: String,
    pub source: Source,
    /// Modules the node image needs where this kernel builds them as modules.
    pub modules: Vec<String>,
    /// Config options that must be on.
    pub requires: Vec<String>,
    /// Part of the default matrix run.
    pub default: bool,
}

impl KernelEntry {
    /// Runs in a VM (as opposed to the host kernel, which runs on namespaces).
    pub fn is_vm(&self) -> bool {
        !matches!(self.source, Source::Host)
    }
}

/// The whole matrix, in file order.
#[derive(Clone, Debug)]
pub struct Matrix {
    pub kernels: Vec<KernelEntry>,
}

impl Matrix {
    pub fn load(path: &Path) -> Result<Matrix> {
        let text = std::fs::read_to_string(path).map_err(|source| KernelError::Read {
            path: path.to_owned(),
            source,
        })?;
        Matrix::parse(&text).map_err(|message| KernelError::Matrix {
            path: path.to_owned(),
            message,
        })
    }

    pub fn parse(text: &str) -> std::result::Result<Matrix, String> {
        let table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        if let Some(toml::Value::Array(entries)) = table.get("kernel") {
            for entry in entries.iter().filter_map(toml::Value::as_table) {
                if let Some(bad) = entry.keys().find(|k| !ENTRY_KEYS.contains(&k.as_str())) {
                    return Err(format!("unknown key {bad:?} in a [[kernel]] entry"));
                }
            }
        }
        let raw: RawMatrix = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut kernels: Vec<KernelEntry> = Vec::new();
        for e in raw.kernel {
            if kernels.iter().any(|k| k.name == e.name) {
                return Err(format!("kernel {:?} appears twice", e.name));
            }
            if e.name.is_empty()
                || !e
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
            {
                return Err(format!(
                    "kernel name {:?}: use letters, digits, '-', '.', '_'",
                    e.name
                ));
            }
            kernels.push(KernelEntry {
                name: e.name,
                version: e.version,
                source: e.source,
                modules: e.modules.unwrap_or_else(|| raw.defaults.modules.clone()),
                requires: e.requires.unwrap_or_else(|| raw.defaults.requires.clone()),
                default: e.default,
            });
        }
        Ok(Matrix { kernels })
    }

    pub fn get(&self, name: &str) -> Result<&KernelEntry> {
        self.kernels
            .iter()
            .find(|k| k.name == name)
            .ok_or_else(|| KernelError::NoSuchKernel(name.to_owned()))
    }

    /// The entries a plain matrix run covers.
    pub fn defaults(&self) -> impl Iterator<Item = &KernelEntry> {
        self.kernels.iter().filter(|k| k.default)
    }
}

/// A kernel ready to boot.
#[derive(Clone, Debug, Serialize)]
pub struct Kernel {
    pub name: String,
    /// `uname -r` of the kernel.
    pub release: String,
    /// The bzImage.
    pub image: PathBuf,
    /// The root holding `lib/modules/<release>` (as `dpkg -x` lays it out), if it has modules.
    pub modules_root: Option<PathBuf>,
    /// The kernel's `config-<release>`, if shipped.
    pub config: Option<PathBuf>,
    /// Where it came from, for the report: "bookworm linux-image-... 6.1.176-1 sha256 ...".
    pub provenance: String,
}

/// Fetches kernels into a cache directory.
pub struct Fetcher {
    cache: PathBuf,
    /// Refresh the package indexes even when the cache already has this kernel.
    pub refresh: bool,
}

impl Fetcher {
    pub fn new(cache: impl Into<PathBuf>) -> Fetcher {
        Fetcher {
            cache: cache.into(),
            refresh: false,
        }
    }

    /// `$WEIR_CACHE_DIR`, else `$XDG_CACHE_HOME/weir`, else `~/.cache/weir`.
    pub fn default_cache_dir() -> PathBuf {
        if let Some(d) = std::env::var_os("WEIR_CACHE_DIR") {
            return PathBuf::from(d);
        }
        if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
            return PathBuf::from(d).join("weir");
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        PathBuf::from(home).join(".cache").join("weir")
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache
    }

    pub fn apt(&self) -> AptRepo {
        AptRepo::new(self.cache.join("apt"))
    }

    /// The kernel an entry names, from the cache or fetched now.
    pub fn fetch(&self, entry: &KernelEntry) -> Result<Kernel> {
        let unavailable = |why: String| KernelError::Unavailable {
            name: entry.name.clone(),
            why,
        };
        match &entry.source {
            Source::Debian { suite, package } => {
                let apt = self.apt();
                let pkgs = apt.resolve_kernel(suite, package, self.refresh)?;
                let pkg = pkgs[0].clone();
                let root = apt.fetch_and_unpack(&pkgs, &pkg.slug(), &self.cache.join("kernels"))?;
                let release = pkg.kernel_release().ok_or_else(|| {
                    unavailable(format!("cannot tell the release from {}", pkg.name))
                })?;
                let layout = DebianLayout::find(&root, &release).ok_or_else(|| {
                    unavailable(format!(
                        "no kernel image in {} (looked for boot/vmlinuz-{release} and usr/lib/modules/{release}/vmlinuz)",
                        root.display()
                    ))
                })?;
                Ok(Kernel {
                    name: entry.name.clone(),
                    release,
                    image: layout.image,
                    modules_root: Some(layout.modules_root),
                    config: layout.config,
                    provenance: format!(
                        "Debian {suite} {} {} (sha256 {}{})",
                        pkg.name,
                        pkg.version,
                        pkg.sha256,
                        if pkgs.len() > 1 {
                            format!(", with {} part package(s)", pkgs.len() - 1)
                        } else {
                            String::new()
                        }
                    ),
                })
            }
            Source::Host => {
                let release = host_release().map_err(|e| unavailable(e.to_string()))?;
                Ok(Kernel {
                    name: entry.name.clone(),
                    release: release.clone(),
                    image: PathBuf::new(),
                    modules_root: None,
                    config: None,
                    provenance: format!("the running kernel {release} (network namespaces)"),
                })
            }
            Source::Local { image, modules } => {
                if !image.is_file() {
                    return Err(unavailable(format!(
                        "no kernel image at {}",
                        image.display()
                    )));
                }
                let release = match modules {
                    Some(root) => single_release(root).map_err(unavailable)?,
                    None => "unknown".to_owned(),
                };
                Ok(Kernel {
                    name: entry.name.clone(),
                    release,
                    image: image.clone(),
                    modules_root: modules.clone(),
                    config: None,
                    provenance: format!("local {}", image.display()),
                })
            }
            Source::Nix {
                attr,
                why_unbuildable,
            } => Err(unavailable(format!(
                "provided by the flake ({attr}); {}",
                why_unbuildable
                    .as_deref()
                    .unwrap_or("building Nix kernels is not wired up yet")
            ))),
        }
    }
}

/// Where an unpacked Debian kernel keeps its parts: up to 6.x `boot/vmlinuz-R`,
/// `boot/config-R` and `lib/modules/R`; from 7.x all under `usr/lib/modules/R`.
struct DebianLayout {
    image: PathBuf,
    config: Option<PathBuf>,
    /// The directory `lib/modules/R` is under (what modprobe's `-d` wants).
    modules_root: PathBuf,
}

impl DebianLayout {
    fn find(root: &Path, release: &str) -> Option<DebianLayout> {
        let classic = root.join("boot").join(format!("vmlinuz-{release}"));
        if classic.is_file() {
            let config = root.join("boot").join(format!("config-{release}"));
            return Some(DebianLayout {
                image: classic,
                config: config.is_file().then_some(config),
                modules_root: root.to_owned(),
            });
        }
        let usr = root.join("usr");
        let dir = usr.join("lib").join("modules").join(release);
        let image = dir.join("vmlinuz");
        if image.is_file() {
            let config = dir.join("config");
            return Some(DebianLayout {
                image,
                config: config.is_file().then_some(config),
                modules_root: usr,
            });
        }
        None
    }
}

/// `uname -r` of the running kernel.
pub fn host_release() -> std::io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_owned())
}

/// The one release under `root/lib/modules`.
fn single_release(root: &Path) -> std::result::Result<String, String> {
    let dir = root.join("lib").join("modules");
    let mut releases: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| format!("reading {}: {e}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match releases.len() {
        1 => Ok(releases.remove(0)),
        0 => Err(format!("no kernel release under {}", dir.display())),
        _ => Err(format!(
            "several releases under {}: {releases:?}",
            dir.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_matrix_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("matrix.toml");
        let m = Matrix::load(&path).unwrap();
        let names: Vec<&str> = m.defaults().map(|k| k.name.as_str()).collect();
        assert!(names.contains(&"debian-5.10"), "{names:?}");
        assert!(names.contains(&"debian-6.1"));
        assert!(names.contains(&"debian-6.12"));
        assert!(names.contains(&"host"));
        let k = m.get("debian-6.1").unwrap();
        assert!(k.modules.iter().any(|m| m == "vxlan"));
        assert!(k.requires.iter().any(|r| r == "CONFIG_DEBUG_INFO_BTF"));
        assert!(matches!(m.get("nope"), Err(KernelError::NoSuchKernel(_))));
    }

    #[test]
    fn duplicates_and_bad_names_are_rejected() {
        let dup = "[[kernel]]\nname='a'\nversion='1'\nsource='host'\n[[kernel]]\nname='a'\nversion='1'\nsource='host'\n";
        assert!(Matrix::parse(dup).unwrap_err().contains("twice"));
        let bad = "[[kernel]]\nname='a b'\nversion='1'\nsource='host'\n";
        assert!(Matrix::parse(bad).is_err());
        let unknown = "[[kernel]]\nname='a'\nversion='1'\nsource='floppy'\n";
        assert!(Matrix::parse(unknown).is_err());
    }

    #[test]
    fn nix_and_missing_local_kernels_are_clear_errors() {
        let m = Matrix::parse(
            "[[kernel]]\nname='n'\nversion='6.6'\nsource='nix'\nattr='k'\nwhy_unbuildable='no nix'\n\
             [[kernel]]\nname='l'\nversion='6.6'\nsource='local'\nimage='/nonexistent/vmlinuz'\n",
        )
        .unwrap();
        let f = Fetcher::new(tempfile::tempdir().unwrap().path());
        let e = f.fetch(m.get("n").unwrap()).unwrap_err().to_string();
        assert!(e.contains("no nix"), "{e}");
        let e = f.fetch(m.get("l").unwrap()).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/vmlinuz"), "{e}");
    }

    #[test]
    fn both_debian_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old");
        std::fs::create_dir_all(old.join("boot")).unwrap();
        std::fs::write(old.join("boot/vmlinuz-6.1.0-1-cloud-amd64"), b"k").unwrap();
        std::fs::write(old.join("boot/config-6.1.0-1-cloud-amd64"), b"c").unwrap();
        let l = DebianLayout::find(&old, "6.1.0-1-cloud-amd64").unwrap();
        assert_eq!(l.modules_root, old);
        assert!(l.config.is_some());
        let new = dir.path().join("new");
        let mods = new.join("usr/lib/modules/7.2.13+deb14-cloud-amd64");
        std::fs::create_dir_all(&mods).unwrap();
        std::fs::write(mods.join("vmlinuz"), b"k").unwrap();
        let l = DebianLayout::find(&new, "7.2.13+deb14-cloud-amd64").unwrap();
        assert_eq!(l.modules_root, new.join("usr"));
        assert_eq!(l.image, mods.join("vmlinuz"));
        assert!(l.config.is_none());
        assert!(DebianLayout::find(dir.path(), "x").is_none());
    }

    #[test]
    fn local_kernel_finds_its_release() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("bzImage");
        std::fs::write(&image, b"x").unwrap();
        std::fs::create_dir_all(dir.path().join("lib/modules/6.6.1-test")).unwrap();
        let entry = KernelEntry {
            name: "l".into(),
            version: "6.6".into(),
            source: Source::Local {
                image: image.clone(),
                modules: Some(dir.path().to_owned()),
            },
            modules: vec![],
            requires: vec![],
            default: true,
        };
        let k = Fetcher::new(dir.path()).fetch(&entry).unwrap();
        assert_eq!(k.release, "6.6.1-test");
        assert_eq!(k.image, image);
    }
}

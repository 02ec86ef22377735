//! Debian packages without touching the system's apt: every suite gets its own sources list,
//! index and archive directories under the cache, `apt-get download` fetches a package, its
//! SHA256 is checked against the suite's Packages index (which apt has checked against the
//! suite's signed InRelease), and `dpkg -x` unpacks it. Nothing is installed.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::{debug, info};

use crate::{KernelError, Result};

/// `apt-get update` of one suite fetches about 10 MB; downloads of kernels about 30 MB.
const APT_TIMEOUT: Duration = Duration::from_secs(300);
const LOCAL_TIMEOUT: Duration = Duration::from_secs(120);
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// One package version as Debian's index describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebianPackage {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub depends: String,
    pub suite: String,
}

impl DebianPackage {
    /// `linux-image-6.1.0-50-cloud-amd64` -> `6.1.0-50-cloud-amd64`.
    pub fn kernel_release(&self) -> Option<String> {
        let rest = self.name.strip_prefix("linux-image-")?;
        let rest = rest.strip_suffix("-unsigned").unwrap_or(rest);
        rest.starts_with(|c: char| c.is_ascii_digit())
            .then(|| rest.to_owned())
    }

    /// A file-name-safe `name_version`.
    pub fn slug(&self) -> String {
        format!("{}_{}", self.name, self.version)
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-._+".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }
}

/// A private apt configuration rooted in a cache directory.
pub struct AptRepo {
    root: PathBuf,
    mirror: String,
}

impl AptRepo {
    pub fn new(root: PathBuf) -> AptRepo {
        AptRepo {
            root,
            mirror: system_mirror(),
        }
    }

    fn suite_dir(&self, suite: &str) -> PathBuf {
        self.root.join("suites").join(suite)
    }

    /// The `-o` options that point apt at this suite's own files only.
    fn options(&self, suite: &str) -> Vec<String> {
        let d = self.suite_dir(suite);
        let p = |s: &str| d.join(s).display().to_string();
        vec![
            format!("Dir::Etc::SourceList={}", p("sources.list")),
            "Dir::Etc::SourceParts=/dev/null".into(),
            "Dir::Etc::Preferences=/dev/null".into(),
            "Dir::Etc::PreferencesParts=/dev/null".into(),
            format!("Dir::State={}", p("state")),
            format!("Dir::State::Lists={}", p("lists")),
            "Dir::State::status=/dev/null".into(),
            format!("Dir::Cache={}", p("cache")),
            "APT::Architecture=amd64".into(),
            "APT::Architectures=amd64".into(),
            "Acquire::Languages=none".into(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".into(),
            "Acquire::http::Timeout=30".into(),
            "Acquire::Retries=2".into(),
        ]
    }

    fn apt(&self, tool: &str, suite: &str, args: &[&str], cwd: Option<&Path>) -> Result<String> {
        let mut cmd = Command::new(tool);
        for o in self.options(suite) {
            cmd.arg("-o").arg(o);
        }
        cmd.args(args);
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        run(cmd, APT_TIMEOUT)
    }

    fn has_index(&self, suite: &str) -> bool {
        std::fs::read_dir(self.suite_dir(suite).join("lists"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
            })
            .unwrap_or(false)
    }

    /// Writes the suite's sources list and fetches its index (if missing or `refresh`).
    pub fn update(&self, suite: &str, refresh: bool) -> Result<()> {
        if self.has_index(suite) && !refresh {
            return Ok(());
        }
        let d = self.suite_dir(suite);
        for sub in [
            "lists/partial",
            "cache/archives/partial",
            "state",
            "archives",
        ] {
            std::fs::create_dir_all(d.join(sub)).map_err(|source| KernelError::Io {
                context: format!("creating {}", d.join(sub).display()),
                source,
            })?;
        }
        let line = format!("deb [signed-by={KEYRING}] {} {suite} main\n", self.mirror);
        std::fs::write(d.join("sources.list"), line).map_err(|source| KernelError::Io {
            context: format!("writing {}", d.join("sources.list").display()),
            source,
        })?;
        info!(suite, mirror = %self.mirror, "fetching the Debian package index");
        let started = Instant::now();
        let out = self.apt("apt-get", suite, &["-q", "update"], None)?;
        // apt-get update exits 0 even when a suite is missing from the mirror; the index is
        // what counts.
        if !self.has_index(suite) {
            return Err(KernelError::Command {
                command: format!("apt-get update ({suite})"),
                detail: format!(
                    "no Packages index for {suite} on {}: {}",
                    self.mirror,
                    last_lines(&out, 4)
                ),
            });
        }
        debug!(suite, elapsed = ?started.elapsed(), "index fetched");
        Ok(())
    }

    /// The candidate version of `name` in `suite` (or exactly `version`).
    pub fn show(&self, suite: &str, name: &str, version: Option<&str>) -> Result<DebianPackage> {
        let spec = match version {
            Some(v) => format!("{name}={v}"),
            None => name.to_owned(),
        };
        let text = self
            .apt(
                "apt-cache",
                suite,
                &["show", "--no-all-versions", &spec],
                None,
            )
            .map_err(|e| match e {
                KernelError::Command { detail, .. } => KernelError::Command {
                    command: format!("apt-cache show {spec} ({suite})"),
                    detail: format!("{spec} is not in Debian {suite}: {detail}"),
                },
                other => other,
            })?;
        let fields = parse_stanza(&text);
        let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
        if get("SHA256").is_empty() || get("Version").is_empty() {
            return Err(KernelError::Command {
                command: format!("apt-cache show {spec} ({suite})"),
                detail: "no Version or SHA256 in the index entry".into(),
            });
        }
        Ok(DebianPackage {
            name: get("Package"),
            version: get("Version"),
            sha256: get("SHA256"),
            depends: get("Depends"),
            suite: suite.to_owned(),
        })
    }

    /// Follows a meta package (linux-image-cloud-amd64) to the image package it depends on,
    /// and that to the packages holding the kernel's parts where Debian splits them (from 7.x:
    /// linux-binary-R for the image, linux-modules-R, linux-base-R). The image package comes
    /// first. Without `refresh`, a kernel resolved before is taken from the cache with no
    /// network.
    pub fn resolve_kernel(
        &self,
        suite: &str,
        package: &str,
        refresh: bool,
    ) -> Result<Vec<DebianPackage>> {
        let record = self
            .root
            .join("resolved")
            .join(format!("{suite}_{package}"));
        if !refresh {
            if let Some(pkgs) = read_set(&record, suite).filter(|p| !p.is_empty()) {
                debug!(suite, package, resolved = %pkgs[0].name, "resolved from the cache");
                return Ok(pkgs);
            }
        }
        self.update(suite, refresh)?;
        let mut pkg = self.show(suite, package, None)?;
        if pkg.kernel_release().is_none() {
            let (image, version) =
                image_dependency(&pkg.depends).ok_or_else(|| KernelError::Command {
                    command: format!("apt-cache show {package} ({suite})"),
                    detail: format!("no linux-image dependency in {:?}", pkg.depends),
                })?;
            pkg = self.show(suite, &image, version.as_deref())?;
        }
        let release = pkg.kernel_release().unwrap_or_default();
        let mut pkgs = vec![pkg.clone()];
        for (name, version) in kernel_parts(&pkg.depends, &release) {
            pkgs.push(self.show(suite, &name, version.as_deref())?);
        }
        write_set(&record, &pkgs)?;
        Ok(pkgs)
    }

    /// The verified .deb of `pkg` in the cache, downloaded if missing.
    pub fn download(&self, pkg: &DebianPackage) -> Result<PathBuf> {
        let debs = self.root.join("debs");
        std::fs::create_dir_all(&debs).map_err(|source| KernelError::Io {
            context: format!("creating {}", debs.display()),
            source,
        })?;
        let deb = debs.join(format!("{}.deb", pkg.slug()));
        if deb.is_file() {
            if verify(&deb, pkg).is_ok() {
                return Ok(deb);
            }
            info!(deb = %deb.display(), "cached package fails its checksum: fetching it again");
        }
        self.update(&pkg.suite, false)?;
        let tmp = tempfile::tempdir_in(&debs).map_err(|source| KernelError::Io {
            context: format!("creating a directory in {}", debs.display()),
            source,
        })?;
        info!(package = %pkg.name, version = %pkg.version, "downloading");
        let spec = format!("{}={}", pkg.name, pkg.version);
        self.apt(
            "apt-get",
            &pkg.suite,
            &["-q", "download", &spec],
            Some(tmp.path()),
        )?;
        let got = std::fs::read_dir(tmp.path())
            .map_err(|source| KernelError::Io {
                context: format!("reading {}", tmp.path().display()),
                source,
            })?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .ok_or_else(|| KernelError::Command {
                command: format!("apt-get download {spec}"),
                detail: "no .deb was written".into(),
            })?;
        verify(&got, pkg)?;
        std::fs::rename(&got, &deb).map_err(|source| KernelError::Io {
            context: format!("moving {} into the cache", got.display()),
            source,
        })?;
        Ok(deb)
    }

    /// Downloads (or reuses) `pkgs` and unpacks them together into
    /// `parent/<name>-<digest of their checksums>`; returns that root.
    pub fn fetch_and_unpack(
        &self,
        pkgs: &[DebianPackage],
        name: &str,
        parent: &Path,
    ) -> Result<PathBuf> {
        let mut hasher = Sha256::new();
        for p in pkgs {
            hasher.update(p.sha256.as_bytes());
        }
        let digest = hex(&hasher.finalize());
        let dest = parent.join(format!("{name}-{}", &digest[..12]));
        if dest.is_dir() {
            return Ok(dest);
        }
        let debs: Vec<PathBuf> = pkgs
            .iter()
            .map(|p| self.download(p))
            .collect::<Result<_>>()?;
        unpack_all(&debs, &dest)?;
        Ok(dest)
    }

    /// Downloads the candidates of `names` in `suite` and unpacks them all into one root under
    /// `parent`, named after `set` and the versions (so a new version gets a new root).
    pub fn fetch_set(
        &self,
        suite: &str,
        names: &[&str],
        set: &str,
        parent: &Path,
    ) -> Result<PathBuf> {
        let record = self
            .root
            .join("resolved")
            .join(format!("{suite}_{set}.set"));
        let mut pkgs: Vec<DebianPackage> = read_set(&record, suite).unwrap_or_default();
        if pkgs.len() != names.len() {
            self.update(suite, false)?;
            pkgs = names
                .iter()
                .map(|n| self.show(suite, n, None))
                .collect::<Result<_>>()?;
            write_set(&record, &pkgs)?;
        }
        self.fetch_and_unpack(&pkgs, set, parent)
    }
}

/// Unpacks debs into a fresh directory and renames it into place, so a half-unpacked tree is
/// never mistaken for a complete one.
fn unpack_all(debs: &[PathBuf], dest: &Path) -> Result<()> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|source| KernelError::Io {
        context: format!("creating {}", parent.display()),
        source,
    })?;
    let tmp = tempfile::tempdir_in(parent).map_err(|source| KernelError::Io {
        context: format!("creating a directory in {}", parent.display()),
        source,
    })?;
    for deb in debs {
        let mut cmd = Command::new("dpkg");
        cmd.arg("-x").arg(deb).arg(tmp.path());
        run(cmd, LOCAL_TIMEOUT)?;
    }
    let tmp = tmp.keep();
    std::fs::rename(&tmp, dest).map_err(|source| KernelError::Io {
        context: format!("moving {} to {}", tmp.display(), dest.display()),
        source,
    })
}

fn verify(deb: &Path, pkg: &DebianPackage) -> Result<()> {
    let actual = sha256_file(deb)?;
    if actual.eq_ignore_ascii_case(&pkg.sha256) {
        Ok(())
    } else {
        let _ = std::fs::remove_file(deb);
        Err(KernelError::Checksum {
            package: pkg.name.clone(),
            version: pkg.version.clone(),
            expected: pkg.sha256.clone(),
            actual,
        })
    }
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|source| KernelError::Io {
        context: format!("opening {}", path.display()),
        source,
    })?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(|source| KernelError::Io {
            context: format!("reading {}", path.display()),
            source,
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The Debian mirror this machine's apt already uses (so the lab reaches what the machine
/// reaches), or deb.debian.org.
fn system_mirror() -> String {
    if let Ok(m) = std::env::var("WEIR_DEBIAN_MIRROR") {
        return m;
    }
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        for word in text.split_whitespace() {
            let word = word.trim_end_matches('/');
            if (word.starts_with("http://") || word.starts_with("https://"))
                && word.ends_with("/debian")
            {
                return word.to_owned();
            }
        }
    }
    DEFAULT_MIRROR.to_owned()
}

/// Fields of the first RFC 822 stanza; continuation lines are joined.
fn parse_stanza(text: &str) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    let mut last: Option<String> = None;
    for line in text.lines() {
        if line.is_empty() {
            if !fields.is_empty() {
                break;
            }
            continue;
        }
        if line.starts_with(' ') || line.starts_with('\t') {
            if let Some(k) = &last {
                fields
                    .entry(k.clone())
                    .and_modify(|v: &mut String| v.push_str(line.trim_end()));
            }
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            fields.insert(k.to_owned(), v.trim().to_owned());
            last = Some(k.to_owned());
        }
    }
    fields
}

/// `linux-image-6.1.0-50-cloud-amd64 (= 6.1.176-1)` out of a Depends field.
fn image_dependency(depends: &str) -> Option<(String, Option<String>)> {
    depends.split(',').find_map(|dep| {
        let dep = dep.split('|').next()?.trim();
        let (name, rest) = match dep.split_once(' ') {
            Some((n, r)) => (n, Some(r)),
            None => (dep, None),
        };
        let digits = name.strip_prefix("linux-image-")?;
        if !digits.starts_with(|c: char| c.is_ascii_digit()) {
            return None;
        }
        let version = rest
            .and_then(|r| r.trim().strip_prefix("(="))
            .map(|v| v.trim().trim_end_matches(')').trim().to_owned());
        Some((name.to_owned(), version))
    })
}

/// The split-out parts of kernel `release` an image package depends on (Debian 7.x):
/// `linux-binary-R`, `linux-modules-R` and `linux-base-R`, with their exact versions.
fn kernel_parts(depends: &str, release: &str) -> Vec<(String, Option<String>)> {
    if release.is_empty() {
        return Vec::new();
    }
    let wanted: Vec<String> = ["binary", "modules", "base"]
        .iter()
        .map(|part| format!("linux-{part}-{release}"))
        .collect();
    depends
        .split(',')
        .filter_map(|dep| {
            let dep = dep.split('|').next()?.trim();
            let (name, rest) = dep.split_once(' ').unwrap_or((dep, ""));
            if !wanted.iter().any(|w| w == name) {
                return None;
            }
            let version = rest
                .trim()
                .strip_prefix("(=")
                .map(|v| v.trim().trim_end_matches(')').trim().to_owned());
            Some((name.to_owned(), version))
        })
        .collect()
}

fn record_text(pkg: &DebianPackage) -> String {
    format!(
        "Package: {}\nVersion: {}\nSHA256: {}\n",
        pkg.name, pkg.version, pkg.sha256
    )
}

fn parse_records(text: &str, suite: &str) -> Vec<DebianPackage> {
    text.split("\n\n")
        .filter(|s| !s.trim().is_empty())
        .filter_map(|s| {
            let f = parse_stanza(s);
            Some(DebianPackage {
                name: f.get("Package")?.clone(),
                version: f.get("Version")?.clone(),
                sha256: f.get("SHA256")?.clone(),
                depends: String::new(),
                suite: suite.to_owned(),
            })
        })
        .collect()
}

fn read_set(path: &Path, suite: &str) -> Option<Vec<DebianPackage>> {
    Some(parse_records(&std::fs::read_to_string(path).ok()?, suite))
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    let io = |source| KernelError::Io {
        context: format!("writing {}", path.display()),
        source,
    };
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new("."))).map_err(io)?;
    std::fs::write(path, text).map_err(io)
}

fn write_set(path: &Path, pkgs: &[DebianPackage]) -> Result<()> {
    let text: Vec<String> = pkgs.iter().map(record_text).collect();
    write_file(path, &text.join("\n"))
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Runs a command with stdout and stderr captured; kills its process group after `timeout`.
pub(crate) fn run(mut cmd: Command, timeout: Duration) -> Result<String> {
    use std::os::unix::process::CommandExt;
    let shown = format!("{cmd:?}");
    let mut out_file = tempfile::tempfile().map_err(|source| KernelError::Io {
        context: "creating a temporary file".into(),
        source,
    })?;
    let spawn_io = |source| KernelError::Io {
        context: format!("starting {shown}"),
        source,
    };
    cmd.stdin(Stdio::null())
        .stdout(out_file.try_clone().map_err(spawn_io)?)
        .stderr(out_file.try_clone().map_err(spawn_io)?)
        .process_group(0);
    let mut child = cmd.spawn().map_err(spawn_io)?;
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().map_err(spawn_io)? {
            break s;
        }
        if started.elapsed() > timeout {
            // SAFETY: kill(2) of the process group created for this child, which is still
            // unreaped, so its group id cannot have been reused.
            unsafe {
                libc::killpg(child.id() as libc::pid_t, libc::SIGKILL);
            }
            let _ = child.wait();
            return Err(KernelError::Timeout {
                command: shown,
                secs: timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    use std::io::Seek;
    let mut text = String::new();
    let _ = out_file.seek(std::io::SeekFrom::Start(0));
    let _ = out_file.read_to_string(&mut text);
    if status.success() {
        Ok(text)
    } else {
        Err(KernelError::Command {
            command: shown,
            detail: format!("{status}: {}", last_lines(&text, 6)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stanza_and_meta_dependency() {
        let text = "Package: linux-image-cloud-amd64\nVersion: 6.1.176-1\nDepends: linux-image-6.1.0-50-cloud-amd64 (= 6.1.176-1)\nSHA256: ab\nDescription: x\n y\n\nPackage: other\n";
        let f = parse_stanza(text);
        assert_eq!(f["Package"], "linux-image-cloud-amd64");
        assert_eq!(
            image_dependency(&f["Depends"]),
            Some((
                "linux-image-6.1.0-50-cloud-amd64".into(),
                Some("6.1.176-1".into())
            ))
        );
        assert_eq!(
            image_dependency("linux-base-cloud-amd64 (= 7.2.13-1), linux-image-7.2.13+deb14-cloud-amd64 (= 7.2.13-1)"),
            Some(("linux-image-7.2.13+deb14-cloud-amd64".into(), Some("7.2.13-1".into())))
        );
        assert_eq!(image_dependency("kmod, linux-base (>= 4.3~)"), None);
    }

    #[test]
    fn split_kernel_parts() {
        let deps = "dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, linux-base-7.2.13+deb14-cloud-amd64 (= 7.2.13-1), linux-binary-7.2.13+deb14-cloud-amd64 (= 7.2.13-1), linux-modules-7.2.13+deb14-cloud-amd64 (= 7.2.13-1)";
        let parts = kernel_parts(deps, "7.2.13+deb14-cloud-amd64");
        let names: Vec<&str> = parts.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "linux-base-7.2.13+deb14-cloud-amd64",
                "linux-binary-7.2.13+deb14-cloud-amd64",
                "linux-modules-7.2.13+deb14-cloud-amd64"
            ]
        );
        assert_eq!(parts[0].1.as_deref(), Some("7.2.13-1"));
        assert!(kernel_parts("kmod, linux-base (>= 4.3~)", "6.1.0-50-cloud-amd64").is_empty());
    }

    #[test]
    fn releases_and_slugs() {
        let p = DebianPackage {
            name: "linux-image-6.12.95+deb12-cloud-amd64".into(),
            version: "6.12.95-1~bpo12+1".into(),
            sha256: "x".into(),
            depends: String::new(),
            suite: "bookworm-backports".into(),
        };
        assert_eq!(p.kernel_release().unwrap(), "6.12.95+deb12-cloud-amd64");
        assert_eq!(
            p.slug(),
            "linux-image-6.12.95+deb12-cloud-amd64_6.12.95-1_bpo12+1"
        );
        let meta = DebianPackage {
            name: "linux-image-cloud-amd64".into(),
            ..p
        };
        assert_eq!(meta.kernel_release(), None);
    }

    #[test]
    fn records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = DebianPackage {
            name: "a".into(),
            version: "1:2".into(),
            sha256: "00ff".into(),
            depends: String::new(),
            suite: "s".into(),
        };
        let q = DebianPackage {
            name: "b".into(),
            ..p.clone()
        };
        write_set(&dir.path().join("x.set"), &[p.clone(), q.clone()]).unwrap();
        assert_eq!(
            read_set(&dir.path().join("x.set"), "s").unwrap(),
            vec![p, q]
        );
    }

    #[test]
    fn checksum_mismatch_is_an_error_and_drops_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.deb");
        std::fs::write(&f, b"hello").unwrap();
        let mut p = DebianPackage {
            name: "p".into(),
            version: "1".into(),
            sha256: "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824".into(),
            depends: String::new(),
            suite: "s".into(),
        };
        verify(&f, &p).unwrap();
        p.sha256 = "00".into();
        assert!(matches!(verify(&f, &p), Err(KernelError::Checksum { .. })));
        assert!(!f.exists());
    }

    #[test]
    fn a_hung_command_is_killed() {
        let mut cmd = Command::new("sleep");
        cmd.arg("10");
        let started = Instant::now();
        let e = run(cmd, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, KernelError::Timeout { .. }), "{e}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}

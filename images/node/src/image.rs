//! Assembling the node image: host programs with the libraries `ldd` names, the guest init,
//! a few configuration files, and the kernel's modules (decompressed, in load order).
//!
//! Files keep their canonical host paths (`/usr/lib/...`) and the image carries Debian's
//! merged-/usr links (`/lib -> usr/lib`, ...), so a program finds its libraries and the lab
//! can name programs by the same paths it uses on the host.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use tracing::{debug, info};
use weir_kernels::{Kernel, ModuleSet};

use crate::cpio::CpioWriter;
use crate::ImageError;

/// Where the init finds the modules to load and their order.
pub const MODULE_DIR: &str = "/usr/lib/modules/weir";
pub const MODULE_ORDER: &str = "/usr/lib/modules/weir/order";
/// Modules of [`ON_DEMAND_MODULES`] (and what they need beyond the boot modules) in load order:
/// the init leaves them alone, the lab loads them (`insmod`, busybox) when a measurement needs
/// them.
pub const ON_DEMAND_ORDER: &str = "/usr/lib/modules/weir/on-demand";

/// Modules not loaded at boot: iptables' tables, their matches and targets, and nf_tables, for
/// the kube-proxy baseline. Before 5.15 a table module registers its table, hooks and all, in
/// the initial namespace (a VM node's own) the moment it loads, which would tax every packet of
/// the routing and Weir measurements too.
pub const ON_DEMAND_MODULES: &[&str] = &[
    "ip_tables",
    "iptable_filter",
    "iptable_nat",
    "nf_nat",
    "xt_nat",
    "xt_tcpudp",
    "xt_statistic",
    "xt_comment",
    "xt_mark",
    "xt_MASQUERADE",
    "xt_addrtype",
    "xt_conntrack",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nft_ct",
];

#[derive(Clone, Debug)]
enum Entry {
    Dir,
    /// Contents from a host file (read at write time) or given bytes.
    HostFile(PathBuf, u32),
    Bytes(Vec<u8>, u32),
    Symlink(String),
    CharDev(u32, u32),
}

/// An initramfs being put together; [`ImageBuilder::write`] lays it out as newc cpio.
#[derive(Clone, Debug, Default)]
pub struct ImageBuilder {
    entries: BTreeMap<String, Entry>,
}

impl ImageBuilder {
    pub fn new() -> ImageBuilder {
        let mut b = ImageBuilder::default();
        for d in [
            "/usr/bin",
            "/usr/sbin",
            "/usr/lib",
            "/usr/lib64",
            "/etc",
            "/root",
        ] {
            b.dir(d);
        }
        // Debian's merged /usr, so /bin/sh, /lib64/ld-linux... and /sbin/... resolve.
        for (link, target) in [
            ("/bin", "usr/bin"),
            ("/sbin", "usr/sbin"),
            ("/lib", "usr/lib"),
            ("/lib64", "usr/lib64"),
        ] {
            b.symlink(link, target);
        }
        for d in [
            "/proc", "/sys", "/dev", "/run", "/tmp", "/var/log", "/var/lib",
        ] {
            b.dir(d);
        }
        // Before devtmpfs is mounted, the kernel opens /dev/console from the initramfs for
        // init's standard streams.
        b.entries
            .insert("/dev/console".into(), Entry::CharDev(5, 1));
        b
    }

    /// A directory and all its parents.
    pub fn dir(&mut self, path: &str) {
        let mut at = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            at.push('/');
            at.push_str(part);
            self.entries.entry(at.clone()).or_insert(Entry::Dir);
        }
    }

    fn parent_dirs(&mut self, path: &str) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            if !parent.is_empty() {
                self.dir(parent);
            }
        }
    }

    pub fn bytes(&mut self, path: &str, mode: u32, data: impl Into<Vec<u8>>) {
        self.parent_dirs(path);
        self.entries
            .insert(path.to_owned(), Entry::Bytes(data.into(), mode));
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.parent_dirs(path);
        self.entries
            .insert(path.to_owned(), Entry::Symlink(target.to_owned()));
    }

    /// A host file at guest path `path`.
    pub fn host_file(&mut self, path: &str, source: &Path, mode: u32) {
        self.parent_dirs(path);
        self.entries
            .insert(path.to_owned(), Entry::HostFile(source.to_owned(), mode));
    }

    /// A host program (a name looked up in PATH, or a path) at its canonical path, with every
    /// library `ldd` says it loads. Returns the canonical guest path.
    pub fn program(&mut self, name: &str) -> Result<String, ImageError> {
        let path = which(name)?;
        self.executable(&path)
    }

    /// An executable at its canonical path, with its libraries.
    pub fn executable(&mut self, path: &Path) -> Result<String, ImageError> {
        let real = std::fs::canonicalize(path).map_err(|source| ImageError::Io {
            context: format!("resolving {}", path.display()),
            source,
        })?;
        let guest = real.display().to_string();
        self.host_file(&guest, &real, 0o755);
        for lib in libraries(&real)? {
            let lib_real = std::fs::canonicalize(&lib).map_err(|source| ImageError::Io {
                context: format!("resolving {}", lib.display()),
                source,
            })?;
            self.host_file(&lib_real.display().to_string(), &lib_real, 0o755);
            // The loader is asked for by its unmerged name, which the /lib64 link serves; a
            // versioned library is asked for by its soname, a symlink on the host.
            let lib_guest = merged(&lib);
            if lib_guest != lib_real.display().to_string() {
                let target = lib_real.display().to_string();
                self.symlink(&lib_guest, &target);
            }
        }
        Ok(guest)
    }

    /// iptables for the kube-proxy baseline: each multi-call binary of [`IPTABLES`] installed
    /// on this machine, linked in /usr/sbin under the argv[0] names the lab calls, and the IPv4
    /// and protocol-independent extensions from [`XTABLES_DIR`] (dlopen'ed, so `ldd` on the
    /// binary does not name them; symlinked aliases such as libxt_DNAT.so stay links). Returns
    /// the binaries added; none is not an error (the kube-proxy measurement then says why).
    pub fn iptables(&mut self) -> Result<Vec<String>, ImageError> {
        let mut added = Vec::new();
        for (multi, names) in IPTABLES {
            let Ok(path) = which(multi) else {
                debug!(binary = multi, "not installed: left out of the node image");
                continue;
            };
            let guest = self.executable(&path)?;
            for name in *names {
                self.symlink(&format!("/usr/sbin/{name}"), &guest);
            }
            added.push(guest);
        }
        if added.is_empty() {
            return Ok(added);
        }
        let dir = Path::new(XTABLES_DIR);
        let entries = std::fs::read_dir(dir).map_err(|source| ImageError::Io {
            context: format!("listing {XTABLES_DIR}"),
            source,
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(is_ipv4_extension)
            })
            .collect();
        files.sort();
        for file in files {
            let guest = file.display().to_string();
            match std::fs::read_link(&file) {
                // An alias of another extension in the same directory.
                Ok(target) => self.symlink(&guest, &target.display().to_string()),
                Err(_) => {
                    self.executable(&file)?;
                }
            }
        }
        Ok(added)
    }

    /// The kernel's modules, decompressed, in load order, and the order file the init reads.
    pub fn modules(&mut self, set: &ModuleSet) -> Result<(), ImageError> {
        self.module_files(&set.files, 0, MODULE_ORDER)
    }

    /// Modules the lab loads when it needs them, listed in [`ON_DEMAND_ORDER`]; `files` must
    /// leave out what the boot modules already load. `first` numbers them on after those.
    pub fn modules_on_demand(&mut self, files: &[PathBuf], first: usize) -> Result<(), ImageError> {
        self.module_files(files, first, ON_DEMAND_ORDER)
    }

    fn module_files(
        &mut self,
        files: &[PathBuf],
        first: usize,
        order_file: &str,
    ) -> Result<(), ImageError> {
        self.dir(MODULE_DIR);
        let mut order = String::new();
        for (i, file) in files.iter().enumerate() {
            let name = weir_kernels::modules::module_name(file);
            let data = decompress(file)?;
            let guest = format!("{MODULE_DIR}/{:02}-{name}.ko", first + i);
            order.push_str(&guest);
            order.push('\n');
            self.bytes(&guest, 0o644, data);
        }
        self.bytes(order_file, 0o644, order);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the image as uncompressed newc cpio (TCG guests unpack it faster than they would
    /// decompress it).
    pub fn write(&self, out: &Path) -> Result<u64, ImageError> {
        let io = |context: String| move |source| ImageError::Io { context, source };
        let tmp = out.with_extension("tmp");
        let file = File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
        let mut w = CpioWriter::new(BufWriter::new(file));
        // Directories first, links last: the kernel creates entries in archive order, and a
        // link written before its target's directory exists would dangle while unpacking.
        let rank = |e: &Entry| match e {
            Entry::Dir => 0,
            Entry::Symlink(_) => 2,
            _ => 1,
        };
        let mut ordered: Vec<(&String, &Entry)> = self.entries.iter().collect();
        ordered.sort_by_key(|(p, e)| (rank(e), p.as_str()));
        for (path, entry) in ordered {
            match entry {
                Entry::Dir => w.dir(path, 0o755),
                Entry::Symlink(t) => w.symlink(path, t),
                Entry::CharDev(major, minor) => w.chardev(path, 0o600, *major, *minor),
                Entry::Bytes(d, mode) => w.file(path, *mode, d),
                Entry::HostFile(src, mode) => {
                    let data =
                        std::fs::read(src).map_err(io(format!("reading {}", src.display())))?;
                    w.file(path, *mode, &data)
                }
            }
            .map_err(io(format!("writing {}", tmp.display())))?;
        }
        w.finish()
            .map_err(io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, out).map_err(io(format!("renaming to {}", out.display())))?;
        Ok(std::fs::metadata(out).map(|m| m.len()).unwrap_or(0))
    }
}

/// `/lib/x86_64-linux-gnu/libc.so.6` as the guest sees it: the path itself (the merged-/usr
/// links make it resolve), but stored under /usr so the links are not shadowed by a directory.
fn merged(path: &Path) -> String {
    let p = path.display().to_string();
    for (old, new) in [
        ("/lib/", "/usr/lib/"),
        ("/lib64/", "/usr/lib64/"),
        ("/bin/", "/usr/bin/"),
        ("/sbin/", "/usr/sbin/"),
    ] {
        if let Some(rest) = p.strip_prefix(old) {
            return format!("{new}{rest}");
        }
    }
    p
}

/// A program's path from PATH (or the path itself).
pub fn which(name: &str) -> Result<PathBuf, ImageError> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(ImageError::Missing(format!("{name} does not exist")))
        };
    }
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found.ok_or_else(|| {
        ImageError::Missing(format!(
            "{name} is not installed on this machine (lab/setup.sh installs it)"
        ))
    })
}

/// The shared libraries (and ELF interpreter) `ldd` lists for a binary.
fn libraries(binary: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|source| ImageError::Io {
            context: "running ldd".into(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // Static binaries make ldd say so and exit 1.
        if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        return Err(ImageError::Missing(format!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    parse_ldd(&text).map_err(|m| ImageError::Missing(format!("{}: {m}", binary.display())))
}

fn parse_ldd(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with("linux-vdso") {
            continue;
        }
        if line.contains("=> not found") {
            return Err(format!("library missing: {line}"));
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

fn decompress(file: &Path) -> Result<Vec<u8>, ImageError> {
    let name = file.display().to_string();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => std::fs::read(file).map_err(|source| ImageError::Io {
            context: format!("reading {name}"),
            source,
        }),
        Some(tool) => {
            let out = Command::new(tool)
                .arg("-dc")
                .arg(file)
                .output()
                .map_err(|source| ImageError::Io {
                    context: format!("running {tool} on {name}"),
                    source,
                })?;
            if !out.status.success() {
                return Err(ImageError::Missing(format!(
                    "{tool} -dc {name}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            Ok(out.stdout)
        }
    }
}

/// Programs the lab runs on nodes and pods, by name (looked up in PATH).
pub const WORKLOAD_PROGRAMS: &[&str] = &[
    "ip", "ss", "bridge", "tc", "sysctl", "ethtool", "curl", "socat", "nginx", "qperf", "iperf3",
    "dash", "busybox",
];

/// iptables' multi-call binaries and the names the lab runs them by (kube-proxy baseline).
pub const IPTABLES: &[(&str, &[&str])] = &[
    (
        "xtables-legacy-multi",
        &[
            "iptables-legacy",
            "iptables-legacy-restore",
            "iptables-legacy-save",
        ],
    ),
    (
        "xtables-nft-multi",
        &["iptables-nft", "iptables-nft-restore", "iptables-nft-save"],
    ),
];

/// Where iptables looks for its extensions (Debian's build; `XTABLES_LIBDIR`).
pub const XTABLES_DIR: &str = "/usr/lib/x86_64-linux-gnu/xtables";

/// Extensions iptables (IPv4) loads: `libxt_*` serve every family, `libipt_*` IPv4 only;
/// ip6tables', arptables' and ebtables' are left out.
fn is_ipv4_extension(file: &str) -> bool {
    file.ends_with(".so") && (file.starts_with("libxt_") || file.starts_with("libipt_"))
}

/// busybox applets linked in /usr/local/bin for the plain commands scenarios use; never `ip`
/// or `sh`, which must be iproute2's and dash.
pub const BUSYBOX_APPLETS: &[&str] = &[
    "mkdir", "cat", "ls", "rm", "echo", "sleep", "ps", "kill", "mount", "umount", "uname", "dmesg",
    "true", "false", "env", "timeout", "grep", "head", "tail", "wc", "poweroff", "sync", "free",
    "uptime", "nproc", "date", "hostname", "touch", "cp", "mv", "ln", "chmod", "stat", "insmod",
    "lsmod",
];

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nwww-data:x:33:\nnogroup:x:65534:\n";

/// What a node image holds, for the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NodeImage {
    pub path: PathBuf,
    pub bytes: u64,
    pub entries: usize,
    pub modules: ModuleSet,
    pub kernel_release: String,
}

/// Builds the node image for `kernel`: `init` as /init, the workload programs, the modules
/// `module_names` resolve to. Reused when `out` is newer than every input.
pub fn build_node_image(
    kernel: &Kernel,
    module_names: &[String],
    init: &Path,
    out: &Path,
) -> Result<NodeImage, ImageError> {
    let started = Instant::now();
    let (on_demand, boot): (Vec<String>, Vec<String>) = module_names
        .iter()
        .cloned()
        .partition(|m| ON_DEMAND_MODULES.contains(&m.as_str()));
    let mut modules = weir_kernels::resolve_modules(kernel, &boot)?;
    let extra = weir_kernels::resolve_modules(kernel, &on_demand)?;
    let extra_files: Vec<PathBuf> = extra
        .files
        .iter()
        .filter(|f| !modules.files.contains(f))
        .cloned()
        .collect();
    let mut b = ImageBuilder::new();
    let init_guest = b.executable(init)?;
    b.symlink("/init", &init_guest);
    for p in WORKLOAD_PROGRAMS {
        b.program(p)?;
    }
    b.iptables()?;
    let dash = which("dash")?;
    let dash = std::fs::canonicalize(&dash).unwrap_or(dash);
    b.symlink("/usr/bin/sh", &dash.display().to_string());
    let busybox = std::fs::canonicalize(which("busybox")?).map_err(|source| ImageError::Io {
        context: "resolving busybox".into(),
        source,
    })?;
    for applet in BUSYBOX_APPLETS {
        b.symlink(
            &format!("/usr/local/bin/{applet}"),
            &busybox.display().to_string(),
        );
    }
    b.bytes("/etc/passwd", 0o644, PASSWD);
    b.bytes("/etc/group", 0o644, GROUP);
    b.bytes(
        "/etc/nsswitch.conf",
        0o644,
        "passwd: files\ngroup: files\nhosts: files\n",
    );
    b.bytes("/etc/hosts", 0o644, "127.0.0.1 localhost\n");
    // iptables names protocols (`-p tcp`) through it, as iptables-save prints them.
    if Path::new("/etc/protocols").is_file() {
        b.host_file("/etc/protocols", Path::new("/etc/protocols"), 0o644);
    }
    b.modules(&modules)?;
    b.modules_on_demand(&extra_files, modules.files.len())?;
    // The report lists every module the image carries, whenever it loads.
    modules.files.extend(extra_files);
    modules.builtin.extend(extra.builtin);
    modules.missing.extend(extra.missing);
    b.dir("/var/www");
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).map_err(|source| ImageError::Io {
            context: format!("creating {}", parent.display()),
            source,
        })?;
    }
    let bytes = b.write(out)?;
    info!(
        image = %out.display(),
        mib = bytes / (1 << 20),
        modules = modules.files.len(),
        elapsed = ?started.elapsed(),
        "node image written"
    );
    debug!(missing = ?modules.missing, builtin = ?modules.builtin, "modules");
    Ok(NodeImage {
        path: out.to_owned(),
        bytes,
        entries: b.len(),
        modules,
        kernel_release: kernel.release.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffc)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(parse_ldd("\tlibx.so => not found\n").is_err());
    }

    #[test]
    fn merged_paths() {
        assert_eq!(
            merged(Path::new("/lib/x86_64-linux-gnu/libc.so.6")),
            "/usr/lib/x86_64-linux-gnu/libc.so.6"
        );
        assert_eq!(merged(Path::new("/usr/lib/x")), "/usr/lib/x");
    }

    #[test]
    fn extensions_for_iptables_not_the_other_tables() {
        assert!(is_ipv4_extension("libxt_statistic.so"));
        assert!(is_ipv4_extension("libipt_REJECT.so"));
        assert!(!is_ipv4_extension("libip6t_REJECT.so"));
        assert!(!is_ipv4_extension("libebt_ip.so"));
        assert!(!is_ipv4_extension("libxt_x.so.1"));
    }

    #[test]
    fn iptables_comes_with_its_names_and_extensions() {
        let mut b = ImageBuilder::new();
        let added = b.iptables().unwrap();
        if which("xtables-legacy-multi").is_err() && which("xtables-nft-multi").is_err() {
            eprintln!("SKIPPED: iptables is not installed on this machine");
            assert!(added.is_empty());
            return;
        }
        assert!(!added.is_empty());
        let has = |p: &str| b.entries.contains_key(p);
        if which("xtables-legacy-multi").is_ok() {
            assert!(has("/usr/sbin/iptables-legacy-restore"));
            assert!(has("/usr/sbin/iptables-legacy-save"));
        }
        // What kube-proxy's rules load, by the name iptables dlopens.
        for ext in [
            "statistic",
            "comment",
            "mark",
            "addrtype",
            "conntrack",
            "MARK",
            "DNAT",
        ] {
            let path = format!("{XTABLES_DIR}/libxt_{ext}.so");
            assert!(has(&path), "{path} missing");
        }
        // DNAT is an alias of libxt_NAT.so: kept a link, its target carried.
        assert!(matches!(
            b.entries.get(&format!("{XTABLES_DIR}/libxt_DNAT.so")),
            Some(Entry::Symlink(t)) if t == "libxt_NAT.so"
        ));
        assert!(has(&format!("{XTABLES_DIR}/libxt_NAT.so")));
        assert!(!b.entries.keys().any(|k| k.contains("libip6t_")));
        assert!(b.entries.keys().any(|k| k.contains("libxtables.so")));
    }

    #[test]
    fn a_program_brings_its_libraries() {
        let mut b = ImageBuilder::new();
        let guest = b.program("ip").unwrap();
        assert!(guest.ends_with("/ip"), "{guest}");
        assert!(
            b.entries.keys().any(|k| k.contains("libc.so")),
            "{:?}",
            b.entries.keys().collect::<Vec<_>>()
        );
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("i.cpio");
        let n = b.write(&out).unwrap();
        assert!(n > 100_000);
        assert!(matches!(
            b.program("no-such-program-here"),
            Err(ImageError::Missing(_))
        ));
    }
}

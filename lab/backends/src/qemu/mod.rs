//! The QEMU backend: every node is a VM booted from a kernel of the matrix and the node image;
//! pods are namespaces inside it, external clients namespaces on the host. It implements the
//! same [`Backend`]/[`Lab`] traits as the namespace backend, so scenarios run unchanged.
//!
//! - [`tools`]: QEMU 10 from Debian (cached), virtiofsd, KVM-or-TCG.
//! - [`vm`]: one VM's processes, console and control port, with hang and panic detection.
//! - [`lab`]: the lab of VMs, its bridge and taps, and the `Lab` operations.
//!
//! Files: the scenario's run directory is shared read-write with every guest over virtiofs at
//! the same path, and the agent's directory read-only, so configs, logs and the agent binary
//! are where the scenario code expects them.

pub mod lab;
pub mod tools;
pub mod vm;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weir_kernels::{Fetcher, Kernel, KernelEntry, Matrix};
use weir_node_image::NodeImage;

pub use tools::{Accel, Qemu};
use weir_lab_core::backend::{Backend, BackendError, Lab};
use weir_lab_core::topology::Plan;

/// Frames up to this size cross the VMs' virtual wire (`host_mtu` on virtio-net, the bridge's
/// and taps' MTU), so plans may set any pod MTU up to it.
pub const HOST_MTU: u32 = 9000;
pub const DEFAULT_KERNEL: &str = "debian-6.1";

/// Everything a VM lab on one kernel needs, prepared once and shared by its labs.
#[derive(Debug, serde::Serialize)]
pub struct VmSetup {
    pub qemu: Qemu,
    pub virtiofsd: PathBuf,
    pub accel: Accel,
    pub accel_reason: String,
    pub kernel: Kernel,
    pub image: NodeImage,
    pub memory_mib: u32,
    pub cpus: u32,
    pub host_mtu: u32,
    /// Checksum and segmentation offloads on the virtio-net devices.
    pub offloads: bool,
    #[serde(with = "humantime_serde")]
    pub boot_timeout: Duration,
    /// Host directories mirrored read-only into every guest at the same path (the agent's).
    pub read_only_shares: Vec<PathBuf>,
    /// Wall time of fetching the kernel and building the image.
    #[serde(with = "humantime_serde")]
    pub prepare_time: Duration,
}

/// What to prepare a [`VmSetup`] from.
#[derive(Clone, Debug)]
pub struct VmOptions {
    pub kernel: KernelEntry,
    pub cache: PathBuf,
    /// The guest init binary (weir-node-init).
    pub init: PathBuf,
    /// Directories the guests see read-only at the same path (the agent's directory).
    pub read_only_shares: Vec<PathBuf>,
    pub offloads: bool,
    pub memory_mib: u32,
    pub boot_timeout: Duration,
}

impl VmOptions {
    pub fn new(kernel: KernelEntry, init: PathBuf, agent_dir: PathBuf) -> VmOptions {
        VmOptions {
            kernel,
            cache: Fetcher::default_cache_dir(),
            init,
            read_only_shares: vec![agent_dir],
            offloads: true,
            memory_mib: 512,
            // TCG boots take 3-10 s alone but stall for 20-60 s now and then on a busy host.
            boot_timeout: Duration::from_secs(180),
        }
    }

    /// Fetches the kernel and QEMU (cached), checks the kernel's config, builds the node image.
    pub fn prepare(&self) -> Result<VmSetup, BackendError> {
        let started = Instant::now();
        let kernel_err = |e: weir_kernels::KernelError| BackendError::Io {
            context: "fetching".into(),
            source: std::io::Error::other(e.to_string()),
        };
        if !self.kernel.is_vm() {
            return Err(BackendError::Io {
                context: format!("kernel {}", self.kernel.name),
                source: std::io::Error::other("the host kernel runs on the netns backend"),
            });
        }
        let fetcher = Fetcher::new(&self.cache);
        lab::progress(&format!(
            "kernel {}: fetching (cached after the first time)",
            self.kernel.name
        ));
        let kernel = fetcher.fetch(&self.kernel).map_err(kernel_err)?;
        let qemu = Qemu::fetch(&fetcher)?;
        let virtiofsd = tools::virtiofsd()?;
        let (accel, accel_reason) = tools::choose_accel();
        if !self.init.is_file() {
            return Err(BackendError::Io {
                context: format!("guest init {}", self.init.display()),
                source: std::io::Error::other(
                    "not built (cargo build -p weir-node-image --bin weir-node-init)",
                ),
            });
        }
        let image_path = self.cache.join("images").join(format!(
            "{}-{}.cpio",
            self.kernel.name,
            std::process::id()
        ));
        let image = weir_node_image::build_node_image(
            &kernel,
            &self.kernel.modules,
            &self.init,
            &image_path,
        )
        .map_err(|e| BackendError::Io {
            context: format!("building the node image for {}", self.kernel.name),
            source: std::io::Error::other(e.to_string()),
        })?;
        lab::progress(&format!(
            "kernel {} ({}): node image {} MiB, {} module file(s); {}",
            self.kernel.name,
            kernel.release,
            image.bytes >> 20,
            image.modules.files.len(),
            accel_reason
        ));
        Ok(VmSetup {
            qemu,
            virtiofsd,
            accel,
            accel_reason,
            kernel,
            image,
            memory_mib: self.memory_mib,
            cpus: 1,
            host_mtu: HOST_MTU,
            offloads: self.offloads,
            boot_timeout: self.boot_timeout,
            read_only_shares: self.read_only_shares.clone(),
            prepare_time: started.elapsed(),
        })
    }
}

impl Drop for VmSetup {
    fn drop(&mut self) {
        // The image is per process; the kernel and QEMU stay cached.
        let _ = std::fs::remove_file(&self.image.path);
    }
}

/// Builds VM labs on one kernel. Prepared on first use when made with [`QemuBackend::lazy`].
pub struct QemuBackend {
    options: Option<VmOptions>,
    setup: Mutex<Option<Arc<VmSetup>>>,
}

impl QemuBackend {
    pub fn new(setup: Arc<VmSetup>) -> QemuBackend {
        QemuBackend {
            options: None,
            setup: Mutex::new(Some(setup)),
        }
    }

    /// Prepares on the first `create`, so choosing the backend costs nothing until used.
    pub fn lazy(options: VmOptions) -> QemuBackend {
        QemuBackend {
            options: Some(options),
            setup: Mutex::new(None),
        }
    }

    /// The default for `--backend qemu`: [`DEFAULT_KERNEL`] (or `$WEIR_LAB_KERNEL`) from the
    /// workspace's kernels/matrix.toml; weir-node-init and weir-agent next to this executable.
    pub fn from_defaults() -> Result<QemuBackend, BackendError> {
        QemuBackend::from_defaults_with_agent(None)
    }

    /// [`QemuBackend::from_defaults`], sharing `agent`'s directory with the guests (instead of
    /// this executable's).
    pub fn from_defaults_with_agent(agent: Option<&Path>) -> Result<QemuBackend, BackendError> {
        let io = |context: &str, e: String| BackendError::Io {
            context: context.into(),
            source: std::io::Error::other(e),
        };
        let exe = std::env::current_exe().map_err(|e| io("locating weir-lab", e.to_string()))?;
        let dir = exe.parent().unwrap_or(Path::new(".")).to_owned();
        let matrix_path = matrix_file().ok_or_else(|| {
            io(
                "kernels/matrix.toml",
                "not found in the current directory or the workspace".into(),
            )
        })?;
        let matrix = Matrix::load(&matrix_path).map_err(|e| io("kernel matrix", e.to_string()))?;
        let name = std::env::var("WEIR_LAB_KERNEL").unwrap_or_else(|_| DEFAULT_KERNEL.into());
        let entry = matrix
            .get(&name)
            .map_err(|e| io("kernel matrix", e.to_string()))?
            .clone();
        let agent_dir = agent
            .and_then(Path::parent)
            .map_or_else(|| dir.clone(), Path::to_owned);
        Ok(QemuBackend::lazy(VmOptions::new(
            entry,
            dir.join("weir-node-init"),
            agent_dir,
        )))
    }

    pub fn setup(&self) -> Result<Arc<VmSetup>, BackendError> {
        let mut guard = self.setup.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = guard.as_ref() {
            return Ok(s.clone());
        }
        let options = self.options.as_ref().ok_or_else(|| BackendError::Io {
            context: "QEMU backend".into(),
            source: std::io::Error::other("neither prepared nor given options"),
        })?;
        let setup = Arc::new(options.prepare()?);
        *guard = Some(setup.clone());
        Ok(setup)
    }
}

/// Boots one VM on `setup`'s kernel and probes what it offers; returns the features and the
/// boot wall time (QEMU start to the init's first answer).
pub fn probe_kernel(
    setup: Arc<VmSetup>,
    work_dir: &Path,
) -> Result<(weir_node_image::proto::Features, Duration), BackendError> {
    let plan = Plan::new(1, 0, 0, 1500);
    let mut lab = lab::QemuLab::create(setup, &plan, work_dir)?;
    let boot = lab.boot_times.get(&1).copied().unwrap_or_default();
    let features = lab.probe(1);
    let _ = lab.teardown();
    Ok((features?, boot))
}

/// kernels/matrix.toml in the current directory or an ancestor, or next to the executable's
/// workspace.
pub fn matrix_file() -> Option<PathBuf> {
    let starts = [
        std::env::current_dir().ok(),
        std::env::current_exe().ok(),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR"))),
    ];
    starts.iter().flatten().find_map(|s| {
        s.ancestors()
            .map(|d| d.join("kernels").join("matrix.toml"))
            .find(|p| p.is_file())
    })
}

impl Backend for QemuBackend {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn create(&self, plan: &Plan, work_dir: &Path) -> Result<Box<dyn Lab>, BackendError> {
        if plan.networks > 1 {
            return Err(lab::unsupported(
                "multi-homed nodes (one NIC per VM); they run on the namespace lab",
            ));
        }
        let setup = self.setup()?;
        if plan.mtu > setup.host_mtu {
            return Err(BackendError::Io {
                context: "plan".into(),
                source: std::io::Error::other(format!(
                    "mtu {} exceeds the VM wire's {}",
                    plan.mtu, setup.host_mtu
                )),
            });
        }
        Ok(Box::new(lab::QemuLab::create(setup, plan, work_dir)?))
    }
}

/// Stands in for a backend that could not be set up, so the error surfaces where the lab is
/// built, as a failed scenario with the reason.
pub struct Unavailable(pub String);

impl Backend for Unavailable {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn create(&self, _plan: &Plan, _work_dir: &Path) -> Result<Box<dyn Lab>, BackendError> {
        Err(BackendError::Io {
            context: "QEMU backend".into(),
            source: std::io::Error::other(self.0.clone()),
        })
    }
}

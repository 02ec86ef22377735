//! The weir-lab command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use weir_kernels::{Fetcher, KernelEntry, Matrix};
use weir_lab::matrix::{self, MatrixOptions};
use weir_lab::runner::{self, RunOptions, ScenarioFile};
use weir_lab_backends::qemu::{self, Qemu, QemuBackend};
use weir_lab_backends::sandbox;
use weir_lab_bench::{self as bench, probe, BenchCommand, BenchEnv};
use weir_lab_core::backend::{Backend, BackendKind};
use weir_lab_core::events::Events;
use weir_lab_report::matrix as report;
use weir_lab_report::run::{JsonReporter, TerminalReporter};

/// Runs Weir scenarios on a throwaway cluster of network namespaces and reports what passed.
///
/// Needs root. Everything it creates (namespaces, bpffs, processes) is private to this process
/// and gone when it exits.
#[derive(Parser)]
#[command(name = "weir-lab", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// More logging on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
}

#[derive(Subcommand)]
enum Command {
    /// Run every scenario of a suite (all scenarios/*.toml whose `suite` lists it).
    Suite {
        /// Directory of scenario files [default: scenarios/ in the current directory or the
        /// workspace root].
        #[arg(long)]
        scenarios: Option<PathBuf>,
        /// Which suite to run.
        #[arg(long, default_value = "default")]
        suite: String,
        #[command(flatten)]
        common: Common,
    },
    /// Run the given scenario files.
    Run {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Benchmarks: Weir against kube-proxy's iptables rules, in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Measuring tools the benches run on lab hosts.
    #[command(subcommand, hide = true)]
    Probe(probe::ProbeCommand),
    /// Run a suite on every kernel of the matrix (VMs; the host kernel on namespaces), probe
    /// each kernel's features, measure throughput, and write report.json and report.html.
    Matrix(MatrixArgs),
    /// List or fetch the kernels of the matrix (downloads are cached and verified).
    Kernels {
        #[command(subcommand)]
        command: KernelsCommand,
        /// The matrix file [default: kernels/matrix.toml of the workspace].
        #[arg(long, global = true)]
        matrix: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum KernelsCommand {
    /// Every kernel of the matrix and where it comes from.
    List,
    /// Fetch kernels (default: the matrix's defaults) and QEMU into the cache.
    Fetch {
        names: Vec<String>,
        /// Look for newer packages even where the cache has the kernel.
        #[arg(long)]
        refresh: bool,
    },
}

#[derive(Args)]
struct MatrixArgs {
    /// Kernels to run (comma separated) [default: the matrix's default kernels].
    #[arg(long, value_delimiter = ',')]
    kernels: Vec<String>,
    /// The matrix file [default: kernels/matrix.toml of the workspace].
    #[arg(long)]
    matrix: Option<PathBuf>,
    /// Directory of scenario files [default: scenarios/ of the workspace].
    #[arg(long)]
    scenarios: Option<PathBuf>,
    /// Which suite to run on every kernel.
    #[arg(long, default_value = "default")]
    suite: String,
    /// Skip the qperf throughput measurements.
    #[arg(long)]
    no_throughput: bool,
    /// Pod MTUs for the throughput measurements (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "1440,8940")]
    mtu: Vec<u32>,
    /// Seconds per qperf test.
    #[arg(long, default_value_t = 5)]
    qperf_seconds: u32,
    /// Alternating plain-routing/Weir rounds per MTU (medians are reported).
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Leave checksum and segmentation offloads on for the VMs' NICs (off by default, so
    /// frames are of the MTU under test rather than 64 KB segments).
    #[arg(long)]
    offloads: bool,
    /// Turn segmentation offloads (TSO, GSO, GRO) off on the namespace lab's veths for the
    /// throughput measurements (on by default, as veths come).
    #[arg(long)]
    no_veth_offloads: bool,
    /// The weir-agent binary [default: weir-agent next to this executable].
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Where report.json, report.html and the per-kernel runs go [default:
    /// target/weir-lab/matrix in the workspace root].
    #[arg(long)]
    report_dir: Option<PathBuf>,
    /// Keep the run directories of passing scenarios too.
    #[arg(long)]
    keep: bool,
}

#[derive(Args)]
struct Common {
    /// The weir-agent binary [default: weir-agent next to this executable].
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Where report.json and the logs of failed runs go [default: target/weir-lab in the
    /// workspace root].
    #[arg(long)]
    report_dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = BackendKind::Netns)]
    backend: BackendKind,
    /// Keep the run directories (configs, logs) of passing scenarios too.
    #[arg(long)]
    keep: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .init();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("weir-lab: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<bool> {
    // Probes run inside a lab host, already in the lab's mount namespace.
    if let Command::Probe(probe) = &cli.command {
        probe::run(probe)?;
        return Ok(true);
    }
    // First, while the process still has a single thread: the kernel refuses a new mount
    // namespace to a multi-threaded process.
    sandbox::enter().context("setting up the lab's private mount namespace")?;

    let cwd = std::env::current_dir()?;
    let exe = std::env::current_exe().context("locating the weir-lab executable")?;
    let root = workspace_root(&cwd).or_else(|| workspace_root(&exe));
    let (files, common) = match cli.command {
        Command::Matrix(args) => return run_matrix(args, &cwd, &exe, root.as_deref()),
        Command::Kernels { command, matrix } => {
            return kernels(command, matrix, root.as_deref()).map(|()| true)
        }
        Command::Suite {
            scenarios,
            suite,
            common,
        } => {
            let dir = match scenarios {
                Some(d) => d,
                None => default_scenarios(&cwd, root.as_deref())?,
            };
            let files = runner::discover(&dir, &suite)
                .with_context(|| format!("reading scenarios from {}", dir.display()))?;
            if files.is_empty() {
                bail!(
                    "no scenario in {} belongs to suite {suite:?}",
                    dir.display()
                );
            }
            (files, common)
        }
        Command::Run { files, common } => {
            let files = files.iter().map(|p| ScenarioFile::load(p)).collect();
            (files, common)
        }
        Command::Bench(bench) => {
            let common = match &bench {
                BenchCommand::Connect(o) => &o.common,
                BenchCommand::SyncBaseline(o) => &o.common,
                BenchCommand::Churn(o) => &o.common,
                BenchCommand::Policy(o) => &o.common,
                BenchCommand::Prefilter(o) => &o.common,
            };
            let report_dir = match &common.report_dir {
                Some(d) => d.clone(),
                None => root
                    .as_deref()
                    .unwrap_or(&cwd)
                    .join("target")
                    .join("weir-lab"),
            };
            let env = BenchEnv {
                agent: match &common.agent {
                    Some(a) => std::path::absolute(a)?,
                    None => exe.with_file_name("weir-agent"),
                },
                exe,
                report_dir: std::path::absolute(report_dir)?,
                backend: common.backend,
            };
            bench::run(&bench, &env)?;
            return Ok(true);
        }
        Command::Probe(_) => unreachable!("probes return before the sandbox"),
    };

    let report_dir = match common.report_dir {
        Some(d) => d,
        None => root
            .as_deref()
            .unwrap_or(&cwd)
            .join("target")
            .join("weir-lab"),
    };
    let report_dir = std::path::absolute(&report_dir)?;
    let agent = match common.agent {
        Some(a) => std::path::absolute(a)?,
        None => exe.with_file_name("weir-agent"),
    };
    let opts = RunOptions {
        backend: common.backend,
        agent,
        report_dir: report_dir.clone(),
        keep: common.keep,
    };

    let report_path = report_dir.join("report.json");
    let mut events = Events::new()
        .with(TerminalReporter::stdout())
        .with(JsonReporter::new(report_path.clone()));
    let tally = match opts.backend {
        // The VMs see the agent through a share of its directory: give them this one.
        BackendKind::Qemu => {
            let backend: Box<dyn Backend> =
                match QemuBackend::from_defaults_with_agent(Some(&opts.agent)) {
                    Ok(b) => Box::new(b),
                    Err(e) => Box::new(qemu::Unavailable(e.to_string())),
                };
            runner::run_all_with(&files, &opts, backend.as_ref(), &mut events)
        }
        BackendKind::Netns => {
            let files = runner::without_missing_host_modules(files);
            runner::run_all(&files, &opts, &mut events)
        }
    };
    events
        .finish()
        .with_context(|| format!("writing {}", report_path.display()))?;
    println!("report: {}", report_path.display());
    Ok(tally.ok())
}

/// The nearest ancestor holding a Cargo.toml with a [workspace] table.
fn workspace_root(start: &Path) -> Option<PathBuf> {
    start.ancestors().find_map(|dir| {
        let text = std::fs::read_to_string(dir.join("Cargo.toml")).ok()?;
        text.lines()
            .any(|l| l.trim() == "[workspace]")
            .then(|| dir.to_owned())
    })
}

fn default_scenarios(cwd: &Path, root: Option<&Path>) -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = std::iter::once(cwd.join("scenarios"))
        .chain(root.map(|r| r.join("scenarios")))
        .collect();
    candidates
        .iter()
        .find(|d| d.is_dir())
        .cloned()
        .with_context(|| {
            format!("no scenarios directory (looked at {candidates:?}); pass --scenarios")
        })
}

fn load_matrix(path: Option<PathBuf>, root: Option<&Path>) -> Result<Matrix> {
    let path = match path {
        Some(p) => p,
        None => root
            .map(|r| r.join("kernels").join("matrix.toml"))
            .filter(|p| p.is_file())
            .or_else(qemu::matrix_file)
            .context("no kernels/matrix.toml found; pass --matrix")?,
    };
    Ok(Matrix::load(&path)?)
}

fn kernels(command: KernelsCommand, matrix: Option<PathBuf>, root: Option<&Path>) -> Result<()> {
    let matrix = load_matrix(matrix, root)?;
    match command {
        KernelsCommand::List => {
            for k in &matrix.kernels {
                println!(
                    "{:<14} {:<8} {}{}",
                    k.name,
                    k.version,
                    serde_json::to_string(&k.source)?,
                    if k.default {
                        ""
                    } else {
                        "  (not in the default run)"
                    }
                );
            }
        }
        KernelsCommand::Fetch { names, refresh } => {
            let mut fetcher = Fetcher::new(Fetcher::default_cache_dir());
            fetcher.refresh = refresh;
            let entries: Vec<&KernelEntry> = if names.is_empty() {
                matrix.defaults().collect()
            } else {
                names
                    .iter()
                    .map(|n| matrix.get(n))
                    .collect::<Result<_, _>>()?
            };
            let mut failed = 0;
            for entry in entries.into_iter().filter(|e| e.is_vm()) {
                let started = std::time::Instant::now();
                match fetcher.fetch(entry) {
                    Ok(k) => println!(
                        "{}: {} in {:.1} s: {}",
                        entry.name,
                        k.release,
                        started.elapsed().as_secs_f64(),
                        k.provenance
                    ),
                    Err(e) => {
                        failed += 1;
                        println!("{}: {e}", entry.name);
                    }
                }
            }
            let qemu = Qemu::fetch(&fetcher)?;
            println!("qemu: {}", qemu.binary.display());
            if failed > 0 {
                bail!("{failed} kernel(s) could not be fetched");
            }
        }
    }
    Ok(())
}

fn run_matrix(args: MatrixArgs, cwd: &Path, exe: &Path, root: Option<&Path>) -> Result<bool> {
    let matrix = load_matrix(args.matrix, root)?;
    let dir = match args.scenarios {
        Some(d) => d,
        None => default_scenarios(cwd, root)?,
    };
    let files = runner::discover(&dir, &args.suite)
        .with_context(|| format!("reading scenarios from {}", dir.display()))?;
    if files.is_empty() {
        bail!(
            "no scenario in {} belongs to suite {:?}",
            dir.display(),
            args.suite
        );
    }
    let report_dir = match args.report_dir {
        Some(d) => d,
        None => root
            .unwrap_or(cwd)
            .join("target")
            .join("weir-lab")
            .join("matrix"),
    };
    let report_dir = std::path::absolute(&report_dir)?;
    let agent = match args.agent {
        Some(a) => std::path::absolute(a)?,
        None => exe.with_file_name("weir-agent"),
    };
    if !agent.is_file() {
        bail!(
            "weir-agent not found at {} (build it or pass --agent)",
            agent.display()
        );
    }
    // The node images' init runs every probe and every VM: without it nothing below can work.
    let init = exe.with_file_name("weir-node-init");
    if !init.is_file() {
        bail!(
            "weir-node-init not found at {}: build it with `cargo build --release -p weir-node-image` \
             (the README's build command builds it with the agent and the lab)",
            init.display()
        );
    }
    let mut throughput = matrix::default_throughput(agent.clone());
    throughput.mtus = args.mtu;
    throughput.seconds = args.qperf_seconds;
    throughput.rounds = args.rounds;
    throughput.veth_offloads = !args.no_veth_offloads;
    let opts = MatrixOptions {
        kernels: args.kernels,
        report_dir: report_dir.clone(),
        agent,
        init,
        cache: Fetcher::default_cache_dir(),
        throughput: (!args.no_throughput).then_some(throughput),
        offloads: args.offloads,
        keep: args.keep,
    };
    // Read before this run overwrites it: the comparison is the nightly reader's first minute.
    let previous = std::fs::read_to_string(report_dir.join("report.json")).ok();
    let mut report =
        matrix::run(&matrix, &files, &args.suite, &opts).map_err(anyhow::Error::msg)?;
    if let Err(e) = report::compare_with_previous(&mut report, previous.as_deref()) {
        println!("[matrix] the previous report does not parse ({e}): not compared");
    }
    let (json, html) = report::write(&report, &report_dir)?;
    println!("{}", report::summary(&report));
    println!("report: {}\nreport: {}", json.display(), html.display());
    Ok(report.passed)
}

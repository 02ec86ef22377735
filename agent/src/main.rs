use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use weir_agent::config::{AgentConfig, ConfigArgs, LogFormat};
use weir_agent::{config, dataplane, dump, monitor, status};

/// Weir's node agent: eBPF service load balancing for a Kubernetes node.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format [default: text, or the config file's log_format].
    #[arg(long, global = true, value_enum, env = "WEIR_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the programs, then keep the maps in line with the desired state.
    ///
    /// Every setting comes from a flag, a WEIR_* environment variable or the --config file, in
    /// that order of precedence. Stopping the agent leaves the programs attached and forwarding.
    Run {
        #[command(flatten)]
        args: Box<ConfigArgs>,
    },
    /// Take Weir off this node: unpin its program links (detaching the programs), delete its
    /// clsact filters from every interface of this network namespace, and remove the pinned maps.
    /// Stop the agent first.
    Uninstall {
        /// The node's pin directory, as in its config (`pin_dir`).
        #[arg(long, env = "WEIR_PIN_DIR", default_value = config::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Print what the pinned maps of a node hold. The pin directory comes from the agent's
    /// configuration (--config, WEIR_CONFIG) or --pin-dir.
    Dump {
        #[arg(value_enum)]
        what: DumpWhat,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        args: Box<ConfigArgs>,
    },
    /// Stream NetworkPolicy's verdicts on flows as they happen: denied flows (and, asked, new
    /// allowed ones) with their tuple, direction and pod, from the data path's ring buffer.
    /// One monitor per node at a time; the data path writes events only while one runs.
    Monitor {
        /// Which verdicts.
        #[arg(long, value_enum, default_value = "denied")]
        verdict: weir_agent::monitor::VerdictFilter,
        /// Only flows with this address at either end or as their service frontend
        /// (repeatable).
        #[arg(long = "addr")]
        addresses: Vec<std::net::IpAddr>,
        /// Only flows with this port at either end or as their frontend's (repeatable).
        #[arg(long = "port")]
        ports: Vec<u16>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this long (e.g. 30s).
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
        /// Take over from a monitor already running on this node.
        #[arg(long)]
        take_over: bool,
        #[command(flatten)]
        args: Box<ConfigArgs>,
    },
    /// One screen on this node's Weir: kernel features and fallbacks, programs per interface,
    /// map fill levels, and the running agent's readiness, last sync and rejected objects. The
    /// pin directory and metrics address come from the agent's configuration.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        args: Box<ConfigArgs>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DumpWhat {
    Services,
    Backends,
    Conntrack,
    Counters,
    /// Per isolated pod of this node: what NetworkPolicy allows in each direction.
    Policy,
}

fn init_tracing(format: Option<LogFormat>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format.unwrap_or_default() {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { args } => {
            let config = AgentConfig::resolve(&args, cli.log_format)?;
            init_tracing(Some(config.log_format));
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?
                .block_on(weir_agent::run::run(config))
        }
        Command::Uninstall { pin_dir } => {
            init_tracing(cli.log_format);
            let interfaces: Vec<String> = nix::net::if_::if_nameindex()
                .context("listing interfaces")?
                .iter()
                .filter_map(|i| i.name().to_str().ok().map(str::to_owned))
                .collect();
            let report = dataplane::uninstall(&pin_dir, &interfaces)
                .with_context(|| format!("uninstalling from {}", pin_dir.display()))?;
            println!(
                "unpinned {} link(s), removed {} clsact filter(s), {}",
                report.links,
                report.filters,
                if report.removed_pin_dir {
                    format!("removed {}", pin_dir.display())
                } else {
                    format!("{} was not there", pin_dir.display())
                }
            );
            Ok(())
        }
        Command::Dump { what, json, args } => {
            init_tracing(cli.log_format);
            let config = AgentConfig::resolve_for_tools(&args, cli.log_format)?;
            if let DumpWhat::Policy = what {
                // Named by the running agent when it answers; numbered from the maps otherwise.
                let names = dump::policy_names(config.metrics_listen);
                let rows = dump::policy(&config.versioned_pin_dir(), names.as_ref())?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                } else {
                    println!("{}", dump::policy_table(&rows).trim_end());
                }
                return Ok(());
            }
            print_dump(what, &config.versioned_pin_dir(), json)
        }
        Command::Monitor {
            verdict,
            addresses,
            ports,
            json,
            count,
            duration,
            take_over,
            args,
        } => {
            init_tracing(cli.log_format);
            let config = AgentConfig::resolve_for_tools(&args, cli.log_format)?;
            let options = monitor::Options {
                filter: monitor::Filter {
                    verdict,
                    addresses,
                    ports,
                },
                json,
                count,
                duration,
                take_over,
                pods: dump::policy_names(config.metrics_listen)
                    .map(|names| names.endpoints)
                    .unwrap_or_default(),
            };
            let summary = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?
                .block_on(monitor::run(
                    &config.versioned_pin_dir(),
                    &options,
                    &mut std::io::stdout().lock(),
                ))?;
            eprintln!(
                "{} event(s) shown, {} filtered out, {} lost to a full ring buffer",
                summary.printed, summary.filtered, summary.lost
            );
            Ok(())
        }
        Command::Status { json, args } => {
            init_tracing(cli.log_format);
            let config = AgentConfig::resolve_for_tools(&args, cli.log_format)?;
            let status = status::gather(&config);
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status::render(&status));
            }
            Ok(())
        }
    }
}

fn print_dump(what: DumpWhat, dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let out = match what {
        DumpWhat::Services => {
            let rows = dump::services(dir)?;
            if json {
                serde_json::to_string_pretty(&rows)?
            } else {
                let cells: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.frontend.clone(),
                            r.proto.clone(),
                            r.service_id.to_string(),
                            r.flags.join(","),
                            r.backends.join(" "),
                            r.local_backends.join(" "),
                        ]
                    })
                    .collect();
                dump::table(
                    &["FRONTEND", "PROTO", "ID", "FLAGS", "BACKENDS", "LOCAL"],
                    &cells,
                )
            }
        }
        DumpWhat::Backends => {
            let rows = dump::backends(dir)?;
            if json {
                serde_json::to_string_pretty(&rows)?
            } else {
                let cells: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.id.to_string(),
                            r.addr.clone(),
                            r.proto.clone(),
                            if r.local {
                                "local".into()
                            } else {
                                r.node.clone().unwrap_or_default()
                            },
                        ]
                    })
                    .collect();
                dump::table(&["ID", "BACKEND", "PROTO", "NODE"], &cells)
            }
        }
        DumpWhat::Conntrack => {
            let rows = dump::conntrack(dir)?;
            if json {
                serde_json::to_string_pretty(&rows)?
            } else {
                let cells: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.kind.to_owned(),
                            r.proto.clone(),
                            r.src.clone(),
                            r.dst.clone(),
                            match r.client_port {
                                Some(port) => format!("{} client port {port}", r.nat),
                                None => r.nat.clone(),
                            },
                            r.state.to_owned(),
                            format!("{:.1}s", r.idle_s),
                            r.table.to_owned(),
                        ]
                    })
                    .collect();
                let mut out = dump::table(
                    &[
                        "KIND", "PROTO", "SRC", "DST", "NAT", "STATE", "IDLE", "TABLE",
                    ],
                    &cells,
                );
                // Below the entries, and only in the table: the JSON stays one row per entry.
                let moves = dump::moved_arrivals(dir)?;
                if !moves.is_empty() {
                    let cells: Vec<Vec<String>> = moves
                        .iter()
                        .map(|m| {
                            vec![
                                m.proto.clone(),
                                m.src.clone(),
                                m.dst.clone(),
                                m.ingress_node.clone(),
                                m.moved_port.to_string(),
                            ]
                        })
                        .collect();
                    out.push_str("\nclient ports moved for tunnel arrivals:\n");
                    out.push_str(&dump::table(
                        &["PROTO", "CLIENT", "BACKEND", "INGRESS NODE", "MOVED TO"],
                        &cells,
                    ));
                }
                out
            }
        }
        DumpWhat::Policy => unreachable!("dumped by the caller, which asks the agent for names"),
        DumpWhat::Counters => {
            let counters = dump::counters(dir)?;
            if json {
                serde_json::to_string_pretty(&counters)?
            } else {
                let cells: Vec<Vec<String>> = counters
                    .iter()
                    .map(|(k, v)| vec![(*k).to_owned(), v.to_string()])
                    .collect();
                dump::table(&["COUNTER", "PACKETS"], &cells)
            }
        }
    };
    println!("{}", out.trim_end());
    Ok(())
}

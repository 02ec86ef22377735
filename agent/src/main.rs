use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use weir_agent::{config, dump};

/// Weir's node agent: eBPF service load balancing for a Kubernetes node.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "WEIR_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the programs, then keep the maps in line with the desired state.
    Run {
        #[arg(long, env = "WEIR_CONFIG")]
        config: PathBuf,
    },
    /// Print what the pinned maps of a node hold.
    Dump {
        #[arg(value_enum)]
        what: DumpWhat,
        /// The node's pin directory, as in its config (`pin_dir`).
        #[arg(long)]
        pin_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DumpWhat {
    Services,
    Backends,
    Conntrack,
    Counters,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::Run { config } => {
            let config = config::AgentConfig::load(&config)?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?
                .block_on(weir_agent::run::run(config))
        }
        Command::Dump {
            what,
            pin_dir,
            json,
        } => print_dump(what, &config::versioned_pin_dir(&pin_dir), json),
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
                            r.nat.clone(),
                            r.state.to_owned(),
                            format!("{:.1}s", r.idle_s),
                        ]
                    })
                    .collect();
                dump::table(
                    &["KIND", "PROTO", "SRC", "DST", "NAT", "STATE", "IDLE"],
                    &cells,
                )
            }
        }
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

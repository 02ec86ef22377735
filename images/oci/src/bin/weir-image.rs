//! `weir-image`: build the agent's OCI image reproducibly, and push it to a registry.
//!
//!   weir-image build --agent target/release/weir-agent --out target/oci/weir-agent --tag 0.1.0
//!   weir-image push --layout target/oci/weir-agent --tag 0.1.0 registry.example/weir/agent:0.1.0

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use weir_oci::{build_layout, push, read_layout, ImageRequest, PushOptions};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build an OCI image layout directory from the agent binary and the libraries it loads.
    Build {
        /// The agent program.
        #[arg(long, default_value = "target/release/weir-agent")]
        agent: PathBuf,
        /// Output directory (created; replaced only if it already holds an OCI layout).
        #[arg(long, default_value = "target/oci/weir-agent")]
        out: PathBuf,
        #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
        tag: String,
        /// Seconds since 1970 for every timestamp in the image.
        #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 0)]
        source_date_epoch: u64,
        /// Where the libraries come from (another architecture's root, say).
        #[arg(long, default_value = "/")]
        sysroot: PathBuf,
        /// Deflate level of the layers (0-9); part of the digest.
        #[arg(long, default_value_t = weir_oci::layout::DEFAULT_COMPRESSION_LEVEL,
              value_parser = clap::value_parser!(u32).range(0..=9))]
        compression_level: u32,
    },
    /// Push one tagged image of a layout to a registry, as REFERENCE (host[:port]/name:tag).
    Push {
        #[arg(long, default_value = "target/oci/weir-agent")]
        layout: PathBuf,
        /// The tag inside the layout to push.
        #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
        tag: String,
        reference: String,
        /// Talk plain HTTP (a registry on loopback).
        #[arg(long)]
        plain_http: bool,
        #[arg(long, env = "WEIR_REGISTRY_USERNAME")]
        username: Option<String>,
        #[arg(long, env = "WEIR_REGISTRY_PASSWORD", hide_env_values = true)]
        password: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Build {
            agent,
            out,
            tag,
            source_date_epoch,
            sysroot,
            compression_level,
        } => {
            let request = ImageRequest {
                sysroot,
                epoch: source_date_epoch,
                compression_level,
                ..ImageRequest::new(agent, tag)
            };
            let built = build_layout(&request, &out)
                .with_context(|| format!("building the image from {}", request.agent.display()))?;
            // The one line scripts read: the manifest digest.
            println!("{}", built.manifest);
        }
        Command::Push {
            layout,
            tag,
            reference,
            plain_http,
            username,
            password,
        } => {
            let image = read_layout(&layout, &tag)
                .with_context(|| format!("reading {}:{tag}", layout.display()))?;
            let options = PushOptions {
                plain_http,
                username,
                password,
            };
            let digest = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?
                .block_on(push(&image, &reference, &options))
                .with_context(|| format!("pushing to {reference}"))?;
            println!("{digest}");
        }
    }
    Ok(())
}

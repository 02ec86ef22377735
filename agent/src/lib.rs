//! Weir's node agent: turns Kubernetes service state into eBPF map contents.
//!
//! Data flows one way: [`source`] objects -> [`intent`] -> [`compile`]d [`state`] -> [`state::Plan`]
//! -> map writes in [`dataplane`]. [`reconcile`] drives that pipeline, [`run`] the process.

pub mod admission;
pub mod compile;
pub mod config;
pub mod conntrack;
pub mod dataplane;
pub mod drift;
pub mod dump;
pub mod fd_budget;
pub mod health_check;
pub mod healthz;
pub mod http;
pub mod intent;
pub mod interfaces;
pub mod kubernetes;
pub mod maglev;
pub mod map_batch;
pub mod metrics;
pub mod monitor;
pub mod node;
pub mod pin_layout;
pub mod policy;
pub mod prefilter;
pub mod reconcile;
pub mod run;
pub mod sock_diag;
pub mod source;
pub mod state;
pub mod status;

//! weir-lab: runs Weir scenarios on a throwaway cluster and reports what passed.
//!
//! A scenario (TOML, see `weir_lab_core::scenario`) describes nodes, pods, Kubernetes services and checks. A
//! [`backend`] builds the hosts (today: network namespaces on the host kernel), the [`runner`]
//! starts real workloads and one weir-agent per node, runs the [`checks`] and emits `weir_lab_core::events`
//! that `weir_lab_report` into a terminal report and a JSON file.

pub mod agent;
pub mod backend;
pub mod bench;
pub mod checks;
pub mod frame_delay;
pub mod kube_proxy;
pub mod matrix;
pub mod probes;
pub mod reorder;
pub mod restart;
pub mod runner;
pub mod sandbox;
pub mod steps;
pub mod throughput;
pub mod workloads;

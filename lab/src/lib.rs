//! weir-lab: runs Weir scenarios on a throwaway cluster and reports what passed.
//!
//! A scenario (`weir_lab_core::scenario`) describes nodes, pods, Kubernetes services and
//! checks. A backend (`weir_lab_backends`) builds the hosts, the [`runner`] starts real
//! workloads and one weir-agent per node, runs the [`checks`] and emits `weir_lab_core::events`
//! that `weir_lab_report` turns into a terminal report and a JSON file.

pub mod checks;
pub mod matrix;
pub mod reachability;
pub mod restart;
pub mod runner;
pub mod steps;

//! weir-lab-cluster: what runs on a built lab's hosts for a scenario, through the
//! `weir_lab_core::backend::Lab` trait only: one weir-agent per node ([`agent`]: its
//! configuration, start, readiness and state dump) and the pods' workloads ([`workloads`]:
//! nginx and UDP echo servers on the ports the scenario's services name). The Kubernetes
//! objects the agents read are `weir_lab_core::k8s`'s.

pub mod agent;
pub mod workloads;

//! weir-lab-core: what a lab run is about, with no processes in it.
//!
//! A [`scenario`] (TOML) describes nodes, pods, Kubernetes services, checks and a timeline of
//! [`timeline`] steps; it compiles to an address plan ([`topology`]) and to the Kubernetes
//! objects the agents read ([`k8s`]). A run reports [`events`]; [`features`] says which Weir
//! features a check proves. [`backend`] holds the traits a lab backend implements (and names no
//! backend), and [`files`] how its files are replaced. Nothing here spawns a process or needs root, so all of it is tested by
//! `cargo test -p weir-lab-core`.

pub mod backend;
pub mod events;
pub mod features;
pub mod files;
pub mod k8s;
pub mod policy_objects;
pub mod scenario;
pub mod state_checks;
pub mod timeline;
pub mod topology;

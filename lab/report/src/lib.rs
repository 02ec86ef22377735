//! weir-lab-report: what the lab reports, as data, and its renderers.
//!
//! [`run`] turns a run's events into a terminal report and a JSON file; [`matrix`] is the
//! kernel matrix's report (kernels x scenarios, kernels x features, what changed since the last
//! run) with its terminal and JSON forms, [`html`] its self-contained page, and [`throughput`]
//! the measurements both carry. Producers (the runner, the matrix, the benches) build these
//! types; nothing here runs anything.

pub mod html;
pub mod matrix;
pub mod run;
pub mod throughput;

//! weir-lab-backends: the lab's backends (network namespaces on the host kernel, QEMU VMs),
//! the one factory that picks among them ([`instantiate`]), the fabric both build on, the
//! lab's private mount namespace, and [`sys`], the lab's one boundary with the operating
//! system's processes (every `unsafe` of the lab is there). Their common traits are
//! `weir_lab_core::backend`'s.

pub mod fabric;
pub mod frame_delay;
pub mod netns;
pub mod qemu;
pub mod sandbox;
pub mod sys;
pub mod wiring;

use weir_lab_core::backend::{Backend, BackendKind};

/// The backend of `kind`, or one that says why it cannot build labs here.
pub fn instantiate(kind: BackendKind) -> Box<dyn Backend> {
    match kind {
        BackendKind::Netns => Box::new(netns::NetnsBackend::new()),
        BackendKind::Qemu => match qemu::QemuBackend::from_defaults() {
            Ok(b) => Box::new(b),
            Err(e) => Box::new(qemu::Unavailable(e.to_string())),
        },
    }
}

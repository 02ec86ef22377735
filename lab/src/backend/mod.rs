//! The backends the lab knows and the one factory that picks among them; their common traits
//! are `weir_lab_core::backend`'s.

pub mod netns;
pub mod qemu;

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

//! weir-node-image: the node image of Weir's VM lab.
//!
//! - [`cpio`] writes the newc archive the kernel unpacks as its initramfs.
//! - [`image`] gathers what goes in: the guest init (`weir-node-init`, this crate's binary), the
//!   workload programs with their libraries, and the kernel's modules in load order.
//! - [`proto`] is what the lab and the init say over the VM's control port.
//!
//! The agent is not in the image: the lab shares its directory with the guest over virtiofs at
//! the same path, so a rebuilt agent needs no new image.

pub mod cpio;
pub mod guest;
pub mod image;
pub mod probe;
pub mod proto;
pub mod sys;

pub use image::{build_node_image, ImageBuilder, NodeImage};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Missing(String),
    #[error(transparent)]
    Kernel(#[from] weir_kernels::KernelError),
}

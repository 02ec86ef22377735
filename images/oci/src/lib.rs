//! Weir's container image without Nix: an OCI image layout built from the agent binary and the
//! shared libraries it loads, byte-for-byte reproducible, and a push to any OCI registry.
//!
//! Layering, bottom up: [`digest`] (content addresses), [`elf`] (what a program loads),
//! [`layer`] (one reproducible `tar.gz`), [`layout`] (config, manifest, index on disk) and
//! [`push`] (the distribution API).

pub mod digest;
pub mod elf;
pub mod layer;
pub mod layout;
pub mod push;

pub use digest::Digest;
pub use layout::{build_layout, read_layout, BuildError, BuiltImage, ImageRequest};
pub use push::{push, PushError, PushOptions};

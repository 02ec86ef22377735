//! Pushes one image of a layout to a registry with the OCI distribution API (oci-client): blobs
//! the registry lacks, then the manifest as the exact bytes of the layout, so the digest a
//! registry reports is the digest the build printed.

use std::path::PathBuf;
use std::sync::Once;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use tracing::{debug, info};

use crate::digest::Digest;
use crate::layout::LayoutImage;

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("invalid image reference {reference:?}: {source}")]
    Reference {
        reference: String,
        source: oci_client::ParseError,
    },
    #[error("reading blob {path}: {source}")]
    ReadBlob {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("blob {path} does not match its digest {expected}")]
    CorruptBlob { path: PathBuf, expected: Digest },
    #[error("registry {registry}: {action}: {source}")]
    Registry {
        registry: String,
        action: &'static str,
        source: OciDistributionError,
    },
    #[error("registry {registry} stored manifest {reported}, but the layout's is {expected}")]
    DigestMismatch {
        registry: String,
        expected: Digest,
        reported: String,
    },
}

/// How to talk to the registry.
#[derive(Clone, Debug, Default)]
pub struct PushOptions {
    /// Plain HTTP instead of HTTPS (a registry on loopback for tests or a lab).
    pub plain_http: bool,
    /// Basic credentials; anonymous when absent.
    pub username: Option<String>,
    pub password: Option<String>,
}

/// Pushes `image` as `reference` (`host[:port]/name:tag`) and returns the manifest digest the
/// registry reports for it.
pub async fn push(
    image: &LayoutImage,
    reference: &str,
    options: &PushOptions,
) -> Result<String, PushError> {
    install_crypto_provider();
    let parsed: Reference = reference.parse().map_err(|source| PushError::Reference {
        reference: reference.to_owned(),
        source,
    })?;
    let registry = parsed.resolve_registry().to_owned();
    let registry_error = |action: &'static str| {
        let registry = registry.clone();
        move |source| PushError::Registry {
            registry,
            action,
            source,
        }
    };
    let client = Client::new(ClientConfig {
        protocol: if options.plain_http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        ..Default::default()
    });
    let auth = match (&options.username, &options.password) {
        (Some(user), Some(password)) => RegistryAuth::Basic(user.clone(), password.clone()),
        _ => RegistryAuth::Anonymous,
    };
    client
        .auth(&parsed, &auth, RegistryOperation::Push)
        .await
        .map_err(registry_error("authenticating"))?;

    for blob in &image.blobs {
        let digest = blob.digest.to_string();
        if client
            .blob_exists(&parsed, &digest)
            .await
            .map_err(registry_error("checking a blob"))?
        {
            debug!(%digest, "blob already in the registry");
            continue;
        }
        let bytes = std::fs::read(&blob.path).map_err(|source| PushError::ReadBlob {
            path: blob.path.clone(),
            source,
        })?;
        // The layout could have been edited since the build: never push a blob under a digest
        // that is not its own.
        if Digest::of(&bytes) != blob.digest {
            return Err(PushError::CorruptBlob {
                path: blob.path.clone(),
                expected: blob.digest.clone(),
            });
        }
        info!(%digest, size = blob.size, "pushing blob");
        client
            .push_blob(&parsed, bytes, &digest)
            .await
            .map_err(registry_error("pushing a blob"))?;
    }

    client
        .push_manifest_raw(
            &parsed,
            image.manifest_bytes.clone(),
            http::HeaderValue::from_static(oci_client::manifest::OCI_IMAGE_MEDIA_TYPE),
        )
        .await
        .map_err(registry_error("pushing the manifest"))?;
    let reported = client
        .fetch_manifest_digest(&parsed, &auth)
        .await
        .map_err(registry_error("reading the manifest digest back"))?;
    if reported != image.manifest.to_string() {
        return Err(PushError::DigestMismatch {
            registry,
            expected: image.manifest.clone(),
            reported,
        });
    }
    info!(reference, digest = %reported, "pushed");
    Ok(reported)
}

/// The TLS stack is built without a default provider (ring is chosen here, not aws-lc).
fn install_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // An error only means another part of the program installed one first: fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

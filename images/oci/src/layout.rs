//! Builds the agent's image as an OCI image layout directory (`oci-layout`, `index.json`,
//! `blobs/sha256/…`): two layers (the runtime libraries, then the agent), a config and a
//! manifest, every JSON document written canonically (sorted keys, no spaces) so that the same
//! inputs give the same manifest digest on any run and any machine with the same inputs.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use oci_spec::image::{
    ConfigBuilder, DescriptorBuilder, HistoryBuilder, ImageConfiguration,
    ImageConfigurationBuilder, ImageIndexBuilder, ImageManifest, ImageManifestBuilder, MediaType,
    OciLayoutBuilder, PlatformBuilder, RootFsBuilder, ANNOTATION_REF_NAME,
};
use serde::Serialize;
use tracing::info;

use crate::digest::Digest;
use crate::elf::{self, ElfError, Machine};
use crate::layer::{self, LayerContents, LayerError, WrittenLayer};

/// Where the agent lives in the image.
pub const AGENT_PATH: &str = "/usr/bin/weir-agent";
/// The configuration file the image's default command reads (a ConfigMap in Kubernetes).
pub const CONFIG_PATH: &str = "/etc/weir/config.toml";
/// The agent's metrics and health port (`metrics_listen`).
pub const METRICS_PORT: u16 = 9464;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Elf(#[from] ElfError),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error("{path} exists and is not an OCI image layout: refusing to replace it")]
    NotALayout { path: PathBuf },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("building the OCI {what}: {source}")]
    Spec {
        what: &'static str,
        source: oci_spec::OciSpecError,
    },
    #[error("the program {path} is statically linked or has no interpreter; not supported")]
    NoInterpreter { path: PathBuf },
    #[error("{path}: {reason}")]
    BadLayout { path: PathBuf, reason: String },
    #[error("invalid tag {0:?}: use letters, digits, '_', '.', '-', at most 128, not starting with '.' or '-'")]
    BadTag(String),
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BuildError {
    let path = path.to_owned();
    move |source| BuildError::Io {
        action,
        path,
        source,
    }
}

fn spec_error(what: &'static str) -> impl FnOnce(oci_spec::OciSpecError) -> BuildError {
    move |source| BuildError::Spec { what, source }
}

/// What to build.
#[derive(Clone, Debug)]
pub struct ImageRequest {
    /// The agent program (normally `target/release/weir-agent`).
    pub agent: PathBuf,
    /// Where its libraries come from: `/` for this machine's.
    pub sysroot: PathBuf,
    /// The tag recorded in `index.json` (`org.opencontainers.image.ref.name`).
    pub tag: String,
    /// Seconds since 1970 for every timestamp in the image (`SOURCE_DATE_EPOCH`).
    pub epoch: u64,
    /// `org.opencontainers.image.version`.
    pub version: String,
    /// Deflate level of the layers, 0-9: a different level is a different (equally valid) image.
    pub compression_level: u32,
}

/// zlib's default: the usual trade of size against time.
pub const DEFAULT_COMPRESSION_LEVEL: u32 = 6;

impl ImageRequest {
    pub fn new(agent: impl Into<PathBuf>, tag: impl Into<String>) -> Self {
        ImageRequest {
            agent: agent.into(),
            sysroot: PathBuf::from("/"),
            tag: tag.into(),
            epoch: 0,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            compression_level: DEFAULT_COMPRESSION_LEVEL,
        }
    }
}

/// What was built, with the digests a registry or runtime will show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuiltImage {
    pub layout: PathBuf,
    pub tag: String,
    pub manifest: Digest,
    pub manifest_size: u64,
    pub config: Digest,
    pub layers: Vec<WrittenLayer>,
    /// Every file in the image, by image path.
    pub files: Vec<PathBuf>,
    pub architecture: &'static str,
}

/// Builds the image into `out` (created, or replaced if it already holds an OCI layout).
pub fn build_layout(request: &ImageRequest, out: &Path) -> Result<BuiltImage, BuildError> {
    check_tag(&request.tag)?;
    let closure = elf::runtime_closure(&request.agent, &request.sysroot)?;
    if closure.interpreter.is_none() {
        return Err(BuildError::NoInterpreter {
            path: request.agent.clone(),
        });
    }
    let machine = elf::read_dynamic_info(&request.agent)?.machine;

    prepare_layout_dir(out)?;
    let blobs = out.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(io_error("creating", &blobs))?;

    // Libraries change far less often than the agent: their layer is shared between versions.
    let mut libraries = LayerContents::default();
    for file in closure.files() {
        libraries.add_file(&file.image_path, &file.source)?;
    }
    let mut agent = LayerContents::default();
    agent.add_file(AGENT_PATH, &request.agent)?;
    let mut files: Vec<PathBuf> = closure.files().map(|f| f.image_path.clone()).collect();
    files.push(PathBuf::from(AGENT_PATH));
    files.sort();

    let layer_descriptions = [
        (
            &libraries,
            "runtime libraries: the agent's ELF interpreter and DT_NEEDED closure",
        ),
        (&agent, "weir-agent"),
    ];
    let mut layers = Vec::new();
    for (contents, _) in &layer_descriptions {
        layers.push(write_layer_blob(
            contents,
            request.epoch,
            request.compression_level,
            &blobs,
        )?);
    }

    let created =
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(request.epoch))
            .to_string();
    let config = image_config(request, machine, &created, &layers, &layer_descriptions)?;
    let config_bytes = canonical_json(&config)?;
    let config_digest = write_blob(&blobs, &config_bytes)?;

    let manifest = image_manifest(&config_digest, config_bytes.len() as u64, &layers)?;
    let manifest_bytes = canonical_json(&manifest)?;
    let manifest_digest = write_blob(&blobs, &manifest_bytes)?;

    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![DescriptorBuilder::default()
            .media_type(MediaType::ImageManifest)
            .digest(oci_digest(&manifest_digest)?)
            .size(manifest_bytes.len() as u64)
            .platform(
                PlatformBuilder::default()
                    .architecture(machine.oci_architecture())
                    .os("linux")
                    .build()
                    .map_err(spec_error("platform"))?,
            )
            .annotations(HashMap::from([(
                ANNOTATION_REF_NAME.to_owned(),
                request.tag.clone(),
            )]))
            .build()
            .map_err(spec_error("index descriptor"))?])
        .build()
        .map_err(spec_error("index"))?;
    write_file(&out.join("index.json"), &canonical_json(&index)?)?;
    let oci_layout = OciLayoutBuilder::default()
        .image_layout_version("1.0.0")
        .build()
        .map_err(spec_error("oci-layout"))?;
    write_file(&out.join("oci-layout"), &canonical_json(&oci_layout)?)?;

    let built = BuiltImage {
        layout: out.to_owned(),
        tag: request.tag.clone(),
        manifest: manifest_digest,
        manifest_size: manifest_bytes.len() as u64,
        config: config_digest,
        layers,
        files,
        architecture: machine.oci_architecture(),
    };
    info!(
        layout = %out.display(),
        tag = %built.tag,
        manifest = %built.manifest,
        files = built.files.len(),
        "image built"
    );
    Ok(built)
}

/// The OCI distribution spec's tag grammar: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
fn check_tag(tag: &str) -> Result<(), BuildError> {
    let mut bytes = tag.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if first_ok && rest_ok && tag.len() <= 128 {
        Ok(())
    } else {
        Err(BuildError::BadTag(tag.to_owned()))
    }
}

/// An output directory is replaced only when it is a layout already, so a typo cannot wipe
/// something else.
fn prepare_layout_dir(out: &Path) -> Result<(), BuildError> {
    match fs::read_dir(out) {
        Ok(mut entries) => {
            if entries.next().is_none() {
                return Ok(());
            }
            if !out.join("oci-layout").is_file() {
                return Err(BuildError::NotALayout {
                    path: out.to_owned(),
                });
            }
            fs::remove_dir_all(out).map_err(io_error("removing the old layout", out))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("reading", out)(e)),
    }
    fs::create_dir_all(out).map_err(io_error("creating", out))
}

fn write_layer_blob(
    contents: &LayerContents,
    epoch: u64,
    level: u32,
    blobs: &Path,
) -> Result<WrittenLayer, BuildError> {
    let partial = blobs.join(".layer.partial");
    let file = File::create(&partial).map_err(io_error("creating", &partial))?;
    let written = layer::write_layer(contents, epoch, level, BufWriter::new(file))?;
    let final_path = blobs.join(written.digest.hex());
    fs::rename(&partial, &final_path).map_err(io_error("renaming", &partial))?;
    Ok(written)
}

fn write_blob(blobs: &Path, bytes: &[u8]) -> Result<Digest, BuildError> {
    let digest = Digest::of(bytes);
    write_file(&blobs.join(digest.hex()), bytes)?;
    Ok(digest)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    fs::write(path, bytes).map_err(io_error("writing", path))
}

fn oci_digest(digest: &Digest) -> Result<oci_spec::image::Digest, BuildError> {
    digest.to_string().parse().map_err(spec_error("digest"))
}

fn image_config(
    request: &ImageRequest,
    machine: Machine,
    created: &str,
    layers: &[WrittenLayer],
    layer_descriptions: &[(&LayerContents, &str)],
) -> Result<ImageConfiguration, BuildError> {
    let labels = HashMap::from([
        (
            "org.opencontainers.image.title".to_owned(),
            "weir-agent".to_owned(),
        ),
        (
            "org.opencontainers.image.description".to_owned(),
            "Weir: eBPF service load balancing for Kubernetes nodes (kube-proxy replacement)"
                .to_owned(),
        ),
        (
            "org.opencontainers.image.version".to_owned(),
            request.version.clone(),
        ),
        (
            "org.opencontainers.image.created".to_owned(),
            created.to_owned(),
        ),
        (
            "org.opencontainers.image.licenses".to_owned(),
            "Apache-2.0 OR MIT".to_owned(),
        ),
    ]);
    let runtime = ConfigBuilder::default()
        // Numeric: the image has no /etc/passwd to look a name up in.
        .user("0:0")
        .entrypoint(vec![AGENT_PATH.to_owned()])
        .cmd(vec![
            "run".to_owned(),
            "--config".to_owned(),
            CONFIG_PATH.to_owned(),
        ])
        .exposed_ports(vec![format!("{METRICS_PORT}/tcp")])
        .labels(labels)
        .build()
        .map_err(spec_error("runtime config"))?;
    let history = layer_descriptions
        .iter()
        .map(|(_, description)| {
            HistoryBuilder::default()
                .created(created.to_owned())
                .created_by(format!("weir-image build: {description}"))
                .build()
                .map_err(spec_error("history"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    ImageConfigurationBuilder::default()
        .created(created.to_owned())
        .architecture(machine.oci_architecture())
        .os("linux")
        .config(runtime)
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(
                    layers
                        .iter()
                        .map(|l| l.diff_id.to_string())
                        .collect::<Vec<_>>(),
                )
                .build()
                .map_err(spec_error("rootfs"))?,
        )
        .history(history)
        .build()
        .map_err(spec_error("image config"))
}

fn image_manifest(
    config_digest: &Digest,
    config_size: u64,
    layers: &[WrittenLayer],
) -> Result<ImageManifest, BuildError> {
    let layer_descriptors = layers
        .iter()
        .map(|layer| {
            DescriptorBuilder::default()
                .media_type(MediaType::ImageLayerGzip)
                .digest(oci_digest(&layer.digest)?)
                .size(layer.size)
                .build()
                .map_err(spec_error("layer descriptor"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(
            DescriptorBuilder::default()
                .media_type(MediaType::ImageConfig)
                .digest(oci_digest(config_digest)?)
                .size(config_size)
                .build()
                .map_err(spec_error("config descriptor"))?,
        )
        .layers(layer_descriptors)
        .build()
        .map_err(spec_error("manifest"))
}

/// JSON with object keys sorted at every level and no insignificant whitespace. oci-spec keeps
/// labels and annotations in `HashMap`s, whose order changes from run to run.
pub fn canonical_json<T: Serialize>(value: &T) -> Result<Vec<u8>, BuildError> {
    fn sort(value: serde_json::Value) -> serde_json::Value {
        match value {
            serde_json::Value::Object(map) => {
                let mut entries: Vec<_> = map.into_iter().collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                serde_json::Value::Object(entries.into_iter().map(|(k, v)| (k, sort(v))).collect())
            }
            serde_json::Value::Array(items) => {
                serde_json::Value::Array(items.into_iter().map(sort).collect())
            }
            other => other,
        }
    }
    let serialize_error = |e: serde_json::Error| BuildError::BadLayout {
        path: PathBuf::from("(a JSON document of the image)"),
        reason: format!("serializing: {e}"),
    };
    let value = serde_json::to_value(value).map_err(serialize_error)?;
    serde_json::to_vec(&sort(value)).map_err(serialize_error)
}

/// Reads back a layout's manifest for `tag`: what a push sends.
pub fn read_layout(layout: &Path, tag: &str) -> Result<LayoutImage, BuildError> {
    let bad = |path: &Path, reason: String| BuildError::BadLayout {
        path: path.to_owned(),
        reason,
    };
    let index_path = layout.join("index.json");
    let index_bytes = fs::read(&index_path).map_err(io_error("reading", &index_path))?;
    let index: oci_spec::image::ImageIndex = serde_json::from_slice(&index_bytes)
        .map_err(|e| bad(&index_path, format!("not an OCI image index: {e}")))?;
    let descriptor = index
        .manifests()
        .iter()
        .find(|d| {
            d.annotations()
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_REF_NAME))
                .is_some_and(|name| name == tag)
        })
        .ok_or_else(|| bad(&index_path, format!("no manifest tagged {tag:?}")))?;
    let digest_of = |d: &oci_spec::image::Descriptor, path: &Path| -> Result<Digest, BuildError> {
        d.digest()
            .to_string()
            .parse()
            .map_err(|e: crate::digest::BadDigest| bad(path, e.to_string()))
    };
    let manifest_digest = digest_of(descriptor, &index_path)?;
    let blob = |digest: &Digest| layout.join("blobs/sha256").join(digest.hex());
    let manifest_path = blob(&manifest_digest);
    let manifest_bytes = fs::read(&manifest_path).map_err(io_error("reading", &manifest_path))?;
    if Digest::of(&manifest_bytes) != manifest_digest {
        return Err(bad(
            &manifest_path,
            "blob content does not match its digest".into(),
        ));
    }
    let manifest: ImageManifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| bad(&manifest_path, format!("not an OCI image manifest: {e}")))?;
    let blobs = std::iter::once(manifest.config())
        .chain(manifest.layers())
        .map(|d| {
            let digest = digest_of(d, &manifest_path)?;
            Ok(LayoutBlob {
                path: blob(&digest),
                digest,
                size: d.size(),
            })
        })
        .collect::<Result<Vec<_>, BuildError>>()?;
    Ok(LayoutImage {
        manifest: manifest_digest,
        manifest_bytes,
        blobs,
    })
}

/// One image of a layout, as a registry needs it: the blobs (config first), then the manifest.
#[derive(Clone, Debug)]
pub struct LayoutImage {
    pub manifest: Digest,
    pub manifest_bytes: Vec<u8>,
    pub blobs: Vec<LayoutBlob>,
}

#[derive(Clone, Debug)]
pub struct LayoutBlob {
    pub digest: Digest,
    pub size: u64,
    pub path: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let value = serde_json::json!({"b": 1, "a": {"d": [ {"z": 0, "y": 1} ], "c": 2}});
        let bytes = canonical_json(&value).unwrap();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            r#"{"a":{"c":2,"d":[{"y":1,"z":0}]},"b":1}"#
        );
    }

    #[test]
    fn tags_follow_the_distribution_grammar() {
        for good in ["latest", "0.1.0", "v1_2-rc.3", "_x"] {
            check_tag(good).unwrap();
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", &"x".repeat(129)] {
            assert!(check_tag(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reading_a_missing_tag_or_a_corrupt_manifest_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let built = build_layout(
            &ImageRequest {
                compression_level: 0,
                ..ImageRequest::new("/bin/true", "t")
            },
            dir.path(),
        )
        .unwrap();
        let error = read_layout(dir.path(), "other").unwrap_err();
        assert!(
            error.to_string().contains("no manifest tagged \"other\""),
            "{error}"
        );
        std::fs::write(
            dir.path().join("blobs/sha256").join(built.manifest.hex()),
            b"{}",
        )
        .unwrap();
        let error = read_layout(dir.path(), "t").unwrap_err();
        assert!(
            error.to_string().contains("does not match its digest"),
            "{error}"
        );
    }

    #[test]
    fn refuses_to_replace_a_directory_that_is_not_a_layout() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("precious"), b"keep me").unwrap();
        let error = prepare_layout_dir(dir.path()).unwrap_err();
        assert!(matches!(error, BuildError::NotALayout { .. }), "{error}");
        assert!(dir.path().join("precious").exists());
    }
}

//! Reading one state file within bounds, and diffing it document by document against what it
//! contributed last time. Pure with respect to the file source: it runs on worker threads, and
//! the file source decides afterwards which of the objects found take effect.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::Path;

use crate::admission::Rejection;

use super::event::{ObjectKey, SourceObject};
use super::yaml::{parse_document, split_documents, text_hash};

/// What one state file, and one object in it, may cost. Input over a limit is refused, and
/// what the file contributed before stays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileLimits {
    /// Bytes one state file may have; a longer file is not read at all.
    pub max_file_bytes: u64,
    /// YAML documents one file may hold, each item of a `kind: List` counting as one.
    pub max_objects_per_file: usize,
    /// Items one list of one object may hold: an EndpointSlice's endpoints and ports, one
    /// endpoint's addresses, a Service's ports and IPs, a Node's addresses.
    pub max_items_per_object: usize,
}

/// 64 MiB: the YAML of a cluster with tens of thousands of Services fits in one file.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 64 << 20;
pub const DEFAULT_MAX_OBJECTS_PER_FILE: usize = 100_000;
/// The EndpointSlice API's own maximum of endpoints per slice.
pub const DEFAULT_MAX_ITEMS_PER_OBJECT: usize = 1000;

impl Default for FileLimits {
    fn default() -> Self {
        FileLimits {
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            max_objects_per_file: DEFAULT_MAX_OBJECTS_PER_FILE,
            max_items_per_object: DEFAULT_MAX_ITEMS_PER_OBJECT,
        }
    }
}

/// Why a whole state file was refused. Each has a stable reason, the rejection metric's label.
#[derive(Debug, thiserror::Error)]
pub enum FileRefusal {
    #[error("not a regular file but a {0}: skipped, never read")]
    NotRegular(&'static str),
    #[error("{size} bytes or more, over the limit of {limit}")]
    TooLarge { size: u64, limit: u64 },
    #[error("more than {limit} objects")]
    TooManyObjects { limit: usize },
    #[error("not UTF-8")]
    NotUtf8,
    #[error("unreadable: {0}")]
    Unreadable(#[source] std::io::Error),
}

impl FileRefusal {
    pub fn reason(&self) -> &'static str {
        match self {
            FileRefusal::NotRegular(_) => "not_a_regular_file",
            FileRefusal::TooLarge { .. } => "too_large",
            FileRefusal::TooManyObjects { .. } => "too_many_objects",
            FileRefusal::NotUtf8 => "not_utf8",
            FileRefusal::Unreadable(_) => "unreadable",
        }
    }
}

/// The rejection a whole file's refusal shows as.
pub(super) fn file_rejection(file: &Path, reason: &'static str, detail: String) -> Rejection {
    Rejection {
        kind: "File",
        object: file.display().to_string(),
        reason,
        detail,
    }
}

/// A file's identity and version as stat(2) sees it through symlinks: a new inode (a ConfigMap
/// update, a file renamed into place) counts as a change even with the same time and size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Stamp {
    device: u64,
    inode: u64,
    modified_ns: i128,
    size: u64,
}

impl Stamp {
    pub(super) fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp {
            device: meta.dev(),
            inode: meta.ino(),
            modified_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            size: meta.len(),
        }
    }

    /// The stamp of `path` (through symlinks); None when it cannot be had.
    pub(super) fn read(path: &Path) -> Option<Stamp> {
        std::fs::metadata(path).ok().map(|m| Stamp::of(&m))
    }
}

/// One document of a file as last read: the hash of its text and the objects it holds.
#[derive(Clone, Debug)]
pub(super) struct DocumentState {
    hash: u64,
    keys: Vec<ObjectKey>,
    /// Every object of it applied: only then may the same text be skipped next time. A document
    /// with a refused object is parsed again, so its refusal is reported again.
    clean: bool,
}

/// What one file contributed last time it was read.
#[derive(Clone, Debug, Default)]
pub(super) struct FileState {
    pub(super) stamp: Option<Stamp>,
    documents: Vec<DocumentState>,
    /// Objects kept from an earlier version while a document of the file does not parse: that
    /// document may hold their new version, so they are neither applied nor deleted.
    held: Vec<ObjectKey>,
}

impl FileState {
    /// Every object the file defines (or holds).
    pub(super) fn keys(&self) -> BTreeSet<ObjectKey> {
        self.documents
            .iter()
            .flat_map(|d| d.keys.iter())
            .chain(&self.held)
            .cloned()
            .collect()
    }

    /// The hash of the first document defining `key`: within a file the first definition wins.
    fn first_definition(&self, key: &ObjectKey) -> Option<u64> {
        self.documents
            .iter()
            .find(|d| d.keys.contains(key))
            .map(|d| d.hash)
    }
}

/// What reading one file found.
pub(super) enum Outcome {
    /// The entry is gone from the directory.
    Gone,
    /// The whole file is refused; it keeps what it contributed.
    Refused {
        stamp: Option<Stamp>,
        refusal: FileRefusal,
    },
    Read(Loaded),
}

pub(super) struct Loaded {
    pub(super) state: FileState,
    /// Objects of documents that are new or changed (or `force`d), first definitions only: the
    /// file source applies those this file owns.
    pub(super) apply: Vec<SourceObject>,
    /// Documents and objects refused, while the rest of the file applies.
    pub(super) rejections: Vec<Rejection>,
}

/// Reads `file` against `old`, what it contributed before. Objects in `force` are handed over
/// even if their document did not change (they were another file's until now).
pub(super) fn load(
    file: &Path,
    old: Option<&FileState>,
    force: &BTreeSet<ObjectKey>,
    limits: &FileLimits,
) -> Outcome {
    let (stamp, bytes) = match read_bounded(file, limits.max_file_bytes) {
        Ok(read) => read,
        Err(ReadFailure::Gone) => return Outcome::Gone,
        Err(ReadFailure::Refused(stamp, refusal)) => return Outcome::Refused { stamp, refusal },
    };
    let refused = |refusal| Outcome::Refused {
        stamp: Some(stamp),
        refusal,
    };
    let Ok(text) = String::from_utf8(bytes) else {
        return refused(FileRefusal::NotUtf8);
    };
    let documents = split_documents(&text);
    if documents.len() > limits.max_objects_per_file {
        return refused(FileRefusal::TooManyObjects {
            limit: limits.max_objects_per_file,
        });
    }
    match diff(file, &documents, old, force, limits) {
        Ok(mut loaded) => {
            loaded.state.stamp = Some(stamp);
            Outcome::Read(loaded)
        }
        Err(refusal) => refused(refusal),
    }
}

enum ReadFailure {
    Gone,
    Refused(Option<Stamp>, FileRefusal),
}

/// The file's bytes, never more than `limit`, from a regular file only: a FIFO would block the
/// agent and a device (`/dev/zero`) never ends, so neither is ever opened.
fn read_bounded(file: &Path, limit: u64) -> Result<(Stamp, Vec<u8>), ReadFailure> {
    let unreadable = |e| ReadFailure::Refused(None, FileRefusal::Unreadable(e));
    // Through symlinks: a dangling one is an unreadable file (retried), not a removed one. The
    // link itself is only looked at when the target cannot be: one stat per file read.
    let meta = std::fs::metadata(file).map_err(|e| match std::fs::symlink_metadata(file) {
        Err(link) if link.kind() == std::io::ErrorKind::NotFound => ReadFailure::Gone,
        Err(link) => unreadable(link),
        Ok(_) => unreadable(e),
    })?;
    check_regular(&meta, limit)?;
    // Opened non-blocking: should a FIFO take the file's place after the check above, opening
    // it must not wait for a writer. The descriptor is checked again below.
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(file)
        .map_err(unreadable)?;
    let meta = opened.metadata().map_err(unreadable)?;
    check_regular(&meta, limit)?;
    let stamp = Stamp::of(&meta);
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // One byte over the limit tells a file that grew since the check.
    opened
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ReadFailure::Refused(Some(stamp), FileRefusal::Unreadable(e)))?;
    if bytes.len() as u64 > limit {
        return Err(ReadFailure::Refused(
            Some(stamp),
            FileRefusal::TooLarge {
                size: bytes.len() as u64,
                limit,
            },
        ));
    }
    Ok((stamp, bytes))
}

fn check_regular(meta: &std::fs::Metadata, limit: u64) -> Result<(), ReadFailure> {
    let stamp = Some(Stamp::of(meta));
    let kind = meta.file_type();
    let other = if kind.is_fifo() {
        "FIFO"
    } else if kind.is_char_device() {
        "character device"
    } else if kind.is_block_device() {
        "block device"
    } else if kind.is_socket() {
        "socket"
    } else if kind.is_dir() {
        "directory"
    } else if !kind.is_file() {
        "special file"
    } else if meta.len() > limit {
        return Err(ReadFailure::Refused(
            stamp,
            FileRefusal::TooLarge {
                size: meta.len(),
                limit,
            },
        ));
    } else {
        return Ok(());
    };
    Err(ReadFailure::Refused(stamp, FileRefusal::NotRegular(other)))
}

/// Parses the documents whose text changed; a document that does not parse, or an object over
/// its limits, is refused alone.
fn diff(
    file: &Path,
    documents: &[&str],
    old: Option<&FileState>,
    force: &BTreeSet<ObjectKey>,
    limits: &FileLimits,
) -> Result<Loaded, FileRefusal> {
    let unchanged = |hash: u64| {
        old.and_then(|o| o.documents.iter().find(|d| d.hash == hash && d.clean))
            .map(|d| d.keys.clone())
    };
    let mut state = FileState::default();
    let mut rejections = Vec::new();
    // Parsed objects by the index (in `state.documents`) of their document.
    let mut parsed: BTreeMap<usize, Vec<SourceObject>> = BTreeMap::new();
    // Where each document's text is, to parse an unchanged one that must be handed over.
    let mut texts: Vec<&str> = Vec::new();
    let mut objects = 0;
    let mut some_document_failed = false;
    for (index, text) in documents.iter().enumerate() {
        let hash = text_hash(text);
        if state.documents.iter().any(|d| d.hash == hash) {
            continue; // The same text twice: the same objects.
        }
        let (keys, clean) = match unchanged(hash) {
            Some(keys) => (keys, true),
            None => match parse_document(text) {
                Ok(found) => {
                    let (keys, clean) =
                        check_objects(file, &found, limits.max_items_per_object, &mut rejections);
                    parsed.insert(state.documents.len(), found);
                    (keys, clean)
                }
                Err(message) => {
                    some_document_failed = true;
                    rejections.push(file_rejection(
                        file,
                        "invalid_document",
                        format!("document {index}: {message}"),
                    ));
                    continue;
                }
            },
        };
        objects += keys.len().max(1);
        if objects > limits.max_objects_per_file {
            return Err(FileRefusal::TooManyObjects {
                limit: limits.max_objects_per_file,
            });
        }
        texts.push(text);
        state.documents.push(DocumentState { hash, keys, clean });
    }
    if some_document_failed {
        let defined: BTreeSet<&ObjectKey> =
            state.documents.iter().flat_map(|d| d.keys.iter()).collect();
        state.held = old
            .map(FileState::keys)
            .unwrap_or_default()
            .into_iter()
            .filter(|k| !defined.contains(k))
            .collect();
    }
    let apply = first_definitions(&state, old, force, parsed, &texts, &rejections);
    Ok(Loaded {
        state,
        apply,
        rejections,
    })
}

/// Keys of `found`, each object checked against the per-object limit; returns whether all
/// passed. A refused object keeps its key (the file still defines it) but is never applied.
fn check_objects(
    file: &Path,
    found: &[SourceObject],
    max_items: usize,
    rejections: &mut Vec<Rejection>,
) -> (Vec<ObjectKey>, bool) {
    let mut clean = true;
    for object in found {
        if let Some((field, items)) = oversized(object, max_items) {
            clean = false;
            let key = object.key();
            rejections.push(Rejection {
                kind: key.as_ref().map_or("Object", ObjectKey::kind),
                object: key
                    .as_ref()
                    .map_or_else(|| "<unnamed>".into(), ObjectKey::object),
                reason: "too_many_items",
                detail: format!(
                    "{}: {field} has {items} items, more than {max_items}",
                    file.display()
                ),
            });
        }
    }
    (found.iter().filter_map(SourceObject::key).collect(), clean)
}

/// The objects to hand over: for each object, its first definition in the file, when that is
/// new, changed, newly first, or forced. Later definitions of the same object are ignored.
fn first_definitions(
    state: &FileState,
    old: Option<&FileState>,
    force: &BTreeSet<ObjectKey>,
    mut parsed: BTreeMap<usize, Vec<SourceObject>>,
    texts: &[&str],
    rejections: &[Rejection],
) -> Vec<SourceObject> {
    let refused: BTreeSet<(&str, &str)> = rejections
        .iter()
        .map(|r| (r.kind, r.object.as_str()))
        .collect();
    let mut seen = BTreeSet::new();
    let mut apply = Vec::new();
    for (index, document) in state.documents.iter().enumerate() {
        let wanted: Vec<&ObjectKey> = document
            .keys
            .iter()
            .filter(|k| !seen.contains(*k))
            .filter(|k| {
                parsed.contains_key(&index)
                    || force.contains(*k)
                    || old.and_then(|o| o.first_definition(k)) != Some(document.hash)
            })
            .collect();
        let parsed_now = parsed.contains_key(&index);
        if !wanted.is_empty() || parsed_now {
            // An unchanged document parsed again: it parsed before, so it parses now.
            let objects = parsed
                .remove(&index)
                .or_else(|| parse_document(texts[index]).ok())
                .unwrap_or_default();
            for object in objects {
                match object.key() {
                    Some(key) if wanted.contains(&&key) => {
                        if !refused.contains(&(key.kind(), key.object().as_str())) {
                            apply.push(object);
                        }
                    }
                    Some(_) => {}
                    // Unnamed: the intent store rejects it with a clear error.
                    None => apply.push(object),
                }
            }
        }
        seen.extend(document.keys.iter().cloned());
    }
    apply
}

/// The first list of `object` longer than `max`, with its length.
fn oversized(object: &SourceObject, max: usize) -> Option<(&'static str, usize)> {
    let lists: Vec<(&'static str, usize)> = match object {
        SourceObject::Service(service) => {
            let spec = service.spec.as_ref();
            let ingress = service
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref());
            vec![
                (
                    "spec.ports",
                    spec.and_then(|s| s.ports.as_ref()).map_or(0, Vec::len),
                ),
                (
                    "spec.clusterIPs",
                    spec.and_then(|s| s.cluster_ips.as_ref())
                        .map_or(0, Vec::len),
                ),
                (
                    "spec.externalIPs",
                    spec.and_then(|s| s.external_ips.as_ref())
                        .map_or(0, Vec::len),
                ),
                ("status.loadBalancer.ingress", ingress.map_or(0, Vec::len)),
            ]
        }
        SourceObject::EndpointSlice(slice) => {
            let most_addresses = slice
                .endpoints
                .iter()
                .map(|e| e.addresses.len())
                .max()
                .unwrap_or(0);
            vec![
                ("endpoints", slice.endpoints.len()),
                ("ports", slice.ports.as_ref().map_or(0, Vec::len)),
                ("endpoints[].addresses", most_addresses),
            ]
        }
        SourceObject::Node(node) => vec![(
            "status.addresses",
            node.status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .map_or(0, Vec::len),
        )],
        SourceObject::NetworkPolicy(policy) => {
            let spec = policy.spec.as_ref();
            vec![
                (
                    "spec.ingress",
                    spec.and_then(|s| s.ingress.as_ref()).map_or(0, Vec::len),
                ),
                (
                    "spec.egress",
                    spec.and_then(|s| s.egress.as_ref()).map_or(0, Vec::len),
                ),
            ]
        }
        // A deny-list has its own, larger cap (`prefilter::MAX_PREFIXES_PER_OBJECT`), checked
        // where it validates: thousands of prefixes are its ordinary size.
        SourceObject::Pod(_) | SourceObject::Namespace(_) | SourceObject::PrefilterDenyList(_) => {
            Vec::new()
        }
    };
    lists.into_iter().find(|(_, len)| *len > max)
}

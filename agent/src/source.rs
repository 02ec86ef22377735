//! Desired state from files of Kubernetes YAML, as `kubectl get -o yaml` prints it.
//!
//! Bad input never costs good state: a file that does not parse keeps the whole previous intent,
//! and an object that does not validate keeps its own previous version (or stays absent), while
//! every other object applies.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;

use crate::intent::{
    self, ClusterIntent, EndpointSliceIntent, IntentError, NodeIntent, ObjectRef, ServiceIntent,
};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: document {index}: {message}")]
    Document {
        path: PathBuf,
        index: usize,
        message: String,
    },
}

/// A problem with one object; the rest of the state still applies.
#[derive(Debug, thiserror::Error)]
#[error("{kind} {object}: {error}")]
pub struct ObjectError {
    pub kind: &'static str,
    pub object: String,
    pub error: IntentError,
}

/// The Kubernetes objects found in the source, before validation.
#[derive(Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub nodes: Vec<k8s_openapi::api::core::v1::Node>,
    /// This node's pods only (the Kubernetes source watches `spec.nodeName=<node>`).
    pub pods: Vec<k8s_openapi::api::core::v1::Pod>,
    pub namespaces: Vec<k8s_openapi::api::core::v1::Namespace>,
    pub network_policies: Vec<k8s_openapi::api::networking::v1::NetworkPolicy>,
}

/// Reads a file, or every `.yaml`/`.yml` file of a directory in name order.
pub fn read_objects(path: &Path) -> Result<Objects, SourceError> {
    let read_err = |source| SourceError::Read {
        path: path.to_owned(),
        source,
    };
    let mut files = Vec::new();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).map_err(read_err)? {
            let file = entry.map_err(read_err)?.path();
            if matches!(
                file.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                files.push(file);
            }
        }
        files.sort();
    } else {
        files.push(path.to_owned());
    }
    let mut objects = Objects::default();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|source| SourceError::Read {
            path: file.clone(),
            source,
        })?;
        parse_documents(&file, &text, &mut objects)?;
    }
    Ok(objects)
}

/// Parses multi-document YAML; `kind: List` documents contribute their items.
pub fn parse_documents(path: &Path, text: &str, objects: &mut Objects) -> Result<(), SourceError> {
    for (index, document) in split_documents(text).into_iter().enumerate() {
        let parsed = parse_document(document).map_err(|message| SourceError::Document {
            path: path.to_owned(),
            index,
            message,
        })?;
        for object in parsed {
            match object {
                SourceObject::Service(s) => objects.services.push(*s),
                SourceObject::EndpointSlice(s) => objects.slices.push(*s),
                SourceObject::Node(n) => objects.nodes.push(*n),
            }
        }
    }
    Ok(())
}

fn collect(value: serde_yaml::Value, out: &mut Vec<SourceObject>) -> Result<(), String> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .ok_or("object without kind")?
        .to_owned();
    match kind.as_str() {
        "List" => {
            let items = match value {
                serde_yaml::Value::Mapping(mut m) => m.remove("items"),
                _ => None,
            };
            if let Some(serde_yaml::Value::Sequence(items)) = items {
                for item in items {
                    collect(item, out)?;
                }
            }
        }
        "Service" => out.push(SourceObject::Service(Box::new(
            serde_yaml::from_value(value).map_err(|e| format!("Service: {e}"))?,
        ))),
        "EndpointSlice" => out.push(SourceObject::EndpointSlice(Box::new(
            serde_yaml::from_value(value).map_err(|e| format!("EndpointSlice: {e}"))?,
        ))),
        "Node" => out.push(SourceObject::Node(Box::new(
            serde_yaml::from_value(value).map_err(|e| format!("Node: {e}"))?,
        ))),
        // Other kinds (Pods, ...) may share the file; they are not service state.
        _ => {}
    }
    Ok(())
}

/// Turns objects into intent, falling back per object to the last version that validated.
#[derive(Debug, Default)]
pub struct IntentBuilder {
    last_good: ClusterIntent,
}

impl IntentBuilder {
    /// The intent the last build produced.
    pub fn last_good(&self) -> &ClusterIntent {
        &self.last_good
    }

    pub fn build(&mut self, objects: &Objects) -> (ClusterIntent, Vec<ObjectError>) {
        let mut intent = ClusterIntent::default();
        let mut errors = Vec::new();
        for service in &objects.services {
            match ServiceIntent::try_from(service) {
                Ok(s) => {
                    intent.services.insert(s.id.clone(), s);
                }
                Err(error) => {
                    let id = intent::service_ref(service);
                    keep_last_good(&self.last_good.services, &mut intent.services, id.as_ref());
                    errors.push(object_error("Service", id, error));
                }
            }
        }
        for slice in &objects.slices {
            match EndpointSliceIntent::try_from(slice) {
                Ok(s) => {
                    intent.slices.insert(s.id.clone(), s);
                }
                Err(error) => {
                    let id = intent::slice_ref(slice);
                    keep_last_good(&self.last_good.slices, &mut intent.slices, id.as_ref());
                    errors.push(object_error("EndpointSlice", id, error));
                }
            }
        }
        for node in &objects.nodes {
            match NodeIntent::try_from(node) {
                Ok(n) => {
                    intent.nodes.insert(n.name.clone(), n);
                }
                Err(error) => {
                    let name = intent::node_name(node);
                    if let Some(previous) = name.as_ref().and_then(|n| self.last_good.nodes.get(n))
                    {
                        intent.nodes.insert(previous.name.clone(), previous.clone());
                    }
                    errors.push(ObjectError {
                        kind: "Node",
                        object: name.unwrap_or_else(|| "<unnamed>".to_owned()),
                        error,
                    });
                }
            }
        }
        self.last_good = intent.clone();
        (intent, errors)
    }
}

fn keep_last_good<T: Clone>(
    last_good: &std::collections::BTreeMap<ObjectRef, T>,
    into: &mut std::collections::BTreeMap<ObjectRef, T>,
    id: Option<&ObjectRef>,
) {
    if let Some((id, previous)) = id.and_then(|id| last_good.get_key_value(id)) {
        into.insert(id.clone(), previous.clone());
    }
}

fn object_error(kind: &'static str, id: Option<ObjectRef>, error: IntentError) -> ObjectError {
    ObjectError {
        kind,
        object: id.map_or_else(|| "<unnamed>".to_owned(), |id| id.to_string()),
        error,
    }
}

/// Which object an event is about.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKey {
    Service(ObjectRef),
    EndpointSlice(ObjectRef),
    Node(String),
}

impl ObjectKey {
    pub fn kind(&self) -> &'static str {
        match self {
            ObjectKey::Service(_) => "Service",
            ObjectKey::EndpointSlice(_) => "EndpointSlice",
            ObjectKey::Node(_) => "Node",
        }
    }
}

/// A source object of a kind the data plane uses.
#[derive(Clone, Debug)]
pub enum SourceObject {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Node(Box<Node>),
}

impl SourceObject {
    /// Its identity, when it has a name.
    pub fn key(&self) -> Option<ObjectKey> {
        match self {
            SourceObject::Service(s) => intent::service_ref(s).map(ObjectKey::Service),
            SourceObject::EndpointSlice(s) => intent::slice_ref(s).map(ObjectKey::EndpointSlice),
            SourceObject::Node(n) => intent::node_name(n).map(ObjectKey::Node),
        }
    }
}

/// The kinds a complete list ([`ObjectEvent::Replace`]) can cover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn covers(self, key: &ObjectKey) -> bool {
        matches!(
            (self, key),
            (Kind::Service, ObjectKey::Service(_))
                | (Kind::EndpointSlice, ObjectKey::EndpointSlice(_))
                | (Kind::Node, ObjectKey::Node(_))
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }
}

/// One change from a source: what both the file source and the Kubernetes watchers produce.
#[derive(Clone, Debug)]
pub enum ObjectEvent {
    Apply(SourceObject),
    Delete(ObjectKey),
    /// A complete list of one kind (a start or a relist): every object of that kind not in it is
    /// gone. Objects that did not change cost a comparison, not a write.
    Replace(Kind, Vec<SourceObject>),
}

impl Objects {
    /// A snapshot as events: a complete list of every kind.
    pub fn to_events(&self) -> Vec<ObjectEvent> {
        vec![
            ObjectEvent::Replace(
                Kind::Node,
                self.nodes
                    .iter()
                    .map(|n| SourceObject::Node(Box::new(n.clone())))
                    .collect(),
            ),
            ObjectEvent::Replace(
                Kind::Service,
                self.services
                    .iter()
                    .map(|s| SourceObject::Service(Box::new(s.clone())))
                    .collect(),
            ),
            ObjectEvent::Replace(
                Kind::EndpointSlice,
                self.slices
                    .iter()
                    .map(|s| SourceObject::EndpointSlice(Box::new(s.clone())))
                    .collect(),
            ),
        ]
    }
}

/// The validated intent, kept up to date object by object, and which services a change touched.
///
/// Each object is converted (validated) when it arrives and only its intent is kept, never the
/// Kubernetes object itself; an object that fails validation keeps its last good version (or
/// stays absent) and its error is remembered until the object is fixed or deleted. A change
/// whose intent equals what is there already touches nothing.
#[derive(Debug, Default)]
pub struct IntentStore {
    intent: ClusterIntent,
    /// Slices by the service they belong to, so a service's slices are found without a scan.
    slices_by_service: BTreeMap<ObjectRef, BTreeSet<ObjectRef>>,
    /// Current validation errors, by object (unnamed objects under their kind alone).
    errors: BTreeMap<(&'static str, String), ObjectError>,
    dirty: BTreeSet<ObjectRef>,
    all_dirty: bool,
}

impl IntentStore {
    pub fn intent(&self) -> &ClusterIntent {
        &self.intent
    }

    /// The slices of a service, in name order.
    pub fn slices_of(&self, service: &ObjectRef) -> impl Iterator<Item = &EndpointSliceIntent> {
        self.slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|id| self.intent.slices.get(id))
    }

    /// Slices whose service does not exist.
    pub fn orphan_slices_of(&self, service: &ObjectRef) -> Vec<&ObjectRef> {
        if self.intent.services.contains_key(service) {
            return Vec::new();
        }
        self.slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .collect()
    }

    pub fn errors(&self) -> impl Iterator<Item = &ObjectError> {
        self.errors.values()
    }

    /// Marks every service changed (after the maps were re-read).
    pub fn mark_all_dirty(&mut self) {
        self.all_dirty = true;
    }

    /// The services changed since the last call: every known one (with a slice or not) when a
    /// node changed or [`IntentStore::mark_all_dirty`] was called.
    pub fn take_dirty(&mut self) -> BTreeSet<ObjectRef> {
        let mut dirty = std::mem::take(&mut self.dirty);
        if std::mem::take(&mut self.all_dirty) {
            dirty.extend(self.intent.services.keys().cloned());
            dirty.extend(self.slices_by_service.keys().cloned());
        }
        dirty
    }

    pub fn handle(&mut self, event: &ObjectEvent) {
        match event {
            ObjectEvent::Apply(object) => self.apply(object),
            ObjectEvent::Delete(key) => self.delete(key),
            ObjectEvent::Replace(kind, objects) => self.replace(*kind, objects),
        }
    }

    fn replace(&mut self, kind: Kind, objects: &[SourceObject]) {
        self.errors.retain(|(k, _), _| *k != kind.name());
        let mut listed = BTreeSet::new();
        for object in objects {
            listed.extend(object.key());
            self.apply(object);
        }
        let present: Vec<ObjectKey> = match kind {
            Kind::Service => self
                .intent
                .services
                .keys()
                .cloned()
                .map(ObjectKey::Service)
                .collect(),
            Kind::EndpointSlice => self
                .intent
                .slices
                .keys()
                .cloned()
                .map(ObjectKey::EndpointSlice)
                .collect(),
            Kind::Node => self
                .intent
                .nodes
                .keys()
                .cloned()
                .map(ObjectKey::Node)
                .collect(),
        };
        for key in present {
            if kind.covers(&key) && !listed.contains(&key) {
                self.delete(&key);
            }
        }
    }

    pub fn apply(&mut self, object: &SourceObject) {
        match object {
            SourceObject::Service(service) => {
                let id = intent::service_ref(service);
                match ServiceIntent::try_from(service.as_ref()) {
                    Ok(s) => {
                        self.errors.remove(&("Service", s.id.to_string()));
                        if self.intent.services.get(&s.id) != Some(&s) {
                            self.dirty.insert(s.id.clone());
                            self.intent.services.insert(s.id.clone(), s);
                        }
                    }
                    Err(error) => self.record("Service", id.map(|i| i.to_string()), error),
                }
            }
            SourceObject::EndpointSlice(slice) => {
                let id = intent::slice_ref(slice);
                match EndpointSliceIntent::try_from(slice.as_ref()) {
                    Ok(s) => {
                        self.errors.remove(&("EndpointSlice", s.id.to_string()));
                        if self.intent.slices.get(&s.id) != Some(&s) {
                            if let Some(old) = self.intent.slices.get(&s.id) {
                                let old_service = old.service.clone();
                                self.unindex(&old_service, &s.id);
                            }
                            self.dirty.insert(s.service.clone());
                            self.slices_by_service
                                .entry(s.service.clone())
                                .or_default()
                                .insert(s.id.clone());
                            self.intent.slices.insert(s.id.clone(), s);
                        }
                    }
                    Err(error) => self.record("EndpointSlice", id.map(|i| i.to_string()), error),
                }
            }
            SourceObject::Node(node) => match NodeIntent::try_from(node.as_ref()) {
                Ok(n) => {
                    self.errors.remove(&("Node", n.name.clone()));
                    if self.intent.nodes.get(&n.name) != Some(&n) {
                        // Backends name their node's tunnel address: any service may change.
                        self.all_dirty = true;
                        self.intent.nodes.insert(n.name.clone(), n);
                    }
                }
                Err(error) => self.record("Node", intent::node_name(node), error),
            },
        }
    }

    pub fn delete(&mut self, key: &ObjectKey) {
        match key {
            ObjectKey::Service(id) => {
                self.errors.remove(&("Service", id.to_string()));
                if self.intent.services.remove(id).is_some() {
                    self.dirty.insert(id.clone());
                }
            }
            ObjectKey::EndpointSlice(id) => {
                self.errors.remove(&("EndpointSlice", id.to_string()));
                if let Some(old) = self.intent.slices.remove(id) {
                    self.unindex(&old.service, id);
                    self.dirty.insert(old.service);
                }
            }
            ObjectKey::Node(name) => {
                self.errors.remove(&("Node", name.clone()));
                if self.intent.nodes.remove(name).is_some() {
                    self.all_dirty = true;
                }
            }
        }
    }

    fn unindex(&mut self, service: &ObjectRef, slice: &ObjectRef) {
        if let Some(set) = self.slices_by_service.get_mut(service) {
            set.remove(slice);
            if set.is_empty() {
                self.slices_by_service.remove(service);
            }
        }
        self.dirty.insert(service.clone());
    }

    fn record(&mut self, kind: &'static str, object: Option<String>, error: IntentError) {
        let object = object.unwrap_or_else(|| "<unnamed>".to_owned());
        self.errors.insert(
            (kind, object.clone()),
            ObjectError {
                kind,
                object,
                error,
            },
        );
    }
}

/// Splits multi-document YAML at its `---` lines. A `---` at the start of a line is always a
/// document marker (block scalars are indented), so no YAML parse is needed to find documents,
/// and an unchanged document is recognised by its text alone.
pub fn split_documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        if bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t") {
            docs.push(&text[start..at]);
            // A marker may carry content after it (`--- {a: 1}`): keep that.
            start = at + 3;
        }
        at += line.len();
    }
    docs.push(&text[start..]);
    docs.retain(|d| !d.trim().is_empty());
    docs
}

/// The objects of one YAML document (several for a `kind: List`). The common kinds deserialize
/// straight from the text into their typed form; only other documents (a `List`) go through a
/// YAML value tree, which lives only while its document converts.
fn parse_document(text: &str) -> Result<Vec<SourceObject>, String> {
    // `kind:` at the start of a line is the top-level key (nested keys are indented).
    let kind = text
        .lines()
        .find_map(|l| l.strip_prefix("kind:"))
        .map(|k| k.trim().trim_matches(['"', '\'']));
    let typed = match kind {
        Some("Service") => Some(
            serde_yaml::from_str(text)
                .map(|s| SourceObject::Service(Box::new(s)))
                .map_err(|e| format!("Service: {e}")),
        ),
        Some("EndpointSlice") => Some(
            serde_yaml::from_str(text)
                .map(|s| SourceObject::EndpointSlice(Box::new(s)))
                .map_err(|e| format!("EndpointSlice: {e}")),
        ),
        Some("Node") => Some(
            serde_yaml::from_str(text)
                .map(|n| SourceObject::Node(Box::new(n)))
                .map_err(|e| format!("Node: {e}")),
        ),
        _ => None,
    };
    if let Some(object) = typed {
        return object.map(|o| vec![o]);
    }
    let mut out = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(document).map_err(|e| e.to_string())?;
        if value.is_null() {
            continue;
        }
        collect(value, &mut out)?;
    }
    Ok(out)
}

/// A stable hash of a document's text: the same text is the same objects.
fn text_hash(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// What one file contributed last time it was read.
#[derive(Debug, Default)]
struct FileState {
    stamp: (Option<SystemTime>, u64),
    /// Per document (by the hash of its text), the objects it holds. A file has a few.
    documents: Vec<(u64, Vec<ObjectKey>)>,
}

/// Desired state from a YAML file or a directory of them, as per-object events.
///
/// A changed file is re-read alone, and only its documents whose text changed are parsed, so a
/// one-service change in a directory of thousands of files costs one small parse. Changes are
/// seen through inotify on the directory (the file's own directory in the single-file form, so
/// replacement by rename is seen); where inotify cannot be had, by polling each file's
/// modification time and size. On shared file systems (virtiofs, NFS, 9p) a change made on the
/// other side raises no inotify event here, so there the files' stamps are also compared now and
/// then ([`FileSource::rescan_if_due`]); on local file systems that scan is skipped, since it
/// stats every file and an update arriving meanwhile waits for it.
pub struct FileSource {
    path: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    inotify: Option<nix::sys::inotify::Inotify>,
    /// The directory lives on a file system whose remote changes inotify cannot see.
    shared_fs: bool,
    last_scan: std::time::Instant,
}

impl std::fmt::Debug for FileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSource")
            .field("path", &self.path)
            .field("files", &self.files.len())
            .field("inotify", &self.inotify.is_some())
            .field("shared_fs", &self.shared_fs)
            .finish()
    }
}

impl FileSource {
    /// Watches `path` (a file or a directory) with inotify if it can.
    pub fn new(path: &Path) -> FileSource {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let dir = if path.is_dir() {
            path.to_owned()
        } else {
            path.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_owned()
        };
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .and_then(|i| {
                i.add_watch(
                    &dir,
                    AddWatchFlags::IN_CLOSE_WRITE
                        | AddWatchFlags::IN_MOVED_TO
                        | AddWatchFlags::IN_MOVED_FROM
                        | AddWatchFlags::IN_DELETE,
                )?;
                Ok(i)
            })
            .map_err(|e| {
                tracing::warn!(dir = %dir.display(), error = %e, "no inotify; polling the state files");
            })
            .ok();
        let shared = shared_fs(&dir);
        if let (Some(fs), Some(_)) = (shared, &inotify) {
            tracing::info!(dir = %dir.display(), fs, "shared file system: inotify backed by stamp rescans");
        }
        FileSource {
            path: path.to_owned(),
            files: BTreeMap::new(),
            inotify,
            shared_fs: shared.is_some(),
            last_scan: std::time::Instant::now(),
        }
    }

    /// A stamp scan ([`FileSource::scan_into`]) when the last one is `every` old, on a shared
    /// file system only: the safety net for changes inotify cannot see. Only files whose stamp
    /// changed are re-read.
    pub fn rescan_if_due(
        &mut self,
        every: std::time::Duration,
        sink: &mut dyn FnMut(ObjectEvent),
    ) -> Vec<SourceError> {
        if !self.shared_fs || self.last_scan.elapsed() < every {
            return Vec::new();
        }
        self.scan_into(sink)
    }

    /// Whether [`FileSource::rescan_if_due`] ever scans.
    pub fn rescans(&self) -> bool {
        self.shared_fs
    }

    /// The inotify descriptor, for the event loop to wait on; None when polling.
    pub fn watch_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.inotify.as_ref().map(|i| i.as_fd())
    }

    fn wanted(&self, file: &Path) -> bool {
        if self.path.is_dir() {
            file.parent() == Some(self.path.as_path())
                && matches!(
                    file.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml")
                )
        } else {
            file == self.path
        }
    }

    fn listing(&self) -> Result<Vec<PathBuf>, SourceError> {
        let read_err = |source| SourceError::Read {
            path: self.path.clone(),
            source,
        };
        if !self.path.is_dir() {
            return Ok(if self.path.exists() {
                vec![self.path.clone()]
            } else {
                Vec::new()
            });
        }
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.path).map_err(read_err)? {
            let file = entry.map_err(read_err)?.path();
            if self.wanted(&file) {
                files.push(file);
            }
        }
        files.sort();
        Ok(files)
    }

    /// [`FileSource::scan_into`], collected.
    pub fn scan(&mut self) -> (Vec<ObjectEvent>, Vec<SourceError>) {
        let mut events = Vec::new();
        let errors = self.scan_into(&mut |e| events.push(e));
        (events, errors)
    }

    /// [`FileSource::changes_into`], collected.
    pub fn changes(&mut self) -> (Vec<ObjectEvent>, Vec<SourceError>) {
        let mut events = Vec::new();
        let errors = self.changes_into(&mut |e| events.push(e));
        (events, errors)
    }

    /// Files whose modification time or size changed, appeared or went: every file the first
    /// time. What polling and an inotify queue overflow fall back to. Events go to `sink` file by
    /// file, so a directory of thousands of files is never held in memory as objects at once.
    pub fn scan_into(&mut self, sink: &mut dyn FnMut(ObjectEvent)) -> Vec<SourceError> {
        self.last_scan = std::time::Instant::now();
        let listing = match self.listing() {
            Ok(l) => l,
            Err(e) => return vec![e],
        };
        let mut changed: Vec<PathBuf> = listing
            .iter()
            .filter(|f| self.files.get(*f).map(|s| s.stamp) != Some(stamp(f)))
            .cloned()
            .collect();
        let listed: BTreeSet<&PathBuf> = listing.iter().collect();
        changed.extend(self.files.keys().filter(|f| !listed.contains(f)).cloned());
        self.reread(changed, sink)
    }

    /// Events for what changed since the last call, as inotify reports it (or by polling).
    pub fn changes_into(&mut self, sink: &mut dyn FnMut(ObjectEvent)) -> Vec<SourceError> {
        use nix::sys::inotify::AddWatchFlags;
        let Some(inotify) = &self.inotify else {
            return self.scan_into(sink);
        };
        let mut names = BTreeSet::new();
        let mut overflow = false;
        let dir = if self.path.is_dir() {
            self.path.clone()
        } else {
            self.path.parent().unwrap_or(Path::new(".")).to_owned()
        };
        loop {
            match inotify.read_events() {
                Ok(events) if !events.is_empty() => {
                    for e in events {
                        if e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                            overflow = true;
                        }
                        if let Some(name) = e.name {
                            names.insert(dir.join(name));
                        }
                    }
                }
                _ => break,
            }
        }
        if overflow {
            return self.scan_into(sink);
        }
        let files: Vec<PathBuf> = names.into_iter().filter(|f| self.wanted(f)).collect();
        self.reread(files, sink)
    }

    /// Re-reads `files`, handing each file's events to `sink` as soon as that file is done.
    /// Many files (a start, a control plane landing thousands of objects) are parsed on a few
    /// threads: YAML parsing is most of a full sync's time.
    fn reread(
        &mut self,
        files: Vec<PathBuf>,
        sink: &mut dyn FnMut(ObjectEvent),
    ) -> Vec<SourceError> {
        const PARALLEL_FROM: usize = 32;
        let mut errors = Vec::new();
        let mut updates: Vec<(PathBuf, Option<FileState>)> = Vec::new();
        let mut take = |file: PathBuf, result: Result<FileUpdate, SourceError>| match result {
            Ok(update) => {
                update.events.into_iter().for_each(&mut *sink);
                updates.push((file, update.state));
            }
            Err(e) => errors.push(e),
        };
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(4);
        if files.len() < PARALLEL_FROM || workers < 2 {
            for file in files {
                let result = read_file(self.files.get(&file), &file);
                take(file, result);
            }
        } else {
            let known = &self.files;
            let next = std::sync::atomic::AtomicUsize::new(0);
            let files = &files;
            std::thread::scope(|scope| {
                // Bounded: parsed objects wait here only until the sink takes them.
                let (tx, rx) = std::sync::mpsc::sync_channel(workers * 4);
                for _ in 0..workers {
                    let tx = tx.clone();
                    let next = &next;
                    scope.spawn(move || loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(file) = files.get(i) else { break };
                        let result = read_file(known.get(file), file);
                        if tx.send((file.clone(), result)).is_err() {
                            break;
                        }
                    });
                }
                drop(tx);
                for (file, result) in rx {
                    take(file, result);
                }
            });
        }
        for (file, state) in updates {
            match state {
                Some(state) => {
                    self.files.insert(file, state);
                }
                None => {
                    self.files.remove(&file);
                }
            }
        }
        errors
    }
}

/// What re-reading one file found: its events, and its new state (None: the file is gone).
struct FileUpdate {
    events: Vec<ObjectEvent>,
    state: Option<FileState>,
}

/// Re-reads one file against what it contributed before. A file that does not read or parse is
/// an error, and keeps what it contributed.
fn read_file(old: Option<&FileState>, file: &Path) -> Result<FileUpdate, SourceError> {
    let stamp = stamp(file);
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let gone: BTreeSet<ObjectKey> = old
                .map(|o| {
                    o.documents
                        .iter()
                        .flat_map(|(_, k)| k.iter().cloned())
                        .collect()
                })
                .unwrap_or_default();
            return Ok(FileUpdate {
                events: gone.into_iter().map(ObjectEvent::Delete).collect(),
                state: None,
            });
        }
        Err(source) => {
            return Err(SourceError::Read {
                path: file.to_owned(),
                source,
            })
        }
    };
    let previous = |hash: u64| {
        old.and_then(|o| o.documents.iter().find(|(h, _)| *h == hash))
            .map(|(_, keys)| keys)
    };
    let mut documents: Vec<(u64, Vec<ObjectKey>)> = Vec::new();
    let mut applied = Vec::new();
    for (index, doc) in split_documents(&text).into_iter().enumerate() {
        let hash = text_hash(doc);
        if documents.iter().any(|(h, _)| *h == hash) {
            continue;
        }
        if let Some(keys) = previous(hash) {
            documents.push((hash, keys.clone()));
            continue;
        }
        let objects = parse_document(doc).map_err(|message| SourceError::Document {
            path: file.to_owned(),
            index,
            message,
        })?;
        documents.push((hash, objects.iter().filter_map(SourceObject::key).collect()));
        applied.extend(objects);
    }
    let now: BTreeSet<&ObjectKey> = documents.iter().flat_map(|(_, k)| k).collect();
    let gone: BTreeSet<ObjectKey> = old
        .into_iter()
        .flat_map(|o| o.documents.iter().flat_map(|(_, k)| k))
        .filter(|k| !now.contains(k))
        .cloned()
        .collect();
    let mut events: Vec<ObjectEvent> = gone.into_iter().map(ObjectEvent::Delete).collect();
    events.extend(applied.into_iter().map(ObjectEvent::Apply));
    documents.shrink_to_fit();
    Ok(FileUpdate {
        events,
        state: Some(FileState { stamp, documents }),
    })
}

/// File systems where a change made by another machine (or a VM's host) raises no inotify event
/// on this one. statfs(2) magic numbers, from the kernel's include/uapi/linux/magic.h.
const SHARED_FS_MAGIC: &[(i64, &str)] = &[
    (0x6573_5546, "fuse (virtiofs, sshfs)"),
    (0x6969, "nfs"),
    (0x0102_1997, "9p"),
    (0xFF53_4D42, "cifs"),
    (0xFE53_4D42, "smb2"),
    (0x00C3_6400, "ceph"),
];

/// Which of [`SHARED_FS_MAGIC`] `dir` is on, if any. An unknown answer counts as shared:
/// rescans cost time, missed changes cost correctness.
fn shared_fs(dir: &Path) -> Option<&'static str> {
    match nix::sys::statfs::statfs(dir) {
        Ok(fs) => {
            // The field's integer type differs between libc targets.
            #[allow(clippy::unnecessary_cast)]
            let magic = fs.filesystem_type().0 as i64;
            SHARED_FS_MAGIC
                .iter()
                .find(|(m, _)| *m == magic)
                .map(|(_, name)| *name)
        }
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "statfs failed; rescanning state files");
            Some("unknown")
        }
    }
}

fn stamp(path: &Path) -> (Option<SystemTime>, u64) {
    let meta = std::fs::metadata(path).ok();
    (
        meta.as_ref().and_then(|m| m.modified().ok()),
        meta.map_or(0, |m| m.len()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: default}\nspec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}\n";

    fn parse(text: &str) -> Result<Objects, SourceError> {
        let mut objects = Objects::default();
        parse_documents(Path::new("t.yaml"), text, &mut objects).map(|()| objects)
    }

    #[test]
    fn reads_documents_lists_and_skips_other_kinds() {
        let list = format!(
            "apiVersion: v1\nkind: List\nitems:\n- {}\n",
            serde_yaml::to_string(&serde_yaml::from_str::<serde_yaml::Value>(SERVICE).unwrap())
                .unwrap()
                .replace('\n', "\n  ")
        );
        let text =
            format!("{SERVICE}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\n---\n{list}");
        let objects = parse(&text).unwrap();
        assert_eq!(objects.services.len(), 2);
        assert!(objects.slices.is_empty());
    }

    #[test]
    fn a_broken_document_is_an_error_naming_it() {
        let err = parse(&format!(
            "{SERVICE}---\nkind: Service\nspec: [not, a, map]\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("document 1"), "{err}");
    }

    #[test]
    fn invalid_objects_keep_their_last_good_version() {
        let mut builder = IntentBuilder::default();
        let (good, errors) = builder.build(&parse(SERVICE).unwrap());
        assert!(errors.is_empty());
        let bad = SERVICE
            .replace("198.18.100.1", "198.18.100.256")
            .replace("port: 80", "port: 70000");
        let (after, errors) = builder.build(&parse(&bad).unwrap());
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("default/a"), "{}", errors[0]);
        assert_eq!(after, good, "the last good version stays");

        let mut fresh = IntentBuilder::default();
        let (intent, errors) = fresh.build(&parse(&bad).unwrap());
        assert_eq!(errors.len(), 1);
        assert!(intent.services.is_empty(), "never good: stays absent");
    }

    #[test]
    fn port_out_of_range_is_rejected() {
        let bad = SERVICE.replace("port: 80", "port: 70000");
        let (_, errors) = IntentBuilder::default().build(&parse(&bad).unwrap());
        assert!(
            errors[0].to_string().contains("out of range"),
            "{}",
            errors[0]
        );
    }

    fn slice_doc(service: &str, ip: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-1, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nendpoints: [{{addresses: [{ip}]}}]\n"
        )
    }

    fn summary(events: &[ObjectEvent]) -> Vec<String> {
        let mut out: Vec<String> = events
            .iter()
            .map(|e| match e {
                ObjectEvent::Apply(o) => format!("apply {:?}", o.key().unwrap()),
                ObjectEvent::Delete(k) => format!("delete {k:?}"),
                ObjectEvent::Replace(kind, _) => format!("replace {kind:?}"),
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn a_directory_rereads_only_the_changed_file_and_document() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            // As control planes and editors write: a temporary file renamed into place.
            let tmp = dir.path().join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, dir.path().join(name)).unwrap();
        };
        write(
            "a.yaml",
            &format!("{SERVICE}---\n{}", slice_doc("a", "198.19.0.1")),
        );
        let b = SERVICE
            .replace("name: a", "name: b")
            .replace(".100.1", ".100.2");
        write(
            "b.yaml",
            &format!("{b}---\n{}", slice_doc("b", "198.19.0.2")),
        );
        write("notes.txt", "not state");

        let mut source = FileSource::new(dir.path());
        assert!(source.watch_fd().is_some(), "inotify is available here");
        assert!(
            !source.rescans(),
            "a local file system is trusted to inotify: no stamp rescans delaying updates"
        );
        let (events, errors) = source.scan();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(events.len(), 4);
        let (events, _) = source.changes();
        assert!(
            events.is_empty(),
            "the first scan already saw these writes: {events:?}"
        );

        // b's slice changes; its Service document is the same text and is not even parsed.
        write(
            "b.yaml",
            &format!("{b}---\n{}", slice_doc("b", "198.19.0.3")),
        );
        let (events, _) = source.changes();
        assert_eq!(
            summary(&events),
            vec!["apply EndpointSlice(ObjectRef { namespace: \"default\", name: \"b-1\" })"]
        );
        // A broken file keeps what it had: no events, one error naming it.
        write("a.yaml", "kind: Service\nspec: [not, a, map]\n");
        let (events, errors) = source.changes();
        assert!(events.is_empty());
        assert!(errors[0].to_string().contains("a.yaml"), "{}", errors[0]);
        // Removing a file deletes its objects.
        std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
        let (events, _) = source.changes();
        assert_eq!(
            summary(&events),
            vec![
                "delete EndpointSlice(ObjectRef { namespace: \"default\", name: \"a-1\" })",
                "delete Service(ObjectRef { namespace: \"default\", name: \"a\" })",
            ]
        );
    }

    #[test]
    fn a_single_file_is_watched_and_diffed_per_document() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.yaml");
        let b = SERVICE
            .replace("name: a", "name: b")
            .replace(".100.1", ".100.2");
        std::fs::write(&path, format!("{SERVICE}---\n{b}")).unwrap();
        std::fs::write(dir.path().join("other.yaml"), SERVICE).unwrap();
        let mut source = FileSource::new(&path);
        let (events, _) = source.scan();
        assert_eq!(events.len(), 2, "only the configured file");
        let b2 = b.replace("port: 80", "port: 81");
        std::fs::write(&path, format!("{SERVICE}---\n{b2}")).unwrap();
        std::fs::write(dir.path().join("other.yaml"), b2.as_str()).unwrap();
        let (events, _) = source.changes();
        assert_eq!(
            summary(&events),
            vec!["apply Service(ObjectRef { namespace: \"default\", name: \"b\" })"]
        );
    }

    #[test]
    fn the_store_marks_only_touched_services_and_ignores_repeats() {
        let objects = parse(&format!("{SERVICE}---\n{}", slice_doc("a", "198.19.0.1"))).unwrap();
        let mut store = IntentStore::default();
        for e in objects.to_events() {
            store.handle(&e);
        }
        assert_eq!(store.take_dirty().len(), 1);
        for e in objects.to_events() {
            store.handle(&e);
        }
        assert!(
            store.take_dirty().is_empty(),
            "the same objects again change nothing"
        );
        store.handle(&ObjectEvent::Replace(Kind::EndpointSlice, Vec::new()));
        let dirty = store.take_dirty();
        assert_eq!(dirty.len(), 1, "a list without the slice deletes it");
        assert_eq!(store.slices_of(dirty.first().unwrap()).count(), 0);
    }
}

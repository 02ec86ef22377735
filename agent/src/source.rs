//! Desired state from files of Kubernetes YAML, as `kubectl get -o yaml` prints it.
//!
//! Bad input never costs good state: a file that does not parse keeps the whole previous intent,
//! and an object that does not validate keeps its own previous version (or stays absent), while
//! every other object applies.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;

use crate::intent::{
    self, ClusterIntent, EndpointSliceIntent, IntentError, ObjectRef, ServiceIntent,
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
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc_err = |message: String| SourceError::Document {
            path: path.to_owned(),
            index,
            message,
        };
        let value = serde_yaml::Value::deserialize(document).map_err(|e| doc_err(e.to_string()))?;
        if value.is_null() {
            continue;
        }
        collect(value, objects).map_err(doc_err)?;
    }
    Ok(())
}

fn collect(value: serde_yaml::Value, objects: &mut Objects) -> Result<(), String> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .ok_or("object without kind")?
        .to_owned();
    match kind.as_str() {
        "List" => {
            let items = value
                .get("items")
                .and_then(|i| i.as_sequence())
                .cloned()
                .unwrap_or_default();
            for item in items {
                collect(item, objects)?;
            }
        }
        "Service" => objects
            .services
            .push(serde_yaml::from_value(value).map_err(|e| format!("Service: {e}"))?),
        "EndpointSlice" => objects
            .slices
            .push(serde_yaml::from_value(value).map_err(|e| format!("EndpointSlice: {e}"))?),
        // Other kinds (Pods, Nodes, ...) may share the file; they are not service state.
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

/// Tells whether a file or directory changed since last asked, by modification time and size of
/// everything in it. Polling survives editors that replace files by rename, and the lab's atomic
/// writes, without inotify bookkeeping.
#[derive(Debug, Default)]
pub struct ChangeDetector {
    last: Option<Vec<(PathBuf, Option<SystemTime>, u64)>>,
}

impl ChangeDetector {
    pub fn changed(&mut self, path: &Path) -> bool {
        let snapshot = snapshot(path);
        let changed = self.last.as_ref() != Some(&snapshot);
        self.last = Some(snapshot);
        changed
    }
}

fn snapshot(path: &Path) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    let stat = |p: &Path| {
        let meta = std::fs::metadata(p).ok();
        (
            p.to_owned(),
            meta.as_ref().and_then(|m| m.modified().ok()),
            meta.map_or(0, |m| m.len()),
        )
    };
    let mut out = vec![stat(path)];
    if let Ok(entries) = std::fs::read_dir(path) {
        let mut files: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        out.extend(files.iter().map(|f| stat(f)));
    }
    out
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
}

#[cfg(test)]
mod change_tests {
    use super::ChangeDetector;

    #[test]
    fn notices_writes_and_atomic_replacements_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.yaml");
        std::fs::write(&path, "a").unwrap();
        let mut detector = ChangeDetector::default();
        assert!(detector.changed(&path), "the first look is a change");
        assert!(!detector.changed(&path));
        // Replaced by rename, as the lab and most editors write: a new size is seen.
        let tmp = dir.path().join("tmp");
        std::fs::write(&tmp, "abc").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert!(detector.changed(&path));
        assert!(!detector.changed(&path));
        std::fs::remove_file(&path).unwrap();
        assert!(detector.changed(&path), "disappearing is a change too");
    }
}

//! Desired state as per-object events: the event model both sources speak ([`event`]), the
//! intent store they feed ([`store`]), and the file source: Kubernetes YAML as
//! `kubectl get -o yaml` prints it ([`yaml`]), read within bounds ([`load`]) from a watched file
//! or directory ([`file`], whose module documentation states its rules).
//!
//! Bad input never costs good state: a file or document that is refused keeps what it
//! contributed, and an object that does not validate keeps its own previous version (or stays
//! absent), while every other object applies.

use std::path::PathBuf;

mod event;
mod file;
mod load;
mod store;
mod yaml;

pub use event::{Kind, ObjectEvent, ObjectKey, Objects, SourceObject};
pub use file::{FileSource, SETTLE};
pub use load::{
    FileLimits, FileRefusal, DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_ITEMS_PER_OBJECT,
    DEFAULT_MAX_OBJECTS_PER_FILE,
};
pub use store::{IntentBuilder, IntentStore, ObjectError};
pub use yaml::{parse_documents, split_documents};

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

/// YAML the unit tests of this module share.
#[cfg(test)]
mod fixtures {
    use std::path::Path;

    use super::{parse_documents, ObjectEvent, Objects, SourceError};

    pub const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: default}\nspec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}\n";

    pub fn parse(text: &str) -> Result<Objects, SourceError> {
        let mut objects = Objects::default();
        parse_documents(Path::new("t.yaml"), text, &mut objects).map(|()| objects)
    }

    pub fn slice_doc(service: &str, ip: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-1, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nendpoints: [{{addresses: [{ip}]}}]\n"
        )
    }

    /// Events in a stable order, one line each.
    pub fn summary(events: &[ObjectEvent]) -> Vec<String> {
        let mut out: Vec<String> = events
            .iter()
            .map(|e| match e {
                ObjectEvent::Apply(o) => format!("apply {:?}", o.key().unwrap()),
                ObjectEvent::Delete(k) => format!("delete {k:?}"),
                ObjectEvent::Replace(kind, _) => format!("replace {kind:?}"),
                ObjectEvent::Rejections { origin, rejections } => {
                    let reasons: Vec<&str> = rejections.iter().map(|r| r.reason).collect();
                    format!("rejections {origin}: {reasons:?}")
                }
            })
            .collect();
        out.sort();
        out
    }
}

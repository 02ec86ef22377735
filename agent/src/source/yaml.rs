//! Kubernetes YAML as `kubectl get -o yaml` prints it: multi-document text, `kind: List`
//! documents, and the kinds the data plane uses; and JSON as `kubectl get -o json` and the API
//! server write it, one object (or a `List`) per document, read by a JSON parser: YAML is a
//! superset of JSON, but its parser took ten times as long over the same objects.

use std::path::Path;

use serde::Deserialize;

use super::event::{Objects, SourceObject};
use super::SourceError;

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
pub(super) fn parse_document(text: &str) -> Result<Vec<SourceObject>, String> {
    if text.trim_start().starts_with('{') {
        return parse_json_document(text);
    }
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

/// The objects of one JSON document: its `kind` read first (every other field skipped), then
/// the typed object, or a `List`'s items one by one.
fn parse_json_document(text: &str) -> Result<Vec<SourceObject>, String> {
    #[derive(Deserialize)]
    struct Kind {
        kind: Option<String>,
    }
    #[derive(Deserialize)]
    struct List {
        #[serde(default)]
        items: Vec<serde_json::Value>,
    }
    let kind = serde_json::from_str::<Kind>(text)
        .map_err(|e| e.to_string())?
        .kind
        .ok_or("object without kind")?;
    let typed = |e: serde_json::Error| format!("{kind}: {e}");
    Ok(match kind.as_str() {
        "Service" => vec![SourceObject::Service(Box::new(
            serde_json::from_str(text).map_err(typed)?,
        ))],
        "EndpointSlice" => vec![SourceObject::EndpointSlice(Box::new(
            serde_json::from_str(text).map_err(typed)?,
        ))],
        "Node" => vec![SourceObject::Node(Box::new(
            serde_json::from_str(text).map_err(typed)?,
        ))],
        "List" => {
            let list: List = serde_json::from_str(text).map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            for item in list.items {
                out.extend(json_item(item)?);
            }
            out
        }
        // Other kinds (Pods, ...) may share the directory; they are not service state.
        _ => Vec::new(),
    })
}

/// One item of a JSON `List`, already parsed.
fn json_item(item: serde_json::Value) -> Result<Option<SourceObject>, String> {
    let kind = item
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("")
        .to_owned();
    let typed = |e: serde_json::Error| format!("{kind}: {e}");
    Ok(match kind.as_str() {
        "Service" => Some(SourceObject::Service(Box::new(
            serde_json::from_value(item).map_err(typed)?,
        ))),
        "EndpointSlice" => Some(SourceObject::EndpointSlice(Box::new(
            serde_json::from_value(item).map_err(typed)?,
        ))),
        "Node" => Some(SourceObject::Node(Box::new(
            serde_json::from_value(item).map_err(typed)?,
        ))),
        _ => None,
    })
}

/// A stable hash of a document's text: the same text is the same objects.
pub(super) fn text_hash(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use crate::source::fixtures::*;

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
    fn json_documents_and_lists_read_as_yaml_ones_do() {
        let service: serde_json::Value = serde_yaml::from_str(SERVICE).unwrap();
        let from_yaml = parse(SERVICE).unwrap();
        let from_json = parse(&service.to_string()).unwrap();
        assert_eq!(from_json.services, from_yaml.services);
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [service, {"kind": "Pod"}]});
        assert_eq!(parse(&list.to_string()).unwrap().services.len(), 1);
        let broken = parse("{\"kind\": \"Service\", \"spec\": [1]}").unwrap_err();
        assert!(broken.to_string().contains("Service"), "{broken}");
    }

    #[test]
    fn a_broken_document_is_an_error_naming_it() {
        let err = parse(&format!(
            "{SERVICE}---\nkind: Service\nspec: [not, a, map]\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("document 1"), "{err}");
    }
}

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
                SourceObject::Pod(p) => objects.pods.push(*p),
                SourceObject::Namespace(n) => objects.namespaces.push(*n),
                SourceObject::NetworkPolicy(p) => objects.network_policies.push(*p),
                SourceObject::PrefilterDenyList(d) => objects.deny_lists.push(*d),
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
        "Pod" => out.push(SourceObject::Pod(Box::new(
            serde_yaml::from_value(value).map_err(|e| format!("Pod: {e}"))?,
        ))),
        "Namespace" => out.push(SourceObject::Namespace(Box::new(
            serde_yaml::from_value(value).map_err(|e| format!("Namespace: {e}"))?,
        ))),
        "NetworkPolicy" => out.push(SourceObject::NetworkPolicy(Box::new(
            serde_yaml::from_value(value).map_err(|e| format!("NetworkPolicy: {e}"))?,
        ))),
        "PrefilterDenyList" => out.push(SourceObject::PrefilterDenyList(Box::new(
            serde_yaml::from_value(value).map_err(|e| format!("PrefilterDenyList: {e}"))?,
        ))),
        // Other kinds (ConfigMaps, ...) may share the file; the data plane does not use them.
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
        Some("Pod") => Some(
            serde_yaml::from_str(text)
                .map(|p| SourceObject::Pod(Box::new(p)))
                .map_err(|e| format!("Pod: {e}")),
        ),
        Some("Namespace") => Some(
            serde_yaml::from_str(text)
                .map(|n| SourceObject::Namespace(Box::new(n)))
                .map_err(|e| format!("Namespace: {e}")),
        ),
        Some("NetworkPolicy") => Some(
            serde_yaml::from_str(text)
                .map(|p| SourceObject::NetworkPolicy(Box::new(p)))
                .map_err(|e| format!("NetworkPolicy: {e}")),
        ),
        Some("PrefilterDenyList") => Some(
            serde_yaml::from_str(text)
                .map(|d| SourceObject::PrefilterDenyList(Box::new(d)))
                .map_err(|e| format!("PrefilterDenyList: {e}")),
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

/// The objects of one JSON document: a `List`'s items typed in the same pass that finds its
/// `kind`; any other document's `kind` read first (every other field skipped), then the typed
/// object.
fn parse_json_document(text: &str) -> Result<Vec<SourceObject>, String> {
    #[derive(Deserialize)]
    struct Document {
        kind: Option<String>,
        /// A `List`'s items; any other kind has none.
        #[serde(default)]
        items: Vec<ListItem>,
    }
    let document = serde_json::from_str::<Document>(text).map_err(|e| e.to_string())?;
    let kind = document.kind.ok_or("object without kind")?;
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
        "Pod" => vec![SourceObject::Pod(Box::new(
            serde_json::from_str(text).map_err(typed)?,
        ))],
        "Namespace" => vec![SourceObject::Namespace(Box::new(
            serde_json::from_str(text).map_err(typed)?,
        ))],
        "NetworkPolicy" => vec![SourceObject::NetworkPolicy(Box::new(
            serde_json::from_str(text).map_err(typed)?,
        ))],
        "PrefilterDenyList" => vec![SourceObject::PrefilterDenyList(Box::new(
            serde_json::from_str(text).map_err(typed)?,
        ))],
        "List" => document.items.into_iter().filter_map(|i| i.0).collect(),
        // Other kinds (ConfigMaps, ...) may share the directory; the data plane does not use them.
        _ => Vec::new(),
    })
}

/// One item of a JSON `List`, typed as its `kind` says, in one pass over its text: the fields
/// before `kind` (the API server writes `apiVersion` and `kind` first; sorted keys put
/// `addressType` there too) are kept as `serde_json::Value`s and replayed ahead of the rest
/// ([`Replayed`]), which is parsed straight into the type. Buffering every item as a `Value`
/// first was about a third of a full sync's parse.
struct ListItem(Option<SourceObject>);

impl<'de> Deserialize<'de> for ListItem {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ListItemVisitor)
    }
}

struct ListItemVisitor;

impl<'de> serde::de::Visitor<'de> for ListItemVisitor {
    type Value = ListItem;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a Kubernetes object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<ListItem, A::Error> {
        use serde::de::value::MapAccessDeserializer;
        use serde::de::{Error as _, IgnoredAny};
        let mut head: Vec<(String, serde_json::Value)> = Vec::with_capacity(2);
        let kind = loop {
            let Some(key) = map.next_key::<String>()? else {
                break None;
            };
            let value: serde_json::Value = map.next_value()?;
            let kind = (key == "kind").then(|| value.as_str().unwrap_or("").to_owned());
            head.push((key, value));
            if kind.is_some() {
                break kind;
            }
        };
        let replayed = MapAccessDeserializer::new(Replayed {
            head: head.into_iter(),
            value: None,
            rest: &mut map,
        });
        let kind = kind.unwrap_or_default();
        let typed = |e: A::Error| A::Error::custom(format!("{kind}: {e}"));
        let object = match kind.as_str() {
            "Service" => Some(SourceObject::Service(Box::new(
                Deserialize::deserialize(replayed).map_err(typed)?,
            ))),
            "EndpointSlice" => Some(SourceObject::EndpointSlice(Box::new(
                Deserialize::deserialize(replayed).map_err(typed)?,
            ))),
            "Node" => Some(SourceObject::Node(Box::new(
                Deserialize::deserialize(replayed).map_err(typed)?,
            ))),
            "Pod" => Some(SourceObject::Pod(Box::new(
                Deserialize::deserialize(replayed).map_err(typed)?,
            ))),
            "Namespace" => Some(SourceObject::Namespace(Box::new(
                Deserialize::deserialize(replayed).map_err(typed)?,
            ))),
            "NetworkPolicy" => Some(SourceObject::NetworkPolicy(Box::new(
                Deserialize::deserialize(replayed).map_err(typed)?,
            ))),
            "PrefilterDenyList" => Some(SourceObject::PrefilterDenyList(Box::new(
                Deserialize::deserialize(replayed).map_err(typed)?,
            ))),
            // Other kinds (and objects without one) are not used by the data plane.
            _ => {
                IgnoredAny::deserialize(replayed)?;
                None
            }
        };
        Ok(ListItem(object))
    }
}

/// A map whose first entries (`head`, already read off `rest`) are handed out again before the
/// rest of `rest`'s.
struct Replayed<'a, A> {
    head: std::vec::IntoIter<(String, serde_json::Value)>,
    /// The value of the head key just handed out.
    value: Option<serde_json::Value>,
    rest: &'a mut A,
}

impl<'de, A: serde::de::MapAccess<'de>> serde::de::MapAccess<'de> for Replayed<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        use serde::de::IntoDeserializer as _;
        match self.head.next() {
            Some((key, value)) => {
                self.value = Some(value);
                seed.deserialize(key.into_deserializer()).map(Some)
            }
            None => self.rest.next_key_seed(seed),
        }
    }

    fn next_value_seed<V: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, A::Error> {
        use serde::de::Error as _;
        match self.value.take() {
            Some(value) => seed.deserialize(value).map_err(A::Error::custom),
            None => self.rest.next_value_seed(seed),
        }
    }
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
        let text = format!(
            "{SERVICE}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: p}}\n---\n{list}"
        );
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
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [service, {"kind": "ConfigMap"}]});
        assert_eq!(parse(&list.to_string()).unwrap().services.len(), 1);
        let broken = parse("{\"kind\": \"Service\", \"spec\": [1]}").unwrap_err();
        assert!(broken.to_string().contains("Service"), "{broken}");
    }

    #[test]
    fn list_items_read_alike_whatever_the_order_of_their_fields() {
        let service: serde_json::Value = serde_yaml::from_str(SERVICE).unwrap();
        // `serde_json::Value` writes keys sorted: `apiVersion`, `kind` first (the direct path).
        let kind_first = service.to_string();
        // The same object with `kind` last: every field before it buffered, then replayed.
        let object = service.as_object().unwrap();
        let mut fields: Vec<String> = object
            .iter()
            .filter(|(k, _)| *k != "kind")
            .map(|(k, v)| format!("{}:{v}", serde_json::Value::from(k.as_str())))
            .collect();
        fields.push(format!("\"kind\":{}", object["kind"]));
        let kind_last = format!("{{{}}}", fields.join(","));
        let list = format!(
            "{{\"kind\":\"List\",\"items\":[{kind_first},{kind_last},{{\"kind\":\"ConfigMap\",\"spec\":{{\"x\":[1]}}}}]}}"
        );
        let parsed = parse(&list).unwrap();
        assert_eq!(parsed.services.len(), 2);
        assert_eq!(parsed.services[0], parsed.services[1]);
        assert_eq!(parsed.services[0], parse(SERVICE).unwrap().services[0]);
        let broken = parse("{\"kind\":\"List\",\"items\":[{\"kind\":\"Service\",\"spec\":[1]}]}")
            .unwrap_err();
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

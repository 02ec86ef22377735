//! `PrefilterDenyList` (`weir.dev/v1alpha1`, cluster-scoped): deny-list prefixes as an object,
//! read by both sources beside the configuration's `[prefilter] deny`. The CustomResourceDefinition
//! is `images/kubernetes/crd-prefilterdenylist.yaml`.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use crate::intent::{Cidr, IntentError};

use super::parse_prefix;

pub const GROUP: &str = "weir.dev";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "PrefilterDenyList";
pub const PLURAL: &str = "prefilterdenylists";

/// The most prefixes one object may list: a list this long is a mistake or an attack long
/// before it is a deny-list, and refusing it whole keeps one object from taking the map.
pub const MAX_PREFIXES_PER_OBJECT: usize = 65_536;

/// The object as the API server (or a state file) holds it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PrefilterDenyList {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<PrefilterDenyListSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefilterDenyListSpec {
    /// Source prefixes (or bare addresses) to drop, as `[prefilter] deny` takes them.
    #[serde(default)]
    pub cidrs: Vec<String>,
    /// Why these sources are denied: for people, the data plane does not read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

// Written out rather than derived: kube's `CustomResource` derive would bring schemars and a
// generated schema, where the shipped CRD's schema is short and checked by the manifest tests.
impl kube::Resource for PrefilterDenyList {
    type DynamicType = ();
    type Scope = k8s_openapi::ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        KIND.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        PLURAL.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// A validated deny-list object: its prefixes, host bits cleared, sorted, without repeats.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DenyListIntent {
    pub name: String,
    pub prefixes: Vec<Cidr>,
}

impl TryFrom<&PrefilterDenyList> for DenyListIntent {
    type Error = IntentError;

    /// All or nothing: one bad prefix refuses the object, which keeps its last good version.
    fn try_from(object: &PrefilterDenyList) -> Result<Self, IntentError> {
        let name = (object.metadata.name.clone()).ok_or(IntentError::Missing("metadata.name"))?;
        let spec = object.spec.as_ref().ok_or(IntentError::Missing("spec"))?;
        if spec.cidrs.len() > MAX_PREFIXES_PER_OBJECT {
            return Err(IntentError::TooManyEntries {
                field: "spec.cidrs",
                count: spec.cidrs.len(),
                limit: MAX_PREFIXES_PER_OBJECT,
            });
        }
        let mut prefixes = (spec.cidrs.iter())
            .enumerate()
            .map(|(i, text)| {
                parse_prefix(text).map_err(|_| IntentError::InvalidCidr {
                    field: format!("spec.cidrs[{i}]"),
                    value: text.clone(),
                })
            })
            .collect::<Result<Vec<Cidr>, IntentError>>()?;
        prefixes.sort();
        prefixes.dedup();
        Ok(DenyListIntent { name, prefixes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(yaml: &str) -> PrefilterDenyList {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn prefixes_and_addresses_validate_and_one_bad_entry_refuses_the_object() {
        let good = object(
            "metadata: {name: scanners}\nspec: {cidrs: [198.18.9.7/24, 198.18.9.0/24, fd00:9::1], description: x}\n",
        );
        let intent = DenyListIntent::try_from(&good).unwrap();
        assert_eq!(intent.name, "scanners");
        let texts: Vec<String> = (intent.prefixes.iter())
            .map(|c| format!("{}/{}", c.addr, c.len))
            .collect();
        assert_eq!(texts, ["198.18.9.0/24", "fd00:9::1/128"]);
        let bad = object("metadata: {name: b}\nspec: {cidrs: [198.18.9.0/24, 198.18.0.0/33]}\n");
        let error = DenyListIntent::try_from(&bad).unwrap_err();
        assert_eq!(error.reason(), "invalid_cidr");
        assert!(error.to_string().contains("spec.cidrs[1]"), "{error}");
        let no_spec = object("metadata: {name: c}\n");
        assert_eq!(
            DenyListIntent::try_from(&no_spec).unwrap_err().reason(),
            "missing"
        );
    }

    #[test]
    fn an_object_over_the_cap_is_refused_whole() {
        let object = PrefilterDenyList {
            metadata: ObjectMeta {
                name: Some("big".into()),
                ..ObjectMeta::default()
            },
            spec: Some(PrefilterDenyListSpec {
                cidrs: vec!["198.18.0.1".into(); MAX_PREFIXES_PER_OBJECT + 1],
                description: None,
            }),
        };
        let error = DenyListIntent::try_from(&object).unwrap_err();
        assert_eq!(error.reason(), "too_many_entries");
    }
}

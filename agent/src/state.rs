//! Compiled dataplane state (exactly what the service maps hold) and the plan that moves the
//! maps from one state to another touching only entries that differ.

use std::collections::BTreeMap;

use weir_common::{
    BackendSlotKey, BackendValue, FrontendKey, MaglevChunk, MaglevKey, ServiceValue, SourceRange,
};

/// One `WEIR_SOURCE_RANGES` entry: the trie key's data and prefix length (in that order, so a
/// service id's entries sort together).
pub type SourcePrefix = (SourceRange, u32);

/// The content of the service maps. Conntrack is not part of it: flows are the kernel's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataplaneState {
    pub services: BTreeMap<FrontendKey, ServiceValue>,
    pub slots: BTreeMap<BackendSlotKey, u32>,
    pub backends: BTreeMap<u32, BackendValue>,
    /// Maglev lookup tables, chunk by chunk.
    pub maglev: BTreeMap<MaglevKey, MaglevChunk>,
    /// `loadBalancerSourceRanges`, keyed as the trie keys them (the value is always 1).
    pub source_ranges: BTreeMap<SourcePrefix, u8>,
}

/// Map writes, in the order they must happen so that a packet never finds a reference to an
/// entry that is not there yet, or no longer: new backends, then the slots and Maglev tables
/// that name them, then the services that count those slots; deletions in the opposite order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub upsert_backends: Vec<(u32, BackendValue)>,
    pub upsert_slots: Vec<(BackendSlotKey, u32)>,
    pub upsert_maglev: Vec<(MaglevKey, MaglevChunk)>,
    pub upsert_source_ranges: Vec<(SourcePrefix, u8)>,
    pub upsert_services: Vec<(FrontendKey, ServiceValue)>,
    pub delete_services: Vec<FrontendKey>,
    pub delete_maglev: Vec<MaglevKey>,
    pub delete_source_ranges: Vec<SourcePrefix>,
    pub delete_slots: Vec<BackendSlotKey>,
    pub delete_backends: Vec<u32>,
}

impl Plan {
    pub fn between(current: &DataplaneState, desired: &DataplaneState) -> Plan {
        Plan {
            upsert_backends: upserts(&current.backends, &desired.backends),
            upsert_slots: upserts(&current.slots, &desired.slots),
            upsert_maglev: upserts(&current.maglev, &desired.maglev),
            upsert_source_ranges: upserts(&current.source_ranges, &desired.source_ranges),
            upsert_services: upserts(&current.services, &desired.services),
            delete_services: deletions(&current.services, &desired.services),
            delete_maglev: deletions(&current.maglev, &desired.maglev),
            delete_source_ranges: deletions(&current.source_ranges, &desired.source_ranges),
            delete_slots: deletions(&current.slots, &desired.slots),
            delete_backends: deletions(&current.backends, &desired.backends),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.writes() == 0
    }

    pub fn writes(&self) -> usize {
        self.upsert_backends.len()
            + self.upsert_slots.len()
            + self.upsert_maglev.len()
            + self.upsert_source_ranges.len()
            + self.upsert_services.len()
            + self.delete_services.len()
            + self.delete_maglev.len()
            + self.delete_source_ranges.len()
            + self.delete_slots.len()
            + self.delete_backends.len()
    }
}

pub(crate) fn upserts<K: Ord + Copy, V: PartialEq + Clone>(
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> Vec<(K, V)> {
    desired
        .iter()
        .filter(|(k, v)| current.get(k) != Some(v))
        .map(|(k, v)| (*k, v.clone()))
        .collect()
}

pub(crate) fn deletions<K: Ord + Copy, V>(
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> Vec<K> {
    current
        .keys()
        .filter(|k| !desired.contains_key(k))
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_common::Addr;

    fn frontend(port: u16) -> FrontendKey {
        FrontendKey {
            addr: Addr::from_v4([198, 18, 100, 1]),
            port_be: port.to_be(),
            proto: 6,
            family: 4,
        }
    }

    #[test]
    fn identical_states_need_no_writes() {
        let mut s = DataplaneState::default();
        s.services.insert(
            frontend(80),
            ServiceValue {
                service_id: 1,
                backend_count: 1,
                ..Default::default()
            },
        );
        s.slots.insert(
            BackendSlotKey {
                service_id: 1,
                slot: 0,
            },
            7,
        );
        assert!(Plan::between(&s, &s.clone()).is_empty());
    }

    #[test]
    fn only_changed_entries_are_written() {
        let mut current = DataplaneState::default();
        current.services.insert(
            frontend(80),
            ServiceValue {
                service_id: 1,
                backend_count: 2,
                ..Default::default()
            },
        );
        current.services.insert(
            frontend(81),
            ServiceValue {
                service_id: 2,
                backend_count: 1,
                ..Default::default()
            },
        );
        current.slots.insert(
            BackendSlotKey {
                service_id: 1,
                slot: 0,
            },
            7,
        );
        current.slots.insert(
            BackendSlotKey {
                service_id: 1,
                slot: 1,
            },
            8,
        );
        let mut desired = current.clone();
        desired
            .services
            .get_mut(&frontend(80))
            .unwrap()
            .backend_count = 1;
        desired.slots.remove(&BackendSlotKey {
            service_id: 1,
            slot: 1,
        });
        desired.services.remove(&frontend(81));

        let plan = Plan::between(&current, &desired);
        assert_eq!(plan.upsert_services.len(), 1);
        assert_eq!(plan.delete_services, vec![frontend(81)]);
        assert_eq!(
            plan.delete_slots,
            vec![BackendSlotKey {
                service_id: 1,
                slot: 1
            }]
        );
        assert!(plan.upsert_slots.is_empty() && plan.upsert_backends.is_empty());
        assert_eq!(plan.writes(), 3);
    }
}

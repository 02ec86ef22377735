//! The four policy maps the agent writes (`WEIR_POLICY_FLOWS` is the data path's own): read
//! whole to adopt what an earlier agent left, and written plan by plan.

use std::collections::BTreeMap;
use std::path::Path;

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap, MapData};
use aya::Ebpf;
use weir_common::{map_names, HostAddrKey, PolicyCidrKey, PolicyEndpoint, PolicyRuleKey};

use super::state::{PlanStep, PolicyPlan, PolicyState};
use crate::dataplane::{
    batch_err, delete_keys, open_pinned, read_all, take_map, write_entries, DataplaneError,
};
use crate::map_batch::{self, Strategy};

pub struct PolicyMaps {
    endpoints: HashMap<MapData, HostAddrKey, PolicyEndpoint>,
    peers: HashMap<MapData, HostAddrKey, u32>,
    cidrs: LpmTrie<MapData, PolicyCidrKey, u32>,
    rules: LpmTrie<MapData, PolicyRuleKey, u8>,
}

impl PolicyMaps {
    pub(crate) fn take(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        Ok(PolicyMaps {
            endpoints: take_map(ebpf, map_names::POLICY_ENDPOINTS)?,
            peers: take_map(ebpf, map_names::POLICY_PEERS)?,
            cidrs: take_map(ebpf, map_names::POLICY_CIDRS)?,
            rules: take_map(ebpf, map_names::POLICY_RULES)?,
        })
    }

    pub fn open_pinned(dir: &Path) -> Result<Self, DataplaneError> {
        Ok(PolicyMaps {
            endpoints: open_pinned(dir, map_names::POLICY_ENDPOINTS)?,
            peers: open_pinned(dir, map_names::POLICY_PEERS)?,
            cidrs: open_pinned(dir, map_names::POLICY_CIDRS)?,
            rules: open_pinned(dir, map_names::POLICY_RULES)?,
        })
    }

    /// What the maps hold now.
    pub fn read(&self) -> Result<PolicyState, DataplaneError> {
        Ok(PolicyState {
            endpoints: read_all(&self.endpoints, map_names::POLICY_ENDPOINTS)?,
            peers: read_all(&self.peers, map_names::POLICY_PEERS)?,
            cidrs: read_trie(&self.cidrs, map_names::POLICY_CIDRS)?,
            rules: read_trie(&self.rules, map_names::POLICY_RULES)?,
        })
    }

    /// Applies a plan in its safe order ([`PolicyPlan`]). On error the maps hold a prefix of
    /// the plan; the caller rereads them and retries.
    pub fn apply(&mut self, plan: &PolicyPlan) -> Result<(), DataplaneError> {
        use map_names::{POLICY_CIDRS, POLICY_ENDPOINTS, POLICY_PEERS, POLICY_RULES};
        for step in plan.steps() {
            match step {
                PlanStep::UpsertRules(entries) => {
                    write_entries(&self.rules, &trie_entries(entries), POLICY_RULES)?
                }
                PlanStep::UpsertCidrs(entries) => {
                    write_entries(&self.cidrs, &trie_entries(entries), POLICY_CIDRS)?
                }
                PlanStep::UpsertPeers(entries) => {
                    write_entries(&self.peers, entries, POLICY_PEERS)?
                }
                PlanStep::UpsertEndpoints(entries) => {
                    write_entries(&self.endpoints, entries, POLICY_ENDPOINTS)?
                }
                PlanStep::DeleteEndpoints(keys) => {
                    delete_keys(&self.endpoints, keys, POLICY_ENDPOINTS)?
                }
                PlanStep::DeletePeers(keys) => delete_keys(&self.peers, keys, POLICY_PEERS)?,
                PlanStep::DeleteCidrs(keys) => {
                    delete_keys(&self.cidrs, &trie_keys(keys), POLICY_CIDRS)?
                }
                PlanStep::DeleteRules(keys) => {
                    delete_keys(&self.rules, &trie_keys(keys), POLICY_RULES)?
                }
            }
        }
        Ok(())
    }
}

pub(crate) fn trie_entries<K: aya::Pod, V: Copy>(entries: &[((K, u32), V)]) -> Vec<(LpmKey<K>, V)> {
    entries
        .iter()
        .map(|((data, bits), value)| (LpmKey::new(*bits, *data), *value))
        .collect()
}

pub(crate) fn trie_keys<K: aya::Pod>(keys: &[(K, u32)]) -> Vec<LpmKey<K>> {
    keys.iter()
        .map(|(data, bits)| LpmKey::new(*bits, *data))
        .collect()
}

pub(crate) fn read_trie<K: aya::Pod + Ord, V: aya::Pod>(
    trie: &LpmTrie<MapData, K, V>,
    name: &'static str,
) -> Result<BTreeMap<(K, u32), V>, DataplaneError> {
    let entries = map_batch::read(trie, Strategy::Batched).map_err(batch_err(name))?;
    Ok(entries
        .into_iter()
        .map(|(key, value)| ((key.data(), key.prefix_len()), value))
        .collect())
}

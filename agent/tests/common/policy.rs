//! The policy maps written as the agent's compiler writes them, opened by their pins as a
//! second writer: for the packet tests and the policy benchmark.

use std::net::IpAddr;
use std::path::Path;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, MapData};
use weir_agent::compile::addr_key;
use weir_common::{
    map_names, node_flags, HostAddrKey, NodeConfig, PolicyCidrKey, PolicyEndpoint, PolicyRuleKey,
    POLICY_CIDR_FIXED_BITS,
};

use super::Harness;

/// The policy maps of a pinned data plane.
pub struct PolicyMaps {
    endpoints: HashMap<MapData, HostAddrKey, PolicyEndpoint>,
    peers: HashMap<MapData, HostAddrKey, u32>,
    cidrs: LpmTrie<MapData, PolicyCidrKey, u32>,
    rules: LpmTrie<MapData, PolicyRuleKey, u8>,
}

impl PolicyMaps {
    pub fn open(dir: &Path) -> PolicyMaps {
        let map = |name: &str| {
            aya::maps::Map::from_map_data(MapData::from_pin(dir.join(name)).expect(name))
                .expect(name)
        };
        PolicyMaps {
            endpoints: map(map_names::POLICY_ENDPOINTS).try_into().unwrap(),
            peers: map(map_names::POLICY_PEERS).try_into().unwrap(),
            cidrs: map(map_names::POLICY_CIDRS).try_into().unwrap(),
            rules: map(map_names::POLICY_RULES).try_into().unwrap(),
        }
    }

    pub fn isolate(&mut self, pod: IpAddr, id: u32, flags: u8) {
        let value = PolicyEndpoint {
            id,
            flags,
            _pad: [0; 3],
        };
        self.endpoints.insert(addr_key(pod), value, 0).unwrap();
    }

    pub fn identity(&mut self, pod: IpAddr, identity: u32) {
        self.peers.insert(addr_key(pod), identity, 0).unwrap();
    }

    pub fn cidr(&mut self, net: IpAddr, bits: u32, identity: u32) {
        let key = addr_key(net);
        let data = PolicyCidrKey {
            family: key.family,
            _pad: [0; 3],
            addr: key.addr,
        };
        let key = Key::new(POLICY_CIDR_FIXED_BITS + bits, data);
        self.cidrs.insert(&key, identity, 0).unwrap();
    }

    /// A rule of `endpoint`: `identity` on (`proto`, `port`) under the prefix length `bits`.
    pub fn allow(
        &mut self,
        endpoint: u32,
        direction: u8,
        identity: u32,
        proto: u8,
        port: u16,
        bits: u32,
    ) {
        let key = rule_key(endpoint, direction, identity, proto, port, bits);
        self.rules.insert(&key, 1, 0).unwrap();
    }

    /// Takes back what [`PolicyMaps::allow`] allowed with the same arguments.
    pub fn revoke(
        &mut self,
        endpoint: u32,
        direction: u8,
        identity: u32,
        proto: u8,
        port: u16,
        bits: u32,
    ) {
        let key = rule_key(endpoint, direction, identity, proto, port, bits);
        self.rules.remove(&key).unwrap();
    }
}

impl PolicyMaps {
    /// Empties every policy map the agent writes.
    pub fn clear(&mut self) {
        let endpoints: Vec<_> = self.endpoints.keys().map(Result::unwrap).collect();
        endpoints
            .iter()
            .for_each(|k| self.endpoints.remove(k).unwrap());
        let peers: Vec<_> = self.peers.keys().map(Result::unwrap).collect();
        peers.iter().for_each(|k| self.peers.remove(k).unwrap());
        let cidrs: Vec<_> = self.cidrs.keys().map(Result::unwrap).collect();
        cidrs.iter().for_each(|k| self.cidrs.remove(k).unwrap());
        let rules: Vec<_> = self.rules.keys().map(Result::unwrap).collect();
        rules.iter().for_each(|k| self.rules.remove(k).unwrap());
    }
}

fn rule_key(
    endpoint: u32,
    direction: u8,
    identity: u32,
    proto: u8,
    port: u16,
    bits: u32,
) -> Key<PolicyRuleKey> {
    let data = PolicyRuleKey {
        endpoint_be: endpoint.to_be(),
        identity_be: identity.to_be(),
        direction,
        proto,
        port_be: port.to_be(),
    };
    Key::new(bits, data)
}

/// Turns enforcement on (the node flag the agent sets once a policy isolates a pod).
pub fn enforce(h: &mut Harness) {
    let config = NodeConfig {
        flags: node_flags::POLICY,
        ..h.dataplane.node.config().unwrap()
    };
    h.dataplane.node.set_config(&config).unwrap();
}

//! The maps, as the agent pins them. Service maps change only from user space, so they need no
//! preallocation; conntrack and affinity are LRU so a full table evicts instead of refusing.
//! Conntrack is two tables (see `ct.rs`): new flows, and established ones.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use weir_common::{
    capacity, counter, AffinityKey, AffinityValue, BackendSlotKey, BackendValue, CtKey, CtValue,
    FailsafeKey, FragKey, FragPorts, FrontendKey, HeldFragment, HeldFragmentKey, HostAddrKey,
    MaglevChunk, MaglevKey, MonitorConfig, MovedArrivalKey, NodeConfig, PolicyCidrKey,
    PolicyEndpoint, PolicyRuleKey, ServiceValue, SockReverseKey, SourceRange, MONITOR_RING_BYTES,
};

const BPF_F_NO_PREALLOC: u32 = 1;

#[map(name = "WEIR_SERVICES")]
pub static SERVICES: HashMap<FrontendKey, ServiceValue> =
    HashMap::with_max_entries(capacity::SERVICES, BPF_F_NO_PREALLOC);

#[map(name = "WEIR_BACKEND_SLOTS")]
pub static BACKEND_SLOTS: HashMap<BackendSlotKey, u32> =
    HashMap::with_max_entries(capacity::BACKEND_SLOTS, BPF_F_NO_PREALLOC);

#[map(name = "WEIR_BACKENDS")]
pub static BACKENDS: HashMap<u32, BackendValue> =
    HashMap::with_max_entries(capacity::BACKENDS, BPF_F_NO_PREALLOC);

#[map(name = "WEIR_MAGLEV")]
pub static MAGLEV: HashMap<MaglevKey, MaglevChunk> =
    HashMap::with_max_entries(capacity::MAGLEV, BPF_F_NO_PREALLOC);

/// `loadBalancerSourceRanges`, by service id: a longest-prefix match on (service, source).
#[map(name = "WEIR_SOURCE_RANGES")]
pub static SOURCE_RANGES: LpmTrie<SourceRange, u8> =
    LpmTrie::with_max_entries(capacity::SOURCE_RANGES, BPF_F_NO_PREALLOC);

#[map(name = "WEIR_HOST_ADDRS")]
pub static HOST_ADDRS: HashMap<HostAddrKey, u32> =
    HashMap::with_max_entries(capacity::HOST_ADDRS, BPF_F_NO_PREALLOC);

/// Every address of every Node: the tunnel device takes packets from these senders only, and
/// in-cluster clients reach NodePorts on these addresses.
#[map(name = "WEIR_TUNNEL_PEERS")]
pub static TUNNEL_PEERS: HashMap<HostAddrKey, u32> =
    HashMap::with_max_entries(capacity::TUNNEL_PEERS, BPF_F_NO_PREALLOC);

/// This node's pod interfaces (ifindex): what enters there is traffic from inside the cluster.
#[map(name = "WEIR_POD_INTERFACES")]
pub static POD_INTERFACES: HashMap<u32, u32> =
    HashMap::with_max_entries(capacity::POD_INTERFACES, BPF_F_NO_PREALLOC);

/// Addresses of ClusterIPs, external and load-balancer IPs (the NodePort's are the node's own).
#[map(name = "WEIR_FRONTEND_ADDRS")]
pub static FRONTEND_ADDRS: HashMap<HostAddrKey, u32> =
    HashMap::with_max_entries(capacity::FRONTEND_ADDRS, BPF_F_NO_PREALLOC);

/// The ports of fragmented datagrams whose first fragment was translated (see `frag.rs`).
#[map(name = "WEIR_FRAGMENTS")]
pub static FRAGMENTS: LruHashMap<FragKey, FragPorts> =
    LruHashMap::with_max_entries(capacity::FRAGMENTS, 0);

/// Datagrams with later fragments held until their first arrives (see `frag.rs`).
#[map(name = "WEIR_FRAGMENTS_HELD")]
pub static FRAGMENTS_HELD: LruHashMap<FragKey, u32> =
    LruHashMap::with_max_entries(capacity::FRAGMENTS_HELD, 0);

/// The held later fragments themselves, whole frames (see `frag.rs`).
#[map(name = "WEIR_HELD_FRAGMENTS")]
pub static HELD_FRAGMENTS: LruHashMap<HeldFragmentKey, HeldFragment> =
    LruHashMap::with_max_entries(capacity::HELD_FRAGMENTS, 0);

/// A frame being held is copied here first: a map value is built in memory, and 2 KiB do not
/// fit the stack. Never pinned.
#[map(name = "WEIR_HOLD_SCRATCH")]
pub static HOLD_SCRATCH: PerCpuArray<HeldFragment> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "WEIR_NODE_CONFIG")]
pub static NODE_CONFIG: Array<NodeConfig> = Array::with_max_entries(1, 0);

/// Established flows: only promotion from [`CT_NEW`] writes here.
#[map(name = "WEIR_CONNTRACK")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> =
    LruHashMap::with_max_entries(capacity::CONNTRACK, 0);

/// New flows, until answered: every entry is created here.
#[map(name = "WEIR_CT_NEW")]
pub static CT_NEW: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(capacity::CT_NEW, 0);

/// The client port a flow arriving through the tunnel was moved to at this (the backend's)
/// node, by client tuple and ingress node (see `tunnel::remember_return`). Looked up only when
/// another node's flow holds the arrival's reply key.
#[map(name = "WEIR_CT_MOVED_ARRIVALS")]
pub static CT_MOVED_ARRIVALS: LruHashMap<MovedArrivalKey, u16> =
    LruHashMap::with_max_entries(capacity::CT_MOVED_ARRIVALS, 0);

/// This node's pods that a NetworkPolicy isolates (see `policy.rs`).
#[map(name = "WEIR_POLICY_ENDPOINTS")]
pub static POLICY_ENDPOINTS: HashMap<HostAddrKey, PolicyEndpoint> =
    HashMap::with_max_entries(capacity::POLICY_ENDPOINTS, BPF_F_NO_PREALLOC);

/// Every pod address of the cluster: its peer identity.
#[map(name = "WEIR_POLICY_PEERS")]
pub static POLICY_PEERS: HashMap<HostAddrKey, u32> =
    HashMap::with_max_entries(capacity::POLICY_PEERS, BPF_F_NO_PREALLOC);

/// ipBlock prefixes: an address's most specific one, as an identity.
#[map(name = "WEIR_POLICY_CIDRS")]
pub static POLICY_CIDRS: LpmTrie<PolicyCidrKey, u32> =
    LpmTrie::with_max_entries(capacity::POLICY_CIDRS, BPF_F_NO_PREALLOC);

/// The isolated endpoints' rules: a hit allows.
#[map(name = "WEIR_POLICY_RULES")]
pub static POLICY_RULES: LpmTrie<PolicyRuleKey, u8> =
    LpmTrie::with_max_entries(capacity::POLICY_RULES, BPF_F_NO_PREALLOC);

/// Flows a policy allowed, by both directions' tuples: the time of their last packet (coarse).
#[map(name = "WEIR_POLICY_FLOWS")]
pub static POLICY_FLOWS: LruHashMap<CtKey, u64> =
    LruHashMap::with_max_entries(capacity::POLICY_FLOWS, 0);

/// Whether `weir-agent monitor` watches, and what (see `monitor.rs`).
#[map(name = "WEIR_MONITOR")]
pub static MONITOR: Array<MonitorConfig> = Array::with_max_entries(1, 0);

/// Flow events for the monitor.
#[map(name = "WEIR_MONITOR_EVENTS")]
pub static MONITOR_EVENTS: RingBuf = RingBuf::with_byte_size(MONITOR_RING_BYTES, 0);

/// Source prefixes the XDP pre-filter drops: the counter to account a drop to.
#[map(name = "WEIR_PREFILTER_DENY")]
pub static PREFILTER_DENY: LpmTrie<PolicyCidrKey, u32> =
    LpmTrie::with_max_entries(capacity::PREFILTER_DENY, BPF_F_NO_PREALLOC);

/// Ports that stay open whatever a deny-list or host policy says.
#[map(name = "WEIR_FAILSAFE_PORTS")]
pub static FAILSAFE_PORTS: HashMap<FailsafeKey, u8> =
    HashMap::with_max_entries(capacity::FAILSAFE_PORTS, BPF_F_NO_PREALLOC);

#[map(name = "WEIR_AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(capacity::AFFINITY, 0);

#[map(name = "WEIR_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Host services: the cookie of the network namespace whose sockets are translated (0 = all).
#[map(name = "WEIR_SOCK_NETNS")]
pub static SOCK_NETNS: Array<u64> = Array::with_max_entries(1, 0);

/// Host services: what each translated socket must see instead of its backend.
#[map(name = "WEIR_SOCK_REVERSE")]
pub static SOCK_REVERSE: LruHashMap<SockReverseKey, FrontendKey> =
    LruHashMap::with_max_entries(capacity::SOCK_REVERSE, 0);

/// Per-CPU clock readings (`ct::coarse_now`); never pinned.
#[map(name = "WEIR_CLOCK")]
pub static CLOCK: PerCpuArray<crate::ct::Clock> = PerCpuArray::with_max_entries(1, 0);

/// Per-packet working memory that would not fit the verifier's stack budget; never pinned.
#[map(name = "WEIR_SCRATCH")]
pub static SCRATCH: PerCpuArray<crate::Scratch> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot is only written by this CPU, and a preempted increment would at
        // worst lose one count; the pointer comes from a successful lookup.
        unsafe { *slot += 1 };
    }
}

static NO_CONFIG: NodeConfig = NodeConfig {
    hairpin_v4: weir_common::Addr::UNSPECIFIED,
    hairpin_v6: weir_common::Addr::UNSPECIFIED,
    tunnel_ifindex: 0,
    flags: 0,
    underlay_mtu: 0,
};

/// The node's configuration: all zeroes (no tunnel, no hairpin address) until the agent writes
/// it. Borrowed from the map, not copied, to spare the stack.
#[inline(always)]
pub fn node_config() -> &'static NodeConfig {
    NODE_CONFIG.get(0).unwrap_or(&NO_CONFIG)
}

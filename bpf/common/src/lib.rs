//! Map keys, values and constants shared by Weir's eBPF programs and the agent.
//!
//! Every type here is `#[repr(C)]` with explicit padding fields, so the kernel and user sides read
//! the same bytes and hashing never sees uninitialised padding. Addresses are 16 bytes in network
//! byte order for both families (IPv4 uses the first four bytes, the rest zero), so IPv6 needs no
//! layout change.
#![no_std]

/// Bumped whenever a pinned map's key or value layout changes: the agent pins under a directory
/// named after it, so a new agent never reinterprets an older agent's bytes.
pub const MAP_LAYOUT_VERSION: u32 = 5;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// Map names, as the eBPF object defines them and as they are pinned.
pub mod map_names {
    pub const SERVICES: &str = "WEIR_SERVICES";
    pub const BACKEND_SLOTS: &str = "WEIR_BACKEND_SLOTS";
    pub const BACKENDS: &str = "WEIR_BACKENDS";
    pub const MAGLEV: &str = "WEIR_MAGLEV";
    pub const SOURCE_RANGES: &str = "WEIR_SOURCE_RANGES";
    pub const HOST_ADDRS: &str = "WEIR_HOST_ADDRS";
    pub const NODE_CONFIG: &str = "WEIR_NODE_CONFIG";
    /// Conntrack of established flows: answered ones, promoted out of [`CT_NEW`].
    pub const CONNTRACK: &str = "WEIR_CONNTRACK";
    /// Conntrack of new flows, until they are answered: a flood of new flows churns this table
    /// only, never the established one.
    pub const CT_NEW: &str = "WEIR_CT_NEW";
    pub const AFFINITY: &str = "WEIR_AFFINITY";
    pub const COUNTERS: &str = "WEIR_COUNTERS";
    /// Host services: the network namespace whose sockets are load-balanced at connect time.
    pub const SOCK_NETNS: &str = "WEIR_SOCK_NETNS";
    /// Host services: backend -> frontend per socket, so replies and peer names show the service.
    pub const SOCK_REVERSE: &str = "WEIR_SOCK_REVERSE";
    /// Underlay addresses of the cluster's nodes: the only senders the tunnel device accepts.
    pub const TUNNEL_PEERS: &str = "WEIR_TUNNEL_PEERS";
    /// Ifindexes of this node's pod interfaces: packets entering there come from inside the
    /// cluster.
    pub const POD_INTERFACES: &str = "WEIR_POD_INTERFACES";
    /// Addresses of ClusterIPs, external IPs and load-balancer IPs: traffic to them that is not
    /// translated is dropped, never routed on. Not pinned: the agent refills it from its first
    /// pass.
    pub const FRONTEND_ADDRS: &str = "WEIR_FRONTEND_ADDRS";
    /// The ports of fragmented datagrams being translated, by their first fragment (LRU). Not
    /// pinned: an agent's restart loses the datagrams in flight at most.
    pub const FRAGMENTS: &str = "WEIR_FRAGMENTS";
    /// The client ports the backend's node moved for flows that arrived through the tunnel
    /// while another node's flow held their reply key, by client tuple and ingress node (LRU).
    pub const CT_MOVED_ARRIVALS: &str = "WEIR_CT_MOVED_ARRIVALS";
    /// Datagrams with later fragments held until their first arrives (see [`HELD_FRAGMENTS`]).
    /// Not pinned, as [`FRAGMENTS`].
    pub const FRAGMENTS_HELD: &str = "WEIR_FRAGMENTS_HELD";
    /// Later fragments that arrived before their first, whole frames, by datagram and slot (LRU).
    /// Not pinned, as [`FRAGMENTS`].
    pub const HELD_FRAGMENTS: &str = "WEIR_HELD_FRAGMENTS";
    /// This node's pods that a NetworkPolicy isolates, by address: the directions it isolates
    /// and the id their rules are keyed by ([`super::PolicyEndpoint`]).
    pub const POLICY_ENDPOINTS: &str = "WEIR_POLICY_ENDPOINTS";
    /// Every pod address of the cluster (a policy's peers live on every node): its peer identity,
    /// shared by the pods whose namespace, labels and named ports are the same.
    pub const POLICY_PEERS: &str = "WEIR_POLICY_PEERS";
    /// The prefixes of every `ipBlock` (CIDRs and their exceptions), longest match: an address's
    /// most specific prefix decides which ipBlocks hold it ([`super::PolicyCidrKey`]).
    pub const POLICY_CIDRS: &str = "WEIR_POLICY_CIDRS";
    /// What each isolated endpoint allows, longest match on (endpoint, peer identity,
    /// direction, protocol, port) ([`super::PolicyRuleKey`]).
    pub const POLICY_RULES: &str = "WEIR_POLICY_RULES";
    /// Flows a policy allowed, both directions, by the tuple as the pod sees it (LRU): their
    /// further packets and replies pass without a rule lookup.
    pub const POLICY_FLOWS: &str = "WEIR_POLICY_FLOWS";
    /// Whether someone watches the flow events, and which ([`super::MonitorConfig`]).
    pub const MONITOR: &str = "WEIR_MONITOR";
    /// Flow events for `weir-agent monitor` (a ring buffer of [`super::MonitorEvent`]).
    pub const MONITOR_EVENTS: &str = "WEIR_MONITOR_EVENTS";
    /// Source prefixes the XDP pre-filter drops, longest match ([`super::PolicyCidrKey`] ->
    /// the counter a drop is accounted to: which list the prefix came from).
    pub const PREFILTER_DENY: &str = "WEIR_PREFILTER_DENY";
    /// Failsafe ports ([`super::FailsafeKey`]): what stays open whatever a deny-list or host
    /// policy says.
    pub const FAILSAFE_PORTS: &str = "WEIR_FAILSAFE_PORTS";
    /// Every map the agent pins, in the order it creates them.
    pub const PINNED: [&str; 25] = [
        SERVICES,
        BACKEND_SLOTS,
        BACKENDS,
        MAGLEV,
        SOURCE_RANGES,
        HOST_ADDRS,
        NODE_CONFIG,
        CONNTRACK,
        CT_NEW,
        AFFINITY,
        COUNTERS,
        SOCK_NETNS,
        SOCK_REVERSE,
        TUNNEL_PEERS,
        POD_INTERFACES,
        CT_MOVED_ARRIVALS,
        POLICY_ENDPOINTS,
        POLICY_PEERS,
        POLICY_CIDRS,
        POLICY_RULES,
        POLICY_FLOWS,
        MONITOR,
        MONITOR_EVENTS,
        PREFILTER_DENY,
        FAILSAFE_PORTS,
    ];
}

/// Program names in the eBPF object.
pub mod program_names {
    /// Service NAT and conntrack on packets entering the node from any interface.
    pub const INGRESS: &str = "weir_ingress";
    /// Translates the ICMP errors the node's own stack sends about translated flows, on their
    /// way out of the node.
    pub const EGRESS: &str = "weir_egress";
    /// Does nothing but pass: the baseline every per-packet figure is a ratio against.
    pub const PASS: &str = "weir_pass";
    /// The XDP pre-filter on host interfaces: drops deny-listed sources before the stack.
    pub const PREFILTER: &str = "weir_prefilter";
    /// XDP doing nothing but pass: the pre-filter's baseline.
    pub const XDP_PASS: &str = "weir_xdp_pass";
    /// Host services (cgroup sock_addr hooks): connect-time load balancing for the node's own
    /// sockets, in the order the agent attaches them (reverse translation before forward, so a
    /// socket never sees a backend address it cannot map back).
    pub const RECVMSG4: &str = "weir_recvmsg4";
    pub const RECVMSG6: &str = "weir_recvmsg6";
    pub const GETPEERNAME4: &str = "weir_getpeername4";
    pub const GETPEERNAME6: &str = "weir_getpeername6";
    pub const CONNECT4: &str = "weir_connect4";
    pub const CONNECT6: &str = "weir_connect6";
    pub const SENDMSG4: &str = "weir_sendmsg4";
    pub const SENDMSG6: &str = "weir_sendmsg6";
    pub const HOST_SERVICES: [&str; 8] = [
        RECVMSG4,
        RECVMSG6,
        GETPEERNAME4,
        GETPEERNAME6,
        CONNECT4,
        CONNECT6,
        SENDMSG4,
        SENDMSG6,
    ];
}

/// Default capacities; the agent may override them at load time.
pub mod capacity {
    pub const SERVICES: u32 = 65_536;
    pub const BACKEND_SLOTS: u32 = 262_144;
    pub const BACKENDS: u32 = 262_144;
    /// Maglev table chunks (16 KiB each): a table of up to 4,093 entries is one chunk, the
    /// largest (131,071, for services of 1,000 backends and more) is 32.
    pub const MAGLEV: u32 = 16_384;
    /// `loadBalancerSourceRanges` entries, per Service port and family.
    pub const SOURCE_RANGES: u32 = 65_536;
    pub const HOST_ADDRS: u32 = 256;
    /// Established flows (answered, see `map_names::CT_NEW`).
    pub const CONNTRACK: u32 = 524_288;
    /// Flows not answered yet: what a SYN flood fills. Holds a new flow for its handshake only,
    /// so a quarter of the established table is room for a high connection rate.
    pub const CT_NEW: u32 = 131_072;
    pub const AFFINITY: u32 = 65_536;
    /// Translated host sockets remembered for reply and peer-name translation (LRU).
    pub const SOCK_REVERSE: u32 = 65_536;
    /// Node addresses the tunnel accepts packets from (every address of every Node).
    pub const TUNNEL_PEERS: u32 = 65_536;
    /// Pod interfaces on one node.
    pub const POD_INTERFACES: u32 = 4096;
    /// Distinct frontend addresses (ClusterIPs, external and load-balancer IPs).
    pub const FRONTEND_ADDRS: u32 = 65_536;
    /// Fragmented datagrams in flight whose first fragment was translated (LRU, about 1 MiB):
    /// Cilium's default too. A later fragment whose entry was evicted is lost with its datagram.
    pub const FRAGMENTS: u32 = 8_192;
    /// Flows arriving through the tunnel whose client port the backend's node moved (LRU): one
    /// per connection of a client port reused through two ingress nodes towards one backend,
    /// as a quarter of the new-flow table.
    pub const CT_MOVED_ARRIVALS: u32 = 32_768;
    /// Datagrams whose later fragments wait for their first (LRU): the marker the first looks for.
    pub const FRAGMENTS_HELD: u32 = 1_024;
    /// Later fragments waiting for their first (LRU, [`super::HeldFragment`] frames of about
    /// 2 KiB: about 2 MiB), at most [`super::FRAGMENT_HOLD_SLOTS`] per datagram.
    pub const HELD_FRAGMENTS: u32 = 1_024;
    /// Addresses of pods on one node (two per dual-stack pod).
    pub const POLICY_ENDPOINTS: u32 = 4_096;
    /// Pod addresses in the cluster.
    pub const POLICY_PEERS: u32 = 262_144;
    pub const POLICY_CIDRS: u32 = 65_536;
    /// Rule entries of this node's isolated pods: (peer identities x port prefixes) per rule.
    pub const POLICY_RULES: u32 = 524_288;
    pub const POLICY_FLOWS: u32 = 131_072;
    /// Deny-listed source prefixes of the XDP pre-filter (both lists, both families).
    pub const PREFILTER_DENY: u32 = 262_144;
    /// Failsafe ports, both directions.
    pub const FAILSAFE_PORTS: u32 = 1_024;
}

/// An IPv4 or IPv6 address as 16 raw bytes in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr {
    pub bytes: [u8; 16],
}

impl Addr {
    pub const UNSPECIFIED: Addr = Addr { bytes: [0; 16] };

    pub const fn from_v4(octets: [u8; 4]) -> Self {
        let mut bytes = [0u8; 16];
        bytes[0] = octets[0];
        bytes[1] = octets[1];
        bytes[2] = octets[2];
        bytes[3] = octets[3];
        Addr { bytes }
    }

    pub const fn from_v6(octets: [u8; 16]) -> Self {
        Addr { bytes: octets }
    }

    pub const fn v4_octets(&self) -> [u8; 4] {
        [self.bytes[0], self.bytes[1], self.bytes[2], self.bytes[3]]
    }
}

/// A service frontend: what a client addresses. ClusterIPs, external IPs and load-balancer
/// ingress IPs are keyed by their address; a NodePort by the unspecified address of its family,
/// and it matches packets to any address in `WEIR_HOST_ADDRS` (or arriving through the tunnel).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub addr: Addr,
    /// Network byte order, as in the packet.
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
}

/// Frontend flags.
pub mod service_flags {
    /// The frontend's traffic policy is Local: only slots of this node's endpoints apply, and a
    /// node without one drops (as kube-proxy does), while a service without any endpoint rejects.
    /// On an external frontend (`externalTrafficPolicy`) it binds traffic from outside the
    /// cluster only: this node's pods get every endpoint, as kube-proxy short-circuits them.
    pub const LOCAL_ONLY: u32 = 1 << 0;
    /// NodePort, load-balancer or external IP: reachable from outside the cluster, so a remote
    /// backend is reached through the tunnel (returning through this node or by DSR).
    pub const EXTERNAL: u32 = 1 << 1;
    /// Pick the backend from the service's Maglev table, so every node picks the same one.
    pub const MAGLEV: u32 = 1 << 2;
    /// Only sources in `WEIR_SOURCE_RANGES` for this service id may start flows here (a
    /// load-balancer IP or NodePort of a Service with `loadBalancerSourceRanges`).
    pub const SOURCE_RANGES: u32 = 1 << 3;
}

/// Slots of a service's local endpoints live at `LOCAL_SLOT | index` beside the cluster-wide ones.
pub const LOCAL_SLOT: u32 = 1 << 31;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Stable identifier of this (service, port) pair; keys its backend slots, its Maglev table
    /// and its clients' affinity.
    pub service_id: u32,
    /// Slots `0..backend_count` hold the endpoints that serve cluster-wide (ready ones, or the
    /// serving-terminating ones when none is ready). Zero means the service rejects.
    pub backend_count: u32,
    /// Slots `LOCAL_SLOT | 0..local_backend_count` hold this node's share of them.
    pub local_backend_count: u32,
    pub flags: u32,
    /// `sessionAffinity: ClientIP`: seconds a client keeps its backend after its last new
    /// connection (0 = off).
    pub affinity_timeout_s: u32,
    /// Entries of its Maglev table (a prime), spread over chunks of [`MAGLEV_CHUNK`]; 0 without.
    pub maglev_size: u32,
}

/// One backend choice of a service. Indirection through a slot keeps a backend's address in one
/// place however many services share it, and lets the agent resize a service without rewriting
/// the backends themselves.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendSlotKey {
    pub service_id: u32,
    pub slot: u32,
}

/// Backend flags.
pub mod backend_flags {
    /// The endpoint runs on this node.
    pub const LOCAL: u8 = 1 << 0;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendValue {
    pub addr: Addr,
    /// Underlay address of the endpoint's node: where the tunnel carries external traffic for a
    /// remote endpoint. Unspecified for local endpoints and nodes without a known address.
    pub node_addr: Addr,
    /// Network byte order.
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
    pub flags: u8,
    pub node_family: u8,
    pub _pad: [u8; 2],
}

/// An address of this node (NodePorts answer on every one of them), or, in the tunnel peer map,
/// of a node the tunnel accepts packets from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostAddrKey {
    pub addr: Addr,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// A fragmented datagram, as all its fragments carry it: addresses, IP id (IPv4) or fragment
/// header id (IPv6, in the low 32 bits either way; network order) and upper-layer protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKey {
    pub saddr: Addr,
    pub daddr: Addr,
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: u16,
}

/// The ports of a fragmented datagram, from its first fragment (later ones do not carry them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragPorts {
    pub sport_be: u16,
    pub dport_be: u16,
}

/// Later fragments of one datagram held at most, waiting for its first: 8 fragments of 1,500
/// bytes are a 12 KB datagram, more than UDP services (DNS, QUIC, tunnels) send through an MTU.
pub const FRAGMENT_HOLD_SLOTS: u32 = 8;

/// The largest frame a held fragment may be (L2 header included): an MTU of 2,034 bytes.
pub const HELD_FRAME_BYTES: usize = 2048;

/// A held later fragment: its datagram and the slot it claimed (below [`FRAGMENT_HOLD_SLOTS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HeldFragmentKey {
    pub datagram: FragKey,
    pub slot: u32,
}

/// A later fragment held until its datagram's first fragment arrives: the whole frame as it
/// arrived, replayed into the interface's ingress behind the first.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HeldFragment {
    /// When it was held (`bpf_ktime_get_ns`): older than [`FRAGMENT_HOLD_NS`] it is not replayed.
    pub held_ns: u64,
    /// Bytes of `frame` that are the frame.
    pub len: u32,
    /// How it arrived: 0 (not through the tunnel) or [`tunnel_id::DSR`] (through it, to be
    /// translated here). Replayed only behind a first fragment that arrived the same way.
    pub arrival_id: u32,
    pub frame: [u8; HELD_FRAME_BYTES],
}

/// How long a held fragment waits for its first: a reordering is a matter of milliseconds, and
/// an IPv4 id may come round again (after 65,536 datagrams between two addresses).
pub const FRAGMENT_HOLD_NS: u64 = 1_000_000_000;

/// Maglev table sizes: primes, so every backend's permutation visits every entry. A table of
/// more than 100 entries per backend spreads flows evenly and moves little more than 1/N of them
/// when one of N backends goes (Cilium's guidance); the agent picks the smallest size that
/// gives that, from the smallest it is configured with, up to the largest here.
pub const MAGLEV_SIZES: [u32; 10] = [
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071,
];

/// A Maglev table is stored in chunks of this many entries, each one map value: a service's table
/// grows with the service without a value size to match the largest.
pub const MAGLEV_CHUNK: usize = 4096;
/// log2 of [`MAGLEV_CHUNK`].
pub const MAGLEV_CHUNK_SHIFT: u32 = 12;

/// A source prefix allowed to reach a service id's restricted frontends, as the LPM trie
/// `WEIR_SOURCE_RANGES` keys it: the prefix length counts `service_id` and `family` (64 bits)
/// and then the address's own prefix, so a lookup with the full length matches within the
/// service only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange {
    /// Network byte order, so the trie's bitwise match compares the id as a whole first.
    pub service_id_be: u32,
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: Addr,
}

/// Bits of [`SourceRange`] before the address: part of every prefix.
pub const SOURCE_RANGE_FIXED_BITS: u32 = 64;

/// Which chunk of which service's Maglev table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MaglevKey {
    pub service_id: u32,
    pub chunk: u32,
}

/// Entries `chunk * MAGLEV_CHUNK ..` of a service's Maglev table: entry `i` names the backend
/// that owns the `i`-th slice of the flow-hash space. Past the table's end, zeros.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevChunk {
    pub backend_ids: [u32; MAGLEV_CHUNK],
}

impl Default for MaglevChunk {
    fn default() -> Self {
        MaglevChunk {
            backend_ids: [0; MAGLEV_CHUNK],
        }
    }
}

/// The table entry a flow hash falls on, in a table of `size` entries: a multiply-shift range
/// reduction, which (unlike `%`) the verifier can bound.
#[inline(always)]
pub fn maglev_index(hash: u32, size: u32) -> u32 {
    ((hash as u64 * size as u64) >> 32) as u32
}

/// Where entry `index` of a service's table lives: the chunk's key and the offset in it.
#[inline(always)]
pub fn maglev_slot(service_id: u32, index: u32) -> (MaglevKey, usize) {
    (
        MaglevKey {
            service_id,
            chunk: index >> MAGLEV_CHUNK_SHIFT,
        },
        (index as usize) & (MAGLEV_CHUNK - 1),
    )
}

/// Hash of the parts of a flow every ingress node sees alike: the client's address and port and
/// the service port, not the node address the client happened to use. The same function runs
/// in the kernel and in user space (tests and tools), so it must stay pure integer arithmetic.
#[inline(always)]
pub fn flow_hash(client: &Addr, sport_be: u16, dport_be: u16, proto: u8) -> u32 {
    let b = &client.bytes;
    let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let mut h = 0x9747_b28c_u32 ^ proto as u32;
    h = mix(h, word(0));
    h = mix(h, word(4));
    h = mix(h, word(8));
    h = mix(h, word(12));
    h = mix(h, ((sport_be as u32) << 16) | dport_be as u32);
    // murmur3's finaliser: every input bit reaches every output bit.
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// How the node runs: one entry, written by the agent before any program is attached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// Source address a pod sees when its own service sends it its own connection (hairpin).
    pub hairpin_v4: Addr,
    pub hairpin_v6: Addr,
    /// The collect-metadata tunnel device (VXLAN or IPIP); 0 when there is none.
    pub tunnel_ifindex: u32,
    pub flags: u32,
    /// The smallest MTU of the host interfaces the tunnel runs over: an inner packet may be this
    /// less the encapsulation overhead. 0 skips the check.
    pub underlay_mtu: u32,
}

pub mod node_flags {
    /// Remote backends of external traffic reply straight to the client (direct server return)
    /// instead of through the ingress node.
    pub const DSR: u32 = 1 << 0;
    /// The tunnel device is IPIP: packets arriving on it carry no Ethernet header, no tunnel id
    /// (the node's own DSR flag says how to treat them), and only IPv4 travels through it.
    pub const TUNNEL_IPIP: u32 = 1 << 1;
    /// Weir forwards translated packets itself (FIB lookup and redirect) instead of handing
    /// them back to the stack's routing (`datapath.forwarding`).
    pub const FORWARD: u32 = 1 << 2;
    /// A NetworkPolicy isolates at least one of this node's pods: flows no service translates
    /// are looked up in the policy maps too (without it, they pass after the service lookups).
    pub const POLICY: u32 = 1 << 3;
    /// The XDP pre-filter lets a deny-listed source reach the node's inbound failsafe ports
    /// (`WEIR_FAILSAFE_PORTS`): the default, so a deny-list can never cut a node off.
    pub const PREFILTER_FAILSAFE: u32 = 1 << 4;
}

/// Bytes the tunnel adds in front of an inner packet, by tunnel kind and underlay family.
pub const fn tunnel_overhead(ipip: bool, underlay_family: u8) -> u32 {
    let outer_ip = if underlay_family == FAMILY_V6 { 40 } else { 20 };
    if ipip {
        outer_ip
    } else {
        // UDP, VXLAN and the inner Ethernet header.
        outer_ip + 8 + 8 + 14
    }
}

/// Tunnel ids (the VXLAN VNI) say how the receiving node must treat a packet.
pub mod tunnel_id {
    /// Already translated by the ingress node; replies go back to it through the tunnel.
    pub const NAT_AT_INGRESS: u32 = 1;
    /// Untranslated: the receiving node picks a local backend, translates, and replies directly.
    pub const DSR: u32 = 2;
}

/// The `skb->mark` bit of a fragment that arrived through the tunnel untranslated (DSR) and is
/// sent round again behind its first fragment (`frag::replay` in the eBPF crate): the replay's
/// redirect drops the tunnel metadata with the skb's dst, but keeps the mark within the network
/// namespace, so the replayed fragment is recognised as a DSR arrival by it.
pub const REPLAY_MARK: u32 = 1 << 21;

/// A client's backend under `sessionAffinity: ClientIP`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey {
    pub client: Addr,
    pub service_id: u32,
    pub family: u8,
    pub _pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    pub last_used_ns: u64,
    pub backend_id: u32,
    /// The slot the backend was found at: if the slot names another backend now, the
    /// affinity is void (the endpoint left the service).
    pub slot: u32,
}

/// A connection as seen in one direction: the packet's own source and destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub saddr: Addr,
    pub daddr: Addr,
    /// Network byte order. For ICMP these are zero.
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: u16,
}

impl CtKey {
    /// The key of packets travelling the other way.
    pub const fn reversed(&self) -> CtKey {
        CtKey {
            saddr: self.daddr,
            daddr: self.saddr,
            sport_be: self.dport_be,
            dport_be: self.sport_be,
            proto: self.proto,
            family: self.family,
            _pad: 0,
        }
    }
}

/// The key of the entry paired with this one (forward with reverse); ENCAP entries stand alone.
/// The data path follows it to promote a flow's two entries together, the agent to judge and
/// reclaim a flow as a whole.
#[inline(always)]
pub fn partner_key(key: &CtKey, value: &CtValue) -> Option<CtKey> {
    let hairpin = value.flags & ct_flags::HAIRPIN != 0;
    match value.kind {
        // Replies come from the backend to the client (or to the hairpin address, which a
        // hairpin forward entry keeps in `tunnel_peer`).
        ct_kind::FORWARD => Some(CtKey {
            saddr: value.nat_addr,
            daddr: if hairpin {
                value.tunnel_peer
            } else {
                key.saddr
            },
            sport_be: value.nat_port_be,
            dport_be: if value.client_port_be != 0 {
                value.client_port_be
            } else {
                key.sport_be
            },
            proto: key.proto,
            family: key.family,
            _pad: 0,
        }),
        // The client addressed the frontend the reply is rewritten to; under hairpin the client
        // is the backend itself.
        ct_kind::REVERSE => Some(CtKey {
            saddr: if hairpin { key.saddr } else { key.daddr },
            daddr: value.nat_addr,
            sport_be: if value.client_port_be != 0 {
                value.client_port_be
            } else {
                key.dport_be
            },
            dport_be: value.nat_port_be,
            proto: key.proto,
            family: key.family,
            _pad: 0,
        }),
        _ => None,
    }
}

/// Tuple collisions: two flows of one client address and port that reach one backend through
/// two frontends share a reply key. The second one's client port, as the backend sees it,
/// moves to a free one (`CtValue::client_port_be`).
pub mod collision {
    use super::{flow_hash, CtKey};

    /// Ports a new flow tries for its reply key before it gives up (`drop_ct_collision`): its
    /// own, then moved ones. A moved port is taken only if that client already has a flow to
    /// that backend from it, one of [`PORT_COUNT`]: one moved port is plenty. Each try costs
    /// the data path two lookups, and the verifier a walk of the try in every state it reaches
    /// a new flow in: on 6.18, 16,000 to 22,000 instructions each (2 tries verify 267K, 4 tries
    /// 314K, 8 tries 380K; 141K without collision handling).
    pub const TRIES: u32 = 2;
    /// Where a moved port lies: Linux's default ephemeral range (`ip_local_port_range`), ports
    /// the client's own stack could have picked.
    pub const PORT_FIRST: u32 = 32768;
    pub const PORT_COUNT: u32 = 61000 - PORT_FIRST;

    /// The port (network byte order) try `attempt` (from 1) of the flow with the client's key
    /// `forward` moves to. A function of the flow alone (client, its port, the frontend): two
    /// CPUs racing its first packets try the same ports, and meet at the same entries.
    #[inline(always)]
    pub fn moved_port_be(forward: &CtKey, attempt: u32) -> u16 {
        let hash = flow_hash(
            &forward.saddr,
            forward.sport_be,
            attempt as u16,
            forward.proto,
        ) ^ flow_hash(&forward.daddr, forward.dport_be, 0, forward.proto);
        let offset = ((hash as u64 * PORT_COUNT as u64) >> 32) as u32;
        ((PORT_FIRST + offset) as u16).to_be()
    }
}

/// A flow as it arrived through the tunnel: the client's key (as the ingress node translated
/// it) and the ingress node that sent it. The backend's node keeps, under it, the client port it
/// moved the flow to when another node's flow of the same tuple held the reply key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MovedArrivalKey {
    pub flow: CtKey,
    pub peer: Addr,
    pub peer_family: u8,
    pub _pad: [u8; 3],
}

impl MovedArrivalKey {
    /// The reply key of the moved flow, holding `moved_port_be` (the port the backend sees).
    pub const fn moved_reply_key(&self, moved_port_be: u16) -> CtKey {
        let mut key = self.flow.reversed();
        key.dport_be = moved_port_be;
        key
    }
}

/// What a conntrack entry tells the program to do with a packet that matches its key.
/// A pod of this node that a NetworkPolicy isolates (`WEIR_POLICY_ENDPOINTS`' value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyEndpoint {
    /// What its rules are keyed by ([`PolicyRuleKey::endpoint_be`]); the same for all of a
    /// pod's addresses.
    pub id: u32,
    /// [`policy_flags`].
    pub flags: u8,
    pub _pad: [u8; 3],
}

/// Which directions a policy isolates an endpoint in.
pub mod policy_flags {
    /// Only what its ingress rules allow reaches it.
    pub const INGRESS: u8 = 1 << 0;
    /// It reaches only what its egress rules allow.
    pub const EGRESS: u8 = 1 << 1;
}

/// The direction of a rule, as [`PolicyRuleKey::direction`].
pub mod policy_direction {
    pub const INGRESS: u8 = 1;
    pub const EGRESS: u8 = 2;
}

/// What `weir-agent monitor` asks the data path to stream (`WEIR_MONITOR`'s one entry). Nothing
/// is written unless a monitor holds a lease: one that dies without a word stops costing
/// anything within [`MONITOR_LEASE_NS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorConfig {
    /// [`monitor_flags`]: which events.
    pub flags: u32,
    /// The watching process: a second monitor sees the lease is taken.
    pub owner_pid: u32,
    /// `CLOCK_MONOTONIC` (the data path's `bpf_ktime_get_ns`) until which the lease holds.
    pub until_ns: u64,
}

pub mod monitor_flags {
    /// Flows NetworkPolicy denies, at their first packet (and every packet after: a denied
    /// flow is not recorded).
    pub const DENIED: u32 = 1;
    /// Flows NetworkPolicy allows to or from an isolated pod, once per flow.
    pub const ALLOWED: u32 = 2;
}

/// How long a monitor's lease lasts; it renews it every second.
pub const MONITOR_LEASE_NS: u64 = 5_000_000_000;
/// The flow events' ring buffer: about 3,000 events between two reads of the monitor.
pub const MONITOR_RING_BYTES: u32 = 256 * 1024;

/// One flow event (`WEIR_MONITOR_EVENTS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorEvent {
    /// `CLOCK_MONOTONIC`, nanoseconds.
    pub time_ns: u64,
    /// The flow as the pod sees it: the client's own address, and for a service's flow the
    /// chosen backend.
    pub flow: CtKey,
    /// For a service's flow, the frontend the client addressed (else zero).
    pub frontend: Addr,
    pub frontend_port_be: u16,
    pub _pad: u16,
    /// The counter the packet was accounted to: `counter::DROP_POLICY_INGRESS`,
    /// `counter::DROP_POLICY_EGRESS` or `counter::POLICY_ALLOWED`.
    pub outcome: u32,
    /// The isolated pod's policy endpoint id whose rules decided (`PolicyEndpoint::id`).
    pub endpoint_id: u32,
    pub _pad2: u32,
}

/// The peer identity of "every address": the identity of rules without peers (`from: []`,
/// `to: []`, or no `from`/`to` at all). Pod and CIDR identities are never 0.
pub const POLICY_ANY_PEER: u32 = 0;

/// `WEIR_POLICY_CIDRS`' key data: an address of one family. Its prefix length counts
/// [`POLICY_CIDR_FIXED_BITS`] plus the CIDR's own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyCidrKey {
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: Addr,
}

/// The bits of a [`PolicyCidrKey`] before its address.
pub const POLICY_CIDR_FIXED_BITS: u32 = 32;

/// `WEIR_FAILSAFE_PORTS`' key: a port of the node's that stays open whatever a deny-list or
/// host policy says, in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FailsafeKey {
    /// For inbound the node's own (destination) port, for outbound the remote one.
    pub port_be: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// [`failsafe_direction`].
    pub direction: u8,
}

pub mod failsafe_direction {
    pub const INBOUND: u8 = 1;
    pub const OUTBOUND: u8 = 2;
}

/// `WEIR_POLICY_RULES`' key data, compared as bytes from the first: every field is big-endian,
/// so a prefix length stops a rule where it stops caring. [`policy_rule_bits`] has the lengths.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRuleKey {
    /// [`PolicyEndpoint::id`], network byte order.
    pub endpoint_be: u32,
    /// The peer's identity ([`POLICY_ANY_PEER`], a pod's or a CIDR's), network byte order.
    pub identity_be: u32,
    /// [`policy_direction`].
    pub direction: u8,
    pub proto: u8,
    /// Network byte order.
    pub port_be: u16,
}

/// Prefix lengths of [`PolicyRuleKey`]s.
pub mod policy_rule_bits {
    /// Every protocol and port (a rule without `ports`).
    pub const ANY_PROTOCOL: u32 = 72;
    /// Every port of one protocol (a `ports` entry without `port`).
    pub const ANY_PORT: u32 = 80;
    /// One port; a port range is a set of prefixes between this and [`ANY_PORT`].
    pub const PORT: u32 = 96;
}

/// How long an allowed flow stays known without a packet (`WEIR_POLICY_FLOWS`); a TCP SYN
/// without ACK on a tuple recorded over [`CT_REFRESH_NS`] ago is looked up in the rules again,
/// so a new connection on an old tuple meets the policy of its day (the same SYN met twice in
/// a moment, at `weir_ingress` and at the pod's door, is decided once).
pub const POLICY_FLOW_IDLE_NS: u64 = 600_000_000_000;

pub mod ct_kind {
    /// Client to service: rewrite the destination to `nat_addr:nat_port` (the backend).
    pub const FORWARD: u8 = 1;
    /// Backend to client: rewrite the source to `nat_addr:nat_port` (the service frontend).
    pub const REVERSE: u8 = 2;
    /// Send the packet into the tunnel towards `tunnel_peer`: DSR traffic at the ingress node,
    /// and replies at a backend's node that return through the ingress node (unchanged, or with
    /// the client's own port back when the backend's node moved it, `client_port_be`).
    pub const ENCAP: u8 = 3;
}

/// Conntrack entry flags.
pub mod ct_flags {
    /// Hairpin: the client is its own backend. FORWARD also rewrites the source to the node's
    /// hairpin address; REVERSE also rewrites the destination back to the client.
    pub const HAIRPIN: u8 = 1 << 0;
    /// FORWARD: after translation, send into the tunnel towards `tunnel_peer`.
    pub const TUNNEL: u8 = 1 << 1;
    /// ENCAP: tag the tunnel packet for DSR handling at the other end.
    pub const DSR: u8 = 1 << 2;
    /// REVERSE: the frontend is one of this node's own addresses (a NodePort). Replies get that
    /// address as their source, which the node's input path would drop as a martian, so they
    /// are forwarded by a FIB lookup and a redirect instead of through the stack.
    pub const HOST_FRONTEND: u8 = 1 << 3;
}

/// TCP flags seen in one direction of a connection; the agent derives the connection state
/// (and so its expiry) from both directions' bits.
pub mod ct_seen {
    pub const SYN: u8 = 1 << 0;
    pub const ACK: u8 = 1 << 1;
    pub const FIN: u8 = 1 << 2;
    pub const RST: u8 = 1 << 3;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) at creation.
    pub created_ns: u64,
    /// Refreshed at most once per [`CT_REFRESH_NS`] on the fast path, and whenever a TCP flag
    /// bit is seen for the first time.
    pub last_seen_ns: u64,
    pub nat_addr: Addr,
    /// Underlay address of the node at the other end of the tunnel (`ct_flags::TUNNEL`, ENCAP).
    pub tunnel_peer: Addr,
    pub backend_id: u32,
    /// Network byte order.
    pub nat_port_be: u16,
    pub kind: u8,
    /// `ct_seen` bits of packets matching this entry's key.
    pub seen: u8,
    pub flags: u8,
    pub tunnel_family: u8,
    /// Network byte order; 0 (the common case) leaves the client's port alone. Set when the
    /// flow's reply key was taken by another flow (a tuple collision, see [`partner_key`]): the
    /// client's port as the other side of the translation must see it. FORWARD: the source port
    /// the backend sees instead of the client's own; REVERSE: the client's own port, given back
    /// to replies as their destination; ENCAP (a return entry at the backend's node, keyed by
    /// the moved port, see [`MovedArrivalKey`]): the client's own port, as for REVERSE.
    pub client_port_be: u16,
    pub _pad: [u8; 4],
}

/// A host socket's translation, looked up by what the socket sees (the backend) to show it the
/// service frontend instead: the source of a UDP reply (recvmsg) and the peer (getpeername).
/// Socket cookies are never reused while the system runs, so a stale entry never misfires; the
/// map is LRU, so stale entries cost nothing but their slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockReverseKey {
    pub cookie: u64,
    pub backend: Addr,
    /// Network byte order.
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: u32,
}

/// How stale `last_seen_ns` may get before the fast path writes it again: expiry runs in seconds,
/// and skipping the write keeps established flows from dirtying a shared cache line per packet.
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

/// Indexes of the per-CPU packet counters. Every packet the program sees counts exactly one
/// outcome (the indexes below [`counter::OUTCOMES`]), so their sum is the packet count and no
/// decision goes unaccounted. Indexes from `OUTCOMES` on count events some packets cause besides
/// their outcome.
pub mod counter {
    pub const CT_FORWARD_HIT: u32 = 0;
    pub const CT_REVERSE_HIT: u32 = 1;
    pub const CT_ENCAP_HIT: u32 = 2;
    pub const CT_NEW_FLOW: u32 = 3;
    /// A new flow to a remote backend, sent into the tunnel.
    pub const CT_NEW_TUNNEL: u32 = 4;
    /// A flow another node translated arrived through the tunnel; its replies will return.
    pub const CT_NEW_FROM_TUNNEL: u32 = 5;
    /// A further packet of such a flow.
    pub const CT_FROM_TUNNEL_HIT: u32 = 6;
    pub const ICMP_ERROR_NAT: u32 = 7;
    pub const REJECT_NO_BACKEND: u32 = 8;
    pub const PASS_NOT_IP: u32 = 9;
    pub const PASS_FRAGMENT: u32 = 10;
    pub const PASS_OTHER_PROTO: u32 = 11;
    pub const PASS_NO_SERVICE: u32 = 12;
    pub const PASS_ICMP_UNRELATED: u32 = 13;
    pub const PASS_IPV6_EXTENSION: u32 = 14;
    pub const DROP_TRUNCATED: u32 = 15;
    pub const DROP_MALFORMED: u32 = 16;
    pub const DROP_NO_LOCAL_BACKEND: u32 = 17;
    pub const DROP_BACKEND_MISSING: u32 = 18;
    pub const DROP_CT_FULL: u32 = 19;
    pub const DROP_REWRITE_FAILED: u32 = 20;
    pub const DROP_TUNNEL_FAILED: u32 = 21;
    pub const DROP_REJECT_FAILED: u32 = 22;
    /// A packet too big for the tunnel (with DF, or IPv6) was answered with ICMP
    /// "fragmentation needed" / "packet too big" from the address the client used.
    pub const ICMP_TOO_BIG: u32 = 23;
    /// A packet arrived through the tunnel from an address that is no node's: dropped before
    /// anything else looks at it, so no one outside the cluster can plant a flow.
    pub const DROP_TUNNEL_UNTRUSTED: u32 = 24;
    /// A new flow to a load-balancer IP or NodePort from a source outside the Service's
    /// `loadBalancerSourceRanges`.
    pub const DROP_SOURCE_RANGE: u32 = 25;
    /// A TCP segment (ACK, no SYN) of no known flow to a frontend without endpoints: its
    /// connection ended with its last endpoint; answered with a reset from the frontend.
    pub const RESET_NO_BACKEND: u32 = 26;
    /// An ICMP error about a flow that crossed the tunnel (a backend's error at its node in
    /// ingress-return mode, a router's error about a DSR reply at the ingress node) went back
    /// into the tunnel to the node that translates the flow.
    pub const ICMP_ERROR_TUNNELLED: u32 = 27;
    /// A TCP reset to a frontend without endpoints: nothing to reset, and a reset is never
    /// answered.
    pub const DROP_RESET_NO_BACKEND: u32 = 28;
    /// A later fragment to a frontend address whose first fragment was not translated here
    /// (not seen yet, lost, or its entry evicted): it cannot be translated without the ports.
    /// Only what cannot be held: through the tunnel translated by the ingress node, or without
    /// an L2 header (IPIP); elsewhere such a fragment is held ([`FRAGMENT_HELD`]).
    pub const DROP_FRAGMENT_UNKNOWN: u32 = 29;
    /// A packet to a ClusterIP, external IP or load-balancer IP that nothing translates (a port
    /// the Service does not have, ICMP echo, another protocol, an extension header Weir does not
    /// walk): dropped rather than routed on towards the underlay.
    pub const DROP_FRONTEND_UNTRANSLATED: u32 = 30;
    /// A new flow whose reply key another flow holds (a tuple collision: one client address
    /// and port reaching one backend through two frontends) found no free source port towards
    /// the backend within its bounded tries: dropped rather than misrouted.
    pub const DROP_CT_COLLISION: u32 = 31;
    /// A later fragment to a frontend address or a Node's (a NodePort's) arrived before its
    /// first (not through the tunnel, or through it untranslated, DSR): its frame is held
    /// ([`super::map_names::HELD_FRAGMENTS`]) and replayed behind its first.
    pub const FRAGMENT_HELD: u32 = 32;
    /// A first fragment found later ones of its datagram held: it and they were sent into the
    /// ingress of its interface again, in that order (each counts its own outcome there); the
    /// packet itself, their vessel, is dropped.
    pub const FRAGMENT_REPLAYED: u32 = 33;
    /// A later fragment that would be held, but its frame is larger than
    /// [`super::HELD_FRAME_BYTES`], or its datagram holds [`super::FRAGMENT_HOLD_SLOTS`] already.
    pub const DROP_FRAGMENT_NOT_HELD: u32 = 34;
    /// A new flow (or an untracked packet) that the ingress rules of the NetworkPolicies
    /// isolating its destination pod do not allow.
    pub const DROP_POLICY_INGRESS: u32 = 35;
    /// A new flow (or an untracked packet) that the egress rules of the NetworkPolicies
    /// isolating its source pod do not allow.
    pub const DROP_POLICY_EGRESS: u32 = 36;
    /// Outcomes are the counters below this index: exactly one per packet.
    pub const OUTCOMES: u32 = 37;
    /// Event: a flow was answered, and its entries moved from the new-flow table to the
    /// established one. New flows minus promotions is what a flood leaves unanswered.
    pub const CT_PROMOTED: u32 = 37;
    /// Event: a new flow's reply key was taken by another flow, and the flow got another source
    /// port towards its backend (restored on its replies and ICMP errors): at the node that
    /// translates it, or at the backend's node for a flow another node translated (see
    /// `MovedArrivalKey`).
    pub const CT_COLLISION_RESOLVED: u32 = 38;
    /// Event: a held fragment was not replayed (held too long ago, arrived another way than its
    /// first fragment, or a helper failed): lost.
    pub const FRAGMENT_REPLAY_FAILED: u32 = 39;
    /// Event: Weir sent a translated packet to its next hop itself (FIB lookup and redirect:
    /// into a local pod's namespace, or out of a host interface), skipping the stack's routing.
    pub const FORWARDED: u32 = 40;
    /// Event: a translated packet Weir would forward went to the stack instead: the FIB had no
    /// forwarding answer (no route, a local destination, forwarding disabled, bigger than the
    /// route's MTU) or its TTL was about to expire. The stack answers those as it always did.
    pub const FORWARD_TO_STACK: u32 = 41;
    /// Event: a flow to or from a pod a NetworkPolicy isolates was allowed by its rules and
    /// recorded (`WEIR_POLICY_FLOWS`, or its conntrack entries for a service's flow).
    pub const POLICY_ALLOWED: u32 = 42;
    /// Event: a flow event for `weir-agent monitor` found its ring buffer full (the monitor
    /// reads slower than the data path writes): the event is lost, the packet is not.
    pub const MONITOR_LOST: u32 = 43;
    /// Event (XDP): a packet from a prefix of the configuration's deny-list, dropped before the
    /// stack. XDP drops are not tc outcomes: the tc programs never see the packet.
    pub const PREFILTER_DROP_CONFIG: u32 = 44;
    /// Event (XDP): a packet from a prefix of a deny-list object (`PrefilterDenyList`), dropped.
    pub const PREFILTER_DROP_OBJECT: u32 = 45;
    /// Event (XDP): a packet from a deny-listed prefix to an inbound failsafe port, let through.
    pub const PREFILTER_PASS_FAILSAFE: u32 = 46;
    pub const COUNT: u32 = 47;

    /// Names for display, indexed by counter.
    pub const NAMES: [&str; COUNT as usize] = [
        "ct_forward_hit",
        "ct_reverse_hit",
        "ct_encap_hit",
        "ct_new_flow",
        "ct_new_tunnel",
        "ct_new_from_tunnel",
        "ct_from_tunnel_hit",
        "icmp_error_nat",
        "reject_no_backend",
        "pass_not_ip",
        "pass_fragment",
        "pass_other_proto",
        "pass_no_service",
        "pass_icmp_unrelated",
        "pass_ipv6_extension",
        "drop_truncated",
        "drop_malformed",
        "drop_no_local_backend",
        "drop_backend_missing",
        "drop_ct_full",
        "drop_rewrite_failed",
        "drop_tunnel_failed",
        "drop_reject_failed",
        "icmp_too_big",
        "drop_tunnel_untrusted",
        "drop_source_range",
        "reset_no_backend",
        "icmp_error_tunnelled",
        "drop_reset_no_backend",
        "drop_fragment_unknown",
        "drop_frontend_untranslated",
        "drop_ct_collision",
        "fragment_held",
        "fragment_replayed",
        "drop_fragment_not_held",
        "drop_policy_ingress",
        "drop_policy_egress",
        "ct_promoted",
        "ct_collision_resolved",
        "fragment_replay_failed",
        "forwarded",
        "forward_to_stack",
        "policy_allowed",
        "monitor_lost",
        "prefilter_drop_config",
        "prefilter_drop_object",
        "prefilter_pass_failsafe",
    ];
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: each type is #[repr(C)], made only of integers and byte arrays, with every padding
    // byte spelled out as a field, so any bit pattern is valid and none is uninitialised.
    unsafe impl aya::Pod for FrontendKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BackendSlotKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BackendValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for MonitorConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FailsafeKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for MonitorEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for HostAddrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for MaglevKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SourceRange {}
    // SAFETY: as above.
    unsafe impl aya::Pod for MaglevChunk {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NodeConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AffinityValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockReverseKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FragKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FragPorts {}
    // SAFETY: as above.
    unsafe impl aya::Pod for MovedArrivalKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for HeldFragmentKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for HeldFragment {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyEndpoint {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyCidrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyRuleKey {}
}

// The layouts are part of the pinned-map ABI: fail the build, not the kernel, if they move.
const _: () = {
    assert!(core::mem::size_of::<FrontendKey>() == 20);
    assert!(core::mem::size_of::<ServiceValue>() == 24);
    assert!(core::mem::size_of::<BackendSlotKey>() == 8);
    assert!(core::mem::size_of::<BackendValue>() == 40);
    assert!(core::mem::size_of::<HostAddrKey>() == 20);
    assert!(core::mem::size_of::<MaglevKey>() == 8);
    assert!(core::mem::size_of::<SourceRange>() == 24);
    assert!(core::mem::size_of::<MaglevChunk>() == 4 * MAGLEV_CHUNK);
    assert!(MAGLEV_CHUNK == 1 << MAGLEV_CHUNK_SHIFT);
    assert!(core::mem::size_of::<NodeConfig>() == 44);
    assert!(core::mem::size_of::<AffinityKey>() == 24);
    assert!(core::mem::size_of::<AffinityValue>() == 16);
    assert!(core::mem::size_of::<CtKey>() == 40);
    assert!(core::mem::size_of::<CtValue>() == 64);
    assert!(core::mem::size_of::<SockReverseKey>() == 32);
    assert!(core::mem::size_of::<FragKey>() == 40);
    assert!(core::mem::size_of::<FragPorts>() == 4);
    assert!(core::mem::size_of::<MovedArrivalKey>() == 60);
    assert!(core::mem::size_of::<HeldFragmentKey>() == 44);
    assert!(core::mem::size_of::<HeldFragment>() == 16 + HELD_FRAME_BYTES);
    assert!(core::mem::size_of::<PolicyEndpoint>() == 8);
    assert!(core::mem::size_of::<PolicyCidrKey>() == 20);
    assert!(core::mem::size_of::<PolicyRuleKey>() == 12);
    assert!(core::mem::size_of::<MonitorConfig>() == 16);
    assert!(core::mem::size_of::<MonitorEvent>() == 80);
    assert!(core::mem::size_of::<FailsafeKey>() == 4);
    assert!(policy_rule_bits::PORT as usize == 8 * core::mem::size_of::<PolicyRuleKey>());
};

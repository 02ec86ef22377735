//! Map keys, values and constants shared by Weir's eBPF programs and the agent.
//!
//! Every type here is `#[repr(C)]` with explicit padding fields, so the kernel and user sides read
//! the same bytes and hashing never sees uninitialised padding. Addresses are 16 bytes in network
//! byte order for both families (IPv4 uses the first four bytes, the rest zero), so IPv6 needs no
//! layout change.
#![no_std]

/// Bumped whenever a pinned map's key or value layout changes: the agent pins under a directory
/// named after it, so a new agent never reinterprets an older agent's bytes.
pub const MAP_LAYOUT_VERSION: u32 = 1;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Map names, as the eBPF object defines them and as they are pinned.
pub mod map_names {
    pub const SERVICES: &str = "WEIR_SERVICES";
    pub const BACKEND_SLOTS: &str = "WEIR_BACKEND_SLOTS";
    pub const BACKENDS: &str = "WEIR_BACKENDS";
    pub const CONNTRACK: &str = "WEIR_CONNTRACK";
    pub const COUNTERS: &str = "WEIR_COUNTERS";
    /// Every map the agent pins, in the order it creates them.
    pub const PINNED: [&str; 5] = [SERVICES, BACKEND_SLOTS, BACKENDS, CONNTRACK, COUNTERS];
}

/// Program names in the eBPF object.
pub mod program_names {
    /// Service NAT and conntrack on packets entering the node from any interface.
    pub const INGRESS: &str = "weir_ingress";
    /// Does nothing but pass: the baseline every per-packet figure is a ratio against.
    pub const PASS: &str = "weir_pass";
}

/// Default capacities; the agent may override them at load time.
pub mod capacity {
    pub const SERVICES: u32 = 65_536;
    pub const BACKEND_SLOTS: u32 = 262_144;
    pub const BACKENDS: u32 = 262_144;
    pub const CONNTRACK: u32 = 524_288;
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

/// A service frontend: what a client addresses (ClusterIP, later NodePort and external IPs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub addr: Addr,
    /// Network byte order, as in the packet.
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
}

/// Service flags.
pub mod service_flags {
    /// No ready endpoint: the program rejects instead of passing the packet to a VIP nobody owns.
    pub const NO_BACKENDS: u32 = 1 << 0;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Stable identifier of this (service, port) pair; keys its backend slots.
    pub service_id: u32,
    /// Slots `0..backend_count` of `BACKEND_SLOTS` are valid for this service.
    pub backend_count: u32,
    pub flags: u32,
    /// Reserved for session affinity: seconds a client keeps its backend (0 = off).
    pub affinity_timeout_s: u32,
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

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendValue {
    pub addr: Addr,
    /// Network byte order.
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
    pub flags: u32,
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

/// What a conntrack entry tells the program to do with a packet that matches its key.
pub mod ct_kind {
    /// Client to service: rewrite the destination to `nat_addr:nat_port` (the backend).
    pub const FORWARD: u8 = 1;
    /// Backend to client: rewrite the source to `nat_addr:nat_port` (the service frontend).
    pub const REVERSE: u8 = 2;
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
    pub backend_id: u32,
    /// Network byte order.
    pub nat_port_be: u16,
    pub kind: u8,
    /// `ct_seen` bits of packets matching this entry's key.
    pub seen: u8,
}

/// How stale `last_seen_ns` may get before the fast path writes it again: expiry runs in seconds,
/// and skipping the write keeps established flows from dirtying a shared cache line per packet.
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

/// Indexes of the per-CPU packet counters. Every packet the program sees counts exactly one
/// outcome, so their sum is the packet count and no decision goes unaccounted.
pub mod counter {
    pub const CT_FORWARD_HIT: u32 = 0;
    pub const CT_REVERSE_HIT: u32 = 1;
    pub const CT_NEW_FLOW: u32 = 2;
    pub const ICMP_ERROR_NAT: u32 = 3;
    pub const PASS_NOT_IP: u32 = 4;
    pub const PASS_FRAGMENT: u32 = 5;
    pub const PASS_OTHER_PROTO: u32 = 6;
    pub const PASS_NO_SERVICE: u32 = 7;
    pub const PASS_ICMP_UNRELATED: u32 = 8;
    pub const DROP_TRUNCATED: u32 = 9;
    pub const DROP_MALFORMED: u32 = 10;
    pub const DROP_NO_BACKEND: u32 = 11;
    pub const DROP_BACKEND_MISSING: u32 = 12;
    pub const DROP_CT_FULL: u32 = 13;
    pub const DROP_REWRITE_FAILED: u32 = 14;
    pub const COUNT: u32 = 15;

    /// Names for display, indexed by counter.
    pub const NAMES: [&str; COUNT as usize] = [
        "ct_forward_hit",
        "ct_reverse_hit",
        "ct_new_flow",
        "icmp_error_nat",
        "pass_not_ip",
        "pass_fragment",
        "pass_other_proto",
        "pass_no_service",
        "pass_icmp_unrelated",
        "drop_truncated",
        "drop_malformed",
        "drop_no_backend",
        "drop_backend_missing",
        "drop_ct_full",
        "drop_rewrite_failed",
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
    unsafe impl aya::Pod for CtValue {}
}

// The layouts are part of the pinned-map ABI: fail the build, not the kernel, if they move.
const _: () = {
    assert!(core::mem::size_of::<FrontendKey>() == 20);
    assert!(core::mem::size_of::<ServiceValue>() == 16);
    assert!(core::mem::size_of::<BackendSlotKey>() == 8);
    assert!(core::mem::size_of::<BackendValue>() == 24);
    assert!(core::mem::size_of::<CtKey>() == 40);
    assert!(core::mem::size_of::<CtValue>() == 40);
};

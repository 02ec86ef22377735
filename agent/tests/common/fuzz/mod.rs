//! A seeded fuzz harness for `weir_ingress` through BPF_PROG_TEST_RUN: generated and mutated
//! packets (see `generate`) run against three nodes loaded and filled through the agent's real
//! compile, plan and data-plane path (see `topology`), every packet held to the invariants of
//! `check`. The test `fuzz.rs` runs it at CI size; the bench `fuzz` runs it long.

pub mod check;
pub mod generate;
pub mod packet;
pub mod rng;
pub mod topology;

use std::fmt;
use std::time::{Duration, Instant};

use weir_common::{counter, program_names, NodeConfig};

use self::check::{Allowed, Violation};
use self::packet::hex;
use self::rng::Rng;
use self::topology::{Frontend, Layout, Profile};
use crate::common::{Harness, TC_ACT_SHOT};

/// The outcome counters: exactly one moves per packet. (The event counters after them, such as
/// conntrack promotions, move besides.)
const COUNTERS: usize = counter::OUTCOMES as usize;
/// Conntrack is emptied every this many packets (as expiry would), so a long run keeps making
/// new flows instead of filling the table once and dropping from then on.
const CONNTRACK_FLUSH_EVERY: u64 = 25_000;

/// How often the outcome counters are read.
#[derive(Clone, Copy, Debug)]
pub enum CounterCheck {
    /// Before and after every packet: each one moved exactly one counter by one.
    EveryPacket,
    /// For every `every`-th packet of a node; for the packets between, their count is the sum
    /// of the counters' moves.
    Sampled { every: u64 },
}

pub struct Settings {
    pub seed: u64,
    pub packets: u64,
    pub counters: CounterCheck,
}

impl Settings {
    /// The given defaults, unless `WEIR_FUZZ_SEED` or `WEIR_FUZZ_PACKETS` say otherwise (the
    /// seed in decimal or 0x-hex).
    pub fn from_env(seed: u64, packets: u64, counters: CounterCheck) -> Settings {
        let read = |name: &str| {
            std::env::var(name).ok().map(|v| {
                let parsed = match v.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => v.parse(),
                };
                parsed.unwrap_or_else(|e| panic!("{name}={v}: {e}"))
            })
        };
        Settings {
            seed: read("WEIR_FUZZ_SEED").unwrap_or(seed),
            packets: read("WEIR_FUZZ_PACKETS").unwrap_or(packets),
            counters,
        }
    }
}

/// What a run did: packets per outcome, and how fast.
pub struct Report {
    pub seed: u64,
    pub packets: u64,
    /// Frames the kernel refused before the program ran (too short for their ethertype).
    pub refused_by_kernel: u64,
    /// Packets the program let go changed, whose checksums and addresses were checked.
    pub rewritten: u64,
    pub outcomes: [u64; COUNTERS],
    pub elapsed: Duration,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rate = self.packets as f64 / self.elapsed.as_secs_f64();
        writeln!(
            f,
            "fuzz: seed {:#x}, {} packets in {:.1} s ({rate:.0} packets/s), {} refused by the \
             kernel before the program ran, {} rewritten and checked",
            self.seed,
            self.packets,
            self.elapsed.as_secs_f64(),
            self.refused_by_kernel,
            self.rewritten
        )?;
        for (name, total) in counter::NAMES.iter().zip(self.outcomes) {
            writeln!(f, "  {name:<22} {total:>12}")?;
        }
        Ok(())
    }
}

/// A broken invariant, with what it takes to replay it.
pub struct Failure {
    pub seed: u64,
    pub index: u64,
    pub node: &'static str,
    pub violation: Violation,
    pub input: Vec<u8>,
    pub result: Option<(u32, Vec<u8>)>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "fuzz invariant broken: {}", self.violation.0)?;
        writeln!(
            f,
            "  seed {:#x}, packet {} on node {}; replay: WEIR_FUZZ_SEED={:#x} \
             WEIR_FUZZ_PACKETS={} cargo test -p weir-agent --test fuzz",
            self.seed,
            self.index,
            self.node,
            self.seed,
            self.index + 1
        )?;
        writeln!(
            f,
            "  in  ({} bytes): {}",
            self.input.len(),
            hex(&self.input)
        )?;
        if let Some((verdict, output)) = &self.result {
            writeln!(
                f,
                "  out ({} bytes, verdict {verdict}): {}",
                output.len(),
                hex(output)
            )?;
        }
        Ok(())
    }
}

/// One fuzzed node: a data plane of its own and what the checker needs to know of it.
pub struct Node {
    pub name: &'static str,
    pub layout: Layout,
    pub harness: Harness,
    allowed: Allowed,
    /// The counters as last read, and the packets run since.
    counters: [u64; COUNTERS],
    unread: u64,
}

impl Node {
    pub fn new(profile: Profile) -> Node {
        let harness = Harness::for_node(
            &topology::cluster_yaml(),
            profile.options,
            profile.node,
            &topology::host_addrs(),
        );
        let allowed = allowed_addresses(&harness, &profile.node);
        Node {
            name: profile.name,
            layout: profile.layout,
            counters: harness.counter_values(),
            harness,
            allowed,
            unread: 0,
        }
    }

    /// How far each counter moved since the last read.
    fn counter_moves(&mut self) -> [u64; COUNTERS] {
        let now = self.harness.counter_values();
        let mut moves = [0; COUNTERS];
        for (i, m) in moves.iter_mut().enumerate() {
            *m = now[i] - self.counters[i];
        }
        self.counters = now;
        self.unread = 0;
        moves
    }

    /// The packets run since the last read moved the counters by exactly their number.
    fn check_batch(&mut self) -> Result<(), Violation> {
        let packets = self.unread;
        let moved: u64 = self.counter_moves().iter().sum();
        if moved != packets {
            return Err(Violation(format!(
                "{packets} packets since the last read moved the counters by {moved} in all"
            )));
        }
        Ok(())
    }

    /// Invariants 2 to 4, and 1 when the counters are read for this packet.
    fn check(
        &mut self,
        input: &[u8],
        result: &(u32, Vec<u8>),
        per_packet: bool,
    ) -> Result<(), Violation> {
        let (verdict, output) = (result.0, &result.1);
        check::rewrite(self.layout, &self.allowed, input, verdict, output)?;
        check::policy(input, verdict)?;
        if per_packet {
            check::outcome(&self.counter_moves(), verdict, input, output)?;
        }
        Ok(())
    }

    fn flush_conntrack(&mut self) {
        let conntrack = &mut self.harness.dataplane.conntrack;
        for key in conntrack.entries().expect("conntrack").keys() {
            // An entry gone meanwhile is as good as removed.
            let _ = conntrack.remove(key);
        }
    }
}

/// What the maps hold that a packet may be translated to (see [`Allowed`]): read back from
/// the maps, not taken from the YAML, so the check trusts only what the kernel saw.
fn allowed_addresses(harness: &Harness, node: &NodeConfig) -> Allowed {
    let state = harness.dataplane.services.read().expect("service maps");
    let mut allowed: std::collections::BTreeSet<[u8; 16]> = state
        .services
        .keys()
        .map(|k| k.addr.bytes)
        .chain(state.backends.values().map(|b| b.addr.bytes))
        .collect();
    let host = harness.dataplane.node.host_addrs().expect("host addresses");
    allowed.extend(host.iter().map(|h| h.addr.bytes));
    allowed.insert(node.hairpin_v4.bytes);
    allowed.insert(node.hairpin_v6.bytes);
    allowed.remove(&[0; 16]);
    Allowed(allowed)
}

pub struct Fuzzer {
    settings: Settings,
    nodes: Vec<Node>,
    frontends: Vec<Frontend>,
    refused_by_kernel: u64,
    rewritten: u64,
}

impl Fuzzer {
    pub fn new(settings: Settings) -> Fuzzer {
        Fuzzer {
            settings,
            nodes: topology::profiles().into_iter().map(Node::new).collect(),
            frontends: topology::frontends(),
            refused_by_kernel: 0,
            rewritten: 0,
        }
    }

    /// Runs every packet of the settings; the first broken invariant ends the run.
    pub fn run(&mut self) -> Result<Report, Box<Failure>> {
        let started = Instant::now();
        for index in 0..self.settings.packets {
            if index > 0 && index.is_multiple_of(CONNTRACK_FLUSH_EVERY) {
                self.nodes.iter_mut().for_each(Node::flush_conntrack);
            }
            self.packet(index)?;
        }
        let mut outcomes = [0; COUNTERS];
        for node in &mut self.nodes {
            let name = node.name;
            node.check_batch().map_err(|violation| {
                Box::new(Failure {
                    seed: self.settings.seed,
                    index: self.settings.packets,
                    node: name,
                    violation,
                    input: Vec::new(),
                    result: None,
                })
            })?;
            for (total, count) in outcomes.iter_mut().zip(node.counters) {
                *total += count;
            }
        }
        Ok(Report {
            seed: self.settings.seed,
            packets: self.settings.packets,
            refused_by_kernel: self.refused_by_kernel,
            rewritten: self.rewritten,
            outcomes,
            elapsed: started.elapsed(),
        })
    }

    /// Generates packet `index`, runs it on its node and checks it.
    fn packet(&mut self, index: u64) -> Result<(), Box<Failure>> {
        let seed = self.settings.seed;
        let mut rng = Rng::for_packet(seed, index);
        // Half the packets for the plain node, a quarter for each other.
        let node = &mut self.nodes[*rng.pick(&[0, 0, 1, 2])];
        let input = generate::packet(&mut rng, node.layout, &self.frontends);
        let per_packet = match self.settings.counters {
            CounterCheck::EveryPacket => true,
            CounterCheck::Sampled { every } => index.is_multiple_of(every),
        };
        let failure = |node: &Node, violation, result| {
            Box::new(Failure {
                seed,
                index,
                node: node.name,
                violation,
                input: input.clone(),
                result,
            })
        };
        if per_packet {
            node.check_batch().map_err(|v| failure(node, v, None))?;
        }
        let result = match node.harness.try_run_program(program_names::INGRESS, &input) {
            Ok(result) => result,
            // Its counters must not move: the next read checks that.
            Err(_) if kernel_refuses(&input) => {
                self.refused_by_kernel += 1;
                return Ok(());
            }
            Err(error) => {
                let violation = Violation(format!("BPF_PROG_TEST_RUN failed: {error}"));
                return Err(failure(node, violation, None));
            }
        };
        node.unread += 1;
        if result.0 != TC_ACT_SHOT && result.1 != input {
            self.rewritten += 1;
        }
        node.check(&input, &result, per_packet)
            .map_err(|v| failure(node, v, Some(result)))
    }
}

/// Frames BPF_PROG_TEST_RUN refuses before the program sees them: an IPv4 or IPv6 ethertype
/// with less than the fixed IP header behind it (seen on 6.18; the kernel reads the header's
/// addresses into the test socket). Any other refusal is a failure.
fn kernel_refuses(frame: &[u8]) -> bool {
    match u16::from_be_bytes([frame[12], frame[13]]) {
        packet::ETH_P_IP => frame.len() < packet::ETH_HLEN + packet::IPV4_HLEN,
        packet::ETH_P_IPV6 => frame.len() < packet::ETH_HLEN + packet::IPV6_HLEN,
        _ => false,
    }
}

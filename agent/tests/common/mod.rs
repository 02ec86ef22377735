//! Shared by the packet tests and the benchmark: a loaded data plane fed through the agent's
//! real pipeline, and crafted packets.
#![allow(dead_code)]

pub mod bench;
pub mod fuzz;
pub mod policy;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use aya::programs::{TestRun, TestRunOptions};
use etherparse::PacketBuilder;
use weir_agent::compile::{addr_key, CompileOptions};
use weir_agent::dataplane::{Dataplane, LoadOptions};
use weir_agent::reconcile::Reconciler;
use weir_agent::source::{parse_documents, Objects};
use weir_common::{map_names, program_names, HostAddrKey, NodeConfig};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 10);
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 10);
pub const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 11);
pub const OTHER: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 12);

/// A service `echo` (TCP 80 -> 8080, UDP 53 -> 5353) with the given ready backends, and a
/// service `empty` (TCP 81) with none.
/// Node objects, one InternalIP each, as YAML documents (each opened by `---`).
pub fn node_objects(nodes: &[(&str, IpAddr)]) -> String {
    nodes
        .iter()
        .map(|(name, ip)| {
            format!(
                "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\n\
                 status: {{addresses: [{{type: InternalIP, address: \"{ip}\"}}]}}\n"
            )
        })
        .collect()
}

pub fn cluster_yaml(backends: &[Ipv4Addr]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|b| format!("- addresses: [\"{b}\"]\n  conditions: {{ready: true}}\n"))
        .collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec:
  type: ClusterIP
  clusterIP: {VIP}
  clusterIPs: ["{VIP}"]
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: 5353}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-1
  namespace: default
  labels: {{kubernetes.io/service-name: echo}}
addressType: IPv4
ports:
- {{name: http, protocol: TCP, port: 8080}}
- {{name: dns, protocol: UDP, port: 5353}}
endpoints:
{endpoints}---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: default}}
spec:
  clusterIP: 198.18.100.11
  ports:
  - {{name: http, protocol: TCP, port: 81, targetPort: 8081}}
  - {{name: dns, protocol: UDP, port: 81, targetPort: 8081}}
"#
    )
}

pub fn objects(yaml: &str) -> Objects {
    let mut objects = Objects::default();
    parse_documents(Path::new("test.yaml"), yaml, &mut objects).expect("test YAML parses");
    objects
}

pub struct Harness {
    pub dataplane: Dataplane,
    pub reconciler: Reconciler,
}

/// A bpffs private to this test thread: its own mount namespace (plus `extra` namespaces, such
/// as a network namespace), so nothing leaks to the host and nothing needs cleaning up by name.
pub fn private_bpffs(extra: nix::sched::CloneFlags) -> tempfile::TempDir {
    use nix::mount::{mount, MsFlags};
    use nix::sched::{unshare, CloneFlags};
    unshare(CloneFlags::CLONE_NEWNS | extra).expect("unshare");
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .expect("make / private");
    let dir = tempfile::tempdir().expect("tempdir");
    mount(
        Some("bpf"),
        dir.path(),
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .expect("mount bpffs");
    dir
}

/// Runs `program` to success and returns its output; panics otherwise. Forked from the calling
/// thread, it runs in that thread's network namespace.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn ip(args: &[&str]) -> String {
    run_ok("ip", args)
}

/// A data plane pinned as the agent pins it under `pin_root`: maps in the versioned directory,
/// program links in the link directory.
pub fn load_pinned(pin_root: &Path) -> Dataplane {
    let mut dataplane = Dataplane::load(&LoadOptions {
        pin_dir: Some(weir_agent::config::versioned_pin_dir(pin_root)),
        ..Default::default()
    })
    .expect("load");
    dataplane
        .pin_links_in(&weir_agent::config::link_pin_dir(pin_root))
        .expect("link pin dir");
    dataplane
}

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "packet tests load BPF programs and need root (CAP_BPF, CAP_NET_ADMIN); run them through \
         the README's test command"
    );
}

impl Harness {
    pub fn new(backends: &[Ipv4Addr]) -> Harness {
        Harness::with_pin_dir(backends, None)
    }

    pub fn with_pin_dir(backends: &[Ipv4Addr], pin_dir: Option<std::path::PathBuf>) -> Harness {
        require_root();
        let dataplane = Dataplane::load(&LoadOptions {
            pin_dir,
            max_entries: vec![(map_names::CONNTRACK, 4096), (map_names::CT_NEW, 4096)],
            ..Default::default()
        })
        .expect("the eBPF object loads and passes the verifier");
        let mut harness = Harness {
            dataplane,
            reconciler: Reconciler::default(),
        };
        harness.apply(&cluster_yaml(backends));
        harness
    }

    /// A data plane for node `options.node_name`, with its configuration and addresses, fed
    /// `yaml`.
    pub fn for_node(
        yaml: &str,
        options: CompileOptions,
        node: NodeConfig,
        host_addrs: &[IpAddr],
    ) -> Harness {
        require_root();
        let mut dataplane = Dataplane::load(&LoadOptions {
            pin_dir: None,
            max_entries: vec![(map_names::CONNTRACK, 4096), (map_names::CT_NEW, 4096)],
            ..Default::default()
        })
        .expect("the eBPF object loads and passes the verifier");
        dataplane.node.set_config(&node).expect("node config");
        let addrs: BTreeSet<HostAddrKey> = host_addrs.iter().map(|ip| addr_key(*ip)).collect();
        dataplane
            .node
            .set_host_addrs(&addrs)
            .expect("host addresses");
        let mut harness = Harness {
            dataplane,
            reconciler: Reconciler::default().with_compile_options(options),
        };
        harness.apply(yaml);
        harness
    }

    pub fn apply(&mut self, yaml: &str) -> weir_agent::reconcile::ReconcileReport {
        self.reconciler
            .reconcile(&mut self.dataplane.services, &objects(yaml))
            .expect("reconcile")
    }

    /// Runs the ingress program once; returns its verdict and the packet as it left.
    pub fn run(&mut self, packet: &[u8]) -> (u32, Vec<u8>) {
        self.run_program(program_names::INGRESS, packet)
    }

    pub fn run_program(&mut self, name: &'static str, packet: &[u8]) -> (u32, Vec<u8>) {
        self.try_run_program(name, packet)
            .expect("BPF_PROG_TEST_RUN")
    }

    /// Like [`Harness::run_program`], but the kernel's refusal to run a packet (it parses the
    /// frame before the program sees it) is an error, not a panic.
    pub fn try_run_program(
        &mut self,
        name: &'static str,
        packet: &[u8],
    ) -> Result<(u32, Vec<u8>), aya::programs::ProgramError> {
        // A first fragment that replays held ones ends as the last of them (`frag.rs`), which
        // may be longer than it.
        let mut out = vec![0u8; packet.len().max(weir_common::HELD_FRAME_BYTES) + 256];
        let program = self.dataplane.program(name).expect("program");
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = Some(&mut out);
        let result = program.test_run(opts)?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    /// Runs the ingress program once on a packet whose `skb->mark` is `mark`; returns its
    /// verdict, the packet and the mark as it left.
    pub fn run_marked(&mut self, packet: &[u8], mark: u32) -> (u32, Vec<u8>, u32) {
        /// Larger than `struct __sk_buff` on every kernel run here: the kernel zero-fills and
        /// copies back the whole of it. The mark is its third `u32`.
        const SK_BUFF_BYTES: usize = 256;
        const MARK_OFFSET: usize = 8;
        let mut ctx_in = [0u8; SK_BUFF_BYTES];
        ctx_in[MARK_OFFSET..MARK_OFFSET + 4].copy_from_slice(&mark.to_ne_bytes());
        let mut ctx_out = [0u8; SK_BUFF_BYTES];
        let mut out = vec![0u8; packet.len().max(weir_common::HELD_FRAME_BYTES) + 256];
        let program = self
            .dataplane
            .program(program_names::INGRESS)
            .expect("program");
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = Some(&mut out);
        opts.ctx_in = Some(&ctx_in);
        opts.ctx_out = Some(&mut ctx_out);
        let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        let mark_out = u32::from_ne_bytes(
            ctx_out[MARK_OFFSET..MARK_OFFSET + 4]
                .try_into()
                .expect("four bytes"),
        );
        (result.return_value, out, mark_out)
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.dataplane
            .counters
            .read()
            .expect("counters")
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .expect("known counter")
    }

    /// Every outcome counter, summed over CPUs, indexed as `weir_common::counter`.
    pub fn counter_values(&self) -> [u64; weir_common::counter::OUTCOMES as usize] {
        let mut values = [0; weir_common::counter::OUTCOMES as usize];
        let read = self.dataplane.counters.read().expect("counters");
        for (slot, (_, value)) in values.iter_mut().zip(read) {
            *slot = value;
        }
        values
    }
}

pub const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
pub const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: &str) -> Vec<u8> {
    let mut builder = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1000, 64240);
    builder = with_flags(builder, flags);
    let payload = b"GET / HTTP/1.1\r\n\r\n";
    let mut out = Vec::new();
    builder.write(&mut out, payload).unwrap();
    out
}

/// The reset that refuses a SYN built by [`tcp`] / [`tcp6`] (sequence 1000, carrying their
/// 18-byte payload) from `client_port` to a frontend's `frontend_port`, as the data path sends
/// it back: RST and ACK, sequence 0, acknowledging the SYN and its data.
pub fn refusal(
    ip: etherparse::PacketBuilderStep<etherparse::IpHeaders>,
    frontend_port: u16,
    client_port: u16,
) -> Vec<u8> {
    let mut out = Vec::new();
    ip.tcp(frontend_port, client_port, 0, 0)
        .rst()
        .ack(1000 + 1 + 18)
        .write(&mut out, &[])
        .unwrap();
    out
}

/// TCP flags by letter: S(YN), A(CK, acknowledging 2000), F(IN), R(ST), P(SH).
fn with_flags(
    mut builder: etherparse::PacketBuilderStep<etherparse::TcpHeader>,
    flags: &str,
) -> etherparse::PacketBuilderStep<etherparse::TcpHeader> {
    for f in flags.chars() {
        builder = match f {
            'S' => builder.syn(),
            'A' => builder.ack(2000),
            'F' => builder.fin(),
            'R' => builder.rst(),
            'P' => builder.psh(),
            _ => panic!("flag {f}"),
        };
    }
    builder
}

pub fn tcp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, flags: &str) -> Vec<u8> {
    let mut builder = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1000, 64240);
    builder = with_flags(builder, flags);
    let mut out = Vec::new();
    builder.write(&mut out, b"GET / HTTP/1.1\r\n\r\n").unwrap();
    out
}

pub fn udp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(src.octets(), dst.octets(), 64)
        .udp(sport, dport)
        .write(&mut out, b"ping")
        .unwrap();
    out
}

/// The same frame with its Ethernet addresses swapped, as a packet sent back out.
pub fn swapped_macs(frame: &[u8]) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[..6].copy_from_slice(&frame[6..12]);
    out[6..12].copy_from_slice(&frame[..6]);
    out
}

pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(sport, dport)
        .write(&mut out, b"ping")
        .unwrap();
    out
}

/// The fragments of an IPv4 frame, its payload cut at `cuts` (multiples of 8), all with `id`.
pub fn fragments4(frame: &[u8], id: u16, cuts: &[usize]) -> Vec<Vec<u8>> {
    const L4: usize = 14 + 20;
    let payload = &frame[L4..];
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(payload.len());
    bounds
        .windows(2)
        .map(|w| {
            let mut out = frame[..L4].to_vec();
            out.extend_from_slice(&payload[w[0]..w[1]]);
            out[16..18].copy_from_slice(&((20 + w[1] - w[0]) as u16).to_be_bytes());
            out[18..20].copy_from_slice(&id.to_be_bytes());
            let more = if w[1] < payload.len() { 0x2000 } else { 0 };
            out[20..22].copy_from_slice(&(more | (w[0] / 8) as u16).to_be_bytes());
            fix_ip_checksum(&mut out);
            out
        })
        .collect()
}

/// An ICMP error from `src` to `dst` quoting `quoted` (an IPv4 packet without Ethernet).
pub fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, type_u8: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    use etherparse::Icmpv4Type;
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src.octets(), dst.octets(), 64)
        .icmpv4(Icmpv4Type::Unknown {
            type_u8,
            code_u8: code,
            bytes5to8: [0; 4],
        })
        .write(&mut out, quoted)
        .unwrap();
    out
}

pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src.octets(), dst.octets(), 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut out, b"abcdefgh")
        .unwrap();
    out
}

/// The IPv4 packet inside an Ethernet frame.
pub fn l3(frame: &[u8]) -> &[u8] {
    &frame[14..]
}

/// Recomputes the IPv4 header checksum of a frame in place, for hand-edited test packets.
pub fn fix_ip_checksum(frame: &mut [u8]) {
    let ihl = ((frame[14] & 0x0f) as usize) * 4;
    frame[24] = 0;
    frame[25] = 0;
    let csum = !fold(ones_sum(&frame[14..14 + ihl]));
    frame[24..26].copy_from_slice(&csum.to_be_bytes());
}

/// `frame` as a router forwards it: its IPv4 TTL one less, the header checksum in step.
pub fn forwarded(frame: &[u8]) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[22] -= 1;
    fix_ip_checksum(&mut out);
    out
}

/// The Internet checksum's sum of `data` as big-endian 16-bit words (an odd last byte padded
/// with zero), not yet folded; sums of pieces at even offsets add up.
pub fn ones_sum(data: &[u8]) -> u64 {
    data.chunks(2)
        .map(|pair| u64::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum()
}

/// A sum folded to 16 bits with end-around carry: 0xffff over data that includes a valid
/// checksum.
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

//! The kube-proxy emulation's rules go through the real iptables-restore (legacy and nft, each if
//! installed) in a throwaway network namespace: `--test` accepts them, a real restore installs
//! every chain, and later partial and full syncs apply on top as kube-proxy's would. Needs root;
//! skipped otherwise.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Child, Command, Output, Stdio};

use weir_lab_bench::kube_proxy::{
    jump_rules_input, Flavor, Protocol, ProxiedServicePort, Proxier, ProxierConfig, ServicePortName,
};

/// A network namespace that lives as long as its holder process (`unshare --net sleep`); it is
/// gone once the holder is killed, by its PID, when this value drops.
struct ThrowawayNetns {
    holder: Child,
}

impl ThrowawayNetns {
    fn new() -> ThrowawayNetns {
        let holder = Command::new("unshare")
            .args(["--net", "sleep", "120"])
            .stdin(Stdio::null())
            .spawn()
            .expect("starting unshare (util-linux)");
        let ns = ThrowawayNetns { holder };
        // unshare execs sleep in place once the namespace exists; wait until it has.
        let mine = std::fs::read_link("/proc/self/ns/net").unwrap();
        for _ in 0..200 {
            if let Ok(theirs) = std::fs::read_link(ns.ns_path()) {
                if theirs != mine {
                    return ns;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("the holder never entered its own network namespace");
    }

    fn ns_path(&self) -> String {
        format!("/proc/{}/ns/net", self.holder.id())
    }

    /// Runs `program` inside the namespace, feeding it `stdin`.
    fn run(&self, program: &str, args: &[&str], stdin: &str) -> Output {
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", self.ns_path()))
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting nsenter");
        let mut input = child.stdin.take().unwrap();
        let text = stdin.to_owned();
        // A writer thread: the ruleset can be larger than a pipe holds.
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(text.as_bytes());
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        out
    }
}

impl Drop for ThrowawayNetns {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

fn services(n: usize) -> Vec<ProxiedServicePort> {
    let mut out: Vec<ProxiedServicePort> = (0..n)
        .map(|i| ProxiedServicePort {
            name: ServicePortName {
                namespace: "default".into(),
                name: format!("svc-{i}"),
                port: "http".into(),
            },
            protocol: if i % 4 == 3 {
                Protocol::Udp
            } else {
                Protocol::Tcp
            },
            cluster_ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 1)) + i as u32),
            port: 80,
            // Every third service is a NodePort, so its KUBE-EXT chain is restored too.
            node_port: (i % 3 == 0).then(|| 30000 + i as u16),
            endpoints: (0..5)
                .map(|e| SocketAddrV4::new(Ipv4Addr::new(198, 19, 1, 11 + e), 20000 + i as u16))
                .collect(),
        })
        .collect();
    // kube-proxy rejects traffic to a service without endpoints in the filter table.
    out.push(ProxiedServicePort {
        name: ServicePortName {
            namespace: "default".into(),
            name: "empty".into(),
            port: String::new(),
        },
        protocol: Protocol::Tcp,
        cluster_ip: Ipv4Addr::new(198, 18, 127, 1),
        port: 443,
        node_port: Some(32443),
        endpoints: Vec::new(),
    });
    out
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn count_lines(text: &str, prefix: &str) -> usize {
    text.lines().filter(|l| l.starts_with(prefix)).count()
}

#[test]
fn iptables_restore_accepts_kube_proxy_rules() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: needs root to create a network namespace");
        return;
    }
    let flavors: Vec<Flavor> = Flavor::ALL
        .into_iter()
        .filter(|f| f.find_restore().is_some())
        .collect();
    if flavors.is_empty() {
        eprintln!("SKIPPED: neither iptables-legacy-restore nor iptables-nft-restore is installed");
        return;
    }
    for flavor in flavors {
        let ns = ThrowawayNetns::new();
        let restore = flavor.restore_binary();
        let save = flavor.save_binary();
        let restore_args = Flavor::restore_args();
        let mut test_args = restore_args.to_vec();
        test_args.push("--test");

        // 210 x 5 endpoints: past kube-proxy's large-cluster threshold of 1,000.
        let mut svcs = services(210);
        let mut proxier = Proxier::new(ProxierConfig {
            cluster_cidr: Some((Ipv4Addr::new(198, 19, 0, 0), 16)),
            ..ProxierConfig::default()
        });
        let full = proxier.sync(&svcs);

        // A dry run first, and proof that the dry run does check: an unknown option fails.
        let jumps = jump_rules_input();
        assert_ok(
            &ns.run(&restore, &test_args, &jumps),
            "--test of the jump rules",
        );
        assert_ok(
            &ns.run(&restore, &test_args, &full.restore_input),
            "--test of a full sync",
        );
        let broken = "*nat\n:KUBE-X - [0:0]\n-A KUBE-X --no-such-option -j RETURN\nCOMMIT\n";
        assert!(!ns.run(&restore, &test_args, broken).status.success());

        // Now for real: jumps, then the full sync.
        assert_ok(&ns.run(&restore, &restore_args, &jumps), "jump rules");
        assert_ok(
            &ns.run(&restore, &restore_args, &full.restore_input),
            "full sync",
        );
        let nat = ns.run(&save, &["-t", "nat"], "");
        assert_ok(&nat, "save");
        let nat = String::from_utf8_lossy(&nat.stdout).into_owned();
        assert_eq!(count_lines(&nat, ":KUBE-SVC-"), 210, "{nat}");
        assert_eq!(count_lines(&nat, ":KUBE-SEP-"), 1050);
        // 210 services and the NodePort jump.
        assert_eq!(count_lines(&nat, "-A KUBE-SERVICES "), 211);
        assert_eq!(
            count_lines(&nat, "-A PREROUTING ")
                + count_lines(&nat, "-A OUTPUT ")
                + count_lines(&nat, "-A POSTROUTING "),
            3
        );
        let filter = ns.run(&save, &["-t", "filter"], "");
        let filter = String::from_utf8_lossy(&filter.stdout).into_owned();
        assert_eq!(count_lines(&filter, "-A KUBE-SERVICES "), 1, "{filter}");
        assert!(filter.contains("-j REJECT"));

        // One service changes an endpoint: a partial sync on top of what is there.
        let old_chain = svcs[10].endpoint_chain(svcs[10].endpoints[0]);
        svcs[10].endpoints[0] = SocketAddrV4::new(Ipv4Addr::new(198, 19, 1, 20), 20010);
        let partial = proxier.sync(&svcs);
        assert_ok(
            &ns.run(&restore, &restore_args, &partial.restore_input),
            "partial sync",
        );
        let nat = ns.run(&save, &["-t", "nat"], "");
        let nat = String::from_utf8_lossy(&nat.stdout).into_owned();
        let new_chain = svcs[10].endpoint_chain(svcs[10].endpoints[0]);
        assert!(nat.contains(&format!("-A {new_chain} ")), "{nat}");
        assert_eq!(count_lines(&nat, "-A KUBE-SERVICES "), 211);
        // Large-cluster mode: the stale chain stays until the next full sync removes it.
        assert!(nat.contains(&format!(":{old_chain} ")));
        let resync = proxier.full_sync(&svcs);
        assert_eq!(resync.deleted_chains, 1);
        assert_ok(
            &ns.run(&restore, &restore_args, &resync.restore_input),
            "full resync",
        );
        let nat = ns.run(&save, &["-t", "nat"], "");
        let nat = String::from_utf8_lossy(&nat.stdout).into_owned();
        assert!(!nat.contains(&old_chain), "{flavor}: stale chain left");
        assert_eq!(count_lines(&nat, ":KUBE-SEP-"), 1050);

        // Taking it all out again (as the throughput measurement does after kube-proxy's turn)
        // leaves no KUBE chain or jump, in either table, and the base chains in place.
        let removal = weir_lab_bench::kube_proxy::removal_input(&[
            &jumps,
            &full.restore_input,
            &partial.restore_input,
            &resync.restore_input,
        ]);
        assert_ok(&ns.run(&restore, &restore_args, &removal), "removal");
        let all = ns.run(&save, &[], "");
        assert_ok(&all, "save after removal");
        let all = String::from_utf8_lossy(&all.stdout).into_owned();
        assert!(!all.contains("KUBE-"), "{flavor}: left behind:\n{all}");
        assert!(all.contains(":PREROUTING ACCEPT"), "{all}");
        eprintln!("{flavor}: ok");
    }
}

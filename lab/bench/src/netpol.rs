//! The NetworkPolicy `bench policy` measures, as one model rendered two ways: the Kubernetes
//! objects the Weir agent reads (a NetworkPolicy, its namespaces, synthetic peer Pods) and the
//! ipsets and iptables filter rules an iptables-based policy engine would install for it.
//!
//! The shape mirrors `agent/benches/policy_path.rs`: N ingress rules select the destination
//! pod, alternating an ipBlock with an except (even rules) and a namespace-and-pod selector
//! naming one synthetic peer pod (odd rules); the client is the last rule's peer too, so
//! its first packet meets every rule before the one that allows it. Everything here is a pure
//! function of the rule count.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use serde_json::json;

use crate::kube_proxy::chain_hash;
use crate::BenchError;

/// The port every rule allows, and the destination pod listens on.
pub const POLICY_PORT: u16 = 8080;
/// The destination pod's namespace, where the policy lives.
pub const TARGET_NAMESPACE: &str = "bench-target";
/// The namespace of the client, the outsider and every synthetic peer pod.
pub const PEER_NAMESPACE: &str = "bench-peers";
/// Policy k is named `bench-ingress-k`.
const POLICY_NAME_PREFIX: &str = "bench-ingress";
/// Rules are split into policies of at most this many, all selecting the destination pod: the
/// agent's file source refuses an object with a longer list (its default per-object limit), and
/// real policy sets are many small policies rather than one huge one.
pub const RULES_PER_POLICY: usize = 1000;
/// The destination pod's label the policy selects.
pub const TARGET_LABEL: (&str, &str) = ("app", "bench-target");
/// The label the selector rules' namespaceSelector matches on the peer namespace.
pub const PEER_NAMESPACE_LABEL: (&str, &str) = ("bench", "peers");
/// The label key whose value names one selector rule's peers.
pub const PEER_KEY: &str = "peer";
/// The outsider's value of [`PEER_KEY`]: no rule names it.
pub const OUTSIDER_PEER: &str = "outsider";
/// The ipBlocks are /30s cut from 198.19.128.0/17, clear of every lab pod CIDR (198.19.N.0/24,
/// N small) and of the synthetic peers.
const IP_BLOCK_BASE: Ipv4Addr = Ipv4Addr::new(198, 19, 128, 0);
const IP_BLOCK_LEN: u8 = 30;
/// Synthetic peer pod k is 198.19.64.(k+1) onwards, in 198.19.64.0/18.
const PEER_BASE: Ipv4Addr = Ipv4Addr::new(198, 19, 64, 1);
/// Both ranges hold 8,192 rules of each kind.
pub const MAX_RULES: usize = 16_384;

/// One ingress rule's peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// `ipBlock {cidr, except: [except/32]}`.
    IpBlock {
        cidr: Ipv4Addr,
        len: u8,
        except: Ipv4Addr,
    },
    /// `namespaceSelector` (the peer namespace's label) and `podSelector {peer: value}`
    /// together; `members` are the addresses of the pods it selects.
    Selector {
        value: String,
        members: Vec<Ipv4Addr>,
    },
}

/// A synthetic peer pod: an object the agent reads, never a host of the lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticPod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub peer: String,
}

/// The policy isolating the destination pod with `rules` ingress rules.
#[derive(Debug, Clone)]
pub struct PolicyShape {
    pub rules: Vec<Peer>,
    pub synthetic_pods: Vec<SyntheticPod>,
    /// The destination pod's address (the pod chain's match).
    pub target: Ipv4Addr,
    /// The destination pod's name, for chain names and comments.
    pub target_pod: String,
}

impl PolicyShape {
    /// `rules` rules (even, 2..=[`MAX_RULES`]); the client at `client` is the last one's peer.
    pub fn new(
        rules: usize,
        client: Ipv4Addr,
        target: Ipv4Addr,
        target_pod: &str,
    ) -> Result<PolicyShape, BenchError> {
        if !(2..=MAX_RULES).contains(&rules) || !rules.is_multiple_of(2) {
            return Err(BenchError::Setup(format!(
                "policy rules must be even and 2..={MAX_RULES} (half ipBlocks, half selectors, \
                 the client's the last), not {rules}"
            )));
        }
        let mut peers = Vec::with_capacity(rules);
        let mut synthetic_pods = Vec::with_capacity(rules / 2);
        for i in 0..rules {
            let k = (i / 2) as u32;
            if i % 2 == 0 {
                let cidr = Ipv4Addr::from(u32::from(IP_BLOCK_BASE) + 4 * k);
                peers.push(Peer::IpBlock {
                    cidr,
                    len: IP_BLOCK_LEN,
                    except: Ipv4Addr::from(u32::from(cidr) + 3),
                });
            } else {
                let pod = SyntheticPod {
                    name: format!("peer-{k}"),
                    ip: Ipv4Addr::from(u32::from(PEER_BASE) + k),
                    peer: peer_value(k as usize),
                };
                let mut members = vec![pod.ip];
                if i == rules - 1 {
                    members.push(client);
                }
                peers.push(Peer::Selector {
                    value: pod.peer.clone(),
                    members,
                });
                synthetic_pods.push(pod);
            }
        }
        Ok(PolicyShape {
            rules: peers,
            synthetic_pods,
            target,
            target_pod: target_pod.to_owned(),
        })
    }

    /// The [`PEER_KEY`] value the client carries: the last rule's.
    pub fn client_peer(&self) -> String {
        peer_value(self.rules.len() / 2 - 1)
    }

    /// The rules as policies: (name, rules), in order.
    fn policies(&self) -> impl Iterator<Item = (String, &[Peer])> {
        self.rules
            .chunks(RULES_PER_POLICY)
            .enumerate()
            .map(|(k, rules)| (format!("{POLICY_NAME_PREFIX}-{k}"), rules))
    }

    /// The NetworkPolicies as a user would write them (YAML, one document each).
    pub fn network_policies(&self) -> Vec<String> {
        self.policies()
            .map(|(name, rules)| network_policy(&name, rules))
            .collect()
    }

    /// The synthetic peer Pods as YAML documents (each starting `---`), running on a node the
    /// lab does not have: peers live anywhere in the cluster.
    pub fn synthetic_pod_documents(&self) -> String {
        let mut out = String::new();
        for pod in &self.synthetic_pods {
            let object = json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": pod.name,
                    "namespace": PEER_NAMESPACE,
                    "labels": { PEER_KEY: pod.peer },
                },
                "spec": { "nodeName": "peer-node", "containers": [{ "name": "peer", "image": "none" }] },
                "status": { "phase": "Running", "podIP": pod.ip.to_string(), "podIPs": [{ "ip": pod.ip.to_string() }] },
            });
            out.push_str("---\n");
            out.push_str(&serde_yaml::to_string(&object).expect("a JSON value serializes"));
        }
        out
    }

    /// The same policies the way iptables-based engines install them (kube-router's names,
    /// Calico's shape): one ipset per rule's peers, `hash:net` for an ipBlock with its except as
    /// a `nomatch` entry, `hash:ip` for a selector's pod addresses; a chain per pod, jumped to
    /// from FORWARD on the destination address, accepting established traffic first, then
    /// jumping to each policy's chain in turn, then dropping; a policy's chain one rule per
    /// peer. Accepting at the first match favours iptables (kube-router marks and returns, two
    /// rules per peer).
    pub fn iptables_ipset(&self) -> IptablesPolicy {
        let pod_chain = format!(
            "KUBE-POD-FW-{}",
            chain_hash(&format!("{TARGET_NAMESPACE}/{}", self.target_pod))
        );
        let mut ipset = String::new();
        let mut chains = format!(":{pod_chain} - [0:0]\n");
        let mut pod_rules = String::new();
        let mut policy_rules = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(
            pod_rules,
            "-A FORWARD -d {}/32 -m comment --comment \"{TARGET_NAMESPACE}/{} ingress\" -j {pod_chain}",
            self.target, self.target_pod
        );
        let _ = writeln!(
            pod_rules,
            "-A {pod_chain} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        );
        for (name, rules) in self.policies() {
            let policy_chain = format!(
                "KUBE-NWPLCY-{}",
                chain_hash(&format!("{TARGET_NAMESPACE}/{name}"))
            );
            let _ = writeln!(chains, ":{policy_chain} - [0:0]");
            let _ = writeln!(pod_rules, "-A {pod_chain} -j {policy_chain}");
            for (i, peer) in rules.iter().enumerate() {
                let set = format!(
                    "KUBE-SRC-{}",
                    chain_hash(&format!("{TARGET_NAMESPACE}/{name}/ingress/{i}"))
                );
                match peer {
                    Peer::IpBlock { cidr, len, except } => {
                        let _ = writeln!(ipset, "create {set} hash:net family inet");
                        let _ = writeln!(ipset, "add {set} {cidr}/{len}");
                        let _ = writeln!(ipset, "add {set} {except}/32 nomatch");
                    }
                    Peer::Selector { members, .. } => {
                        let _ = writeln!(ipset, "create {set} hash:ip family inet");
                        for ip in members {
                            let _ = writeln!(ipset, "add {set} {ip}");
                        }
                    }
                }
                let _ = writeln!(
                    policy_rules,
                    "-A {policy_chain} -p tcp -m tcp --dport {POLICY_PORT} -m set --match-set {set} src -j ACCEPT"
                );
            }
        }
        let _ = writeln!(
            pod_rules,
            "-A {pod_chain} -m comment --comment \"default deny\" -j DROP"
        );
        IptablesPolicy {
            ipset_restore: ipset,
            iptables_restore: format!("*filter\n{chains}{pod_rules}{policy_rules}COMMIT\n"),
        }
    }
}

/// Inputs for `ipset restore` and `iptables-restore` (filter table), in that order.
#[derive(Debug, Clone)]
pub struct IptablesPolicy {
    pub ipset_restore: String,
    pub iptables_restore: String,
}

/// One NetworkPolicy selecting the destination pod, one ingress rule per peer (YAML).
fn network_policy(name: &str, rules: &[Peer]) -> String {
    let ingress: Vec<serde_json::Value> = rules
        .iter()
        .map(|peer| {
            let from = match peer {
                Peer::IpBlock { cidr, len, except } => json!({
                    "ipBlock": { "cidr": format!("{cidr}/{len}"), "except": [format!("{except}/32")] }
                }),
                Peer::Selector { value, .. } => json!({
                    "namespaceSelector": { "matchLabels": { PEER_NAMESPACE_LABEL.0: PEER_NAMESPACE_LABEL.1 } },
                    "podSelector": { "matchLabels": { PEER_KEY: value } },
                }),
            };
            json!({ "from": [from], "ports": [{ "protocol": "TCP", "port": POLICY_PORT }] })
        })
        .collect();
    let policy = json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": { "name": name, "namespace": TARGET_NAMESPACE },
        "spec": {
            "podSelector": { "matchLabels": { TARGET_LABEL.0: TARGET_LABEL.1 } },
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    });
    serde_yaml::to_string(&policy).expect("a JSON value serializes")
}

fn peer_value(k: usize) -> String {
    format!("p{k}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 10);
    const TARGET: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 11);

    fn shape(rules: usize) -> PolicyShape {
        PolicyShape::new(rules, CLIENT, TARGET, "n1p1").unwrap()
    }

    #[test]
    fn rules_alternate_and_the_client_is_the_last_peer() {
        let s = shape(10);
        assert_eq!(s.rules.len(), 10);
        assert_eq!(s.synthetic_pods.len(), 5);
        assert_eq!(
            s.rules[0],
            Peer::IpBlock {
                cidr: Ipv4Addr::new(198, 19, 128, 0),
                len: 30,
                except: Ipv4Addr::new(198, 19, 128, 3),
            }
        );
        assert!(
            matches!(&s.rules[2], Peer::IpBlock { cidr, .. } if *cidr == Ipv4Addr::new(198, 19, 128, 4))
        );
        let Peer::Selector { value, members } = &s.rules[9] else {
            panic!("the last rule is a selector");
        };
        assert_eq!(*value, s.client_peer());
        assert_eq!(members, &[Ipv4Addr::new(198, 19, 64, 5), CLIENT]);
        let Peer::Selector { members, .. } = &s.rules[1] else {
            panic!("odd rules are selectors");
        };
        assert_eq!(members, &[Ipv4Addr::new(198, 19, 64, 1)]);
        // No rule but the last holds the client.
        for peer in &s.rules[..9] {
            match peer {
                Peer::Selector { members, .. } => assert!(!members.contains(&CLIENT)),
                Peer::IpBlock { cidr, len, .. } => {
                    let mask = u32::MAX << (32 - u32::from(*len));
                    assert_ne!(u32::from(CLIENT) & mask, u32::from(*cidr));
                }
            }
        }
    }

    #[test]
    fn sizes_are_checked_and_stay_in_the_test_range() {
        assert!(PolicyShape::new(0, CLIENT, TARGET, "t").is_err());
        assert!(PolicyShape::new(11, CLIENT, TARGET, "t").is_err());
        assert!(PolicyShape::new(MAX_RULES + 2, CLIENT, TARGET, "t").is_err());
        let s = shape(MAX_RULES);
        for peer in &s.rules {
            let ip = match peer {
                Peer::IpBlock { cidr, .. } => *cidr,
                Peer::Selector { members, .. } => members[0],
            };
            assert!(weir_lab_core::topology::is_test_address(ip), "{ip}");
            // Clear of the lab's pod CIDRs (198.19.N.0/24 for the few nodes a lab has).
            assert!(ip.octets()[2] >= 64, "{ip}");
        }
        let last_block = s.rules.iter().rev().find_map(|p| match p {
            Peer::IpBlock { except, .. } => Some(*except),
            Peer::Selector { .. } => None,
        });
        assert_eq!(last_block, Some(Ipv4Addr::new(198, 19, 255, 255)));
        let Peer::Selector { members, .. } = &s.rules[MAX_RULES - 3] else {
            panic!("odd rules are selectors");
        };
        assert_eq!(members[0], Ipv4Addr::new(198, 19, 95, 255));
    }

    #[test]
    fn the_network_policy_reads_as_kubernetes_yaml() {
        let s = shape(4);
        let policies = s.network_policies();
        assert_eq!(policies.len(), 1);
        let doc: serde_yaml::Value = serde_yaml::from_str(&policies[0]).unwrap();
        assert_eq!(doc["kind"], "NetworkPolicy");
        assert_eq!(doc["metadata"]["namespace"], TARGET_NAMESPACE);
        assert_eq!(
            doc["spec"]["podSelector"]["matchLabels"]["app"],
            "bench-target"
        );
        let ingress = doc["spec"]["ingress"].as_sequence().unwrap();
        assert_eq!(ingress.len(), 4);
        assert_eq!(ingress[0]["from"][0]["ipBlock"]["cidr"], "198.19.128.0/30");
        assert_eq!(
            ingress[0]["from"][0]["ipBlock"]["except"][0],
            "198.19.128.3/32"
        );
        assert_eq!(ingress[2]["from"][0]["ipBlock"]["cidr"], "198.19.128.4/30");
        let last = &ingress[3]["from"][0];
        assert_eq!(last["namespaceSelector"]["matchLabels"]["bench"], "peers");
        assert_eq!(last["podSelector"]["matchLabels"]["peer"], "p1");
        assert_eq!(ingress[3]["ports"][0]["port"], 8080);
        assert_eq!(ingress[3]["ports"][0]["protocol"], "TCP");

        let pods = s.synthetic_pod_documents();
        assert_eq!(pods.matches("---\n").count(), 2);
        let docs: Vec<serde_yaml::Value> = pods
            .split("---\n")
            .filter(|d| !d.is_empty())
            .map(|d| serde_yaml::from_str(d).unwrap())
            .collect();
        assert_eq!(docs[1]["metadata"]["labels"]["peer"], "p1");
        assert_eq!(docs[1]["metadata"]["namespace"], PEER_NAMESPACE);
        assert_eq!(docs[1]["status"]["podIPs"][0]["ip"], "198.19.64.2");
    }

    #[test]
    fn iptables_rules_match_every_peer_through_its_set() {
        let s = shape(4);
        let p = s.iptables_ipset();
        let sets: Vec<&str> = p
            .ipset_restore
            .lines()
            .filter_map(|l| l.strip_prefix("create "))
            .collect();
        assert_eq!(sets.len(), 4);
        assert!(sets[0].ends_with(" hash:net family inet"));
        assert!(sets[1].ends_with(" hash:ip family inet"));
        let names: Vec<&str> = sets.iter().map(|s| s.split(' ').next().unwrap()).collect();
        for name in &names {
            assert!(name.starts_with("KUBE-SRC-") && name.len() <= 31, "{name}");
        }
        let adds = |set: &str| -> Vec<String> {
            p.ipset_restore
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("add {set} ")))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(
            adds(names[0]),
            ["198.19.128.0/30", "198.19.128.3/32 nomatch"]
        );
        assert_eq!(adds(names[3]), ["198.19.64.2", "198.19.1.10"]);

        let lines: Vec<&str> = p.iptables_restore.lines().collect();
        assert_eq!(lines[0], "*filter");
        assert_eq!(*lines.last().unwrap(), "COMMIT");
        let jump = lines.iter().find(|l| l.starts_with("-A FORWARD")).unwrap();
        assert!(jump.starts_with("-A FORWARD -d 198.19.1.11/32 "));
        let pod_chain = jump.rsplit(' ').next().unwrap();
        assert!(pod_chain.starts_with("KUBE-POD-FW-"));
        let pod_rules: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with(&format!("-A {pod_chain} ")))
            .collect();
        assert_eq!(pod_rules.len(), 3);
        assert!(pod_rules[0].contains("--ctstate RELATED,ESTABLISHED -j ACCEPT"));
        assert!(pod_rules[1].contains("-j KUBE-NWPLCY-"));
        assert!(pod_rules[2].ends_with("-j DROP"));
        let matches: Vec<&&str> = lines.iter().filter(|l| l.contains("--match-set")).collect();
        assert_eq!(matches.len(), 4);
        for (line, set) in matches.iter().zip(&names) {
            assert!(line.starts_with("-A KUBE-NWPLCY-"));
            assert!(line.contains(&format!(
                "--dport 8080 -m set --match-set {set} src -j ACCEPT"
            )));
        }
        // Every chain a rule names is declared.
        for chain in [pod_chain, pod_rules[1].rsplit(' ').next().unwrap()] {
            assert!(lines.contains(&format!(":{chain} - [0:0]").as_str()));
        }
    }

    #[test]
    fn many_rules_split_into_policies_jumped_to_in_order() {
        let s = shape(2 * RULES_PER_POLICY + 500);
        let policies: Vec<serde_yaml::Value> = s
            .network_policies()
            .iter()
            .map(|p| serde_yaml::from_str(p).unwrap())
            .collect();
        let sizes: Vec<usize> = policies
            .iter()
            .map(|p| p["spec"]["ingress"].as_sequence().unwrap().len())
            .collect();
        assert_eq!(sizes, [RULES_PER_POLICY, RULES_PER_POLICY, 500]);
        let names: Vec<&str> = policies
            .iter()
            .map(|p| p["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["bench-ingress-0", "bench-ingress-1", "bench-ingress-2"]
        );
        // The client's rule is the last policy's last.
        let last = policies[2]["spec"]["ingress"]
            .as_sequence()
            .unwrap()
            .last()
            .unwrap();
        assert_eq!(
            last["from"][0]["podSelector"]["matchLabels"]["peer"].as_str(),
            Some(s.client_peer().as_str())
        );

        let p = s.iptables_ipset();
        let lines: Vec<&str> = p.iptables_restore.lines().collect();
        let pod_chain = lines
            .iter()
            .find_map(|l| l.strip_prefix("-A FORWARD "))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap();
        let pod_rules: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix(&format!("-A {pod_chain} ")))
            .collect();
        assert_eq!(pod_rules.len(), 5);
        assert!(pod_rules[0].contains("RELATED,ESTABLISHED -j ACCEPT"));
        assert!(pod_rules[4].ends_with("-j DROP"));
        let policy_chains: Vec<&str> = pod_rules[1..4]
            .iter()
            .map(|r| r.strip_prefix("-j ").unwrap())
            .collect();
        for (chain, size) in policy_chains.iter().zip(sizes) {
            let rules = lines
                .iter()
                .filter(|l| l.starts_with(&format!("-A {chain} ")))
                .count();
            assert_eq!(rules, size, "{chain}");
        }
        let sets: std::collections::BTreeSet<&str> = p
            .ipset_restore
            .lines()
            .filter_map(|l| l.strip_prefix("create "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        assert_eq!(sets.len(), 2500, "one set per rule, no name twice");
    }
}

//! The XDP pre-filter (`bpf/ebpf/src/prefilter.rs`) from the agent's side: the deny-list and
//! the failsafe ports as map entries, and the program's attachment to the host interfaces.
//!
//! The entries flow one way, as everywhere: configuration -> [`PrefilterState`] (what the maps
//! must hold) -> the difference against what they hold -> writes, additions before removals so
//! no packet meets a list that is neither the old nor the new one.
//!
//! The deny-list has two origins: the configuration's `[prefilter] deny`, and
//! `PrefilterDenyList` objects from the source ([`object`]). Objects are admitted against the
//! map's capacity ([`DenyListAdmission`]) and their prefixes carry their own drop counter; a
//! prefix in both keeps the configuration's.

mod object;

pub use object::{
    DenyListIntent, PrefilterDenyList, PrefilterDenyListSpec, GROUP, KIND, MAX_PREFIXES_PER_OBJECT,
    PLURAL, VERSION,
};

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{HashMap, MapData};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::{XdpLink, XdpLinkId};
use aya::programs::Xdp;
use aya::Ebpf;
use tracing::{debug, info, warn};
use weir_common::{
    capacity, counter, failsafe_direction, map_names, FailsafeKey, PolicyCidrKey,
    POLICY_CIDR_FIXED_BITS, PROTO_TCP, PROTO_UDP,
};

use crate::admission::Rejection;
use crate::compile::addr_of;
use crate::config::{AgentConfig, FailsafePorts, FailsafeProtocol, XdpMode};
use crate::dataplane::{
    delete_keys, open_pinned, read_all, take_map, write_entries, DataplaneError,
};
use crate::intent::{Cidr, IntentError};
use crate::metrics::Metrics;
use crate::policy::maps::{read_trie, trie_entries, trie_keys};
use crate::reconcile::Reconciler;
use crate::source::ObjectEvent;

/// A deny-list prefix as the trie keys it: (address of one family, prefix length).
pub type DenyKey = (PolicyCidrKey, u32);

/// A deny-list entry: an address prefix, or a bare address (one host).
pub fn parse_prefix(text: &str) -> Result<Cidr, IntentError> {
    let text = text.trim();
    if text.contains('/') {
        return Cidr::parse("deny", text);
    }
    let addr: std::net::IpAddr = text.parse().map_err(|_| IntentError::InvalidCidr {
        field: "deny".into(),
        value: text.to_owned(),
    })?;
    Ok(Cidr {
        addr,
        len: if addr.is_ipv4() { 32 } else { 128 },
    })
}

/// What the pre-filter's maps must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefilterState {
    /// Deny-listed prefixes -> the counter their drops go to (which list they came from).
    pub deny: BTreeMap<DenyKey, u32>,
    pub failsafe: BTreeSet<FailsafeKey>,
}

impl PrefilterState {
    /// The configuration's deny-list (when the pre-filter is on) and failsafe ports (always:
    /// host policy reads them too), with the agent's own listening ports among the inbound.
    pub fn from_config(config: &AgentConfig) -> Result<PrefilterState, IntentError> {
        let mut state = PrefilterState::default();
        if config.prefilter.enabled {
            for text in &config.prefilter.deny {
                state.deny.insert(
                    deny_key(&parse_prefix(text)?),
                    counter::PREFILTER_DROP_CONFIG,
                );
            }
        }
        let own = config.own_tcp_ports().map(|port| FailsafePorts {
            protocol: FailsafeProtocol::Tcp,
            ports: crate::config::PortRange::one(port),
        });
        let inbound: Vec<FailsafePorts> =
            config.failsafe.inbound.iter().copied().chain(own).collect();
        let directions = [
            (failsafe_direction::INBOUND, &inbound),
            (failsafe_direction::OUTBOUND, &config.failsafe.outbound),
        ];
        for (direction, list) in directions {
            for entry in list {
                let proto = match entry.protocol {
                    FailsafeProtocol::Tcp => PROTO_TCP,
                    FailsafeProtocol::Udp => PROTO_UDP,
                };
                for port in entry.ports.first..=entry.ports.last {
                    state.failsafe.insert(FailsafeKey {
                        port_be: port.to_be(),
                        proto,
                        direction,
                    });
                }
            }
        }
        Ok(state)
    }
}

impl PrefilterState {
    /// Adds the admitted objects' prefixes under the object counter; a prefix the
    /// configuration lists keeps the configuration's.
    fn add_objects<'a>(&mut self, prefixes: impl IntoIterator<Item = &'a Cidr>) {
        for prefix in prefixes {
            (self.deny)
                .entry(deny_key(prefix))
                .or_insert(counter::PREFILTER_DROP_OBJECT);
        }
    }
}

/// Which deny-list objects' prefixes go into the map, against its capacity.
///
/// Entries are counted from above (a prefix in two objects, or in an object and the
/// configuration, counts twice), so an admitted set always fits. An object whose new version
/// would overflow the map is refused (`capacity`) and keeps its admitted version; a deleted
/// object frees its room in the same pass. Changed objects are admitted smallest first, so one
/// runaway list gives way before many small ones.
#[derive(Debug, Default)]
pub struct DenyListAdmission {
    admitted: BTreeMap<String, Vec<Cidr>>,
    refused: Vec<Rejection>,
}

impl DenyListAdmission {
    /// Admits `objects` into a map of `capacity` entries, `reserved` of them the
    /// configuration's; returns the objects refused.
    pub fn admit(
        &mut self,
        objects: &BTreeMap<String, DenyListIntent>,
        reserved: usize,
        capacity: usize,
    ) -> &[Rejection] {
        self.admitted.retain(|name, _| objects.contains_key(name));
        let mut total = reserved + self.admitted.values().map(Vec::len).sum::<usize>();
        let mut changed: Vec<&DenyListIntent> = (objects.values())
            .filter(|o| self.admitted.get(&o.name) != Some(&o.prefixes))
            .collect();
        changed.sort_by_key(|o| (o.prefixes.len(), &o.name));
        self.refused.clear();
        for object in changed {
            let before = self.admitted.get(&object.name).map_or(0, Vec::len);
            let after = total - before + object.prefixes.len();
            if after <= capacity {
                total = after;
                (self.admitted).insert(object.name.clone(), object.prefixes.clone());
            } else {
                self.refused.push(Rejection {
                    kind: KIND,
                    object: object.name.clone(),
                    reason: "capacity",
                    detail: format!(
                        "{} prefixes would make {after} entries in {}, which holds {capacity}",
                        object.prefixes.len(),
                        map_names::PREFILTER_DENY
                    ),
                });
            }
        }
        &self.refused
    }

    /// Every admitted object's prefixes.
    pub fn prefixes(&self) -> impl Iterator<Item = &Cidr> {
        self.admitted.values().flatten()
    }

    pub fn refused(&self) -> &[Rejection] {
        &self.refused
    }
}

/// Keeps the deny-list map in step with the configuration and the deny-list objects.
#[derive(Debug)]
pub struct DenyListReconciler {
    /// The configuration's part (all of it while the pre-filter is off: an empty deny-list).
    configured: PrefilterState,
    enabled: bool,
    admission: DenyListAdmission,
    /// The objects the maps were last written from; None until a write succeeds (or after one
    /// fails), so the next pass writes.
    written: Option<BTreeMap<String, DenyListIntent>>,
}

/// What a deny-list pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenyListReport {
    pub writes: usize,
    /// Entries in the deny-list map after the pass.
    pub entries: usize,
}

impl DenyListReconciler {
    pub fn new(config: &AgentConfig) -> Result<DenyListReconciler, IntentError> {
        Ok(DenyListReconciler {
            configured: PrefilterState::from_config(config)?,
            enabled: config.prefilter.enabled,
            admission: DenyListAdmission::default(),
            written: None,
        })
    }

    /// The agent's first write, before the source has listed anything: the configuration's
    /// entries and failsafe ports, keeping the object entries an earlier agent wrote (while the
    /// pre-filter stays on) until the first pass knows the objects.
    pub fn start(&mut self, maps: &mut PrefilterMaps) -> Result<DenyListReport, DataplaneError> {
        let mut wanted = self.configured.clone();
        if self.enabled {
            let held = maps.read()?;
            for (key, drop_counter) in held.deny {
                if drop_counter == counter::PREFILTER_DROP_OBJECT {
                    wanted.deny.entry(key).or_insert(drop_counter);
                }
            }
        }
        let writes = maps.write(&wanted)?;
        Ok(DenyListReport {
            writes,
            entries: wanted.deny.len(),
        })
    }

    /// Writes the deny-list when the objects changed since the last write (or it failed);
    /// None when nothing was due. With the pre-filter off objects are ignored: the map stays
    /// empty.
    pub fn pass(
        &mut self,
        objects: &BTreeMap<String, DenyListIntent>,
        maps: &mut PrefilterMaps,
    ) -> Option<Result<DenyListReport, DataplaneError>> {
        let objects_read = if self.enabled {
            objects
        } else {
            &BTreeMap::new()
        };
        if self.written.as_ref() == Some(objects_read) {
            return None;
        }
        let reserved = self.configured.deny.len();
        (self.admission).admit(objects_read, reserved, capacity::PREFILTER_DENY as usize);
        let mut wanted = self.configured.clone();
        wanted.add_objects(self.admission.prefixes());
        Some(match maps.write(&wanted) {
            Ok(writes) => {
                self.written = Some(objects_read.clone());
                Ok(DenyListReport {
                    writes,
                    entries: wanted.deny.len(),
                })
            }
            Err(e) => {
                self.written = None;
                Err(e)
            }
        })
    }

    /// The objects the last pass refused for capacity.
    pub fn refused(&self) -> &[Rejection] {
        self.admission.refused()
    }

    /// The agent's deny-list pass, run before the services' pass: writes the map when the
    /// reconciler's `PrefilterDenyList` objects changed, and hands the objects refused for
    /// capacity to its rejections (logged and counted by that services' pass).
    pub fn apply(
        &mut self,
        reconciler: &mut Reconciler,
        maps: &mut PrefilterMaps,
        metrics: Option<&Metrics>,
    ) -> Result<(), DataplaneError> {
        let Some(result) = self.pass(&reconciler.intent().deny_lists, maps) else {
            return Ok(());
        };
        reconciler.stage(&ObjectEvent::Rejections {
            origin: ADMISSION_ORIGIN.to_owned(),
            rejections: self.refused().to_vec(),
        });
        let report = result?;
        if report.writes > 0 {
            info!(
                writes = report.writes,
                entries = report.entries,
                "pre-filter deny-list updated"
            );
        }
        if let Some(metrics) = metrics {
            metrics.set_map_entries(map_names::PREFILTER_DENY, report.entries);
        }
        Ok(())
    }
}

/// The origin under which deny-list objects refused for capacity are reported.
const ADMISSION_ORIGIN: &str = "prefilter deny-list admission";

pub fn deny_key(prefix: &Cidr) -> DenyKey {
    let (addr, family) = addr_of(prefix.addr);
    (
        PolicyCidrKey {
            family,
            _pad: [0; 3],
            addr,
        },
        POLICY_CIDR_FIXED_BITS + u32::from(prefix.len),
    )
}

/// `WEIR_PREFILTER_DENY` and `WEIR_FAILSAFE_PORTS`.
pub struct PrefilterMaps {
    deny: LpmTrie<MapData, PolicyCidrKey, u32>,
    failsafe: HashMap<MapData, FailsafeKey, u8>,
}

impl PrefilterMaps {
    pub(crate) fn take(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        Ok(PrefilterMaps {
            deny: take_map(ebpf, map_names::PREFILTER_DENY)?,
            failsafe: take_map(ebpf, map_names::FAILSAFE_PORTS)?,
        })
    }

    pub fn open_pinned(dir: &Path) -> Result<Self, DataplaneError> {
        Ok(PrefilterMaps {
            deny: open_pinned(dir, map_names::PREFILTER_DENY)?,
            failsafe: open_pinned(dir, map_names::FAILSAFE_PORTS)?,
        })
    }

    pub fn read(&self) -> Result<PrefilterState, DataplaneError> {
        Ok(PrefilterState {
            deny: read_trie(&self.deny, map_names::PREFILTER_DENY)?,
            failsafe: read_all(&self.failsafe, map_names::FAILSAFE_PORTS)?
                .into_keys()
                .collect(),
        })
    }

    /// Makes the maps hold `wanted`: new and changed entries first, stale ones after (a
    /// failsafe port is open, a prefix denied, throughout), except new prefixes a full map has
    /// no room for yet. Returns the writes.
    pub fn write(&mut self, wanted: &PrefilterState) -> Result<usize, DataplaneError> {
        let held = self.read()?;
        let upserts: Vec<(DenyKey, u32)> = (wanted.deny.iter())
            .filter(|(key, counter)| held.deny.get(key) != Some(counter))
            .map(|(key, counter)| (*key, *counter))
            .collect();
        let stale_deny: Vec<DenyKey> = (held.deny.keys())
            .filter(|key| !wanted.deny.contains_key(key))
            .copied()
            .collect();
        let opened: Vec<(FailsafeKey, u8)> = (wanted.failsafe.difference(&held.failsafe))
            .map(|key| (*key, 1))
            .collect();
        let closed: Vec<FailsafeKey> = (held.failsafe.difference(&wanted.failsafe))
            .copied()
            .collect();
        // A full map takes no new prefix before stale ones go: new prefixes beyond the free
        // room wait for the removals (a set that fits is always written). Changed counters
        // take no room.
        let room = (capacity::PREFILTER_DENY as usize).saturating_sub(held.deny.len());
        let (mut early, mut late): (Vec<_>, Vec<_>) = upserts
            .iter()
            .partition(|(key, _)| held.deny.contains_key(key));
        let new = late.len();
        early.extend(late.drain(..room.min(new)));
        write_entries(&self.failsafe, &opened, map_names::FAILSAFE_PORTS)?;
        write_entries(&self.deny, &trie_entries(&early), map_names::PREFILTER_DENY)?;
        delete_keys(
            &self.deny,
            &trie_keys(&stale_deny),
            map_names::PREFILTER_DENY,
        )?;
        write_entries(&self.deny, &trie_entries(&late), map_names::PREFILTER_DENY)?;
        delete_keys(&self.failsafe, &closed, map_names::FAILSAFE_PORTS)?;
        Ok(upserts.len() + stale_deny.len() + opened.len() + closed.len())
    }
}

/// Where the pre-filter runs on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// In the driver, before an skb exists.
    Native,
    /// At the stack's generic XDP hook: any driver, after the skb is built.
    Generic,
    /// A link an earlier agent pinned, whose program was replaced in place (its mode kept).
    Adopted,
}

enum Link {
    Owned(XdpLinkId),
    Pinned(PathBuf),
}

/// The pre-filter's attachments, by interface. With a link directory, links are pinned there
/// (`xdp_<interface>`) and outlive the agent as the tc links do; a restarted agent swaps its
/// program into them.
#[derive(Default)]
pub struct Attachments {
    links: BTreeMap<String, (Link, Attached)>,
}

const PIN_PREFIX: &str = "xdp_";

/// The file its pinned link has in the link directory.
pub fn link_pin_name(interface: &str) -> String {
    format!("{PIN_PREFIX}{interface}")
}

impl Attachments {
    pub fn is_attached(&self, interface: &str) -> bool {
        self.links.contains_key(interface)
    }

    pub fn interfaces(&self) -> impl Iterator<Item = (&str, Attached)> {
        self.links
            .iter()
            .map(|(name, (_, how))| (name.as_str(), *how))
    }

    /// Attaches the pre-filter to `interface` in `mode`: `Auto` tries the driver first and
    /// falls back to generic XDP, saying which it got.
    pub fn attach(
        &mut self,
        program: &mut Xdp,
        interface: &str,
        mode: XdpMode,
        link_dir: Option<&Path>,
    ) -> Result<Attached, DataplaneError> {
        let attach_err = |source| DataplaneError::Attach {
            interface: interface.to_owned(),
            source,
        };
        let pin = link_dir.map(|dir| dir.join(link_pin_name(interface)));
        if let Some(pin) = pin.as_ref().filter(|p| p.exists()) {
            match adopt(program, pin) {
                Ok(()) => {
                    info!(interface, pin = %pin.display(), "adopted the pinned XDP pre-filter link; program replaced");
                    self.links.insert(
                        interface.to_owned(),
                        (Link::Pinned(pin.clone()), Attached::Adopted),
                    );
                    return Ok(Attached::Adopted);
                }
                Err(e) => {
                    warn!(interface, error = %e, "pinned XDP link not adoptable; attaching anew");
                    let _ = std::fs::remove_file(pin);
                }
            }
        }
        let tries: &[(aya::programs::XdpMode, Attached)] = match mode {
            XdpMode::Native => &[(aya::programs::XdpMode::Driver, Attached::Native)],
            XdpMode::Generic => &[(aya::programs::XdpMode::Skb, Attached::Generic)],
            XdpMode::Auto => &[
                (aya::programs::XdpMode::Driver, Attached::Native),
                (aya::programs::XdpMode::Skb, Attached::Generic),
            ],
        };
        let mut last_error = None;
        for (flags, attached) in tries {
            match program.attach(interface, *flags) {
                Ok(id) => {
                    let link = match &pin {
                        Some(path) => {
                            pin_link(program, id, path).map_err(|message| {
                                DataplaneError::PinLink {
                                    interface: interface.to_owned(),
                                    path: path.clone(),
                                    message,
                                }
                            })?;
                            Link::Pinned(path.clone())
                        }
                        None => Link::Owned(id),
                    };
                    info!(interface, mode = ?attached, "attached the XDP pre-filter");
                    self.links.insert(interface.to_owned(), (link, *attached));
                    return Ok(*attached);
                }
                Err(e) => {
                    debug!(interface, mode = ?attached, error = %e, "XDP attach failed");
                    last_error = Some(e);
                }
            }
        }
        Err(attach_err(last_error.expect("at least one mode was tried")))
    }

    pub fn detach(&mut self, program: &mut Xdp, interface: &str) {
        match self.links.remove(interface) {
            Some((Link::Owned(id), _)) => {
                if let Err(e) = program.detach(id) {
                    debug!(interface, error = %e, "detaching the XDP pre-filter");
                }
                info!(interface, "detached the XDP pre-filter");
            }
            Some((Link::Pinned(path), _)) => match std::fs::remove_file(&path) {
                Ok(()) => info!(interface, "detached the XDP pre-filter (unpinned its link)"),
                Err(e) => debug!(interface, error = %e, "unpinning the XDP link"),
            },
            None => {}
        }
    }

    /// Unpins the links an earlier agent left for interfaces not in `wanted` (all of them when
    /// the pre-filter is off now).
    pub fn release_unwanted(&mut self, link_dir: &Path, wanted: &BTreeSet<String>) {
        let Ok(entries) = std::fs::read_dir(link_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(interface) = name.to_str().and_then(|n| n.strip_prefix(PIN_PREFIX)) else {
                continue;
            };
            if !wanted.contains(interface) && !self.links.contains_key(interface) {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => info!(interface, "released the XDP pre-filter's pinned link"),
                    Err(e) => debug!(interface, error = %e, "releasing the XDP link"),
                }
            }
        }
    }
}

/// `BPF_LINK_UPDATE` on a pinned XDP link: the kernel swaps the program in place.
fn adopt(program: &mut Xdp, pin: &Path) -> Result<(), String> {
    let pinned = PinnedLink::from_pin(pin).map_err(|e| e.to_string())?;
    let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| e.to_string())?;
    let id = program.attach_to_link(link).map_err(|e| e.to_string())?;
    // The pin keeps the link; our descriptor is not needed.
    let link = program.take_link(id).map_err(|e| e.to_string())?;
    drop(FdLink::try_from(link).map_err(|e| e.to_string())?);
    Ok(())
}

/// Pins a new link; on failure the link is dropped, and with it the attachment.
fn pin_link(program: &mut Xdp, id: XdpLinkId, path: &Path) -> Result<(), String> {
    let link = program.take_link(id).map_err(|e| e.to_string())?;
    let fd_link = FdLink::try_from(link).map_err(|e| e.to_string())?;
    // Closing our descriptor leaves the link to its pin.
    drop(fd_link.pin(path).map_err(|e| e.to_string())?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> AgentConfig {
        let layer: crate::config::ConfigLayer =
            toml::from_str(&format!("node_name = \"n1\"\nstate_path = \"/s\"\n{text}")).unwrap();
        layer.finish().unwrap()
    }

    #[test]
    fn the_deny_list_is_written_only_when_the_prefilter_is_on() {
        let off = config("[prefilter]\ndeny = [\"198.18.9.0/24\"]\n");
        assert!(PrefilterState::from_config(&off).unwrap().deny.is_empty());
        let on = config(
            "[prefilter]\nenabled = true\ndeny = [\"198.18.9.7/24\", \"198.19.0.1\", \"fd00:9::/32\"]\n",
        );
        let state = PrefilterState::from_config(&on).unwrap();
        let keys: Vec<(std::net::IpAddr, u32, u32)> = (state.deny.iter())
            .map(|((key, bits), counter)| {
                (
                    crate::compile::ip_of(&key.addr, key.family),
                    bits - POLICY_CIDR_FIXED_BITS,
                    *counter,
                )
            })
            .collect();
        let drop = counter::PREFILTER_DROP_CONFIG;
        assert_eq!(
            keys,
            [
                ("198.18.9.0".parse().unwrap(), 24, drop),
                ("198.19.0.1".parse().unwrap(), 32, drop),
                ("fd00:9::".parse().unwrap(), 32, drop),
            ]
        );
    }

    fn deny_list(name: &str, prefixes: &[&str]) -> DenyListIntent {
        DenyListIntent {
            name: name.into(),
            prefixes: prefixes.iter().map(|p| parse_prefix(p).unwrap()).collect(),
        }
    }

    fn admitted(admission: &DenyListAdmission) -> Vec<String> {
        let mut out: Vec<String> = (admission.prefixes())
            .map(|c| format!("{}/{}", c.addr, c.len))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn an_object_that_would_overflow_the_map_is_refused_and_keeps_its_admitted_version() {
        let mut admission = DenyListAdmission::default();
        let a = deny_list("a", &["198.18.1.0/24", "198.18.2.0/24"]);
        let b = deny_list("b", &["198.18.3.0/24"]);
        let objects = BTreeMap::from([("a".to_owned(), a.clone()), ("b".to_owned(), b)]);
        // Capacity 4, one entry the configuration's: both fit.
        assert!(admission.admit(&objects, 1, 4).is_empty());
        assert_eq!(admitted(&admission).len(), 3);
        // `a` grows past the capacity: refused whole, its admitted version stays.
        let grown = deny_list("a", &["198.18.1.0/24", "198.18.2.0/24", "198.18.4.0/24"]);
        let mut objects = objects;
        objects.insert("a".into(), grown.clone());
        let refused = admission.admit(&objects, 1, 4);
        assert_eq!(refused.len(), 1);
        assert_eq!(
            (refused[0].object.as_str(), refused[0].reason),
            ("a", "capacity")
        );
        assert_eq!(
            admitted(&admission),
            ["198.18.1.0/24", "198.18.2.0/24", "198.18.3.0/24"]
        );
        // Deleting `b` frees its room in the same pass: `a` fits now.
        objects.remove("b");
        assert!(admission.admit(&objects, 1, 4).is_empty());
        assert_eq!(
            admitted(&admission),
            ["198.18.1.0/24", "198.18.2.0/24", "198.18.4.0/24"]
        );
        // A new object that cannot fit is refused and never admitted; the others stay.
        objects.insert("c".into(), deny_list("c", &["198.18.5.0/24"]));
        assert_eq!(admission.admit(&objects, 1, 4)[0].object, "c");
        assert_eq!(admitted(&admission).len(), 3);
    }

    #[test]
    fn configuration_prefixes_keep_their_counter_over_an_objects() {
        let mut state = PrefilterState::from_config(&config(
            "[prefilter]\nenabled = true\ndeny = [\"198.18.9.0/24\"]\n",
        ))
        .unwrap();
        let object = deny_list("x", &["198.18.9.0/24", "fd00:9::/32"]);
        state.add_objects(&object.prefixes);
        let counters: Vec<u32> = state.deny.values().copied().collect();
        assert_eq!(
            counters,
            [
                counter::PREFILTER_DROP_CONFIG,
                counter::PREFILTER_DROP_OBJECT
            ]
        );
    }

    #[test]
    fn failsafe_ports_default_to_the_nodes_control_ports_and_the_agents_own() {
        let state = PrefilterState::from_config(&config("")).unwrap();
        let has = |proto, port: u16, direction| {
            state.failsafe.contains(&FailsafeKey {
                port_be: port.to_be(),
                proto,
                direction,
            })
        };
        use failsafe_direction::{INBOUND, OUTBOUND};
        for port in [22, 179, 2379, 2380, 6443, 10250, 9464, 10256] {
            assert!(has(PROTO_TCP, port, INBOUND), "tcp {port} inbound");
        }
        assert!(has(PROTO_UDP, 68, INBOUND));
        assert!(has(PROTO_UDP, 53, OUTBOUND) && has(PROTO_UDP, 67, OUTBOUND));
        assert!(!has(PROTO_TCP, 80, INBOUND) && !has(PROTO_UDP, 22, INBOUND));
        let custom = config("[failsafe]\ninbound = [\"tcp:2222\"]\noutbound = []\n");
        let state = PrefilterState::from_config(&custom).unwrap();
        // 2222, and the agent's own two ports.
        assert_eq!(state.failsafe.len(), 3);
    }

    #[test]
    fn a_bad_deny_entry_or_failsafe_port_is_a_configuration_error() {
        let layer: crate::config::ConfigLayer = toml::from_str(
            "node_name = \"n1\"\nstate_path = \"/s\"\n[prefilter]\nenabled = true\ndeny = [\"198.18.0.0/33\"]\n",
        )
        .unwrap();
        let error = layer.finish().unwrap_err().to_string();
        assert!(error.contains("prefilter.deny[0]"), "{error}");
        for bad in ["\"ssh:22\"", "\"tcp:70000\"", "\"tcp:30-20\"", "\"22\""] {
            let text = format!("[failsafe]\ninbound = [{bad}]\n");
            assert!(
                toml::from_str::<crate::config::ConfigLayer>(&text).is_err(),
                "{bad}"
            );
        }
    }
}

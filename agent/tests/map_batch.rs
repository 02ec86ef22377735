//! The batch layer against the running kernel: batched and per-entry paths agree, reads span
//! several calls, absent keys delete as success, and a write that fails half-way leaves the map
//! holding a prefix of what was asked (also through `ServiceMaps::apply`).

mod common;

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd as _, OwnedFd};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap, Map, MapData};
use common::require_root;
use weir_agent::dataplane::{Dataplane, DataplaneError, LoadOptions};
use weir_agent::map_batch::{self, Operation, Strategy};
use weir_agent::state::Plan;
use weir_common::{map_names, BackendValue};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
const BPF_F_NO_PREALLOC: u32 = 1;

/// A fresh unpinned map (union bpf_attr's map-create prefix), as aya's typed handle.
fn create<T: TryFrom<Map, Error = aya::maps::MapError>>(
    map_type: u32,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
    flags: u32,
) -> T {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    let attr = MapCreate {
        map_type,
        key_size: key_size as u32,
        value_size: value_size as u32,
        max_entries,
        map_flags: flags,
    };
    // SAFETY: `attr` is an initialised prefix of union bpf_attr for BPF_MAP_CREATE, with no
    // pointers in it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &attr as *const MapCreate,
            std::mem::size_of::<MapCreate>() as u32,
        )
    };
    assert!(fd >= 0, "map create: {}", std::io::Error::last_os_error());
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let map = Map::from_map_data(MapData::from_fd(fd).expect("map data")).expect("map");
    T::try_from(map).expect("typed map")
}

/// Values large enough that a read takes several lookup calls (256 KiB each).
type Wide = [u64; 32];

fn wide(i: u32) -> Wide {
    let mut value = [0u64; 32];
    value[0] = i as u64;
    value[31] = !(i as u64);
    value
}

fn sorted<K: Ord, V>(entries: Vec<(K, V)>) -> BTreeMap<K, V> {
    entries.into_iter().collect()
}

#[test]
fn batched_and_per_entry_paths_agree_on_hash_maps() {
    require_root();
    for map_type in [BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LRU_HASH] {
        let map: HashMap<MapData, u32, Wide> = create(map_type, 4, 256, 8192, 0);
        let entries: Vec<(u32, Wide)> = (0..3000).map(|i| (i * 7, wide(i))).collect();
        map_batch::update(&map, &entries, Strategy::Batched).expect("batched update");

        let batched = map_batch::read(&map, Strategy::Batched).expect("batched read");
        let single = map_batch::read(&map, Strategy::PerEntry).expect("per-entry read");
        assert_eq!(batched.len(), 3000, "every entry once, over several calls");
        assert_eq!(sorted(batched), sorted(entries.clone()));
        assert_eq!(sorted(single), sorted(entries.clone()));

        // Deleting keys that are not there (odd multiples of 7 past the end, 1, 2) is success
        // and does not stop the batch.
        let doomed: Vec<u32> = (0..1500)
            .map(|i| i * 14)
            .chain([1, 2, 99_999])
            .chain((1500..1600).map(|i| i * 14))
            .collect();
        map_batch::delete(&map, &doomed, Strategy::Batched).expect("batched delete");
        let left = sorted(map_batch::read(&map, Strategy::Batched).expect("read"));
        let expected: BTreeMap<u32, Wide> = entries
            .iter()
            .filter(|(k, _)| k % 14 != 0 || *k >= 1600 * 14)
            .copied()
            .collect();
        assert_eq!(left, expected);

        // The per-entry path deletes the rest alike.
        let rest: Vec<u32> = left.keys().copied().chain([3]).collect();
        map_batch::delete(&map, &rest, Strategy::PerEntry).expect("per-entry delete");
        assert!(map_batch::read(&map, Strategy::Batched)
            .expect("read")
            .is_empty());
    }
}

#[test]
fn an_lpm_trie_round_trips_batched_or_not() {
    require_root();
    // Whether the kernel has batch commands for LPM tries (generic ones came after 5.10) or
    // not, the batched calls give the per-entry results.
    let trie: LpmTrie<MapData, [u8; 4], u8> =
        create(BPF_MAP_TYPE_LPM_TRIE, 8, 1, 1024, BPF_F_NO_PREALLOC);
    let entries: Vec<(LpmKey<[u8; 4]>, u8)> = (0..200u8)
        .map(|i| (LpmKey::new(24, [198, 18, i, 0]), i))
        .collect();
    map_batch::update(&trie, &entries, Strategy::Batched).expect("update");
    let as_tuples = |entries: Vec<(LpmKey<[u8; 4]>, u8)>| -> BTreeMap<(u32, [u8; 4]), u8> {
        entries
            .into_iter()
            .map(|(k, v)| ((k.prefix_len(), k.data()), v))
            .collect()
    };
    let batched = as_tuples(map_batch::read(&trie, Strategy::Batched).expect("read"));
    let single = as_tuples(map_batch::read(&trie, Strategy::PerEntry).expect("read"));
    assert_eq!(batched, as_tuples(entries.clone()));
    assert_eq!(single, batched);
    let doomed: Vec<LpmKey<[u8; 4]>> = entries[..100].iter().map(|(k, _)| *k).collect();
    map_batch::delete(&trie, &doomed, Strategy::Batched).expect("delete");
    assert_eq!(
        as_tuples(map_batch::read(&trie, Strategy::Batched).expect("read")),
        as_tuples(entries[100..].to_vec())
    );
}

#[test]
fn a_write_that_fails_half_way_leaves_a_prefix() {
    require_root();
    for strategy in [Strategy::Batched, Strategy::PerEntry] {
        let map: HashMap<MapData, u32, u64> = create(BPF_MAP_TYPE_HASH, 4, 8, 8, BPF_F_NO_PREALLOC);
        let entries: Vec<(u32, u64)> = (0..12).map(|i| (100 - i, i as u64)).collect();
        let failed = map_batch::update(&map, &entries, strategy).expect_err("map holds 8");
        assert_eq!(failed.operation, Operation::Update);
        assert_eq!(failed.done, 8, "{strategy:?}: the kernel's count");
        assert_eq!(failed.source.raw_os_error(), Some(libc::E2BIG));
        assert_eq!(
            sorted(map_batch::read(&map, Strategy::Batched).expect("read")),
            sorted(entries[..8].to_vec()),
            "{strategy:?}: exactly the first 8, in the plan's order"
        );
    }
}

#[test]
fn a_plan_that_does_not_fit_leaves_a_consistent_prefix_in_the_service_maps() {
    require_root();
    let mut dataplane = Dataplane::load(&LoadOptions {
        pin_dir: None,
        max_entries: vec![
            (map_names::CONNTRACK, 4096),
            (map_names::CT_NEW, 4096),
            (map_names::BACKENDS, 3),
        ],
        ..Default::default()
    })
    .expect("the eBPF object loads");
    let backend = |id: u32| BackendValue {
        addr: weir_common::Addr::from_v4([198, 19, 2, id as u8]),
        port_be: 8080u16.to_be(),
        proto: 6,
        family: 4,
        ..Default::default()
    };
    let plan = Plan {
        upsert_backends: (1..=5).map(|id| (id, backend(id))).collect(),
        upsert_slots: vec![(
            weir_common::BackendSlotKey {
                service_id: 1,
                slot: 0,
            },
            1,
        )],
        ..Default::default()
    };
    let failed = dataplane.services.apply(&plan).expect_err("3 backends fit");
    match failed {
        DataplaneError::Batch { name, source } => {
            assert_eq!(name, map_names::BACKENDS);
            assert_eq!(source.done, 3);
        }
        other => panic!("unexpected error {other}"),
    }
    let state = dataplane.services.read().expect("read");
    let held: Vec<u32> = state.backends.keys().copied().collect();
    assert_eq!(held, vec![1, 2, 3], "the plan's first three backends");
    assert!(
        state.slots.is_empty(),
        "nothing after the failed step: no slot names a backend that is not there"
    );
}

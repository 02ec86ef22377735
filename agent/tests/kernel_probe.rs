//! The kernel probe (`weir-node-image`, run by the lab on every kernel of the matrix) must ask
//! for every helper and map type Weir's programs use: checked here against the built object,
//! so a new helper call or map type cannot reach a kernel unprobed.

use std::collections::BTreeSet;

use weir_agent::dataplane::OBJECT;
use weir_node_image::probe::{WEIR_HELPERS, WEIR_MAPS};

const BPF_CALL: u8 = 0x85;
/// `src_reg` of a call to a helper (1 is a call to a BPF function, 2 a kfunc).
const HELPER_CALL: u8 = 0;

fn object() -> aya_obj::Object {
    aya_obj::Object::parse(OBJECT).expect("the built object parses")
}

#[test]
fn the_kernel_probe_asks_for_every_helper_the_programs_call() {
    let called: BTreeSet<i32> = object()
        .functions
        .values()
        .flat_map(|f| &f.instructions)
        .filter(|insn| insn.code == BPF_CALL && insn.src_reg() == HELPER_CALL)
        .map(|insn| insn.imm)
        .collect();
    let probed: BTreeSet<i32> = WEIR_HELPERS.iter().map(|(_, id, _)| *id).collect();
    assert_eq!(
        called, probed,
        "helper ids the object calls vs the ones images/node/src/probe.rs probes"
    );
}

#[test]
fn the_kernel_probe_creates_every_map_type_the_programs_declare() {
    let declared: BTreeSet<u32> = object().maps.values().map(|m| m.map_type()).collect();
    let probed: BTreeSet<u32> = WEIR_MAPS
        .iter()
        .map(|(_, map_type, ..)| *map_type)
        .collect();
    assert_eq!(
        declared, probed,
        "map types the object declares vs the ones images/node/src/probe.rs creates"
    );
}

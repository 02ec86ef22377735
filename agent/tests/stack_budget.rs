//! Old verifiers' stack budget, checked on the built object: every call chain of every program
//! must fit 512 bytes when each frame is rounded up to 32 bytes, as Linux 5.10 and 6.1 count
//! it. The host's newer verifier accepts chains those refuse (5.10 refused weir_ingress at 544
//! bytes while every packet test on the host passed), and a VM run takes minutes: this catches
//! it in a second. Frames are read as the verifier reads them, from the deepest stack access of
//! each function (an upper bound: the verifier counts only accesses on paths it walks).

use std::collections::BTreeMap;

use weir_agent::dataplane::OBJECT;

const MAX_BPF_STACK: u32 = 512;
const FRAME_ROUNDING: u32 = 32;
const FRAME_POINTER: u8 = 10;
const INS_SIZE: u64 = 8;
const BPF_CALL: u8 = 0x85;
const BPF_PSEUDO_CALL: u8 = 1;
/// `mov64 dst, src` and `add64 dst, imm`: how a pointer into the frame is made.
const MOV64_X: u8 = 0xbf;
const ADD64_K: u8 = 0x07;
/// Instruction classes that access memory: LDX, ST, STX.
const CLASS_LDX: u8 = 0x01;
const CLASS_ST: u8 = 0x02;
const CLASS_STX: u8 = 0x03;

type Key = (usize, u64);

struct Frame {
    name: String,
    bytes: u32,
    callees: Vec<Key>,
}

/// Each function's frame and the functions it calls (calls to named symbols, such as the
/// compiler's `memset`, are leaves with no frame and are left out).
fn frames() -> BTreeMap<Key, Frame> {
    let object = aya_obj::Object::parse(OBJECT).expect("the built object parses");
    let text = object
        .functions
        .values()
        .find(|f| f.name == "memset" || f.name.starts_with("_R"))
        .map(|f| f.section_index.0)
        .expect("a .text function");
    object
        .functions
        .iter()
        .map(|(key, function)| {
            let mut bytes = 0u32;
            let mut frame_pointer_copies = [false; 11];
            let mut callees = Vec::new();
            for (index, insn) in function.instructions.iter().enumerate() {
                let class = insn.code & 0x07;
                let memory = matches!(class, CLASS_LDX | CLASS_ST | CLASS_STX);
                let base = if class == CLASS_LDX {
                    insn.src_reg()
                } else {
                    insn.dst_reg()
                };
                if memory && base == FRAME_POINTER && insn.off < 0 {
                    bytes = bytes.max(u32::from(insn.off.unsigned_abs()));
                }
                if insn.code == ADD64_K
                    && frame_pointer_copies[usize::from(insn.dst_reg()).min(10)]
                    && insn.imm < 0
                {
                    bytes = bytes.max(insn.imm.unsigned_abs());
                }
                if usize::from(insn.dst_reg()) < frame_pointer_copies.len() && insn.code != ADD64_K
                {
                    frame_pointer_copies[usize::from(insn.dst_reg())] =
                        insn.code == MOV64_X && insn.src_reg() == FRAME_POINTER;
                }
                if insn.code == BPF_CALL && insn.src_reg() == BPF_PSEUDO_CALL && insn.imm != -1 {
                    // Within a section, a call is relative to itself; out of a program's
                    // section it goes to .text, relative to its start (a relocation against
                    // the section symbol, which this parse does not keep: both are tried).
                    let relative = function.section_offset as i64
                        + (index as i64 + 1 + i64::from(insn.imm)) * INS_SIZE as i64;
                    let into_text = (i64::from(insn.imm) + 1) * INS_SIZE as i64;
                    let target = if key.0 == text {
                        Some((text, relative))
                    } else if object.functions.contains_key(&(text, into_text as u64)) {
                        Some((text, into_text))
                    } else {
                        Some((key.0, relative))
                    };
                    callees.extend(
                        target
                            .filter(|(_, at)| *at >= 0)
                            .map(|(section, at)| (section, at as u64)),
                    );
                }
            }
            (
                *key,
                Frame {
                    name: function.name.clone(),
                    bytes,
                    callees,
                },
            )
        })
        .collect()
}

fn rounded(bytes: u32) -> u32 {
    bytes.max(1).div_ceil(FRAME_ROUNDING) * FRAME_ROUNDING
}

/// The deepest chain from `key`: its bytes and the functions on it.
fn deepest(frames: &BTreeMap<Key, Frame>, key: Key, path: &mut Vec<Key>) -> (u32, Vec<String>) {
    let frame = &frames[&key];
    path.push(key);
    let mut best = (0, Vec::new());
    for callee in &frame.callees {
        if frames.contains_key(callee) && !path.contains(callee) {
            let found = deepest(frames, *callee, path);
            if found.0 > best.0 {
                best = found;
            }
        }
    }
    path.pop();
    let mut chain = vec![format!("{} ({})", frame.name, frame.bytes)];
    chain.extend(best.1);
    (rounded(frame.bytes) + best.0, chain)
}

#[test]
fn every_call_chain_fits_old_verifiers_stack_budget() {
    let frames = frames();
    let entries: Vec<Key> = frames
        .iter()
        .filter(|(_, f)| f.name.starts_with("weir_"))
        .map(|(k, _)| *k)
        .collect();
    assert!(
        entries.len() >= 11,
        "every program found: {}",
        entries.len()
    );
    for entry in entries {
        let (bytes, chain) = deepest(&frames, entry, &mut Vec::new());
        assert!(
            bytes <= MAX_BPF_STACK,
            "{} bytes of stack over the chain {}: old verifiers (5.10, 6.1) refuse more than \
             {MAX_BPF_STACK}, counting each frame rounded up to {FRAME_ROUNDING}",
            bytes,
            chain.join(" -> ")
        );
    }
}

#[test]
fn the_deepest_chain_is_found() {
    // The flow path is known to call into conntrack: the walk must see calls between
    // functions, or the budget test above would pass on an empty graph.
    let frames = frames();
    let ingress = frames
        .iter()
        .find(|(_, f)| f.name == "weir_ingress")
        .map(|(k, _)| *k)
        .expect("weir_ingress");
    let (bytes, chain) = deepest(&frames, ingress, &mut Vec::new());
    assert!(chain.len() >= 3, "{chain:?}");
    assert!(bytes > 256, "{bytes} bytes over {chain:?}");
}

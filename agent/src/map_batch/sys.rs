//! The raw `bpf(2)` map commands the batch layer uses: every `unsafe` of [`super`] is here.
//!
//! Callers promise what the kernel cannot check for us: that the buffers they pass hold whole
//! keys and values of the sizes the map was created with. The safe layer above keeps that
//! promise through [`super::BatchTarget`].

use std::os::fd::{AsRawFd as _, BorrowedFd};

/// `enum bpf_cmd` numbers (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// union bpf_attr's `batch` member (the `BPF_MAP_*_BATCH` commands).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    /// In: room in `keys`/`values`, in elements. Out: elements the kernel processed.
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// union bpf_attr's per-element member (`BPF_MAP_*_ELEM`, `BPF_MAP_GET_NEXT_KEY`).
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    /// `value` for lookups and updates, `next_key` for `BPF_MAP_GET_NEXT_KEY`.
    value_or_next_key: u64,
    flags: u64,
}

/// What a batch command did: how many elements the kernel processed (always reported, also on
/// failure: the elements before the failing one), and the failure if any.
pub struct BatchOutcome {
    pub processed: u32,
    pub result: std::io::Result<()>,
}

/// # Safety
/// The pointers inside `attr` are valid for what `cmd` reads and writes through them.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<()> {
    // SAFETY: `attr` is a fully initialised, `#[repr(C)]` prefix of union bpf_attr for `cmd`
    // (the kernel zero-extends shorter attributes), writable for the call's length (batch
    // commands write `count` back); the pointers inside it are this function's precondition.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// # Safety
/// As [`bpf`].
unsafe fn batch(cmd: libc::c_long, mut attr: BatchAttr) -> BatchOutcome {
    let room = attr.count;
    // SAFETY: the pointers in `attr` are this function's precondition.
    let result = unsafe { bpf(cmd, &mut attr) };
    BatchOutcome {
        processed: processed(room, attr.count, &result),
        result,
    }
}

/// How many elements a batch command processed, from `count` as it is after the call. A kernel
/// that fails a command before its loop (no batch operation for the map type: `ENOTSUPP` on 5.10
/// for the LPM trie; bad flags) never writes `count`, which then still holds `room`. A failure
/// inside the loop stops before the failing element, so it reports fewer than `room`; the only
/// failure with every element processed is a lookup's `ENOENT` at the end of the map, whose
/// count the kernel does write.
fn processed(room: u32, count: u32, result: &std::io::Result<()>) -> u32 {
    match result {
        Ok(()) => count,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => count.min(room),
        Err(_) if count >= room => 0,
        Err(_) => count,
    }
}

/// `BPF_MAP_UPDATE_BATCH`: `count` keys from `keys` with their values from `values`, in order;
/// the kernel stops at the first element it cannot write.
///
/// # Safety
/// `keys` holds `count` keys of the map's key size and `values` `count` values of its value
/// size, both readable for the call.
pub unsafe fn update_batch(
    map: BorrowedFd<'_>,
    keys: *const u8,
    values: *const u8,
    count: u32,
) -> BatchOutcome {
    // SAFETY: `keys` and `values` hold `count` elements of the map's sizes (precondition).
    unsafe {
        batch(
            BPF_MAP_UPDATE_BATCH,
            BatchAttr {
                keys: keys as u64,
                values: values as u64,
                count,
                map_fd: map.as_raw_fd() as u32,
                ..Default::default()
            },
        )
    }
}

/// `BPF_MAP_DELETE_BATCH`: `count` keys from `keys`, in order; the kernel stops at the first
/// key it cannot delete (`ENOENT` for one that is not there).
///
/// # Safety
/// `keys` holds `count` keys of the map's key size, readable for the call.
pub unsafe fn delete_batch(map: BorrowedFd<'_>, keys: *const u8, count: u32) -> BatchOutcome {
    // SAFETY: `keys` holds `count` keys of the map's size (precondition).
    unsafe {
        batch(
            BPF_MAP_DELETE_BATCH,
            BatchAttr {
                keys: keys as u64,
                count,
                map_fd: map.as_raw_fd() as u32,
                ..Default::default()
            },
        )
    }
}

/// `BPF_MAP_LOOKUP_BATCH`: up to `count` entries after the position `in_batch` (null: from the
/// start), writing the position to resume from to `out_batch`. `ENOENT` means the walk reached
/// the end (the elements of this call are still valid).
///
/// # Safety
/// `keys` and `values` are writable for `count` keys and values of the map's sizes; `in_batch`
/// (unless null) and `out_batch` point to `token_len` bytes, at least the map type's position
/// token (4 bytes for hash maps, a key for the generic implementation).
pub unsafe fn lookup_batch(
    map: BorrowedFd<'_>,
    in_batch: *const u8,
    out_batch: *mut u8,
    keys: *mut u8,
    values: *mut u8,
    count: u32,
) -> BatchOutcome {
    // SAFETY: the buffers have room for `count` elements and the position token
    // (precondition).
    unsafe {
        batch(
            BPF_MAP_LOOKUP_BATCH,
            BatchAttr {
                in_batch: in_batch as u64,
                out_batch: out_batch as u64,
                keys: keys as u64,
                values: values as u64,
                count,
                map_fd: map.as_raw_fd() as u32,
                ..Default::default()
            },
        )
    }
}

/// `BPF_MAP_UPDATE_ELEM` with `BPF_ANY`.
///
/// # Safety
/// `key` and `value` point to a key and a value of the map's sizes.
pub unsafe fn update_elem(
    map: BorrowedFd<'_>,
    key: *const u8,
    value: *const u8,
) -> std::io::Result<()> {
    // SAFETY: `key` and `value` are whole elements of the map's sizes (precondition).
    unsafe {
        bpf(
            BPF_MAP_UPDATE_ELEM,
            &mut ElemAttr {
                map_fd: map.as_raw_fd() as u32,
                key: key as u64,
                value_or_next_key: value as u64,
                ..Default::default()
            },
        )
    }
}

/// `BPF_MAP_DELETE_ELEM`.
///
/// # Safety
/// `key` points to a key of the map's size.
pub unsafe fn delete_elem(map: BorrowedFd<'_>, key: *const u8) -> std::io::Result<()> {
    // SAFETY: `key` is a whole key of the map's size (precondition).
    unsafe {
        bpf(
            BPF_MAP_DELETE_ELEM,
            &mut ElemAttr {
                map_fd: map.as_raw_fd() as u32,
                key: key as u64,
                ..Default::default()
            },
        )
    }
}

/// `BPF_MAP_LOOKUP_ELEM`.
///
/// # Safety
/// `key` points to a key of the map's size, `value` is writable for a value of its size.
pub unsafe fn lookup_elem(
    map: BorrowedFd<'_>,
    key: *const u8,
    value: *mut u8,
) -> std::io::Result<()> {
    // SAFETY: `key` is a whole key, `value` has room for a value (precondition).
    unsafe {
        bpf(
            BPF_MAP_LOOKUP_ELEM,
            &mut ElemAttr {
                map_fd: map.as_raw_fd() as u32,
                key: key as u64,
                value_or_next_key: value as u64,
                ..Default::default()
            },
        )
    }
}

/// `BPF_MAP_GET_NEXT_KEY`: the key after `key` (null: the first), `ENOENT` after the last.
///
/// # Safety
/// `key` (unless null) points to a key of the map's size, `next_key` is writable for one.
pub unsafe fn get_next_key(
    map: BorrowedFd<'_>,
    key: *const u8,
    next_key: *mut u8,
) -> std::io::Result<()> {
    // SAFETY: `key` is null or a whole key, `next_key` has room for one (precondition).
    unsafe {
        bpf(
            BPF_MAP_GET_NEXT_KEY,
            &mut ElemAttr {
                map_fd: map.as_raw_fd() as u32,
                key: key as u64,
                value_or_next_key: next_key as u64,
                ..Default::default()
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::processed;

    fn failed(errno: i32) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(errno))
    }

    #[test]
    fn a_count_the_kernel_never_wrote_is_nothing_processed() {
        // 5.10, LPM trie: ENOTSUPP (524) before the loop, count as the caller set it.
        assert_eq!(processed(4096, 4096, &failed(524)), 0);
        assert_eq!(processed(12, 12, &failed(libc::EINVAL)), 0);
        // A failure at element 8 of 12 (E2BIG: the map is full).
        assert_eq!(processed(12, 8, &failed(libc::E2BIG)), 8);
        // The end of a walk that filled the buffer exactly.
        assert_eq!(processed(16, 16, &failed(libc::ENOENT)), 16);
        assert_eq!(processed(16, 16, &Ok(())), 16);
    }
}

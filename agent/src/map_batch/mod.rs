//! Batched map operations: one `bpf(2)` call for many entries where the kernel has the batch
//! commands (`BPF_MAP_{LOOKUP,UPDATE,DELETE}_BATCH`, 5.6 on for hash and LRU hash maps), one
//! call per entry where it does not (older kernels, map types without them: the LPM trie on
//! kernels before its generic batch ops). aya 0.14 has no batch API, hence this module.
//!
//! A full sync of 5,000 services writes about 60,000 entries: one syscall each cost a third of
//! its CPU, with Spectre mitigations making every kernel entry dear.
//!
//! Writes keep their order, also when they fail half-way: the kernel processes a batch element
//! by element and reports how many it did (`count`), so the map holds exactly a prefix of what
//! was asked, as a loop of single updates would leave it. The caller's "maps hold a prefix of
//! the plan" ([`crate::state::Plan`]) survives a failed batch.

mod sys;

use std::os::fd::{AsFd as _, BorrowedFd};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap, IterableMap as _, MapData};
use aya::Pod;

/// A map whose key and value sizes are those of `Key` and `Value`.
///
/// # Safety
/// The map behind [`BatchTarget::map_fd`] was created with key size `size_of::<Key>()` and
/// value size `size_of::<Value>()`: the kernel reads and writes whole elements of its own sizes
/// through the buffers this module sizes from the types.
pub unsafe trait BatchTarget {
    type Key: Pod;
    type Value: Pod;
    fn map_fd(&self) -> BorrowedFd<'_>;
}

// SAFETY: aya's `HashMap::try_from` refuses a map whose key or value size differs from K's or
// V's (`MapError::InvalidKeySize` / `InvalidValueSize`), and no handle changes its map after.
unsafe impl<K: Pod, V: Pod> BatchTarget for HashMap<MapData, K, V> {
    type Key = K;
    type Value = V;
    fn map_fd(&self) -> BorrowedFd<'_> {
        self.map().fd().as_fd()
    }
}

// SAFETY: aya's `LpmTrie::try_from` checks the key size against `lpm_trie::Key<K>` (prefix
// length and data) and the value size against V.
unsafe impl<K: Pod, V: Pod> BatchTarget for LpmTrie<MapData, K, V> {
    type Key = LpmKey<K>;
    type Value = V;
    fn map_fd(&self) -> BorrowedFd<'_> {
        self.map().fd().as_fd()
    }
}

/// A map's entries as read: keys and values of a [`BatchTarget`].
pub type Entries<M> = Vec<(<M as BatchTarget>::Key, <M as BatchTarget>::Value)>;

/// How to talk to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Batch commands, falling back to single entries when the kernel has none for the map.
    Batched,
    /// One call per entry (what the fallback does; for tests and comparisons).
    PerEntry,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Update,
    Delete,
    Read,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Operation::Update => "updating",
            Operation::Delete => "deleting",
            Operation::Read => "reading",
        })
    }
}

/// A failed batch: which operation, and how many elements of it reached the map before the
/// failure (the ones that did are the first `done`, in order).
#[derive(Debug, thiserror::Error)]
#[error("{operation} map entries (failed after {done}): {source}")]
pub struct BatchError {
    pub operation: Operation,
    pub done: usize,
    #[source]
    pub source: std::io::Error,
}

/// Whether a failure with nothing processed says the kernel has no batch command for this map
/// (an unknown command before 5.6, or a map type without the operation), rather than that an
/// element was refused. A real refusal comes back again from the per-entry path, with its cause.
fn lacks_batch(outcome: &sys::BatchOutcome) -> bool {
    /// The kernel's internal `ENOTSUPP`, which `bpf(2)` leaks for a missing batch operation.
    const ENOTSUPP: i32 = 524;
    outcome.processed == 0
        && matches!(
            outcome.result.as_ref().err().and_then(|e| e.raw_os_error()),
            Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
        )
}

/// Writes `entries` in order. On failure the map holds the first [`BatchError::done`] of them.
pub fn update<M: BatchTarget>(
    map: &M,
    entries: &[(M::Key, M::Value)],
    strategy: Strategy,
) -> Result<(), BatchError> {
    if entries.is_empty() {
        return Ok(());
    }
    let fd = map.map_fd();
    if strategy == Strategy::Batched {
        // The kernel takes keys and values as two packed arrays.
        let keys: Vec<M::Key> = entries.iter().map(|(k, _)| *k).collect();
        let values: Vec<M::Value> = entries.iter().map(|(_, v)| *v).collect();
        let mut done = 0;
        while done < entries.len() {
            let count = u32::try_from(entries.len() - done).unwrap_or(u32::MAX);
            // SAFETY: `keys[done..]` and `values[done..]` hold at least `count` elements of
            // M::Key and M::Value, the map's own sizes (BatchTarget).
            let outcome = unsafe {
                sys::update_batch(
                    fd,
                    keys[done..].as_ptr().cast(),
                    values[done..].as_ptr().cast(),
                    count,
                )
            };
            if done == 0 && lacks_batch(&outcome) {
                return update_each(fd, entries);
            }
            done += outcome.processed as usize;
            if let Err(source) = outcome.result {
                return Err(BatchError {
                    operation: Operation::Update,
                    done,
                    source,
                });
            }
        }
        return Ok(());
    }
    update_each(fd, entries)
}

fn update_each<K: Pod, V: Pod>(fd: BorrowedFd<'_>, entries: &[(K, V)]) -> Result<(), BatchError> {
    for (done, (key, value)) in entries.iter().enumerate() {
        // SAFETY: `key` and `value` are whole K and V, the map's sizes (BatchTarget).
        unsafe { sys::update_elem(fd, (key as *const K).cast(), (value as *const V).cast()) }
            .map_err(|source| BatchError {
                operation: Operation::Update,
                done,
                source,
            })?;
    }
    Ok(())
}

/// Deletes `keys` in order; a key already absent counts as deleted (the goal is absence). On
/// failure the first [`BatchError::done`] keys are gone.
pub fn delete<M: BatchTarget>(
    map: &M,
    keys: &[M::Key],
    strategy: Strategy,
) -> Result<(), BatchError> {
    let fd = map.map_fd();
    if strategy == Strategy::PerEntry {
        return delete_each(fd, keys);
    }
    let mut done = 0;
    while done < keys.len() {
        let count = u32::try_from(keys.len() - done).unwrap_or(u32::MAX);
        // SAFETY: `keys[done..]` holds at least `count` whole M::Key, the map's key size.
        let outcome = unsafe { sys::delete_batch(fd, keys[done..].as_ptr().cast(), count) };
        if done == 0 && lacks_batch(&outcome) {
            return delete_each(fd, keys);
        }
        done += outcome.processed as usize;
        match outcome.result {
            Ok(()) => {}
            // The kernel stops at a key that is not there: skip it, go on after it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => done += 1,
            Err(source) => {
                return Err(BatchError {
                    operation: Operation::Delete,
                    done,
                    source,
                })
            }
        }
    }
    Ok(())
}

fn delete_each<K: Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> Result<(), BatchError> {
    for (done, key) in keys.iter().enumerate() {
        // SAFETY: `key` is a whole K, the map's key size (BatchTarget).
        match unsafe { sys::delete_elem(fd, (key as *const K).cast()) } {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(source) => {
                return Err(BatchError {
                    operation: Operation::Delete,
                    done,
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Bytes of keys and values one lookup call asks for: large enough that a table of 500,000
/// conntrack entries takes a few hundred calls, small enough not to matter in memory.
const READ_CHUNK_BYTES: usize = 256 * 1024;

/// Every entry of the map, in the kernel's order. Entries written or deleted meanwhile may or
/// may not show, as with any walk of a live map; none shows twice.
pub fn read<M: BatchTarget>(map: &M, strategy: Strategy) -> Result<Entries<M>, BatchError> {
    let fd = map.map_fd();
    if strategy == Strategy::PerEntry {
        return read_each(fd);
    }
    let element = std::mem::size_of::<M::Key>() + std::mem::size_of::<M::Value>();
    let mut chunk = (READ_CHUNK_BYTES / element).clamp(16, 4096);
    let mut keys: Vec<M::Key> = Vec::new();
    let mut values: Vec<M::Value> = Vec::new();
    // The position token: a bucket index (4 bytes) for hash maps, a key for the generic walk.
    let token_words = std::mem::size_of::<M::Key>().max(8).div_ceil(8);
    let mut position = vec![0u64; token_words];
    let mut next_position = vec![0u64; token_words];
    let mut started = false;
    loop {
        keys.reserve(chunk);
        values.reserve(chunk);
        let in_batch = if started {
            position.as_ptr().cast()
        } else {
            std::ptr::null()
        };
        // SAFETY: `keys` and `values` have spare capacity for `chunk` elements of M::Key and
        // M::Value (the map's sizes, BatchTarget) past their lengths; both position buffers
        // hold at least a key and at least 8 bytes, more than any map type's token.
        let outcome = unsafe {
            sys::lookup_batch(
                fd,
                in_batch,
                next_position.as_mut_ptr().cast(),
                keys.as_mut_ptr().add(keys.len()).cast(),
                values.as_mut_ptr().add(values.len()).cast(),
                chunk as u32,
            )
        };
        if !started && keys.is_empty() && lacks_batch(&outcome) {
            return read_each(fd);
        }
        let got = (outcome.processed as usize).min(chunk);
        // SAFETY: the kernel wrote `got` whole elements into the spare capacity (it reports
        // what it copied out), and any bytes are a valid M::Key / M::Value (Pod).
        unsafe {
            keys.set_len(keys.len() + got);
            values.set_len(values.len() + got);
        }
        match outcome.result {
            Ok(()) => {}
            // The end of the map: this call's elements are the last.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            // One bucket holds more than `chunk` entries: ask for more room and retry.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && got == 0 && chunk < 1 << 20 => {
                chunk *= 2;
                continue;
            }
            Err(source) => {
                return Err(BatchError {
                    operation: Operation::Read,
                    done: keys.len(),
                    source,
                })
            }
        }
        std::mem::swap(&mut position, &mut next_position);
        started = true;
    }
    Ok(keys.into_iter().zip(values).collect())
}

fn read_each<K: Pod, V: Pod>(fd: BorrowedFd<'_>) -> Result<Vec<(K, V)>, BatchError> {
    let failed = |done: usize| {
        move |source| BatchError {
            operation: Operation::Read,
            done,
            source,
        }
    };
    let mut entries: Vec<(K, V)> = Vec::new();
    let mut previous: Option<K> = None;
    loop {
        let mut key = std::mem::MaybeUninit::<K>::uninit();
        let after = previous
            .as_ref()
            .map_or(std::ptr::null(), |k| (k as *const K).cast());
        // SAFETY: `after` is null or a whole K; `key` has room for one (the map's key size).
        match unsafe { sys::get_next_key(fd, after, key.as_mut_ptr().cast()) } {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(source) => return Err(failed(entries.len())(source)),
        }
        // SAFETY: the kernel wrote a whole key, and any bytes are a valid K (Pod).
        let key = unsafe { key.assume_init() };
        let mut value = std::mem::MaybeUninit::<V>::uninit();
        // SAFETY: `key` is a whole K, `value` has room for a V (the map's sizes).
        match unsafe { sys::lookup_elem(fd, (&key as *const K).cast(), value.as_mut_ptr().cast()) }
        {
            // SAFETY: the kernel wrote a whole value, and any bytes are a valid V (Pod).
            Ok(()) => entries.push((key, unsafe { value.assume_init() })),
            // Deleted between listing its key and reading it: gone either way.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(source) => return Err(failed(entries.len())(source)),
        }
        previous = Some(key);
    }
    Ok(entries)
}

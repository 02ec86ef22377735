//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): each backend fills the lookup table
//! in the order of its own permutation of the entries, taking turns, so the table splits evenly
//! and losing one of N backends reassigns little more than its own 1/N of the entries.
//!
//! Every node computes the same table from the same backends, independent of the order it
//! learnt them in and of the node-local ids it gave them: the permutations hash backend names.

use weir_common::{MaglevTable, MAGLEV_TABLE_SIZE};

/// Builds the table for backends given as (stable name, node-local id). Empty input gives an
/// all-zero table, which callers do not install.
pub fn table(backends: &[(String, u32)]) -> MaglevTable {
    let mut table = MaglevTable::default();
    if backends.is_empty() {
        return table;
    }
    let mut sorted: Vec<&(String, u32)> = backends.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    sorted.dedup_by(|a, b| a.0 == b.0);

    let m = MAGLEV_TABLE_SIZE as u64;
    let permutations: Vec<(u64, u64)> = sorted
        .iter()
        .map(|(name, _)| {
            let offset = fnv1a(name.as_bytes(), 0) % m;
            let skip = fnv1a(name.as_bytes(), 1) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; sorted.len()];
    let mut owner: Vec<Option<usize>> = vec![None; MAGLEV_TABLE_SIZE];
    let mut filled = 0;
    'fill: loop {
        for (i, &(offset, skip)) in permutations.iter().enumerate() {
            // The table size is prime, so each permutation visits every entry: this finds a
            // free one within m steps.
            let mut entry = ((offset + next[i] * skip) % m) as usize;
            while owner[entry].is_some() {
                next[i] += 1;
                entry = ((offset + next[i] * skip) % m) as usize;
            }
            owner[entry] = Some(i);
            next[i] += 1;
            filled += 1;
            if filled == MAGLEV_TABLE_SIZE {
                break 'fill;
            }
        }
    }
    for (slot, who) in table.backend_ids.iter_mut().zip(owner) {
        *slot = sorted[who.expect("every entry is filled")].1;
    }
    table
}

/// FNV-1a, 64 bits, with a seed byte mixed in first: stable across Rust versions and machines,
/// unlike std's hasher.
fn fnv1a(bytes: &[u8], seed: u8) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    for &b in std::iter::once(&seed).chain(bytes) {
        hash ^= b as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_common::{flow_hash, Addr};

    fn backends(n: u32) -> Vec<(String, u32)> {
        (0..n)
            .map(|i| (format!("198.19.{}.{}:8080", i / 200, 10 + i % 200), i + 1))
            .collect()
    }

    fn flows() -> impl Iterator<Item = u32> {
        (0..50_000u32).map(|i| {
            let client = Addr::from_v4([198, 18, (i >> 8) as u8, i as u8]);
            flow_hash(&client, (1024 + i % 50_000) as u16, 80u16.to_be(), 6)
        })
    }

    fn pick(table: &MaglevTable, hash: u32) -> u32 {
        table.backend_ids[MaglevTable::index(hash)]
    }

    #[test]
    fn spreads_evenly() {
        let table = table(&backends(10));
        let mut counts = [0usize; 11];
        for id in table.backend_ids {
            counts[id as usize] += 1;
        }
        let expected = MAGLEV_TABLE_SIZE / 10;
        for &c in &counts[1..] {
            assert!(c.abs_diff(expected) <= 1, "entries per backend {counts:?}");
        }
    }

    #[test]
    fn order_of_input_does_not_matter() {
        let mut reversed = backends(7);
        reversed.reverse();
        assert_eq!(table(&backends(7)), table(&reversed));
    }

    #[test]
    fn removing_one_of_n_moves_about_one_nth_of_flows() {
        for n in [5u32, 10, 20] {
            let before = table(&backends(n));
            let mut fewer = backends(n);
            let removed = fewer.remove(n as usize / 2);
            let after = table(&fewer);
            let (mut moved, mut total, mut on_removed) = (0usize, 0usize, 0usize);
            for hash in flows() {
                total += 1;
                let (b, a) = (pick(&before, hash), pick(&after, hash));
                if b == removed.1 {
                    on_removed += 1;
                } else if b != a {
                    moved += 1;
                }
            }
            let share = 1.0 / n as f64;
            let moved_share = (moved + on_removed) as f64 / total as f64;
            // The removed backend's own flows must move; Maglev's promise is that few others do.
            assert!(
                moved_share < share * 1.6,
                "n={n}: {moved_share:.3} of flows moved, 1/n = {share:.3}"
            );
            assert!(
                (moved as f64 / total as f64) < 0.5 * share,
                "n={n}: {moved} flows not on the removed backend moved"
            );
        }
    }
}

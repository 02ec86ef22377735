//! Drift: map entries changed behind the agent's back (a stray `bpftool map update`, a human
//! with the pin, a crashed tool) would otherwise stay until the next restart. A watcher thread
//! reads the pinned service maps through handles of its own, so the main loop never waits for
//! a scan; the loop compares each snapshot with the shadow of what it wrote and writes back
//! only what differs.
//!
//! A snapshot is only worth comparing if no write of the agent's own happened while it was
//! taken: the loop bumps a generation before every write, and a snapshot whose generation
//! moved during the read, or before the loop looked at it, is dropped (the next one is
//! compared instead).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::warn;

use crate::dataplane::{DataplaneError, ServiceMaps};
use crate::state::{DataplaneState, Plan};

/// The maps as the watcher read them, while the agent's writes stood still.
pub struct Snapshot {
    generation: u64,
    state: DataplaneState,
}

pub struct DriftWatch {
    generation: Arc<AtomicU64>,
    snapshots: mpsc::Receiver<Snapshot>,
}

impl DriftWatch {
    /// Starts the watcher on the service maps pinned in `pin_dir`, reading them every `every`.
    /// The thread ends once the watch is dropped.
    pub fn start(pin_dir: &Path, every: Duration) -> Result<DriftWatch, DataplaneError> {
        let maps = ServiceMaps::open_pinned(pin_dir)?;
        let generation = Arc::new(AtomicU64::new(0));
        // One snapshot in flight: a loop that has not looked at the last one does not need
        // another.
        let (send, snapshots) = mpsc::channel(1);
        let seen = generation.clone();
        std::thread::Builder::new()
            .name("weir-drift".into())
            .spawn(move || watch(maps, seen, send, every))
            .map_err(DataplaneError::Thread)?;
        Ok(DriftWatch {
            generation,
            snapshots,
        })
    }

    /// Called before every write of the service maps: snapshots taken across it are stale.
    pub fn writing(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The next snapshot that still describes the maps as the agent last left them.
    pub async fn next(&mut self) -> DataplaneState {
        loop {
            match self.snapshots.recv().await {
                Some(s) if s.generation == self.generation.load(Ordering::SeqCst) => {
                    return s.state
                }
                Some(_) => continue,
                None => std::future::pending().await,
            }
        }
    }
}

fn watch(
    maps: ServiceMaps,
    generation: Arc<AtomicU64>,
    send: mpsc::Sender<Snapshot>,
    every: Duration,
) {
    while !send.is_closed() {
        std::thread::sleep(every);
        let before = generation.load(Ordering::SeqCst);
        let state = match maps.read() {
            Ok(state) => state,
            Err(e) => {
                warn!(error = %e, "drift check: reading the service maps failed");
                continue;
            }
        };
        if generation.load(Ordering::SeqCst) != before {
            continue;
        }
        // Full: the loop has not taken the previous one yet; this one is dropped.
        let _ = send.try_send(Snapshot {
            generation: before,
            state,
        });
    }
}

/// What a repair wrote back, per map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriftReport {
    pub services: usize,
    pub slots: usize,
    pub backends: usize,
    pub maglev: usize,
    pub source_ranges: usize,
}

impl DriftReport {
    pub fn of(plan: &Plan) -> DriftReport {
        DriftReport {
            services: plan.upsert_services.len() + plan.delete_services.len(),
            slots: plan.upsert_slots.len() + plan.delete_slots.len(),
            backends: plan.upsert_backends.len() + plan.delete_backends.len(),
            maglev: plan.upsert_maglev.len() + plan.delete_maglev.len(),
            source_ranges: plan.upsert_source_ranges.len() + plan.delete_source_ranges.len(),
        }
    }

    pub fn total(&self) -> usize {
        self.services + self.slots + self.backends + self.maglev + self.source_ranges
    }

    /// (map, entries repaired) for metrics and logs.
    pub fn by_map(&self) -> [(&'static str, usize); 5] {
        use weir_common::map_names;
        [
            (map_names::SERVICES, self.services),
            (map_names::BACKEND_SLOTS, self.slots),
            (map_names::BACKENDS, self.backends),
            (map_names::MAGLEV, self.maglev),
            (map_names::SOURCE_RANGES, self.source_ranges),
        ]
    }
}

//! Drift: map entries changed behind the agent's back (a stray `bpftool map update`, a human
//! with the pin, a crashed tool) would otherwise stay until the next restart. A watcher thread
//! reads the pinned service and policy maps through handles of its own, so the main loop never waits for
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
use crate::policy::{PolicyMaps, PolicyState};
use crate::state::DataplaneState;

/// The maps as the watcher read them, while the agent's writes stood still.
struct Snapshot {
    generation: u64,
    actual: Actual,
}

/// What the maps held.
#[derive(Debug)]
pub struct Actual {
    pub services: DataplaneState,
    /// None when the policy maps could not be read (the service maps still are compared).
    pub policy: Option<PolicyState>,
}

pub struct DriftWatch {
    generation: Arc<AtomicU64>,
    snapshots: mpsc::Receiver<Snapshot>,
}

impl DriftWatch {
    /// Starts the watcher on the service maps pinned in `pin_dir`, reading them every `every`.
    /// The thread ends once the watch is dropped.
    pub fn start(pin_dir: &Path, every: Duration) -> Result<DriftWatch, DataplaneError> {
        let maps = (
            ServiceMaps::open_pinned(pin_dir)?,
            PolicyMaps::open_pinned(pin_dir)?,
        );
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

    /// Called before every write of the service or policy maps: snapshots taken across it
    /// are stale.
    pub fn writing(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The next snapshot that still describes the maps as the agent last left them.
    pub async fn next(&mut self) -> Actual {
        loop {
            match self.snapshots.recv().await {
                Some(s) if s.generation == self.generation.load(Ordering::SeqCst) => {
                    return s.actual
                }
                Some(_) => continue,
                None => std::future::pending().await,
            }
        }
    }
}

fn watch(
    (maps, policy_maps): (ServiceMaps, PolicyMaps),
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
        let policy = match policy_maps.read() {
            Ok(policy) => Some(policy),
            Err(e) => {
                warn!(error = %e, "drift check: reading the policy maps failed");
                None
            }
        };
        if generation.load(Ordering::SeqCst) != before {
            continue;
        }
        // Full: the loop has not taken the previous one yet; this one is dropped.
        let _ = send.try_send(Snapshot {
            generation: before,
            actual: Actual {
                services: state,
                policy,
            },
        });
    }
}

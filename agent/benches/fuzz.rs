//! The fuzz harness of `tests/common/fuzz`, long: `WEIR_FUZZ_PACKETS` packets (default one
//! million) from `WEIR_FUZZ_SEED` (default: from the clock, printed), every packet checked for
//! checksums and addresses; the outcome counters are read for every 64th packet, and the
//! packets between must move them by exactly their number (`WEIR_FUZZ_COUNTERS=every` reads
//! them around every packet, about eight times slower: 48 map reads per packet). Prints packets
//! per second and the total per outcome.
//!
//! Run: `WEIR_FUZZ_PACKETS=10000000 cargo bench -p weir-agent --bench fuzz` (root).

#[path = "../tests/common/mod.rs"]
mod common;

use common::fuzz::{CounterCheck, Fuzzer, Settings};

const DEFAULT_PACKETS: u64 = 1_000_000;
const SAMPLE_EVERY: u64 = 64;

fn main() {
    // `cargo bench` passes harness flags; this bench takes none.
    common::require_root();
    let _bpffs = common::private_bpffs(nix::sched::CloneFlags::CLONE_NEWNET);
    let counters = match std::env::var("WEIR_FUZZ_COUNTERS").as_deref() {
        Ok("every") => CounterCheck::EveryPacket,
        _ => CounterCheck::Sampled {
            every: SAMPLE_EVERY,
        },
    };
    let clock_seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64;
    let settings = Settings::from_env(clock_seed, DEFAULT_PACKETS, counters);
    println!(
        "fuzz: seed {:#x}, {} packets, counters {counters:?}",
        settings.seed, settings.packets
    );
    match Fuzzer::new(settings).run() {
        Ok(report) => println!("{report}"),
        Err(failure) => {
            eprintln!("{failure}");
            std::process::exit(1);
        }
    }
}

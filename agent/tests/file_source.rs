//! The file source against what operators, control planes and the kubelet do to a state
//! directory: real files, symlinks, hard links, FIFOs, devices and ConfigMap volumes' `..data`
//! swaps in a temporary directory, the source's events fed to the real intent store. Every wait
//! is bounded.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use weir_agent::intent::ObjectRef;
use weir_agent::source::{FileLimits, FileSource, IntentStore, ObjectEvent, SETTLE};

/// Long enough for any change here to be seen; the conditions end the waits much sooner.
const PATIENCE: Duration = Duration::from_secs(10);

fn service(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec: {{clusterIP: \"{ip}\", ports: [{{name: http, port: 80}}]}}\n"
    )
}

fn slice(service: &str, endpoints: usize) -> String {
    let endpoints: String = (0..endpoints)
        .map(|i| format!("- addresses: [\"198.19.{}.{}\"]\n", i / 250, i % 250 + 1))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-1\n  \
         namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{endpoints}"
    )
}

/// Writes as control planes and editors do: a hidden temporary file renamed into place.
fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// A file source feeding a real intent store, as the agent's loop does.
struct Fed {
    source: FileSource,
    store: IntentStore,
    /// Errors the source returned (failed reads), all calls together.
    errors: usize,
}

impl Fed {
    fn new(source: FileSource) -> Fed {
        let mut fed = Fed {
            source,
            store: IntentStore::default(),
            errors: 0,
        };
        let store = &mut fed.store;
        fed.errors += fed.source.scan_into(&mut |e| store.handle(&e)).len();
        fed
    }

    /// One turn of the agent's loop: the inotify events, then the per-tick housekeeping.
    fn turn(&mut self) {
        let store = &mut self.store;
        self.errors += self.source.changes_into(&mut |e| store.handle(&e)).len();
        self.errors += self
            .source
            .rescan_if_due(Duration::from_secs(1), &mut |e| store.handle(&e))
            .len();
    }

    /// Turns until `done` holds, or panics after [`PATIENCE`].
    fn until(&mut self, what: &str, done: impl Fn(&Fed) -> bool) {
        let started = Instant::now();
        while !done(self) {
            assert!(started.elapsed() < PATIENCE, "never: {what}; {self:?}");
            std::thread::sleep(Duration::from_millis(20));
            self.turn();
        }
    }

    /// Turns for `long`, asserting `holds` all along.
    fn keeps(&mut self, long: Duration, what: &str, holds: impl Fn(&Fed) -> bool) {
        let started = Instant::now();
        while started.elapsed() < long {
            self.turn();
            assert!(holds(self), "no longer: {what}; {self:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn cluster_ip(&self, name: &str) -> Option<IpAddr> {
        let id = ObjectRef {
            namespace: "default".into(),
            name: name.into(),
        };
        self.store
            .intent()
            .services
            .get(&id)?
            .cluster_ips
            .first()
            .copied()
    }

    fn has(&self, name: &str, ip: &str) -> bool {
        self.cluster_ip(name) == Some(ip.parse().unwrap())
    }

    /// (kind, reason) of every rejection the source reported.
    fn rejected(&self) -> Vec<(&'static str, &'static str)> {
        self.store
            .source_rejections()
            .map(|r| (r.kind, r.reason))
            .collect()
    }
}

impl std::fmt::Debug for Fed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let services: Vec<String> = self
            .store
            .intent()
            .services
            .iter()
            .map(|(id, s)| format!("{id}={:?}", s.cluster_ips))
            .collect();
        let rejected: Vec<String> = self
            .store
            .source_rejections()
            .map(|r| format!("{} {} {}: {}", r.kind, r.object, r.reason, r.detail))
            .collect();
        write!(f, "services {services:?}, rejected {rejected:?}")
    }
}

/// Scans in a thread, so a source that blocks (on a FIFO) fails the test instead of hanging it.
fn scan_within(source: FileSource, limit: Duration) -> Fed {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(Fed::new(source));
    });
    rx.recv_timeout(limit)
        .expect("the first scan finishes: nothing blocks it")
}

#[test]
fn a_symlink_to_dev_zero_is_skipped_unread() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &service("a", "198.18.100.1"));
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("zero.yaml")).unwrap();
    let before = peak_rss_mib();
    let fed = scan_within(FileSource::new(dir.path()), Duration::from_secs(10));
    let grown = peak_rss_mib() - before;
    assert!(grown < 256, "the scan grew the peak RSS by {grown} MiB");
    assert_eq!(fed.errors, 0, "skipped, not a failed read");
    assert!(fed.has("a", "198.18.100.1"), "{fed:?}");
    assert_eq!(fed.rejected(), vec![("File", "not_a_regular_file")]);
}

/// This process's peak resident memory.
fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status");
    kib / 1024
}

#[test]
fn a_fifo_is_skipped_and_never_opened() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &service("a", "198.18.100.1"));
    nix::unistd::mkfifo(
        &dir.path().join("fifo.yaml"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let mut fed = scan_within(FileSource::new(dir.path()), Duration::from_secs(10));
    assert!(fed.has("a", "198.18.100.1"), "{fed:?}");
    assert_eq!(fed.rejected(), vec![("File", "not_a_regular_file")]);
    // The files next to it are still watched.
    write(dir.path(), "b.yaml", &service("b", "198.18.100.2"));
    fed.until("b is read past the FIFO", |f| f.has("b", "198.18.100.2"));
}

#[test]
fn a_file_over_its_limits_is_refused_and_keeps_its_last_good_state() {
    let dir = tempfile::tempdir().unwrap();
    let limits = FileLimits {
        max_file_bytes: 4096,
        max_objects_per_file: 3,
        max_items_per_object: 10,
    };
    write(dir.path(), "a.yaml", &service("a", "198.18.100.1"));
    write(
        dir.path(),
        "b.yaml",
        &format!("{}---\n{}", service("b", "198.18.100.2"), slice("b", 10)),
    );
    let mut fed = Fed::new(FileSource::with_limits(dir.path(), limits));
    assert!(fed.has("a", "198.18.100.1") && fed.has("b", "198.18.100.2"));
    assert!(fed.rejected().is_empty(), "{fed:?}");

    // Too many bytes: a's change is not read, a keeps its address.
    let padding = format!("# {}\n", "x".repeat(5000));
    write(
        dir.path(),
        "a.yaml",
        &format!("{}{padding}", service("a", "198.18.100.11")),
    );
    fed.until("a.yaml refused as too large", |f| {
        f.rejected() == [("File", "too_large")]
    });
    assert!(fed.has("a", "198.18.100.1"), "{fed:?}");

    // Too many objects: the whole file refused.
    let many: String = (0..4)
        .map(|i| format!("{}---\n", service(&format!("m{i}"), "198.18.100.30")))
        .collect();
    write(dir.path(), "a.yaml", &many);
    fed.until("a.yaml refused for its objects", |f| {
        f.rejected() == [("File", "too_many_objects")]
    });
    assert!(fed.has("a", "198.18.100.1") && fed.cluster_ip("m0").is_none());

    // An object over its items: that object alone, its Service next to it applies.
    write(
        dir.path(),
        "b.yaml",
        &format!("{}---\n{}", service("b", "198.18.100.12"), slice("b", 11)),
    );
    fed.until("b's slice refused alone", |f| {
        f.rejected().contains(&("EndpointSlice", "too_many_items")) && f.has("b", "198.18.100.12")
    });
    let b = ObjectRef {
        namespace: "default".into(),
        name: "b".into(),
    };
    assert_eq!(
        fed.store.slices_of(&b).next().unwrap().endpoints.len(),
        10,
        "the slice keeps its last good endpoints"
    );

    // Fixed files apply and their rejections clear.
    write(dir.path(), "a.yaml", &service("a", "198.18.100.21"));
    write(
        dir.path(),
        "b.yaml",
        &format!("{}---\n{}", service("b", "198.18.100.12"), slice("b", 3)),
    );
    fed.until("both fixed", |f| {
        f.has("a", "198.18.100.21") && f.rejected().is_empty()
    });
}

#[test]
fn the_first_file_in_name_order_wins_and_the_next_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    // Written in reverse order: precedence is by name, not by time.
    write(dir.path(), "b.yaml", &service("x", "198.18.100.2"));
    write(dir.path(), "a.yaml", &service("x", "198.18.100.1"));
    let mut fed = Fed::new(FileSource::new(dir.path()));
    assert!(fed.has("x", "198.18.100.1"), "a.yaml wins: {fed:?}");

    // The later file changing changes nothing.
    write(dir.path(), "b.yaml", &service("x", "198.18.100.3"));
    fed.keeps(Duration::from_millis(300), "a.yaml's version stays", |f| {
        f.has("x", "198.18.100.1")
    });

    // Removing the winner hands the object to b.yaml's definition: it is never deleted.
    std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
    let started = Instant::now();
    while !fed.has("x", "198.18.100.3") {
        assert!(fed.cluster_ip("x").is_some(), "x deleted: {fed:?}");
        assert!(started.elapsed() < PATIENCE, "never handed over: {fed:?}");
        std::thread::sleep(Duration::from_millis(20));
        fed.turn();
    }

    // An earlier file defining it takes it back; removing the last definition deletes it.
    write(dir.path(), "0.yaml", &service("x", "198.18.100.4"));
    fed.until("0.yaml wins", |f| f.has("x", "198.18.100.4"));
    std::fs::remove_file(dir.path().join("0.yaml")).unwrap();
    std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
    fed.until("x deleted", |f| f.cluster_ip("x").is_none());
}

#[test]
fn precedence_holds_when_many_files_are_read_in_parallel() {
    let dir = tempfile::tempdir().unwrap();
    // Enough files for the parallel reader; every one also defines `dup`, the last written
    // first.
    for i in (0..40).rev() {
        let text = format!(
            "{}---\n{}",
            service(&format!("s{i}"), &format!("198.18.101.{i}")),
            service("dup", &format!("198.18.102.{i}"))
        );
        write(dir.path(), &format!("{i:02}.yaml"), &text);
    }
    let mut fed = Fed::new(FileSource::new(dir.path()));
    assert!(fed.has("dup", "198.18.102.0") && fed.has("s39", "198.18.101.39"));

    // Removing the first half hands `dup` to 20.yaml.
    for i in 0..20 {
        std::fs::remove_file(dir.path().join(format!("{i:02}.yaml"))).unwrap();
    }
    fed.until("dup handed to 20.yaml", |f| {
        f.has("dup", "198.18.102.20") && f.cluster_ip("s0").is_none()
    });
}

#[test]
fn one_bad_document_costs_only_itself() {
    let dir = tempfile::tempdir().unwrap();
    let broken = "apiVersion: v1\nkind: Service\nspec: [not, a, map]\n";
    write(
        dir.path(),
        "all.yaml",
        &format!(
            "{}---\n{broken}---\n{}",
            service("a", "198.18.100.1"),
            service("b", "198.18.100.2")
        ),
    );
    let mut fed = Fed::new(FileSource::new(dir.path()));
    assert!(
        fed.has("a", "198.18.100.1") && fed.has("b", "198.18.100.2"),
        "{fed:?}"
    );
    assert_eq!(fed.rejected(), vec![("File", "invalid_document")]);

    // b's document breaks: b keeps its last good version while a's change applies.
    write(
        dir.path(),
        "all.yaml",
        &format!("{}---\n{broken}", service("a", "198.18.100.11")),
    );
    fed.until("a's change applies", |f| f.has("a", "198.18.100.11"));
    fed.keeps(SETTLE + Duration::from_millis(200), "b is kept", |f| {
        f.has("b", "198.18.100.2")
    });
    // Fixed: the objects the file no longer defines go.
    write(dir.path(), "all.yaml", &service("a", "198.18.100.11"));
    fed.until("b deleted, nothing rejected", |f| {
        f.cluster_ip("b").is_none() && f.rejected().is_empty()
    });
}

/// A ConfigMap volume as the kubelet's atomic writer lays it out: the data in a timestamped
/// directory, `..data` pointing at it, and each key a symlink through `..data`.
struct ConfigMapVolume<'a> {
    dir: &'a Path,
    generation: u32,
}

impl ConfigMapVolume<'_> {
    /// Publishes `files` as the volume's new content, as the kubelet does: a new timestamped
    /// directory, `..data` swapped by rename, the old directory removed, and the keys' symlinks
    /// added and removed around the swap.
    fn publish(&mut self, files: &[(&str, String)]) {
        use std::os::unix::fs::symlink;
        self.generation += 1;
        let data = format!("..2026_01_01_00_00_0{}.000", self.generation);
        std::fs::create_dir(self.dir.join(&data)).unwrap();
        for (name, text) in files {
            std::fs::write(self.dir.join(&data).join(name), text).unwrap();
        }
        let old = std::fs::read_link(self.dir.join("..data")).ok();
        symlink(&data, self.dir.join("..data_tmp")).unwrap();
        std::fs::rename(self.dir.join("..data_tmp"), self.dir.join("..data")).unwrap();
        for (name, _) in files {
            let link = self.dir.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                symlink(format!("..data/{name}"), link).unwrap();
            }
        }
        for entry in std::fs::read_dir(self.dir).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            let dangling = std::fs::metadata(self.dir.join(&name)).is_err();
            if !name.starts_with("..") && dangling {
                std::fs::remove_file(self.dir.join(&name)).unwrap();
            }
        }
        if let Some(old) = old {
            std::fs::remove_dir_all(self.dir.join(old)).unwrap();
        }
    }
}

#[test]
fn a_configmap_volume_follows_its_data_swaps() {
    let dir = tempfile::tempdir().unwrap();
    let mut volume = ConfigMapVolume {
        dir: dir.path(),
        generation: 0,
    };
    volume.publish(&[
        ("a.yaml", service("a", "198.18.100.1")),
        ("b.yaml", service("b", "198.18.100.2")),
    ]);
    let mut fed = Fed::new(FileSource::new(dir.path()));
    assert!(fed.has("a", "198.18.100.1") && fed.has("b", "198.18.100.2"));
    assert!(
        fed.rejected().is_empty(),
        "hidden entries are never read: {fed:?}"
    );

    // A changed key, a new key.
    volume.publish(&[
        ("a.yaml", service("a", "198.18.100.11")),
        ("b.yaml", service("b", "198.18.100.2")),
        ("c.yaml", service("c", "198.18.100.3")),
    ]);
    fed.until("the swap is seen", |f| {
        f.has("a", "198.18.100.11") && f.has("c", "198.18.100.3")
    });

    // A removed key: its objects go, the others stay.
    volume.publish(&[
        ("a.yaml", service("a", "198.18.100.11")),
        ("c.yaml", service("c", "198.18.100.3")),
    ]);
    fed.until("b deleted", |f| f.cluster_ip("b").is_none());
    assert!(fed.has("a", "198.18.100.11") && fed.has("c", "198.18.100.3"));
    assert!(fed.rejected().is_empty(), "{fed:?}");
}

#[test]
fn new_symlinks_and_hard_links_are_read() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("state");
    let elsewhere = root.path().join("elsewhere");
    std::fs::create_dir(&dir).unwrap();
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("s"), service("s", "198.18.100.1")).unwrap();
    std::fs::write(elsewhere.join("h"), service("h", "198.18.100.2")).unwrap();
    let mut fed = Fed::new(FileSource::new(&dir));

    std::os::unix::fs::symlink(elsewhere.join("s"), dir.join("s.yaml")).unwrap();
    std::fs::hard_link(elsewhere.join("h"), dir.join("h.yaml")).unwrap();
    fed.until("both links read", |f| {
        f.has("s", "198.18.100.1") && f.has("h", "198.18.100.2")
    });
    // Written in place through its name here.
    std::fs::write(dir.join("h.yaml"), service("h", "198.18.100.12")).unwrap();
    fed.until("the hard link's change", |f| f.has("h", "198.18.100.12"));
}

#[test]
fn a_deleted_directory_keeps_its_state_and_is_watched_again_once_recreated() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("state");
    std::fs::create_dir(&dir).unwrap();
    write(&dir, "a.yaml", &service("a", "198.18.100.1"));
    write(&dir, "b.yaml", &service("b", "198.18.100.2"));
    let mut fed = Fed::new(FileSource::new(&dir));
    assert!(fed.has("a", "198.18.100.1") && fed.has("b", "198.18.100.2"));

    std::fs::remove_dir_all(&dir).unwrap();
    fed.keeps(SETTLE * 2, "the last good state stays", |f| {
        f.has("a", "198.18.100.1") && f.has("b", "198.18.100.2")
    });

    // Recreated with a changed a.yaml and without b.yaml: the new directory is the truth.
    std::fs::create_dir(&dir).unwrap();
    write(&dir, "a.yaml", &service("a", "198.18.100.11"));
    fed.until("the recreated directory is read", |f| {
        f.has("a", "198.18.100.11") && f.cluster_ip("b").is_none()
    });
    // And watched: a new file in it is seen.
    write(&dir, "c.yaml", &service("c", "198.18.100.3"));
    fed.until("a file in the recreated directory", |f| {
        f.has("c", "198.18.100.3")
    });
}

#[test]
fn a_vanished_single_state_file_keeps_the_last_good_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.yaml");
    std::fs::write(&path, service("a", "198.18.100.1")).unwrap();
    let mut fed = Fed::new(FileSource::new(&path));
    std::fs::remove_file(&path).unwrap();
    fed.keeps(SETTLE * 2, "a stays", |f| f.has("a", "198.18.100.1"));
    write(dir.path(), "cluster.yaml", &service("a", "198.18.100.11"));
    fed.until("the file is back", |f| f.has("a", "198.18.100.11"));
}

#[test]
fn a_failed_read_is_retried_with_a_backoff_and_keeps_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let hidden = dir.path().join("sub");
    std::fs::create_dir(&hidden).unwrap();
    std::fs::write(hidden.join("real"), service("a", "198.18.100.1")).unwrap();
    // A symlink into a subdirectory: changes there raise no event in the watched directory.
    std::os::unix::fs::symlink("sub/real", dir.path().join("a.yaml")).unwrap();
    let mut fed = Fed::new(FileSource::new(dir.path()));
    assert!(fed.has("a", "198.18.100.1"));

    // The target goes: the read fails, and a is kept.
    std::fs::remove_file(hidden.join("real")).unwrap();
    std::fs::rename(dir.path().join("a.yaml"), dir.path().join("a.tmp")).unwrap();
    std::fs::rename(dir.path().join("a.tmp"), dir.path().join("a.yaml")).unwrap();
    fed.until("the failed read is reported", |f| {
        f.rejected() == [("File", "unreadable")]
    });
    let errors = fed.errors;
    fed.keeps(Duration::from_millis(1200), "a is kept", |f| {
        f.has("a", "198.18.100.1")
    });
    assert!(
        fed.errors - errors <= 3,
        "retries back off: {} in 1.2 s",
        fed.errors - errors
    );

    // The target is back, without an event in the directory: a retry finds it.
    std::fs::write(hidden.join("real"), service("a", "198.18.100.11")).unwrap();
    fed.until("the retry reads it", |f| {
        f.has("a", "198.18.100.11") && f.rejected().is_empty()
    });
}

#[test]
fn a_bad_document_is_a_rejection_not_a_read_error() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", "kind: Service\nspec: [not, a, map]\n");
    let mut source = FileSource::new(dir.path());
    let (events, errors) = source.scan();
    assert!(errors.is_empty(), "a bad document is no read error");
    let [ObjectEvent::Rejections { origin, rejections }] = &events[..] else {
        panic!("one rejection event: {events:?}");
    };
    assert!(origin.ends_with("a.yaml"), "{origin}");
    assert_eq!(rejections[0].kind, "File");
    assert!(
        rejections[0].detail.contains("document 0"),
        "{}",
        rejections[0].detail
    );
}

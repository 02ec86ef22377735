//! The file source: desired state from a YAML file or a directory of them, watched with
//! inotify, as per-object events.
//!
//! # Rules
//! - **Which files.** In a directory: the entries ending in `.yaml`, `.yml` or `.json` whose name does
//!   not start with a dot, through symlinks and hard links. Hidden entries (editors' temporary
//!   files, a ConfigMap volume's `..data` and `..<timestamp>` entries) are never read as state.
//!   A FIFO, device, socket or directory is skipped without being opened, and refused.
//! - **Limits** ([`FileLimits`]). A file over its bytes or objects is refused whole; an object
//!   with a list over its items is refused alone. Refused input keeps what it had.
//! - **Precedence.** An object defined more than once takes its first definition: files in
//!   name order, documents in file order. Removing that definition hands the object to the
//!   next one; the object is deleted only when no file defines it.
//! - **Bad input.** A document that does not parse is refused alone: the file's other documents
//!   apply, and the objects it may hold keep their last good version. A read that fails (an I/O
//!   error, a dangling symlink) is retried with a backoff, keeping what the file had.
//! - **Vanishing.** A file removed from the directory deletes its objects once it has stayed
//!   away for [`SETTLE`] (so a file replaced by delete-and-create, or a directory removed file
//!   by file, does not drop them). The configured path itself (the directory, or the single
//!   file) vanishing keeps the last good state until it reappears; a recreated directory is
//!   watched again and read afresh.
//! - **ConfigMap volumes.** The kubelet's atomic writer swaps a `..data` symlink: any event on
//!   a `..` entry compares every file's stamp (device, inode, time, size through symlinks), so
//!   the files whose target changed are read again. Other changes made through a path outside
//!   the directory (a symlink's target, another name of a hard link) raise no event here: only
//!   the stamp rescans of shared file systems, or a later event, see them.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use std::os::unix::fs::MetadataExt as _;

use crate::admission::Rejection;

use super::event::{ObjectEvent, ObjectKey};
use super::load::{
    file_rejection, load, FileLimits, FileRefusal, FileState, Loaded, Outcome, Stamp,
};
use super::SourceError;

/// How long a file must stay away before its objects are deleted.
pub const SETTLE: Duration = Duration::from_secs(1);
/// The first wait before reading a failed file again; it doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// What the directory is watched for. `IN_CREATE` catches symlinks and hard links, which are
/// never closed after writing; the `SELF` events and `IN_IGNORED` (always reported) say the
/// directory itself went.
fn watch_flags() -> AddWatchFlags {
    AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR
}

/// The directory being watched: which one (by device and inode), under which descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Watched {
    identity: (u64, u64),
    descriptor: Option<WatchDescriptor>,
}

/// A failed read waiting for its next try.
#[derive(Clone, Copy, Debug)]
struct Retry {
    due: Instant,
    delay: Duration,
}

/// Desired state from a YAML file or a directory of them, as per-object events.
///
/// A changed file is re-read alone, and only its documents whose text changed are parsed, so a
/// one-service change in a directory of thousands of files costs one small parse. Changes are
/// seen through inotify on the directory (the file's own directory in the single-file form, so
/// replacement by rename is seen); where inotify cannot be had, by polling each file's stamp.
/// On shared file systems (virtiofs, NFS, 9p) a change made on the other side raises no inotify
/// event here, so there the files' stamps are also compared now and then
/// ([`FileSource::rescan_if_due`]); on local file systems that scan is skipped, since it stats
/// every file and an update arriving meanwhile waits for it. See the module's rules.
pub struct FileSource {
    path: PathBuf,
    /// The directory watched: `path`, or the single file's parent.
    dir: PathBuf,
    single_file: bool,
    limits: FileLimits,
    /// What each file contributed last, by path.
    files: BTreeMap<PathBuf, FileState>,
    /// Which files define each object, in name order: the first one owns it.
    claims: BTreeMap<ObjectKey, BTreeSet<PathBuf>>,
    /// Objects handed to a file whose definition has not been applied yet.
    owed: BTreeMap<PathBuf, BTreeSet<ObjectKey>>,
    /// Files to read again because objects were handed to them.
    handovers: BTreeSet<PathBuf>,
    /// The rejections last reported for each file.
    rejections: BTreeMap<PathBuf, Vec<Rejection>>,
    retries: BTreeMap<PathBuf, Retry>,
    /// Files seen gone, and since when: deleted once gone for [`SETTLE`].
    gone_since: BTreeMap<PathBuf, Instant>,
    inotify: Option<Inotify>,
    /// None while the directory is missing (or inotify cannot watch it).
    watched: Option<Watched>,
    /// The directory is missing, as last logged.
    vanished: bool,
    /// The single file is missing, as last logged.
    file_vanished: bool,
    /// The directory lives on a file system whose remote changes inotify cannot see.
    shared_fs: bool,
    last_scan: Instant,
    /// The last drain stopped at its bound with events still queued (see
    /// [`FileSource::events_pending`]).
    events_pending: bool,
}

impl std::fmt::Debug for FileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSource")
            .field("path", &self.path)
            .field("files", &self.files.len())
            .field("inotify", &self.inotify.is_some())
            .field("watched", &self.watched.is_some())
            .field("shared_fs", &self.shared_fs)
            .finish()
    }
}

impl FileSource {
    /// Watches `path` (a file or a directory) with inotify if it can, with default limits.
    pub fn new(path: &Path) -> FileSource {
        FileSource::with_limits(path, FileLimits::default())
    }

    pub fn with_limits(path: &Path, limits: FileLimits) -> FileSource {
        let single_file = match std::fs::metadata(path) {
            Ok(meta) => !meta.is_dir(),
            // Not there yet: a directory to come, unless it is named like a state file.
            Err(_) => matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ),
        };
        let dir = if single_file {
            path.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_owned()
        } else {
            path.to_owned()
        };
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| {
                tracing::warn!(dir = %dir.display(), error = %e, "no inotify; polling the state files");
            })
            .ok();
        let mut source = FileSource {
            path: path.to_owned(),
            dir,
            single_file,
            limits,
            files: BTreeMap::new(),
            claims: BTreeMap::new(),
            owed: BTreeMap::new(),
            handovers: BTreeSet::new(),
            rejections: BTreeMap::new(),
            retries: BTreeMap::new(),
            gone_since: BTreeMap::new(),
            inotify,
            watched: None,
            vanished: false,
            file_vanished: false,
            shared_fs: false,
            last_scan: Instant::now(),
            events_pending: false,
        };
        source.watch_dir();
        source
    }

    /// A stamp scan ([`FileSource::scan_into`]) when the last one is `every` old, on a shared
    /// file system only: the safety net for changes inotify cannot see. Only files whose stamp
    /// changed are re-read. Also the housekeeping every tick needs: failed reads whose retry is
    /// due, files gone long enough to delete, and a vanished directory come back.
    pub fn rescan_if_due(
        &mut self,
        every: Duration,
        sink: &mut dyn FnMut(ObjectEvent),
    ) -> Vec<SourceError> {
        let due = self.shared_fs && self.last_scan.elapsed() >= every;
        if self.check_dir() || self.polling() || due {
            return self.scan_into(sink);
        }
        self.due_files(Vec::new(), sink)
    }

    /// Whether the last look at the inotify queue left events in it: the caller must look
    /// again ([`FileSource::changes_into`]) without waiting for the descriptor to turn readable,
    /// since nothing new may ever arrive to make it so.
    pub fn events_pending(&self) -> bool {
        self.events_pending
    }

    /// Whether [`FileSource::rescan_if_due`] ever scans without cause.
    pub fn rescans(&self) -> bool {
        self.shared_fs
    }

    /// The inotify descriptor, for the event loop to wait on; None when polling. The same
    /// descriptor serves a directory watched again after it was recreated.
    pub fn watch_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.inotify.as_ref().map(|i| i.as_fd())
    }

    /// [`FileSource::scan_into`], collected.
    pub fn scan(&mut self) -> (Vec<ObjectEvent>, Vec<SourceError>) {
        let mut events = Vec::new();
        let errors = self.scan_into(&mut |e| events.push(e));
        (events, errors)
    }

    /// [`FileSource::changes_into`], collected.
    pub fn changes(&mut self) -> (Vec<ObjectEvent>, Vec<SourceError>) {
        let mut events = Vec::new();
        let errors = self.changes_into(&mut |e| events.push(e));
        (events, errors)
    }

    /// Files whose stamp changed, appeared or went: every file the first time. What polling,
    /// an inotify queue overflow and a ConfigMap update fall back to. Events go to `sink` file
    /// by file, so a directory of thousands of files is never held in memory as objects at once.
    pub fn scan_into(&mut self, sink: &mut dyn FnMut(ObjectEvent)) -> Vec<SourceError> {
        self.last_scan = Instant::now();
        self.check_dir();
        let listing = match self.listing() {
            Ok(listing) => listing,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.note_vanished();
                return Vec::new();
            }
            Err(source) => {
                return vec![SourceError::Read {
                    path: self.dir.clone(),
                    source,
                }]
            }
        };
        let now = Instant::now();
        let listed: BTreeSet<&PathBuf> = listing.iter().collect();
        for known in self.files.keys() {
            if !listed.contains(known) {
                self.gone_since.entry(known.clone()).or_insert(now);
            }
        }
        let changed: Vec<PathBuf> = listing
            .iter()
            .filter(|f| self.retries.get(*f).is_none_or(|r| r.due <= now))
            .filter(|f| {
                let known = self.files.get(*f).map(|s| s.stamp);
                known.is_none() || known != Some(Stamp::read(f))
            })
            .cloned()
            .collect();
        self.due_files(changed, sink)
    }

    /// Events for what changed since the last call, as inotify reports it (or by polling).
    pub fn changes_into(&mut self, sink: &mut dyn FnMut(ObjectEvent)) -> Vec<SourceError> {
        if self.polling() {
            return self.scan_into(sink);
        }
        let (names, mut rescan) = self.drain_events();
        if self.check_dir() || rescan {
            return self.scan_into(sink);
        }
        let mut read = Vec::new();
        for (file, mask) in names {
            if !self.wanted(&file) {
                continue;
            }
            match std::fs::symlink_metadata(&file) {
                // Seen gone: deleted after SETTLE unless it is back by then.
                Err(_) => {
                    self.gone_since.entry(file).or_insert_with(Instant::now);
                }
                Ok(meta) => {
                    let linked = meta.is_file() && meta.nlink() > 1;
                    // A new regular file is read when closed after writing, not half written.
                    let only_created = (mask & !AddWatchFlags::IN_CREATE).is_empty();
                    if only_created && meta.is_file() && !linked {
                        continue;
                    }
                    // Another name of the same inode changed with it: compare every stamp.
                    rescan |= linked;
                    read.push(file);
                }
            }
        }
        if rescan {
            return self.scan_into(sink);
        }
        self.due_files(read, sink)
    }

    /// Whether changes are found by comparing stamps: no inotify, or no watch on the directory.
    fn polling(&self) -> bool {
        self.inotify.is_none() || self.watched.is_some_and(|w| w.descriptor.is_none())
    }

    /// The queued inotify events of the watched directory: the names they are about, with
    /// their events, and whether every file must be compared instead (a queue overflow, a
    /// ConfigMap's `..data` swap, the directory itself gone).
    fn drain_events(&mut self) -> (BTreeMap<PathBuf, AddWatchFlags>, bool) {
        let mut names: BTreeMap<PathBuf, AddWatchFlags> = BTreeMap::new();
        let mut rescan = false;
        let watching = self.watched.and_then(|w| w.descriptor);
        let Some(inotify) = &self.inotify else {
            return (names, true);
        };
        // Bounded: the queue holds at most max_queued_events, and a writer faster than this loop
        // is read in the next turn, which the loop's poll tick takes when the bound was hit
        // ([`FileSource::events_pending`]): the descriptor's readiness is already cleared then,
        // and 10,000 files moved in at once outlast one turn (about 5,000 events).
        self.events_pending = true;
        for _ in 0..64 {
            let events = match inotify.read_events() {
                Ok(events) if !events.is_empty() => events,
                _ => {
                    self.events_pending = false;
                    break;
                }
            };
            for e in events {
                if e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    rescan = true;
                }
                if Some(e.wd) != watching {
                    continue; // A directory watched before this one.
                }
                match e.name {
                    // The kubelet's atomic writer swapped `..data`: compare every stamp.
                    Some(name) if name.to_string_lossy().starts_with("..") => rescan = true,
                    Some(name) => {
                        *names
                            .entry(self.entry_path(&name))
                            .or_insert(AddWatchFlags::empty()) |= e.mask;
                    }
                    // The directory itself went (IN_DELETE_SELF, IN_MOVE_SELF, IN_IGNORED):
                    // the check that follows sees it.
                    None => {}
                }
            }
        }
        (names, rescan)
    }

    /// Reads `files` and every file whose retry, handover or removal is due.
    fn due_files(
        &mut self,
        mut files: Vec<PathBuf>,
        sink: &mut dyn FnMut(ObjectEvent),
    ) -> Vec<SourceError> {
        if self.watched.is_none() {
            // The directory is missing: everything waits for it to come back.
            return Vec::new();
        }
        let now = Instant::now();
        files.extend(
            self.retries
                .iter()
                .filter(|(_, r)| r.due <= now)
                .map(|(f, _)| f.clone()),
        );
        files.extend(
            self.gone_since
                .iter()
                .filter(|(_, since)| now.duration_since(**since) >= SETTLE)
                .map(|(f, _)| f.clone()),
        );
        files.sort();
        files.dedup();
        let mut errors = self.reread(files, sink);
        // Objects handed from a file to the next: bounded, as every handover drops a claim.
        for _ in 0..=self.files.len() {
            if self.handovers.is_empty() {
                break;
            }
            let files = std::mem::take(&mut self.handovers).into_iter().collect();
            errors.extend(self.reread(files, sink));
        }
        errors
    }

    /// The path of the directory's entry `name`, as the listing names it.
    fn entry_path(&self, name: &OsStr) -> PathBuf {
        if self.single_file && self.path.file_name() == Some(name) {
            return self.path.clone();
        }
        self.dir.join(name)
    }

    /// Whether `file` is a state file of this source.
    fn wanted(&self, file: &Path) -> bool {
        if self.single_file {
            return file == self.path;
        }
        let name = file.file_name().map(OsStr::to_string_lossy);
        file.parent() == Some(self.dir.as_path())
            && name.is_some_and(|n| !n.starts_with('.'))
            && matches!(
                file.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
    }

    fn listing(&self) -> std::io::Result<Vec<PathBuf>> {
        if self.single_file {
            // Checked for the directory: a missing directory is a vanished path.
            std::fs::metadata(&self.dir)?;
            return Ok(if self.path.exists() {
                vec![self.path.clone()]
            } else {
                Vec::new()
            });
        }
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let file = entry?.path();
            if self.wanted(&file) {
                files.push(file);
            }
        }
        files.sort();
        Ok(files)
    }

    /// Watches the directory if it is there and not watched as it is now; true when it was
    /// (re)watched, so everything in it must be read. Polling sources only track its presence.
    fn check_dir(&mut self) -> bool {
        let identity = match std::fs::metadata(&self.dir) {
            Ok(meta) if meta.is_dir() => (meta.dev(), meta.ino()),
            _ => {
                self.note_vanished();
                return false;
            }
        };
        if self.watched.is_some_and(|w| w.identity == identity) {
            return false;
        }
        self.watch_dir();
        true
    }

    fn note_vanished(&mut self) {
        if let Some(Watched {
            descriptor: Some(wd),
            ..
        }) = self.watched.take()
        {
            if let Some(inotify) = &self.inotify {
                // Already gone with the directory, mostly.
                let _ = inotify.rm_watch(wd);
            }
        }
        if !self.vanished {
            self.vanished = true;
            tracing::warn!(dir = %self.dir.display(), "state directory vanished; keeping the last good state until it reappears");
        }
    }

    /// (Re)watches the directory, recording which one it is.
    fn watch_dir(&mut self) {
        let Ok(meta) = std::fs::metadata(&self.dir) else {
            self.note_vanished();
            return;
        };
        if let Some(Watched {
            descriptor: Some(old),
            ..
        }) = self.watched.take()
        {
            if let Some(inotify) = &self.inotify {
                let _ = inotify.rm_watch(old);
            }
        }
        let descriptor = self.inotify.as_ref().and_then(|i| {
            i.add_watch(&self.dir, watch_flags())
                .map_err(|e| {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "cannot watch the state directory; polling it");
                })
                .ok()
        });
        // Without a watch this directory is polled; the inotify instance stays, as the event
        // loop waits on its descriptor, and a recreated directory tries a watch again.
        self.watched = Some(Watched {
            identity: (meta.dev(), meta.ino()),
            descriptor,
        });
        let shared = shared_fs(&self.dir);
        if let (Some(fs), Some(_)) = (shared, &self.inotify) {
            tracing::info!(dir = %self.dir.display(), fs, "shared file system: inotify backed by stamp rescans");
        }
        self.shared_fs = shared.is_some();
        if std::mem::take(&mut self.vanished) {
            // Files missing from the recreated directory get their SETTLE from now: it may
            // still be filling.
            let now = Instant::now();
            self.gone_since.values_mut().for_each(|since| *since = now);
            tracing::info!(dir = %self.dir.display(), "state directory back; watching and reading it again");
        }
    }

    /// Re-reads `files`, handing each file's events to `sink` as soon as that file is done.
    /// Many files (a start, a control plane landing thousands of objects) are parsed on a few
    /// threads: YAML parsing is most of a full sync's time.
    fn reread(
        &mut self,
        files: Vec<PathBuf>,
        sink: &mut dyn FnMut(ObjectEvent),
    ) -> Vec<SourceError> {
        const PARALLEL_FROM: usize = 32;
        let mut errors = Vec::new();
        // Each job owns the file's state while it is read, so the reading threads share nothing
        // with the commits made here meanwhile.
        let jobs: Vec<Job> = files
            .into_iter()
            .map(|file| Job {
                old: self.files.remove(&file),
                force: self.owed.get(&file).cloned().unwrap_or_default(),
                file,
            })
            .collect();
        let limits = self.limits;
        // Asked only for a large batch: the answer reads the process's cgroup files, which on
        // every tick of an idle agent was a tenth of its CPU.
        let workers = if jobs.len() < PARALLEL_FROM {
            1
        } else {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(4)
        };
        if workers < 2 {
            for job in jobs {
                let outcome = load(&job.file, job.old.as_ref(), &job.force, &limits);
                errors.extend(self.commit(job.file, job.old, outcome, sink));
            }
            return errors;
        }
        let queue = std::sync::Mutex::new(jobs.into_iter());
        std::thread::scope(|scope| {
            // Bounded: parsed objects wait here only until they are committed.
            let (tx, rx) = std::sync::mpsc::sync_channel(workers * 4);
            for _ in 0..workers {
                let tx = tx.clone();
                let queue = &queue;
                scope.spawn(move || loop {
                    let next = queue.lock().map(|mut q| q.next());
                    let Ok(Some(job)) = next else { break };
                    let outcome = load(&job.file, job.old.as_ref(), &job.force, &limits);
                    if tx.send((job, outcome)).is_err() {
                        break;
                    }
                });
            }
            drop(tx);
            for (job, outcome) in rx {
                errors.extend(self.commit(job.file, job.old, outcome, sink));
            }
        });
        errors
    }

    /// Takes what reading `file` found into the claims, and hands over what takes effect.
    fn commit(
        &mut self,
        file: PathBuf,
        old: Option<FileState>,
        outcome: Outcome,
        sink: &mut dyn FnMut(ObjectEvent),
    ) -> Option<SourceError> {
        self.gone_since.remove(&file);
        match outcome {
            Outcome::Gone if self.single_file || !self.dir_intact() => {
                self.keep_vanished(file, old);
                None
            }
            Outcome::Gone => {
                self.retries.remove(&file);
                for key in old.map(|o| o.keys()).unwrap_or_default() {
                    self.release(&key, &file, sink);
                }
                self.owed.remove(&file);
                self.report(&file, Vec::new(), sink);
                None
            }
            Outcome::Refused { stamp, refusal } => self.refuse(file, old, stamp, refusal, sink),
            Outcome::Read(loaded) => {
                self.take_read(file, old, loaded, sink);
                None
            }
        }
    }

    /// The configured path itself is gone, not one file of it: the file keeps what it had.
    fn keep_vanished(&mut self, file: PathBuf, old: Option<FileState>) {
        self.retries.remove(&file);
        if let Some(old) = old {
            self.files.insert(file.clone(), old);
        }
        if !self.single_file {
            // Judged again once the directory is back.
            self.gone_since.insert(file, Instant::now());
        } else if !self.file_vanished {
            self.file_vanished = true;
            tracing::warn!(file = %self.path.display(), "state file vanished; keeping the last good state until it reappears");
        }
    }

    /// The whole file is refused: it keeps what it had; a failed read is tried again later.
    fn refuse(
        &mut self,
        file: PathBuf,
        old: Option<FileState>,
        stamp: Option<Stamp>,
        refusal: FileRefusal,
        sink: &mut dyn FnMut(ObjectEvent),
    ) -> Option<SourceError> {
        let mut state = old.unwrap_or_default();
        state.stamp = stamp;
        self.files.insert(file.clone(), state);
        let rejection = file_rejection(&file, refusal.reason(), refusal.to_string());
        self.report(&file, vec![rejection], sink);
        // Only a failed read can go better without a change to the file.
        let FileRefusal::Unreadable(source) = refusal else {
            self.retries.remove(&file);
            return None;
        };
        let delay = self
            .retries
            .get(&file)
            .map_or(FIRST_RETRY, |r| (r.delay * 2).min(MAX_RETRY));
        let due = Instant::now() + delay;
        self.retries.insert(file.clone(), Retry { due, delay });
        Some(SourceError::Read { path: file, source })
    }

    /// The file read: its claims follow what it defines now, and its objects apply where it
    /// is the first to define them.
    fn take_read(
        &mut self,
        file: PathBuf,
        old: Option<FileState>,
        loaded: Loaded,
        sink: &mut dyn FnMut(ObjectEvent),
    ) {
        self.retries.remove(&file);
        self.file_vanished = false;
        let before = old.map(|o| o.keys()).unwrap_or_default();
        let now = loaded.state.keys();
        for key in before.difference(&now) {
            self.release(key, &file, sink);
        }
        for key in now.difference(&before) {
            self.claims
                .entry(key.clone())
                .or_default()
                .insert(file.clone());
        }
        // Taken out and put back only if something is still owed: most files owe nothing, and
        // an entry made and dropped per file was a path clone and two tree walks each.
        let mut owed = self.owed.remove(&file).unwrap_or_default();
        owed.retain(|k| now.contains(k));
        for object in loaded.apply {
            if let Some(key) = object.key() {
                owed.remove(&key);
                let owner = self.claims.get(&key).and_then(|c| c.first());
                if owner != Some(&file) {
                    continue; // An earlier file defines it.
                }
            }
            sink(ObjectEvent::Apply(object));
        }
        if !owed.is_empty() {
            self.owed.insert(file.clone(), owed);
        }
        self.report(&file, loaded.rejections, sink);
        self.files.insert(file, loaded.state);
    }

    /// Whether the watched directory is still there, the same one.
    fn dir_intact(&self) -> bool {
        let identity = std::fs::metadata(&self.dir).map(|m| (m.dev(), m.ino()));
        matches!((self.watched, identity), (Some(w), Ok(id)) if w.identity == id)
    }

    /// `file` no longer defines `key`: the object goes to the next file defining it, or is
    /// deleted when none does.
    fn release(&mut self, key: &ObjectKey, file: &Path, sink: &mut dyn FnMut(ObjectEvent)) {
        let Some(claimants) = self.claims.get_mut(key) else {
            return;
        };
        let was_owner = claimants.first().map(PathBuf::as_path) == Some(file);
        claimants.remove(file);
        match claimants.first() {
            None => {
                self.claims.remove(key);
                sink(ObjectEvent::Delete(key.clone()));
            }
            Some(next) if was_owner => {
                self.owed
                    .entry(next.clone())
                    .or_default()
                    .insert(key.clone());
                self.handovers.insert(next.clone());
            }
            Some(_) => {}
        }
    }

    /// Reports `file`'s refusals when they changed.
    fn report(&mut self, file: &Path, now: Vec<Rejection>, sink: &mut dyn FnMut(ObjectEvent)) {
        let before = self.rejections.get(file).map_or(&[][..], Vec::as_slice);
        if before == now.as_slice() {
            return;
        }
        if now.is_empty() {
            self.rejections.remove(file);
        } else {
            self.rejections.insert(file.to_owned(), now.clone());
        }
        sink(ObjectEvent::Rejections {
            origin: file.display().to_string(),
            rejections: now,
        });
    }
}

/// One file to read, with what it contributed before and the objects owed to it.
struct Job {
    file: PathBuf,
    old: Option<FileState>,
    force: BTreeSet<ObjectKey>,
}

/// File systems where a change made by another machine (or a VM's host) raises no inotify event
/// on this one. statfs(2) magic numbers, from the kernel's include/uapi/linux/magic.h.
const SHARED_FS_MAGIC: &[(i64, &str)] = &[
    (0x6573_5546, "fuse (virtiofs, sshfs)"),
    (0x6969, "nfs"),
    (0x0102_1997, "9p"),
    (0xFF53_4D42, "cifs"),
    (0xFE53_4D42, "smb2"),
    (0x00C3_6400, "ceph"),
];

/// Which of [`SHARED_FS_MAGIC`] `dir` is on, if any. An unknown answer counts as shared:
/// rescans cost time, missed changes cost correctness.
fn shared_fs(dir: &Path) -> Option<&'static str> {
    match nix::sys::statfs::statfs(dir) {
        Ok(fs) => {
            // The field's integer type differs between libc targets.
            #[allow(clippy::unnecessary_cast)]
            let magic = fs.filesystem_type().0 as i64;
            SHARED_FS_MAGIC
                .iter()
                .find(|(m, _)| *m == magic)
                .map(|(_, name)| *name)
        }
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "statfs failed; rescanning state files");
            Some("unknown")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::fixtures::*;

    #[test]
    fn a_burst_longer_than_one_drain_is_read_on_the_next_look() {
        let dir = tempfile::tempdir().unwrap();
        let staging = tempfile::tempdir_in(dir.path().parent().unwrap()).unwrap();
        let mut source = FileSource::new(dir.path());
        assert!(source.scan().0.is_empty());
        // As the sync bench delivers a full state: every file staged, then moved in.
        const FILES: usize = 12_000;
        for i in 0..FILES {
            let name = format!("svc-{i}.yaml");
            let service = SERVICE
                .replace("name: a", &format!("name: s{i}"))
                .replace(".100.1", &format!(".{}.{}", 100 + i / 250, i % 250 + 1));
            std::fs::write(staging.path().join(&name), service).unwrap();
            std::fs::rename(staging.path().join(&name), dir.path().join(&name)).unwrap();
        }
        let mut seen = source.changes().0.len();
        assert!(
            source.events_pending(),
            "{FILES} moves outlast one drain ({seen} seen): the test no longer tests the bound"
        );
        for _ in 0..FILES {
            if !source.events_pending() {
                break;
            }
            seen += source.changes().0.len();
        }
        assert!(!source.events_pending());
        assert_eq!(seen, FILES, "every file's Service, none lost in the queue");
    }

    #[test]
    fn a_directory_rereads_only_the_changed_file_and_document() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            // As control planes and editors write: a temporary file renamed into place.
            let tmp = dir.path().join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, dir.path().join(name)).unwrap();
        };
        write(
            "a.yaml",
            &format!("{SERVICE}---\n{}", slice_doc("a", "198.19.0.1")),
        );
        let b = SERVICE
            .replace("name: a", "name: b")
            .replace(".100.1", ".100.2");
        write(
            "b.yaml",
            &format!("{b}---\n{}", slice_doc("b", "198.19.0.2")),
        );
        write("notes.txt", "not state");

        let mut source = FileSource::new(dir.path());
        assert!(source.watch_fd().is_some(), "inotify is available here");
        assert!(
            !source.rescans(),
            "a local file system is trusted to inotify: no stamp rescans delaying updates"
        );
        let (events, errors) = source.scan();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(events.len(), 4);
        let (events, _) = source.changes();
        assert!(
            events.is_empty(),
            "the first scan already saw these writes: {events:?}"
        );

        // b's slice changes; its Service document is the same text and is not even parsed.
        write(
            "b.yaml",
            &format!("{b}---\n{}", slice_doc("b", "198.19.0.3")),
        );
        let (events, _) = source.changes();
        assert_eq!(
            summary(&events),
            vec!["apply EndpointSlice(ObjectRef { namespace: \"default\", name: \"b-1\" })"]
        );
        // A broken file keeps what it had: no object events, one rejection naming it.
        write("a.yaml", "kind: Service\nspec: [not, a, map]\n");
        let (events, errors) = source.changes();
        assert!(errors.is_empty(), "{errors:?}");
        let a = dir.path().join("a.yaml");
        assert_eq!(
            summary(&events),
            vec![format!(
                "rejections {}: [\"invalid_document\"]",
                a.display()
            )]
        );
        // Removing a file deletes its objects once it stayed away, and clears its rejection.
        std::fs::remove_file(&a).unwrap();
        let (events, _) = source.changes();
        assert!(events.is_empty(), "not before SETTLE: {events:?}");
        std::thread::sleep(SETTLE);
        let (events, _) = source.changes();
        assert_eq!(
            summary(&events),
            vec![
                "delete EndpointSlice(ObjectRef { namespace: \"default\", name: \"a-1\" })"
                    .to_owned(),
                "delete Service(ObjectRef { namespace: \"default\", name: \"a\" })".to_owned(),
                format!("rejections {}: []", a.display()),
            ]
        );
    }

    #[test]
    fn a_single_file_is_watched_and_diffed_per_document() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.yaml");
        let b = SERVICE
            .replace("name: a", "name: b")
            .replace(".100.1", ".100.2");
        std::fs::write(&path, format!("{SERVICE}---\n{b}")).unwrap();
        std::fs::write(dir.path().join("other.yaml"), SERVICE).unwrap();
        let mut source = FileSource::new(&path);
        let (events, _) = source.scan();
        assert_eq!(events.len(), 2, "only the configured file");
        let b2 = b.replace("port: 80", "port: 81");
        std::fs::write(&path, format!("{SERVICE}---\n{b2}")).unwrap();
        std::fs::write(dir.path().join("other.yaml"), b2.as_str()).unwrap();
        let (events, _) = source.changes();
        assert_eq!(
            summary(&events),
            vec!["apply Service(ObjectRef { namespace: \"default\", name: \"b\" })"]
        );
    }
}

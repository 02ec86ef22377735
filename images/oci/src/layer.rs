//! One image layer as a byte-for-byte reproducible `tar.gz`: entries sorted by path, parent
//! directories listed before their contents, every mtime set to the build's epoch, owner 0:0
//! without names, normalised modes, and a gzip header with a fixed mtime and OS byte and no file
//! name. The bytes then depend only on the files' contents and the epoch (and on the compressor
//! version, which Cargo.lock pins).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Write};
use std::path::{Component, Path, PathBuf};

use flate2::{Compression, GzBuilder};
use sha2::{Digest as _, Sha256};

use crate::digest::Digest;

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("reading {path}: {source}")]
    ReadSource { path: PathBuf, source: io::Error },
    #[error("{path} is not an absolute, normal path inside the image")]
    BadImagePath { path: PathBuf },
    #[error("{path} is in the layer twice (from {first} and {second})")]
    Duplicate {
        path: PathBuf,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("writing the layer: {0}")]
    Write(#[source] io::Error),
}

/// Mode of every file: the layer carries programs and shared objects only, and the kernel needs
/// the execute bit on the program and on the interpreter.
const FILE_MODE: u32 = 0o755;
const DIR_MODE: u32 = 0o755;

/// The files of one layer: image path -> source on the build machine.
#[derive(Clone, Debug, Default)]
pub struct LayerContents {
    files: BTreeMap<PathBuf, PathBuf>,
}

impl LayerContents {
    pub fn add_file(
        &mut self,
        image_path: impl Into<PathBuf>,
        source: impl Into<PathBuf>,
    ) -> Result<(), LayerError> {
        let image_path = image_path.into();
        let relative = relative_image_path(&image_path)?;
        let source = source.into();
        if let Some(first) = self.files.get(&relative) {
            if first != &source {
                return Err(LayerError::Duplicate {
                    path: image_path,
                    first: first.clone(),
                    second: source,
                });
            }
            return Ok(());
        }
        self.files.insert(relative, source);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Every entry of the tar, in order: directories end in `/`.
    fn entries(&self) -> Vec<(String, Option<&Path>)> {
        let mut entries: BTreeMap<String, Option<&Path>> = BTreeMap::new();
        for (relative, source) in &self.files {
            let mut parent = PathBuf::new();
            let components: Vec<_> = relative.components().collect();
            for component in &components[..components.len() - 1] {
                parent.push(component);
                entries.insert(format!("{}/", parent.display()), None);
            }
            entries.insert(relative.display().to_string(), Some(source.as_path()));
        }
        // BTreeMap order is byte order, where "a/" sorts before "a/b": parents come first.
        entries.into_iter().collect()
    }
}

/// `/usr/bin/x` -> `usr/bin/x`, refusing `..`, `.` and relative paths.
fn relative_image_path(image_path: &Path) -> Result<PathBuf, LayerError> {
    let mut components = image_path.components();
    let bad = || LayerError::BadImagePath {
        path: image_path.to_owned(),
    };
    if components.next() != Some(Component::RootDir) {
        return Err(bad());
    }
    let mut relative = PathBuf::new();
    for component in components {
        match component {
            Component::Normal(part) => relative.push(part),
            _ => return Err(bad()),
        }
    }
    if relative.as_os_str().is_empty() {
        return Err(bad());
    }
    Ok(relative)
}

/// A written layer: its blob digest (of the compressed bytes), its diff ID (of the tar) and size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenLayer {
    pub digest: Digest,
    pub diff_id: Digest,
    pub size: u64,
}

/// Counts and hashes what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    fn finish(self) -> (W, Digest, u64) {
        (
            self.inner,
            Digest::from_sha256(self.hasher.finalize().as_slice()),
            self.written,
        )
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the layer's `tar.gz` to `out` and returns its digests.
/// `level` is the deflate level (0-9): part of the output, so part of what must stay fixed.
pub fn write_layer<W: Write>(
    contents: &LayerContents,
    epoch: u64,
    level: u32,
    out: W,
) -> Result<WrittenLayer, LayerError> {
    let compressed = HashingWriter::new(out);
    // mtime 0 in the gzip header means "none"; OS 255 means "unknown": nothing of the build
    // machine or the clock leaks into the header.
    let gzip = GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(compressed, Compression::new(level.min(9)));
    let uncompressed = HashingWriter::new(gzip);
    let mut tar = tar::Builder::new(uncompressed);
    tar.follow_symlinks(true);

    for (path, source) in contents.entries() {
        let mut header = tar::Header::new_gnu();
        header.set_mtime(epoch);
        header.set_uid(0);
        header.set_gid(0);
        // Empty names: the runtime uses the numeric IDs and the image has no /etc/passwd.
        header.set_username("").map_err(LayerError::Write)?;
        header.set_groupname("").map_err(LayerError::Write)?;
        match source {
            None => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(DIR_MODE);
                header.set_size(0);
                tar.append_data(&mut header, &path, io::empty())
                    .map_err(LayerError::Write)?;
            }
            Some(source) => {
                let read_error = |source_error| LayerError::ReadSource {
                    path: source.to_owned(),
                    source: source_error,
                };
                let file = File::open(source).map_err(read_error)?;
                let size = file.metadata().map_err(read_error)?.len();
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(FILE_MODE);
                header.set_size(size);
                tar.append_data(&mut header, &path, BufReader::new(file))
                    .map_err(LayerError::Write)?;
            }
        }
    }

    let uncompressed = tar.into_inner().map_err(LayerError::Write)?;
    let (gzip, diff_id, _) = uncompressed.finish();
    let compressed = gzip.finish().map_err(LayerError::Write)?;
    let (mut out, digest, size) = compressed.finish();
    out.flush().map_err(LayerError::Write)?;
    Ok(WrittenLayer {
        digest,
        diff_id,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sample() -> (tempfile::TempDir, LayerContents) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"alpha").unwrap();
        std::fs::write(dir.path().join("b"), b"beta").unwrap();
        let mut contents = LayerContents::default();
        // Added out of order on purpose.
        contents
            .add_file("/usr/bin/b", dir.path().join("b"))
            .unwrap();
        contents.add_file("/lib/x/a", dir.path().join("a")).unwrap();
        (dir, contents)
    }

    #[test]
    fn entries_are_sorted_with_parents_first_and_normalised() {
        let (_dir, contents) = sample();
        let mut bytes = Vec::new();
        write_layer(&contents, 1234, 6, &mut bytes).unwrap();
        let mut tar_bytes = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut tar_bytes)
            .unwrap();
        let mut archive = tar::Archive::new(&tar_bytes[..]);
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let header = entry.header();
            assert_eq!(header.mtime().unwrap(), 1234);
            assert_eq!((header.uid().unwrap(), header.gid().unwrap()), (0, 0));
            assert_eq!(header.mode().unwrap(), 0o755);
            seen.push(entry.path().unwrap().display().to_string());
        }
        assert_eq!(
            seen,
            ["lib/", "lib/x/", "lib/x/a", "usr/", "usr/bin/", "usr/bin/b"]
        );
        // Fixed gzip header: magic, deflate, no flags, mtime 0, OS unknown.
        assert_eq!(&bytes[..8], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0]);
        assert_eq!(bytes[9], 255);
    }

    #[test]
    fn same_contents_same_bytes_and_the_epoch_is_part_of_them() {
        let (dir, contents) = sample();
        let first = write_layer(&contents, 0, 6, io::sink()).unwrap();
        // Source metadata (mtime, mode) must not matter.
        let b = dir.path().join("b");
        std::fs::set_permissions(&b, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        File::options()
            .write(true)
            .open(&b)
            .unwrap()
            .set_modified(std::time::SystemTime::now())
            .unwrap();
        let second = write_layer(&contents, 0, 6, io::sink()).unwrap();
        assert_eq!(first, second);
        let other_epoch = write_layer(&contents, 1, 6, io::sink()).unwrap();
        assert_ne!(first.digest, other_epoch.digest);
    }

    #[test]
    fn bad_and_duplicate_paths_are_refused() {
        let mut contents = LayerContents::default();
        for bad in ["relative", "/a/../b", "/", "./a"] {
            assert!(
                matches!(
                    contents.add_file(bad, "/x"),
                    Err(LayerError::BadImagePath { .. })
                ),
                "{bad}"
            );
        }
        contents.add_file("/a", "/x").unwrap();
        contents.add_file("/a", "/x").unwrap();
        assert!(matches!(
            contents.add_file("/a", "/y"),
            Err(LayerError::Duplicate { .. })
        ));
    }
}

//! What a dynamically linked ELF program needs at run time: its interpreter (`PT_INTERP`) and the
//! transitive closure of its `DT_NEEDED` libraries, resolved the way glibc's `ld.so` does it for a
//! program without `LD_LIBRARY_PATH`: already-loaded sonames first, then `DT_RPATH` (when the
//! object has no `DT_RUNPATH`), `DT_RUNPATH`, then the system directories.
//!
//! Reading the headers instead of running `ldd` means nothing of the program is executed, and the
//! same code works for a foreign architecture's binary given that architecture's library tree.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};

use object::elf;
use object::read::elf::{FileHeader, ProgramHeader};
use object::{Endianness, FileKind};
use tracing::debug;

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not an ELF file")]
    NotElf { path: PathBuf },
    #[error("parsing ELF {path}: {source}")]
    Parse {
        path: PathBuf,
        source: object::read::Error,
    },
    #[error("{path}: unsupported ELF machine {machine} (supported: x86_64, aarch64)")]
    UnsupportedMachine { path: PathBuf, machine: u16 },
    #[error("library {name} (needed by {needed_by}) not found for {machine} in {searched:?}")]
    LibraryNotFound {
        name: String,
        needed_by: PathBuf,
        machine: Machine,
        searched: Vec<PathBuf>,
    },
}

/// The CPU architectures an image can be built for, with their OCI and Debian multiarch names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Machine {
    X86_64,
    Aarch64,
}

impl Machine {
    fn from_elf(machine: u16, path: &Path) -> Result<Self, ElfError> {
        match machine {
            elf::EM_X86_64 => Ok(Machine::X86_64),
            elf::EM_AARCH64 => Ok(Machine::Aarch64),
            other => Err(ElfError::UnsupportedMachine {
                path: path.to_owned(),
                machine: other,
            }),
        }
    }

    /// The `architecture` of an OCI image configuration (Go's GOARCH).
    pub fn oci_architecture(self) -> &'static str {
        match self {
            Machine::X86_64 => "amd64",
            Machine::Aarch64 => "arm64",
        }
    }

    /// Debian's multiarch tuple, the first place glibc looks for libraries there.
    pub fn multiarch_tuple(self) -> &'static str {
        match self {
            Machine::X86_64 => "x86_64-linux-gnu",
            Machine::Aarch64 => "aarch64-linux-gnu",
        }
    }

    /// glibc's built-in search directories for this machine, in its order, below `root`.
    pub fn system_library_dirs(self, root: &Path) -> Vec<PathBuf> {
        let tuple = self.multiarch_tuple();
        [
            format!("lib/{tuple}"),
            format!("usr/lib/{tuple}"),
            "lib64".to_owned(),
            "usr/lib64".to_owned(),
            "lib".to_owned(),
            "usr/lib".to_owned(),
        ]
        .into_iter()
        .map(|dir| root.join(dir))
        .collect()
    }
}

impl std::fmt::Display for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Machine::X86_64 => "x86_64",
            Machine::Aarch64 => "aarch64",
        })
    }
}

/// The parts of an ELF file's headers that decide what gets loaded with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynamicInfo {
    pub machine: Machine,
    pub is_64_bit: bool,
    /// `PT_INTERP`: the program interpreter the kernel starts, as an absolute path.
    pub interpreter: Option<String>,
    pub soname: Option<String>,
    /// `DT_NEEDED`, in file order.
    pub needed: Vec<String>,
    pub rpath: Vec<String>,
    pub runpath: Vec<String>,
}

/// Reads the dynamic-linking headers of one ELF file.
pub fn read_dynamic_info(path: &Path) -> Result<DynamicInfo, ElfError> {
    let data = std::fs::read(path).map_err(|source| ElfError::Read {
        path: path.to_owned(),
        source,
    })?;
    let parse_error = |source| ElfError::Parse {
        path: path.to_owned(),
        source,
    };
    match FileKind::parse(&*data).map_err(parse_error)? {
        FileKind::Elf64 => dynamic_info::<elf::FileHeader64<Endianness>>(&data, path, true),
        FileKind::Elf32 => dynamic_info::<elf::FileHeader32<Endianness>>(&data, path, false),
        _ => Err(ElfError::NotElf {
            path: path.to_owned(),
        }),
    }
}

fn dynamic_info<Elf: FileHeader<Endian = Endianness>>(
    data: &[u8],
    path: &Path,
    is_64_bit: bool,
) -> Result<DynamicInfo, ElfError> {
    let parse_error = |source| ElfError::Parse {
        path: path.to_owned(),
        source,
    };
    let header = Elf::parse(data).map_err(parse_error)?;
    let endian = header.endian().map_err(parse_error)?;
    let machine = Machine::from_elf(header.e_machine(endian), path)?;

    let mut interpreter = None;
    for segment in header.program_headers(endian, data).map_err(parse_error)? {
        if let Some(bytes) = segment.interpreter(endian, data).map_err(parse_error)? {
            interpreter = Some(String::from_utf8_lossy(bytes).into_owned());
        }
    }

    let sections = header.sections(endian, data).map_err(parse_error)?;
    let table = sections.dynamic_table(endian, data).map_err(parse_error)?;
    let mut info = DynamicInfo {
        machine,
        is_64_bit,
        interpreter,
        soname: None,
        needed: Vec::new(),
        rpath: Vec::new(),
        runpath: Vec::new(),
    };
    for entry in &table {
        let tag = entry.tag;
        if !matches!(
            tag,
            elf::DT_NEEDED | elf::DT_SONAME | elf::DT_RPATH | elf::DT_RUNPATH
        ) {
            continue;
        }
        let value = String::from_utf8_lossy(table.string(entry).map_err(parse_error)?).into_owned();
        match tag {
            elf::DT_NEEDED => info.needed.push(value),
            elf::DT_SONAME => info.soname = Some(value),
            // Both are colon-separated lists.
            elf::DT_RPATH => info.rpath.extend(value.split(':').map(str::to_owned)),
            _ => info.runpath.extend(value.split(':').map(str::to_owned)),
        }
    }
    Ok(info)
}

/// One file the program needs at run time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeFile {
    /// Where the loader looks for it, as an absolute path inside the image (for the interpreter:
    /// exactly `PT_INTERP`). The image stores a regular file there, so it needs no symlinks.
    pub image_path: PathBuf,
    /// Where its bytes come from on the build machine.
    pub source: PathBuf,
}

/// The interpreter and libraries of a program, in load order (breadth first, as `ld.so`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuntimeClosure {
    pub interpreter: Option<RuntimeFile>,
    pub libraries: Vec<RuntimeFile>,
}

impl RuntimeClosure {
    pub fn files(&self) -> impl Iterator<Item = &RuntimeFile> {
        self.interpreter.iter().chain(&self.libraries)
    }
}

/// Finds everything `program` loads, looking for files below `sysroot` (`/` for this machine).
/// A static program (no interpreter, no `DT_NEEDED`) gives an empty closure.
pub fn runtime_closure(program: &Path, sysroot: &Path) -> Result<RuntimeClosure, ElfError> {
    let program_info = read_dynamic_info(program)?;
    let machine = program_info.machine;
    let in_sysroot = |absolute: &str| sysroot.join(absolute.trim_start_matches('/'));

    let mut closure = RuntimeClosure::default();
    // soname (or file name) -> image path, for objects already loaded: ld.so never loads a
    // soname twice, which is how libc's DT_NEEDED on the interpreter resolves to PT_INTERP.
    let mut loaded: BTreeMap<String, PathBuf> = BTreeMap::new();
    if let Some(interpreter) = &program_info.interpreter {
        let source = in_sysroot(interpreter);
        let info = read_dynamic_info(&source)?;
        let file = RuntimeFile {
            image_path: PathBuf::from(interpreter),
            source,
        };
        remember(&mut loaded, &file, info.soname.as_deref());
        closure.interpreter = Some(file);
    }

    let mut queue: VecDeque<(PathBuf, DynamicInfo)> = VecDeque::new();
    queue.push_back((program.to_owned(), program_info.clone()));
    while let Some((object_path, info)) = queue.pop_front() {
        for name in &info.needed {
            if loaded.contains_key(name) {
                continue;
            }
            let (file, lib_info) =
                find_library(name, &object_path, &info, &program_info, sysroot, machine)?;
            debug!(library = %name, found = %file.source.display(), "resolved");
            remember(&mut loaded, &file, lib_info.soname.as_deref());
            loaded.insert(name.clone(), file.image_path.clone());
            closure.libraries.push(file.clone());
            queue.push_back((file.source, lib_info));
        }
    }
    Ok(closure)
}

fn remember(loaded: &mut BTreeMap<String, PathBuf>, file: &RuntimeFile, soname: Option<&str>) {
    if let Some(soname) = soname {
        loaded.insert(soname.to_owned(), file.image_path.clone());
    }
    if let Some(name) = file.image_path.file_name() {
        loaded.insert(name.to_string_lossy().into_owned(), file.image_path.clone());
    }
}

fn find_library(
    name: &str,
    needed_by: &Path,
    needed_by_info: &DynamicInfo,
    program_info: &DynamicInfo,
    sysroot: &Path,
    machine: Machine,
) -> Result<(RuntimeFile, DynamicInfo), ElfError> {
    let origin = needed_by.parent().unwrap_or(Path::new("/"));
    let expand = |entry: &String| -> PathBuf {
        let expanded = entry
            .replace("${ORIGIN}", &origin.to_string_lossy())
            .replace("$ORIGIN", &origin.to_string_lossy());
        if expanded.starts_with(&*sysroot.to_string_lossy()) {
            // $ORIGIN already points into the sysroot.
            PathBuf::from(expanded)
        } else {
            sysroot.join(expanded.trim_start_matches('/'))
        }
    };

    let mut candidates_dirs: Vec<PathBuf> = Vec::new();
    if name.contains('/') {
        // A path in DT_NEEDED is used as is.
        let source = sysroot.join(name.trim_start_matches('/'));
        let info = read_dynamic_info(&source)?;
        return Ok((
            RuntimeFile {
                image_path: PathBuf::from("/").join(name.trim_start_matches('/')),
                source,
            },
            info,
        ));
    }
    // DT_RPATH counts only when the object has no DT_RUNPATH; the program's own DT_RPATH applies
    // to every library it pulls in (glibc's rule).
    if needed_by_info.runpath.is_empty() {
        candidates_dirs.extend(needed_by_info.rpath.iter().map(expand));
        if program_info.runpath.is_empty() {
            candidates_dirs.extend(program_info.rpath.iter().map(expand));
        }
    }
    candidates_dirs.extend(needed_by_info.runpath.iter().map(expand));
    candidates_dirs.extend(machine.system_library_dirs(sysroot));

    for dir in &candidates_dirs {
        let source = dir.join(name);
        if !source.is_file() {
            continue;
        }
        // A library of another architecture or class in the path is skipped, as ld.so does.
        match read_dynamic_info(&source) {
            Ok(info) if info.machine == machine && info.is_64_bit == program_info.is_64_bit => {
                let inside = source.strip_prefix(sysroot).unwrap_or(&source);
                return Ok((
                    RuntimeFile {
                        image_path: PathBuf::from("/").join(inside),
                        source,
                    },
                    info,
                ));
            }
            Ok(_) | Err(ElfError::UnsupportedMachine { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ElfError::LibraryNotFound {
        name: name.to_owned(),
        needed_by: needed_by.to_owned(),
        machine,
        searched: candidates_dirs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any dynamically linked program of this machine will do: the test runner itself is one.
    fn this_program() -> PathBuf {
        std::env::current_exe().unwrap()
    }

    #[test]
    fn reads_interpreter_and_needed_of_a_rust_program() {
        let info = read_dynamic_info(&this_program()).unwrap();
        assert!(info.is_64_bit);
        let interpreter = info.interpreter.expect("dynamically linked");
        assert!(interpreter.starts_with('/'), "{interpreter}");
        assert!(
            info.needed.iter().any(|n| n.starts_with("libc.so")),
            "{:?}",
            info.needed
        );
    }

    #[test]
    fn closure_contains_libc_once_and_the_interpreter_once() {
        let closure = runtime_closure(&this_program(), Path::new("/")).unwrap();
        let interpreter = closure.interpreter.as_ref().unwrap();
        let libc: Vec<_> = closure
            .libraries
            .iter()
            .filter(|f| {
                f.image_path
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("libc.so")
            })
            .collect();
        assert_eq!(libc.len(), 1, "{closure:?}");
        // libc.so.6 names ld-linux in DT_NEEDED: that is the interpreter, not a second copy.
        let interpreter_name = interpreter.image_path.file_name().unwrap();
        assert!(
            !closure
                .libraries
                .iter()
                .any(|f| f.image_path.file_name() == Some(interpreter_name)),
            "{closure:?}"
        );
    }

    #[test]
    fn a_missing_library_is_a_clear_error() {
        // A sysroot with the interpreter and nothing else: libc is not found, and the error says
        // which library, who needed it and where it looked.
        let info = read_dynamic_info(&this_program()).unwrap();
        let interpreter = info.interpreter.unwrap();
        let sysroot = tempfile::tempdir().unwrap();
        let copy = sysroot.path().join(interpreter.trim_start_matches('/'));
        std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
        std::fs::copy(&interpreter, &copy).unwrap();

        let error = runtime_closure(&this_program(), sysroot.path()).unwrap_err();
        let ElfError::LibraryNotFound { searched, .. } = &error else {
            panic!("expected LibraryNotFound, got {error}");
        };
        assert!(
            searched.iter().all(|dir| dir.starts_with(sysroot.path())),
            "{searched:?}"
        );
        assert!(error.to_string().contains("not found"), "{error}");
    }

    #[test]
    fn a_non_elf_file_is_rejected() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), b"#!/bin/sh\necho hi\n").unwrap();
        let error = read_dynamic_info(file.path()).unwrap_err();
        assert!(
            matches!(error, ElfError::NotElf { .. } | ElfError::Parse { .. }),
            "{error}"
        );
    }
}

//! The agent's OCI image, built from the real agent binary: reproducible, readable by skopeo and
//! umoci, complete enough to run the agent in a bare root, and pushable to a real registry.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{agent_binary, run, LoopbackRegistry};
use weir_oci::{build_layout, read_layout, BuildError, BuiltImage, ImageRequest, PushOptions};

const TAG: &str = "test";
/// The fastest deflate level: the tests hash and compress a ~100 MB debug agent several times.
const LEVEL: u32 = 1;

fn request(agent: impl Into<PathBuf>, tag: &str) -> ImageRequest {
    ImageRequest {
        compression_level: LEVEL,
        ..ImageRequest::new(agent, tag)
    }
}

fn work_dir(name: &str) -> PathBuf {
    // Under target/tmp, replaced on every run, rather than a temp dir a static would leak.
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("weir-oci")
        .join(name)
}

/// The image every test reads, built once per test binary.
fn image() -> &'static BuiltImage {
    static IMAGE: OnceLock<BuiltImage> = OnceLock::new();
    IMAGE
        .get_or_init(|| build_layout(&request(agent_binary(), TAG), &work_dir("a")).expect("build"))
}

/// Every file of a directory tree with its bytes, by relative path.
fn tree(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.insert(
                    path.strip_prefix(root).unwrap().to_owned(),
                    std::fs::read(&path).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn same_inputs_give_the_same_digest_twice() {
    let first = image();

    // The second build runs in another process (the weir-image command), from a copy of the
    // agent with another mtime and mode: neither the process nor file metadata may leak in.
    let copy_dir = tempfile::tempdir().unwrap();
    let copy = copy_dir.path().join("weir-agent");
    std::fs::copy(agent_binary(), &copy).unwrap();
    std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let second_dir = work_dir("b");
    let printed = run(Command::new(env!("CARGO_BIN_EXE_weir-image"))
        .arg("build")
        .arg("--agent")
        .arg(&copy)
        .arg("--out")
        .arg(&second_dir)
        .args(["--tag", TAG])
        .args(["--compression-level", &LEVEL.to_string()])
        .env("SOURCE_DATE_EPOCH", "0"));
    assert_eq!(printed.trim(), first.manifest.to_string());
    println!("manifest digest, both builds: {}", first.manifest);

    let (a, b) = (tree(&first.layout), tree(&second_dir));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (path, bytes) in &a {
        assert!(
            bytes == &b[path],
            "{} differs between the builds",
            path.display()
        );
    }
}

#[test]
fn the_image_holds_the_agent_and_exactly_its_libraries() {
    let image = image();
    // ldd runs the real loader: the closure read from the ELF headers must name the same files.
    let ldd = run(Command::new("ldd").arg(agent_binary()));
    let mut from_ldd: Vec<String> = ldd
        .lines()
        .filter(|line| !line.contains("linux-vdso"))
        .filter_map(|line| {
            let path = line.split("=>").last()?.split_whitespace().next()?;
            Some(Path::new(path).file_name()?.to_string_lossy().into_owned())
        })
        .collect();
    from_ldd.push("weir-agent".to_owned());
    from_ldd.sort();
    let mut in_image: Vec<String> = image
        .files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    in_image.sort();
    assert_eq!(in_image, from_ldd);
    assert!(
        !image.files.iter().any(|f| f.starts_with("/etc")),
        "{:?}",
        image.files
    );
    assert_eq!(image.layers.len(), 2);
    println!(
        "files: {:?}; layers (compressed bytes): {:?}",
        image.files,
        image.layers.iter().map(|l| l.size).collect::<Vec<_>>()
    );
}

#[test]
fn skopeo_and_umoci_read_the_layout_and_its_rootfs_runs_the_agent() {
    let image = image();
    let reference = format!("oci:{}:{TAG}", image.layout.display());
    let inspect: serde_json::Value =
        serde_json::from_str(&run(Command::new("skopeo").args(["inspect", &reference]))).unwrap();
    assert_eq!(inspect["Digest"], image.manifest.to_string());
    assert_eq!(inspect["Architecture"], image.architecture);
    assert_eq!(inspect["Os"], "linux");
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 2);
    assert_eq!(
        inspect["Labels"]["org.opencontainers.image.title"],
        "weir-agent"
    );

    let umoci_image = format!("{}:{TAG}", image.layout.display());
    let stat: serde_json::Value = serde_json::from_str(&run(Command::new("umoci").args([
        "stat",
        "--image",
        &umoci_image,
        "--json",
    ])))
    .unwrap();
    assert_eq!(stat["history"].as_array().unwrap().len(), 2, "{stat}");

    let bundle_parent = tempfile::tempdir().unwrap();
    let bundle = bundle_parent.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image", &umoci_image])
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    let mut unpacked: Vec<PathBuf> = tree(&rootfs)
        .into_keys()
        .map(|p| Path::new("/").join(p))
        .collect();
    unpacked.sort();
    assert_eq!(unpacked, image.files);
    let runtime: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        runtime["process"]["args"],
        serde_json::json!([
            "/usr/bin/weir-agent",
            "run",
            "--config",
            "/etc/weir/config.toml"
        ])
    );

    // The real proof that nothing is missing: the agent runs inside the bare rootfs.
    let version = run(Command::new("chroot")
        .arg(&rootfs)
        .args(["/usr/bin/weir-agent", "--version"]));
    assert!(version.starts_with("weir-agent "), "{version}");
}

#[test]
fn push_to_a_loopback_registry_keeps_the_digest() {
    let image = image();
    let registry = LoopbackRegistry::start().expect("starting docker-registry");
    let reference = format!("{}/weir/agent:{TAG}", registry.addr);
    let layout = read_layout(&image.layout, TAG).unwrap();
    let options = PushOptions {
        plain_http: true,
        ..Default::default()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pushed = runtime
        .block_on(weir_oci::push(&layout, &reference, &options))
        .unwrap_or_else(|e| panic!("push: {e}\nregistry log:\n{}", registry.log()));
    assert_eq!(pushed, image.manifest.to_string());
    // A second push finds every blob present and sends only the manifest.
    let again = runtime
        .block_on(weir_oci::push(&layout, &reference, &options))
        .unwrap();
    assert_eq!(again, pushed);

    let inspect: serde_json::Value = serde_json::from_str(&run(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        &format!("docker://{reference}"),
    ])))
    .unwrap();
    assert_eq!(inspect["Digest"], image.manifest.to_string());
}

#[test]
fn a_bad_agent_path_is_a_clear_error_and_keeps_the_previous_layout() {
    let out = work_dir("bad-input");
    let first = build_layout(&request(common::which("true").unwrap(), TAG), &out).unwrap();
    let not_elf = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(not_elf.path(), "#!/bin/sh\n").unwrap();
    let error = build_layout(&request(not_elf.path(), TAG), &out).unwrap_err();
    assert!(matches!(error, BuildError::Elf(_)), "{error}");
    assert!(
        error
            .to_string()
            .contains(&not_elf.path().display().to_string()),
        "{error}"
    );
    assert_eq!(read_layout(&out, TAG).unwrap().manifest, first.manifest);

    let error =
        build_layout(&request(common::which("true").unwrap(), "no/slash"), &out).unwrap_err();
    assert!(matches!(error, BuildError::BadTag(_)), "{error}");
}

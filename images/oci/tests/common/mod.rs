//! Shared pieces of the weir-oci integration tests: the agent binary to package, and a Debian
//! `docker-registry` on a loopback port, started by the test and stopped by its PID.

#![allow(dead_code)] // Each test binary uses its own subset.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The agent program the image is built from: `WEIR_AGENT_BIN`, or the `weir-agent` that this
/// `cargo test` built next to this test (same profile), so it matches the sources under test.
pub fn agent_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("WEIR_AGENT_BIN") {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<test> -> target/<profile>/weir-agent
    let exe = std::env::current_exe().expect("test executable path");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .join("weir-agent");
    assert!(
        path.is_file(),
        "{} is missing: run the workspace's `cargo test` (it builds the agent) or \
         `cargo build -p weir-agent` first, or set WEIR_AGENT_BIN",
        path.display()
    );
    path
}

/// Runs a command to completion and returns its stdout; panics with its stderr if it failed.
pub fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed with {}:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

/// A `docker-registry` (the CNCF distribution registry, Debian package `docker-registry`) on
/// 127.0.0.1, with its storage in a temporary directory. Dropping it stops it by PID.
pub struct LoopbackRegistry {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl LoopbackRegistry {
    pub fn start() -> Result<Self, String> {
        let binary = which("docker-registry")
            .ok_or("docker-registry is not installed (Debian package docker-registry)")?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        // Let the kernel choose a free port, then hand it to the registry.
        let addr = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?;
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {addr}\n",
                dir.path().join("storage").display()
            ),
        )
        .map_err(|e| e.to_string())?;
        let log =
            std::fs::File::create(dir.path().join("registry.log")).map_err(|e| e.to_string())?;
        let child = Command::new(binary)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting docker-registry: {e}"))?;
        let mut registry = LoopbackRegistry {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if http_get_status(addr, "/v2/").is_ok_and(|status| status == 200) {
                return Ok(registry);
            }
            if let Ok(Some(status)) = registry.child.try_wait() {
                return Err(format!(
                    "docker-registry exited early: {status}: {}",
                    registry.log()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "docker-registry did not answer on {addr}: {}",
                    registry.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("registry.log")).unwrap_or_default()
    }
}

impl Drop for LoopbackRegistry {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(10));
    }
}

/// SIGTERM by PID, then SIGKILL if it has not exited after `grace`.
pub fn stop_child(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The status code of a plain HTTP/1.1 GET, enough to poll a loopback service.
pub fn http_get_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let (status, _) = http_get(addr, path)?;
    Ok(status)
}

pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

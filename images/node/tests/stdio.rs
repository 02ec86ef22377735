//! The real weir-node-init binary serving its protocol over stdio, as the lab's control port
//! would see it. (Also what makes `cargo test` build the binary the VM lab tests boot with.)

use std::io::Write;
use std::process::{Command, Stdio};

use weir_node_image::proto::{Reply, Response};

#[test]
fn init_answers_over_stdio() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weir-node-init"))
        .arg("--stdio")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            b"{\"id\":1,\"op\":\"ping\"}\n{\"id\":2,\"op\":\"exec\",\"program\":\"echo\",\"args\":[\"hi\"],\"timeout_ms\":5000}\n",
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let answers: Vec<Response> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(matches!(answers[0].reply, Reply::Pong { .. }));
    match &answers[1].reply {
        Reply::Exited { code, stdout, .. } => {
            assert_eq!(*code, Some(0));
            assert_eq!(stdout, "hi\n");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn init_refuses_to_run_as_an_ordinary_process() {
    let out = Command::new(env!("CARGO_BIN_EXE_weir-node-init"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PID 1"));
}

//! The reference key service over HTTP: a key file rotated under it, and
//! the resource taking two keys at once (key1 and key2) while it rotates.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

use aoai_emulator::{Emulator, Settings, Verdict};
use common::call;
use serde_json::{json, Value};

fn get_key(emulator: &Emulator) -> (u16, Value) {
    let answer = call(emulator, "GET", "127.0.0.1", "/keyservice/key", &[], "");
    (answer.status, answer.body)
}

/// Replace `path` whole, as kubelet's symlink swap or `mv` does: a reader
/// sees the old file or the new one, never half of either.
fn rotate(path: &Path, contents: &str) {
    let dir = path.parent().unwrap();
    let mut staged = tempfile::NamedTempFile::new_in(dir).unwrap();
    std::io::Write::write_all(&mut staged, contents.as_bytes()).unwrap();
    staged.persist(path).unwrap();
}

#[test]
fn the_key_file_is_read_anew_on_every_request_and_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    rotate(&path, "  key-one\n");
    let emulator = Emulator::start(Settings {
        key_file: Some(path.clone()),
        ..Settings::default()
    })
    .unwrap();
    assert_eq!(get_key(&emulator), (200, json!({"key": "key-one"})));
    rotate(&path, "key-two\n");
    assert_eq!(get_key(&emulator), (200, json!({"key": "key-two"})));
    assert_eq!(emulator.key_requests(), 2);
}

#[test]
fn expires_in_is_added_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    rotate(&path, "key-one");
    let emulator = Emulator::start(Settings {
        key_file: Some(path),
        key_expires_in_s: Some(300),
        ..Settings::default()
    })
    .unwrap();
    assert_eq!(
        get_key(&emulator),
        (200, json!({"key": "key-one", "expires_in": 300}))
    );
}

#[test]
fn no_configured_file_is_404_and_an_unreadable_or_empty_one_is_503() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    assert_eq!(get_key(&emulator).0, 404);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing");
    emulator.configure(|s| s.key_file = Some(path.clone()));
    assert_eq!(get_key(&emulator), (503, json!({"error": "unavailable"})));
    rotate(&path, " \n");
    assert_eq!(get_key(&emulator), (503, json!({"error": "unavailable"})));
    rotate(&path, "back");
    assert_eq!(get_key(&emulator), (200, json!({"key": "back"})));
    assert_eq!(emulator.key_requests(), 4);
}

/// A chat request with this `api-key`: (status, who the data plane let through).
fn chat_with_key(emulator: &Emulator, key: &str) -> (u16, Value) {
    let answer = call(
        emulator,
        "POST",
        "myres.openai.azure.com",
        "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21",
        &[("api-key", key), ("content-type", "application/json")],
        r#"{"messages":[{"role":"user","content":"hi"}]}"#,
    );
    (answer.status, answer.body)
}

#[test]
fn a_secondary_key_is_accepted_beside_the_primary_as_key1_and_key2_are() {
    let emulator = Emulator::start(Settings {
        local_auth_disabled: false,
        api_key: "key-one".into(),
        ..Settings::default()
    })
    .unwrap();
    assert_eq!(chat_with_key(&emulator, "key-one").0, 200);
    assert_eq!(chat_with_key(&emulator, "key-two").0, 401, "not yet listed");
    // A rotation: the new key is added beside the old one, ...
    emulator.configure(|s| s.secondary_api_key = Some("key-two".into()));
    for key in ["key-one", "key-two"] {
        let (status, body) = chat_with_key(&emulator, key);
        assert_eq!(status, 200, "{key}: {body}");
    }
    // ... then the old one is retired.
    emulator.configure(|s| {
        s.api_key = "key-two".into();
        s.secondary_api_key = None;
    });
    let (status, body) = chat_with_key(&emulator, "key-one");
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "401");
    assert_eq!(chat_with_key(&emulator, "key-two").0, 200);
    // While local auth is off, neither key is taken.
    emulator.configure(|s| {
        s.local_auth_disabled = true;
        s.secondary_api_key = Some("key-three".into());
    });
    for key in ["key-two", "key-three"] {
        assert_eq!(chat_with_key(&emulator, key).0, 403, "{key}");
    }
    let verdicts: Vec<_> = emulator
        .upstream_requests()
        .iter()
        .map(|r| r.verdict)
        .collect();
    assert_eq!(
        verdicts,
        [
            Verdict::Ok,
            Verdict::InvalidKey,
            Verdict::Ok,
            Verdict::Ok,
            Verdict::InvalidKey,
            Verdict::Ok,
            Verdict::KeyAuthDisabled,
            Verdict::KeyAuthDisabled,
        ]
    );
}

/// The standalone binary, as the README runs it: `--key-file` makes
/// `GET /keyservice/key` serve the file, read anew on every request; without
/// it the key service answers 404.
#[test]
fn the_binary_serves_the_key_file_named_by_its_option() {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    struct Running(std::process::Child);
    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    fn get(addr: SocketAddr) -> Option<(u16, Value)> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            stream,
            "GET /keyservice/key HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let status = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n")?.1;
        Some((status, serde_json::from_str(body).ok()?))
    }
    fn start(extra: &[&str]) -> (Running, SocketAddr) {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new(env!("CARGO_BIN_EXE_aoai-emulator"))
            .args(["--listen", &addr.to_string(), "--quiet"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let running = Running(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "aoai-emulator did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        (running, addr)
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    rotate(&path, "key-one\n");
    let (_emulator, addr) = start(&["--key-file", path.to_str().unwrap()]);
    assert_eq!(get(addr), Some((200, json!({"key": "key-one"}))));
    rotate(&path, "key-two\n");
    assert_eq!(get(addr), Some((200, json!({"key": "key-two"}))));

    let (_plain, addr) = start(&[]);
    assert_eq!(get(addr), Some((404, json!({"error": "not_found"}))));
}

//! The reference key service over HTTP: a key file rotated under it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

use aoai_emulator::{Emulator, Settings};
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

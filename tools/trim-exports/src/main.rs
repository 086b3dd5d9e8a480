//! `trim-exports <module.wasm> <export>...`: remove the named exports from a
//! WebAssembly module, in place.
//!
//! Why: proxy-wasm hosts call a callback only when the module exports it, and
//! every call is a crossing into the wasm VM. The Rust SDK exports every
//! callback, used or not. aoai-msi-filter does nothing in `proxy_on_log` and
//! `proxy_on_done`, yet Envoy would enter the VM for both on every request;
//! without the exports, Envoy skips them (`make bench` measures the saving).
//!
//! Only the export section changes: the functions stay in the module, unused,
//! and every index stays valid. Running it twice changes nothing the second
//! time. Names that the module does not export are reported, not an error, so
//! the build does not break when an SDK stops exporting one.

use std::process::ExitCode;

const MAGIC: &[u8; 4] = b"\0asm";
const VERSION: &[u8; 4] = &[1, 0, 0, 0];
const EXPORT_SECTION: u8 = 7;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((path, names)) = args.split_first() else {
        eprintln!("usage: trim-exports <module.wasm> <export>...");
        return ExitCode::from(2);
    };
    let result = std::fs::read(path)
        .map_err(|e| format!("cannot read {path}: {e}"))
        .and_then(|module| {
            let drop: Vec<&str> = names.iter().map(String::as_str).collect();
            trim(&module, &drop).map_err(|e| format!("{path}: {e}"))
        })
        .and_then(|trimmed| {
            if !trimmed.absent.is_empty() {
                eprintln!(
                    "trim-exports: {path} does not export {}",
                    trimmed.absent.join(", ")
                );
            }
            std::fs::write(path, &trimmed.module)
                .map_err(|e| format!("cannot write {path}: {e}"))
                .map(|()| trimmed.removed)
        });
    match result {
        Ok(removed) => {
            if !removed.is_empty() {
                eprintln!("trim-exports: removed {} from {path}", removed.join(", "));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("trim-exports: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The module without the dropped exports, and what happened to each name.
#[derive(Debug)]
struct Trimmed {
    module: Vec<u8>,
    removed: Vec<String>,
    absent: Vec<String>,
}

fn trim(module: &[u8], drop: &[&str]) -> Result<Trimmed, String> {
    if module.get(..4) != Some(MAGIC.as_slice()) {
        return Err("not a WebAssembly module (no \\0asm header)".into());
    }
    if module.get(4..8) != Some(VERSION.as_slice()) {
        return Err("unsupported WebAssembly binary version".into());
    }
    let mut out = module[..8].to_vec();
    let mut removed = Vec::new();
    let mut at = 8;
    while at < module.len() {
        let id = module[at];
        let (size, body_at) = read_u32(module, at + 1)?;
        let body = module
            .get(body_at..body_at + size as usize)
            .ok_or_else(|| format!("section {id} at byte {at} runs past the end"))?;
        at = body_at + size as usize;
        let body = if id == EXPORT_SECTION {
            let (kept, gone) = filter_exports(body, drop)?;
            removed.extend(gone);
            kept
        } else {
            body.to_vec()
        };
        out.push(id);
        write_u32(
            &mut out,
            u32::try_from(body.len()).map_err(|_| "section too large")?,
        );
        out.extend_from_slice(&body);
    }
    let absent = drop
        .iter()
        .filter(|name| !removed.iter().any(|r| r == *name))
        .map(|name| name.to_string())
        .collect();
    Ok(Trimmed {
        module: out,
        removed,
        absent,
    })
}

/// Export section body → (new body, removed names). An entry is a name
/// (length-prefixed UTF-8), a kind byte and an index.
fn filter_exports(body: &[u8], drop: &[&str]) -> Result<(Vec<u8>, Vec<String>), String> {
    let (count, mut at) = read_u32(body, 0)?;
    let mut kept = Vec::new();
    let mut kept_count = 0u32;
    let mut removed = Vec::new();
    for _ in 0..count {
        let start = at;
        let (len, name_at) = read_u32(body, at)?;
        let name = body
            .get(name_at..name_at + len as usize)
            .and_then(|n| std::str::from_utf8(n).ok())
            .ok_or("an export name is cut short or not UTF-8")?;
        let kind_at = name_at + len as usize;
        body.get(kind_at).ok_or("an export entry is cut short")?;
        let (_index, end) = read_u32(body, kind_at + 1)?;
        at = end;
        if drop.contains(&name) {
            removed.push(name.to_owned());
        } else {
            kept.extend_from_slice(&body[start..end]);
            kept_count += 1;
        }
    }
    if at != body.len() {
        return Err("the export section has bytes after its last entry".into());
    }
    let mut out = Vec::with_capacity(kept.len() + 5);
    write_u32(&mut out, kept_count);
    out.extend_from_slice(&kept);
    Ok((out, removed))
}

/// Unsigned LEB128, at most 5 bytes: (value, index after it).
fn read_u32(bytes: &[u8], mut at: usize) -> Result<(u32, usize), String> {
    let mut value: u64 = 0;
    for shift in (0..35).step_by(7) {
        let byte = *bytes
            .get(at)
            .ok_or_else(|| format!("a number at byte {at} runs past the end"))?;
        at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return u32::try_from(value)
                .map(|v| (v, at))
                .map_err(|_| format!("a number before byte {at} does not fit in 32 bits"));
        }
    }
    Err(format!("a number before byte {at} is longer than 5 bytes"))
}

fn write_u32(out: &mut Vec<u8>, mut value: u32) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A module with one function and the given exports of it, plus a custom
    /// section after the exports, so sections on both sides must survive.
    fn module(exports: &[&str]) -> Vec<u8> {
        let mut m = b"\0asm\x01\0\0\0".to_vec();
        let section = |m: &mut Vec<u8>, id: u8, body: &[u8]| {
            m.push(id);
            write_u32(m, body.len() as u32);
            m.extend_from_slice(body);
        };
        section(&mut m, 1, &[1, 0x60, 0, 0]); // type: () -> ()
        section(&mut m, 3, &[1, 0]); // one function of type 0
        let mut body = Vec::new();
        write_u32(&mut body, exports.len() as u32);
        for name in exports {
            write_u32(&mut body, name.len() as u32);
            body.extend_from_slice(name.as_bytes());
            body.extend_from_slice(&[0, 0]); // function 0
        }
        section(&mut m, EXPORT_SECTION, &body);
        section(&mut m, 10, &[1, 2, 0, 0x0b]); // code: empty body
        section(&mut m, 0, b"\x04note");
        m
    }

    #[test]
    fn named_exports_are_removed_and_everything_else_is_kept() {
        let before = module(&["proxy_on_log", "proxy_on_request_headers", "proxy_on_done"]);
        let trimmed = trim(&before, &["proxy_on_log", "proxy_on_done"]).unwrap();
        assert_eq!(trimmed.module, module(&["proxy_on_request_headers"]));
        assert_eq!(trimmed.removed, ["proxy_on_log", "proxy_on_done"]);
        assert!(trimmed.absent.is_empty());
    }

    #[test]
    fn trimming_twice_changes_nothing_the_second_time() {
        let once = trim(&module(&["a", "b"]), &["a"]).unwrap().module;
        let twice = trim(&once, &["a"]).unwrap();
        assert_eq!(twice.module, once);
        assert_eq!(twice.absent, ["a"]);
    }

    #[test]
    fn a_module_without_the_names_is_returned_unchanged() {
        let before = module(&["proxy_on_tick"]);
        assert_eq!(trim(&before, &["proxy_on_log"]).unwrap().module, before);
    }

    #[test]
    fn long_sections_keep_valid_multi_byte_sizes() {
        let names: Vec<String> = (0..100).map(|i| format!("export_number_{i:03}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let trimmed = trim(&module(&refs), &["export_number_042"]).unwrap();
        let rest: Vec<&str> = refs
            .iter()
            .copied()
            .filter(|n| *n != "export_number_042")
            .collect();
        assert_eq!(trimmed.module, module(&rest));
    }

    #[test]
    fn broken_input_is_an_error_not_a_panic() {
        assert!(trim(b"hello", &[])
            .unwrap_err()
            .contains("not a WebAssembly module"));
        let good = module(&["proxy_on_log"]);
        for cut in 8..good.len() {
            // Every truncation either fails cleanly or (at a section boundary) succeeds.
            let _ = trim(&good[..cut], &["proxy_on_log"]);
        }
        let mut endless = b"\0asm\x01\0\0\0\x07".to_vec();
        endless.extend_from_slice(&[0xff; 6]);
        assert!(trim(&endless, &[])
            .unwrap_err()
            .contains("longer than 5 bytes"));
    }
}

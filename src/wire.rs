//! Decoders for the bytes the host hands the glue: header values, property
//! values, call answers. Every byte here came from a client, an upstream or a
//! token endpoint, so nothing is assumed: a value that does not decode is
//! absent, never a panic.

/// `:status` → a status code, if it is three ASCII digits from 100 to 599.
pub fn status(value: &[u8]) -> Option<u16> {
    match value {
        [a @ b'1'..=b'5', b @ b'0'..=b'9', c @ b'0'..=b'9'] => {
            Some(u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0'))
        }
        _ => None,
    }
}

/// A header value as text, if it is visible ASCII and spaces only: what
/// host names, media types and codings are made of. Anything else (obs-text,
/// control bytes) is treated as absent.
pub fn text(value: &[u8]) -> Option<&str> {
    if value
        .iter()
        .all(|b| b.is_ascii_graphic() || *b == b' ' || *b == b'\t')
    {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

/// `content-length` → bytes, if it is a plain decimal number.
pub fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Is this `content-type` JSON (`application/json`, `…+json`)?
pub fn is_json(content_type: Option<&[u8]>) -> bool {
    let Some(media) = content_type.and_then(text) else {
        return false;
    };
    let media = media.split(';').next().unwrap_or_default().trim();
    let (kind, sub) = media.split_once('/').unwrap_or_default();
    kind.eq_ignore_ascii_case("application")
        && (sub.eq_ignore_ascii_case("json")
            || sub.len() > 5 && sub[sub.len() - 5..].eq_ignore_ascii_case("+json"))
}

/// Is this `content-encoding` absent or `identity`, so the bytes are the body?
pub fn is_identity(content_encoding: Option<&[u8]>) -> bool {
    match content_encoding {
        None => true,
        Some(value) => text(value).is_some_and(|v| v.trim().eq_ignore_ascii_case("identity")),
    }
}

/// Serialise header pairs the way proxy-wasm ABI 0.2.1 expects them: the
/// count, each name and value length, then each name and value, NUL-ended.
pub fn serialize_pairs(pairs: &[(&str, &[u8])]) -> Vec<u8> {
    let size = 4
        + pairs.len() * 8
        + pairs
            .iter()
            .map(|(n, v)| n.len() + v.len() + 2)
            .sum::<usize>();
    let mut bytes = Vec::with_capacity(size);
    bytes.extend_from_slice(&len32(pairs.len()).to_le_bytes());
    for (name, value) in pairs {
        bytes.extend_from_slice(&len32(name.len()).to_le_bytes());
        bytes.extend_from_slice(&len32(value.len()).to_le_bytes());
    }
    for (name, value) in pairs {
        bytes.extend_from_slice(name.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(value);
        bytes.push(0);
    }
    bytes
}

/// Header pairs as the host serialises them (the layout of
/// [`serialize_pairs`]), borrowed from `bytes`; `None` when the bytes do not
/// hold exactly that layout. Lengths are checked before any slice is taken.
pub fn deserialize_pairs(bytes: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let word = |at: usize| -> Option<usize> {
        let raw: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(raw)).ok()
    };
    let count = word(0)?;
    // Each pair needs 8 bytes of lengths and 2 NULs: a count the bytes
    // cannot hold is refused before anything is allocated for it.
    if count > bytes.len() / 10 {
        return if count == 0 { Some(Vec::new()) } else { None };
    }
    let mut pairs = Vec::with_capacity(count);
    let mut at = 4 + count * 8;
    for i in 0..count {
        let name_len = word(4 + i * 8)?;
        let value_len = word(8 + i * 8)?;
        let name = bytes.get(at..at.checked_add(name_len)?)?;
        at += name_len;
        if bytes.get(at) != Some(&0) {
            return None;
        }
        at += 1;
        let value = bytes.get(at..at.checked_add(value_len)?)?;
        at += value_len;
        if bytes.get(at) != Some(&0) {
            return None;
        }
        at += 1;
        pairs.push((name, value));
    }
    (at == bytes.len()).then_some(pairs)
}

/// A property path (`["xds", "cluster_name"]`) as the host expects it: the
/// segments, each NUL-ended.
pub fn serialize_path(segments: &[&str]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for segment in segments {
        bytes.extend_from_slice(segment.as_bytes());
        bytes.push(0);
    }
    bytes
}

fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    #[test]
    fn header_pairs_read_back_what_was_written_and_nothing_malformed() {
        let pairs: Vec<(&str, &[u8])> =
            vec![(":authority", b"myres"), ("api-key", b"k\xff"), ("", b"")];
        let bytes = serialize_pairs(&pairs);
        let back = deserialize_pairs(&bytes).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back[1], (&b"api-key"[..], &b"k\xff"[..]));
        assert_eq!(deserialize_pairs(&serialize_pairs(&[])), Some(Vec::new()));
        for bad in [
            &bytes[..bytes.len() - 1],
            &[0xff, 0xff, 0xff, 0x7f][..],
            &[1, 0, 0, 0, 200, 0, 0, 0, 0, 0, 0, 0][..],
            &[][..],
        ] {
            assert_eq!(deserialize_pairs(bad), None, "{bad:?}");
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(deserialize_pairs(&trailing), None);
    }

    use super::*;

    #[test]
    fn only_three_digit_statuses_in_range_are_statuses() {
        assert_eq!(status(b"200"), Some(200));
        assert_eq!(status(b"403"), Some(403));
        assert_eq!(status(b"599"), Some(599));
        for bad in [
            &b""[..],
            b"20",
            b"2000",
            b"600",
            b"099",
            b" 200",
            b"20\xff",
            b"-20",
        ] {
            assert_eq!(status(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn header_text_refuses_obs_text_and_control_bytes() {
        assert_eq!(
            text(b"myres.openai.azure.com:443"),
            Some("myres.openai.azure.com:443")
        );
        assert_eq!(text(b""), Some(""));
        assert_eq!(text(b"application/json\xff"), None);
        assert_eq!(text(b"a\r\nb"), None);
        assert_eq!(text("caf\u{e9}".as_bytes()), None);
    }

    #[test]
    fn content_length_is_a_plain_decimal_or_nothing() {
        assert_eq!(content_length(b"0"), Some(0));
        assert_eq!(content_length(b"2097152"), Some(2_097_152));
        for bad in [
            &b""[..],
            b"-1",
            b"1e3",
            b" 12",
            b"99999999999999999999",
            b"12\xff",
        ] {
            assert_eq!(content_length(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn json_media_types_are_recognised_and_nothing_else() {
        for yes in [
            &b"application/json"[..],
            b"application/json; charset=utf-8",
            b"Application/JSON",
            b"application/problem+json",
        ] {
            assert!(is_json(Some(yes)), "{yes:?}");
        }
        for no in [
            &b"text/plain"[..],
            b"application/jsonx",
            b"json",
            b"application/json\xff",
            b"+json",
        ] {
            assert!(!is_json(Some(no)), "{no:?}");
        }
        assert!(!is_json(None));
    }

    #[test]
    fn only_identity_coding_means_the_bytes_are_the_body() {
        assert!(is_identity(None));
        assert!(is_identity(Some(b"identity")));
        assert!(!is_identity(Some(b"gzip")));
        assert!(!is_identity(Some(b"identity\xff")));
    }

    #[test]
    fn pairs_serialise_in_the_abi_layout() {
        let bytes = serialize_pairs(&[("a", b"xy"), ("bc", b"")]);
        let mut expected = vec![2, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0];
        expected.extend_from_slice(b"a\0xy\0bc\0\0");
        assert_eq!(bytes, expected);
        assert_eq!(
            serialize_path(&["xds", "cluster_name"]),
            b"xds\0cluster_name\0"
        );
    }
}

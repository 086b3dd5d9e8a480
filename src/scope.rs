//! Path scopes (`paths` of a target) judged on the path the upstream will
//! resolve, not on the bytes the client sent.
//!
//! A client may send `/openai/../internal/admin`: its raw bytes start with
//! `/openai/`, but a server that resolves dot segments (RFC 3986 §5.2.4)
//! serves `/internal/admin`. Envoy forwards such a path as it is unless the
//! listener normalises paths, so the filter resolves it itself: dot segments
//! are removed, `%2e` counts as `.`, and `..;x` as `..` (a path parameter).
//! A server may also decode `%2f` and `\` into `/` before resolving; the
//! request is in a scope only if it stays there read either way.

use std::borrow::Cow;

/// Is the request path `raw` (query and fragment included) inside one of
/// `prefixes`, however the upstream resolves it?
pub fn in_scope(raw: &str, prefixes: &[String]) -> bool {
    let path = path_part(raw);
    if is_plain(path) {
        return prefixes.iter().any(|p| path.starts_with(p.as_str()));
    }
    let literal = resolved(path, false);
    let decoded = resolved(path, true);
    prefixes.iter().any(|p| literal.starts_with(p.as_str()))
        && prefixes.iter().any(|p| decoded.starts_with(p.as_str()))
}

/// The path without query and fragment.
fn path_part(raw: &str) -> &str {
    let end = raw.find(['?', '#']).unwrap_or(raw.len());
    &raw[..end]
}

/// Nothing to resolve: no dot segment, no escape, no backslash, no path
/// parameter. The common case; it allocates nothing.
fn is_plain(path: &str) -> bool {
    let bytes = path.as_bytes();
    !bytes.iter().any(|b| matches!(b, b'%' | b'\\' | b';'))
        && !bytes.windows(2).any(|w| w[0] == b'/' && w[1] == b'.')
}

/// `path` as a server resolves it: dot segments removed (RFC 3986 §5.2.4),
/// `%2e` read as `.`; with `decode_slashes`, `%2f` and `\` separate segments.
pub fn resolved(path: &str, decode_slashes: bool) -> String {
    let separated: Cow<'_, str> = if decode_slashes {
        Cow::Owned(
            replace_ignore_case(path, "%2f", "/")
                .replace('\\', "/")
                .replace("%5c", "/")
                .replace("%5C", "/"),
        )
    } else {
        Cow::Borrowed(path)
    };
    let mut output: Vec<&str> = Vec::new();
    let segments: Vec<&str> = separated.split('/').collect();
    let last = segments.len().saturating_sub(1);
    // The first segment is what precedes the leading '/': empty for an
    // absolute path.
    for (i, segment) in segments.iter().enumerate().skip(1) {
        match dot_segment(segment) {
            Some(Dot::Current) => {
                if i == last {
                    output.push("");
                }
            }
            Some(Dot::Parent) => {
                output.pop();
                if i == last {
                    output.push("");
                }
            }
            None => output.push(segment),
        }
    }
    let mut out = String::with_capacity(separated.len());
    out.push_str(segments.first().copied().unwrap_or(""));
    for segment in output {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

enum Dot {
    Current,
    Parent,
}

/// `.` / `..`, also spelled `%2e`, `.%2E`, …, and with a `;param`.
fn dot_segment(segment: &str) -> Option<Dot> {
    let name = segment.split(';').next().unwrap_or(segment);
    let dots = replace_ignore_case(name, "%2e", ".");
    match dots.as_str() {
        "." => Some(Dot::Current),
        ".." => Some(Dot::Parent),
        _ => None,
    }
}

/// `text` with every ASCII-case-insensitive occurrence of `from` replaced.
fn replace_ignore_case(text: &str, from: &str, to: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = find_ignore_case(rest, from) {
        out.push_str(&rest[..i]);
        out.push_str(to);
        rest = &rest[i + from.len()..];
    }
    out.push_str(rest);
    out
}

fn find_ignore_case(haystack: &str, needle: &str) -> Option<usize> {
    let (h, n) = (haystack.as_bytes(), needle.as_bytes());
    (0..=h.len().checked_sub(n.len())?).find(|&i| h[i..i + n.len()].eq_ignore_ascii_case(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scopes(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn dot_segments_are_removed_as_rfc_3986_says() {
        for (raw, expected) in [
            ("/a/b/c/./../../g", "/a/g"),
            ("/openai/../internal/admin", "/internal/admin"),
            ("/openai/./../internal/admin", "/internal/admin"),
            ("/openai/x/..", "/openai/"),
            ("/openai/.", "/openai/"),
            ("/../../x", "/x"),
            ("/", "/"),
            ("/openai/%2e%2E/internal", "/internal"),
            ("/openai/.%2e/internal", "/internal"),
            ("/openai/..;x=1/internal", "/internal"),
            ("/openai/...", "/openai/..."),
            ("/openai/v1/chat/completions", "/openai/v1/chat/completions"),
        ] {
            assert_eq!(resolved(raw, false), expected, "{raw}");
        }
        assert_eq!(resolved("/openai%2f..%2finternal", true), "/internal");
        assert_eq!(resolved("/openai\\..\\internal", true), "/internal");
        assert_eq!(
            resolved("/openai%2f..%2finternal", false),
            "/openai%2f..%2finternal"
        );
    }

    #[test]
    fn a_path_that_resolves_outside_every_scope_is_out_of_scope() {
        let scope = scopes(&["/openai/"]);
        for inside in [
            "/openai/deployments/d/chat/completions?api-version=1",
            "/openai/v1/responses",
            "/openai/x/../v1/models",
            "/openai/./v1/models#frag",
        ] {
            assert!(in_scope(inside, &scope), "{inside}");
        }
        for outside in [
            "/openai/../internal/admin",
            "/openai/./../internal/admin",
            "/openai/%2e%2e/internal/admin",
            "/openai/%2E./internal",
            "/openai/..;/internal",
            "/openai%2f..%2finternal",
            "/openai/x%2f..%2f..%2finternal",
            "/openai\\..\\internal",
            "/internal/openai/",
            "/openai",
        ] {
            assert!(!in_scope(outside, &scope), "{outside}");
        }
    }

    #[test]
    fn a_query_cannot_bring_a_path_into_scope() {
        let scope = scopes(&["/api/projects/"]);
        assert!(!in_scope("/openai/x?/api/projects/", &scope));
        assert!(in_scope("/api/projects/p/threads?x=/../..", &scope));
    }
}

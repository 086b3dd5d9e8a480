//! Text from other parties, checked before it reaches a log line, a diagnosis
//! or a command an operator will paste into a shell.
//!
//! An upstream body, a token endpoint and a client's `Host` can all say
//! anything. Each value that is copied into our own output is validated
//! against the shape it must have (a GUID, an RBAC action, a DNS name, an
//! https URI, an ARM resource id) and replaced by a placeholder when it does
//! not fit. Free text (an endpoint's `error_description`) keeps printable
//! ASCII only and is bounded. Commands are built only from validated values.

/// `0b5e7c4a-0000-4000-8000-0000000000a1`, any case.
pub fn guid(value: &str) -> Option<&str> {
    let b = value.as_bytes();
    let dashes = [8, 13, 18, 23];
    let ok = b.len() == 36
        && b.iter().enumerate().all(|(i, c)| {
            if dashes.contains(&i) {
                *c == b'-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    ok.then_some(value)
}

/// A tenant: its GUID, or a verified domain such as `contoso.onmicrosoft.com`.
pub fn tenant(value: &str) -> Option<&str> {
    guid(value).or_else(|| {
        let ok = value.contains('.')
            && (1..=253).contains(&value.len())
            && value.split('.').all(|label| dns_label(label).is_some());
        ok.then_some(value)
    })
}

/// `Microsoft.CognitiveServices/accounts/OpenAI/deployments/chat/completions/action`.
pub fn data_action(value: &str) -> Option<&str> {
    let ok = (1..=200).contains(&value.len())
        && value.starts_with("Microsoft.")
        && value
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'/' | b'-' | b'_'));
    ok.then_some(value)
}

/// An audience URI: `https://cognitiveservices.azure.com`, `api://<app>`.
pub fn audience(value: &str) -> Option<&str> {
    let rest = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("api://"))?;
    let ok = (1..=200).contains(&rest.len())
        && rest
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'/' | b'-' | b'_' | b':'));
    ok.then_some(value)
}

/// One DNS label as Azure resource names use them: letters, digits, hyphens.
pub fn dns_label(value: &str) -> Option<&str> {
    let ok = (1..=63).contains(&value.len())
        && !value.starts_with('-')
        && !value.ends_with('-')
        && value
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-');
    ok.then_some(value)
}

/// A host as a client may send it: DNS labels, optionally a trailing dot and
/// a port; or an IPv4 address with a port.
pub fn host(value: &str) -> Option<&str> {
    let (name, port) = match value.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (value, None),
    };
    let port_ok =
        port.is_none_or(|p| (1..=5).contains(&p.len()) && p.bytes().all(|c| c.is_ascii_digit()));
    let name = name.strip_suffix('.').unwrap_or(name);
    let ok = port_ok
        && (1..=253).contains(&name.len())
        && name.split('.').all(|label| dns_label(label).is_some());
    ok.then_some(value)
}

/// An ARM resource id: `/subscriptions/<id>/resourceGroups/<rg>/providers/…`.
pub fn resource_id(value: &str) -> Option<&str> {
    let ok = (1..=400).contains(&value.len())
        && value.starts_with("/subscriptions/")
        && value.bytes().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, b'/' | b'.' | b'-' | b'_' | b'(' | b')')
        });
    ok.then_some(value)
}

/// Free text from a token endpoint or an upstream: printable ASCII, with
/// anything else (control characters, line breaks, non-ASCII) shown as `?`,
/// at most `max_chars` characters.
pub fn free_text(value: &str, max_chars: usize) -> String {
    let mut out: String = value
        .chars()
        .take(max_chars)
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect();
    if value.chars().nth(max_chars).is_some() {
        out.push_str("...");
    }
    out
}

/// A token-service path as it may be shown: its query is `?…`, whatever it
/// holds (an Azure Function's `?code=` is the service's own access key).
pub fn path_shown(path: &str) -> std::borrow::Cow<'_, str> {
    match path.split_once('?') {
        Some((base, _)) => std::borrow::Cow::Owned(format!("{base}?…")),
        None => std::borrow::Cow::Borrowed(path),
    }
}

/// The value if `check` accepts it, else the placeholder.
pub fn or<'a>(
    value: Option<&'a str>,
    check: fn(&str) -> Option<&str>,
    placeholder: &'a str,
) -> &'a str {
    value.and_then(check).unwrap_or(placeholder)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_service_path_never_shows_its_query() {
        assert_eq!(path_shown("/api/key?code=s3cr3t&x=1"), "/api/key?…");
        assert_eq!(path_shown("/key"), "/key");
        assert_eq!(path_shown("/?"), "/?…");
    }

    #[test]
    fn guids_are_accepted_and_lookalikes_refused() {
        assert!(guid("0b5e7c4a-0000-4000-8000-0000000000a1").is_some());
        assert!(guid("0B5E7C4A-0000-4000-8000-0000000000A1").is_some());
        for bad in [
            "",
            "0b5e7c4a",
            "0b5e7c4a-0000-4000-8000-0000000000a1 ",
            "0b5e7c4a-0000-4000-8000-0000000000a1;id",
            "$(id)5e7c4a-0000-4000-8000-000000000000",
            "0b5e7c4a_0000-4000-8000-0000000000a1",
        ] {
            assert_eq!(guid(bad), None, "{bad}");
        }
    }

    #[test]
    fn rbac_actions_are_paths_of_safe_characters() {
        assert!(data_action(
            "Microsoft.CognitiveServices/accounts/OpenAI/deployments/chat/completions/action"
        )
        .is_some());
        assert!(data_action(
            "Microsoft.MachineLearningServices/workspaces/onlineEndpoints/score/action"
        )
        .is_some());
        for bad in [
            "",
            "x`; rm -rf /`",
            "Microsoft.X/$(id)",
            "Microsoft.X/a b",
            "Other/action",
        ] {
            assert_eq!(data_action(bad), None, "{bad}");
        }
    }

    #[test]
    fn audiences_are_https_or_api_uris() {
        assert!(audience("https://cognitiveservices.azure.com").is_some());
        assert!(audience("https://ai.azure.com/").is_some());
        assert!(audience("api://11111111-2222-3333-4444-555555555555").is_some());
        for bad in [
            "",
            "https://",
            "http://x",
            "https://x\" && id",
            "https://a b",
        ] {
            assert_eq!(audience(bad), None, "{bad}");
        }
    }

    #[test]
    fn hosts_and_labels_from_clients_are_checked() {
        assert!(host("myres.openai.azure.com").is_some());
        assert!(host("myres.openai.azure.com:443").is_some());
        assert!(host("myres.openai.azure.com.").is_some());
        assert!(host("127.0.0.1:10000").is_some());
        for bad in [
            "",
            "$(id).openai.azure.com",
            "a..b",
            "-a.com",
            "a.com:",
            "a.com:123456",
            "a com",
            "[::1]:443",
            "a.com/x",
        ] {
            assert_eq!(host(bad), None, "{bad}");
        }
        assert!(dns_label("myres-eastus").is_some());
        assert_eq!(dns_label("$(id)"), None);
        assert_eq!(dns_label(""), None);
    }

    #[test]
    fn resource_ids_are_arm_paths() {
        assert!(resource_id(
            "/subscriptions/0000/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1"
        )
        .is_some());
        assert_eq!(resource_id("/subscriptions/x;y"), None);
        assert_eq!(resource_id("subscriptions/x"), None);
    }

    #[test]
    fn free_text_keeps_printable_ascii_only_and_is_bounded() {
        assert_eq!(free_text("Identity not found", 100), "Identity not found");
        assert_eq!(free_text("a\r\nb\u{1b}[31mc", 100), "a??b?[31mc");
        assert_eq!(free_text("caf\u{e9}", 100), "caf?");
        assert_eq!(free_text("abcdef", 3), "abc...");
    }

    #[test]
    fn placeholders_stand_in_for_what_does_not_fit() {
        assert_eq!(
            or(Some("$(id)"), dns_label, "<resource name>"),
            "<resource name>"
        );
        assert_eq!(or(Some("myres"), dns_label, "<resource name>"), "myres");
        assert_eq!(or(None, dns_label, "<resource name>"), "<resource name>");
    }
}

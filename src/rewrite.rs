//! Which requests get the token, and what is done to their headers.
//!
//! Matching runs on every request, so it allocates nothing: patterns are
//! lower-cased once at configuration time and compared byte-wise, ignoring
//! ASCII case (as Envoy matches virtual hosts).
//!
//! Envoy routes on the full `Host`: with its default virtual-host matching,
//! `myres.openai.azure.com:443` and `myres.openai.azure.com.` are other
//! hosts, which a catch-all virtual host may send to another cluster. So a
//! target that does not name `clusters` matches only a bare host name
//! ([`HostPatterns::matches_bare`]); a target bound to clusters knows where
//! the request really goes, and may ignore the port and a trailing dot
//! ([`HostPatterns::matches_spelled`]).

/// Header the application's key arrives in; always removed on matching hosts.
pub const API_KEY_HEADER: &str = "api-key";
/// Header the token leaves in; replaced, never appended.
pub const AUTHORIZATION_HEADER: &str = "authorization";

/// One entry of `hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `myres.openai.azure.com`
    Exact(String),
    /// `*.openai.azure.com`, stored as `.openai.azure.com`: a host matches when
    /// it ends with this and has at least one character before it.
    Suffix(String),
    /// `*`: every host. Only in targets bound to clusters.
    Any,
}

impl HostPattern {
    /// Parse one pattern. The error says what is wrong with it.
    pub fn parse(text: &str) -> Result<HostPattern, String> {
        let lower = text.trim().to_ascii_lowercase();
        if lower == "*" {
            return Ok(HostPattern::Any);
        }
        let (suffix, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        if name.is_empty() {
            return Err("it has no name after `*.`".to_owned());
        }
        if name.contains('*') {
            return Err(
                "`*` is only allowed as a whole first label, as in `*.openai.azure.com`".to_owned(),
            );
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '.'))
        {
            return Err(format!(
                "`{bad}` cannot appear in a host name (no scheme, port or path)"
            ));
        }
        if name.starts_with('.') || name.ends_with('.') || name.contains("..") {
            return Err("it has an empty label".to_owned());
        }
        Ok(if suffix {
            HostPattern::Suffix(format!(".{name}"))
        } else {
            HostPattern::Exact(name.to_owned())
        })
    }

    /// The name part (`myres.openai.azure.com`, `.openai.azure.com`), if any.
    pub fn name(&self) -> Option<&str> {
        match self {
            HostPattern::Exact(name) | HostPattern::Suffix(name) => Some(name),
            HostPattern::Any => None,
        }
    }

    fn matches(&self, host: &[u8]) -> bool {
        match self {
            HostPattern::Exact(name) => host.eq_ignore_ascii_case(name.as_bytes()),
            HostPattern::Suffix(suffix) => {
                let suffix = suffix.as_bytes();
                host.len() > suffix.len()
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
            HostPattern::Any => true,
        }
    }

    /// Does every host `other` matches also match `self`?
    pub fn covers(&self, other: &HostPattern) -> bool {
        match (self, other) {
            (HostPattern::Any, _) => true,
            (_, HostPattern::Any) => false,
            (HostPattern::Exact(a), HostPattern::Exact(b)) => a == b,
            (HostPattern::Exact(_), HostPattern::Suffix(_)) => false,
            (HostPattern::Suffix(_), HostPattern::Exact(b)) => self.matches(b.as_bytes()),
            (HostPattern::Suffix(a), HostPattern::Suffix(b)) => b.ends_with(a.as_str()),
        }
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostPattern::Exact(name) => f.write_str(name),
            HostPattern::Suffix(suffix) => write!(f, "*{suffix}"),
            HostPattern::Any => f.write_str("*"),
        }
    }
}

/// The configured `hosts` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPatterns(Vec<HostPattern>);

impl HostPatterns {
    pub fn new(patterns: Vec<HostPattern>) -> Self {
        HostPatterns(patterns)
    }

    pub fn patterns(&self) -> &[HostPattern] {
        &self.0
    }

    /// For a target not bound to clusters: `:authority` must be a bare host
    /// name (no port, no trailing dot) that a pattern matches, because that
    /// is the only spelling Envoy's default virtual-host matching sends where
    /// the pattern says. Other spellings are refused, never guessed.
    pub fn matches_bare(&self, authority: &str) -> bool {
        let host = authority.as_bytes();
        !host.is_empty()
            && !host.contains(&b':')
            && !host.ends_with(b".")
            && self.0.iter().any(|p| p.matches(host))
    }

    /// For a target bound to clusters, where Envoy's routing is checked
    /// separately: the port and one trailing dot do not matter.
    pub fn matches_spelled(&self, authority: &str) -> bool {
        let host = host_without_port(authority).as_bytes();
        let host = host.strip_suffix(b".").unwrap_or(host);
        !host.is_empty() && self.0.iter().any(|p| p.matches(host))
    }

    /// Does every host `other` matches also match one of these?
    pub fn covers(&self, other: &HostPatterns) -> bool {
        other
            .0
            .iter()
            .all(|theirs| self.0.iter().any(|mine| mine.covers(theirs)))
    }
}

/// Clusters whose destination the client picks: Istio's `ORIGINAL_DST`
/// clusters (`PassthroughCluster` for outbound traffic under `ALLOW_ANY`, and
/// `InboundPassthroughCluster`, `…Ipv4`, `…Ipv6` for inbound), and the
/// dynamic-forward-proxy cluster of `ALLOW_ANY_DYNAMIC_DNS`
/// (`AllowAnyDynamicDNSCluster`: wherever the `Host` resolves, in plain
/// HTTP). istio/istio, pilot/pkg/networking/core/cluster_builder.go.
pub fn client_chosen(cluster: &str) -> bool {
    cluster == "PassthroughCluster"
        || cluster == "AllowAnyDynamicDNSCluster"
        || cluster.starts_with("InboundPassthroughCluster")
}

/// `host:port` → `host`; `[v6]:port` → `[v6]`.
pub fn host_without_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => &authority[..=end],
            None => authority,
        };
    }
    match authority.rsplit_once(':') {
        Some((host, _port)) => host,
        None => authority,
    }
}

/// `:path` without any `api-key` query parameter, or `None` when it has none
/// (the common case: nothing to rewrite). Browser clients of the Realtime API
/// send their key there. The name is compared percent-decoded and without
/// case, so no spelling of it survives; every other parameter, and the order
/// and bytes of the rest, stay as they were.
pub fn without_api_key_param(path: &str) -> Option<String> {
    let (base, query) = path.split_once('?')?;
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let is_key = |param: &str| {
        let name = param.split_once('=').map_or(param, |(n, _)| n);
        percent_decoded_eq_ignore_case(name, API_KEY_HEADER)
    };
    if !query.split('&').any(is_key) {
        return None;
    }
    let kept: Vec<&str> = query.split('&').filter(|p| !is_key(p)).collect();
    let mut out = String::with_capacity(path.len());
    out.push_str(base);
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    Some(out)
}

/// The value of the first `api-key` query parameter of `path`,
/// percent-decoded, as bytes; `None` when there is none (or it is empty).
pub fn api_key_param(path: &str) -> Option<Vec<u8>> {
    let path = path.split_once('#').map_or(path, |(p, _)| p);
    let (_, query) = path.split_once('?')?;
    query.split('&').find_map(|param| {
        let (name, value) = param.split_once('=').unwrap_or((param, ""));
        (percent_decoded_eq_ignore_case(name, API_KEY_HEADER) && !value.is_empty())
            .then(|| percent_decode(value))
    })
}

/// `%xx` and `+` decoded; anything else kept as it is.
fn percent_decode(encoded: &str) -> Vec<u8> {
    PercentDecoded(encoded.as_bytes()).collect()
}

/// The bytes of a query component, percent-decoded (`+` is a space; a `%`
/// not followed by two hex digits stands for itself), one at a time.
struct PercentDecoded<'a>(&'a [u8]);

impl Iterator for PercentDecoded<'_> {
    type Item = u8;

    fn next(&mut self) -> Option<u8> {
        let hex = |b: Option<&u8>| b.and_then(|b| char::from(*b).to_digit(16));
        let (&first, rest) = self.0.split_first()?;
        let (byte, taken) = match (first, hex(rest.first()), hex(rest.get(1))) {
            (b'%', Some(hi), Some(lo)) => ((hi * 16 + lo) as u8, 3),
            (b'+', _, _) => (b' ', 1),
            (b, _, _) => (b, 1),
        };
        self.0 = self.0.get(taken..).unwrap_or_default();
        Some(byte)
    }
}

/// Does `encoded`, percent-decoded, equal `plain` ignoring ASCII case? On
/// every query parameter of every request, so it compares in place: a name
/// without `%` is compared as it stands, and no name is copied.
fn percent_decoded_eq_ignore_case(encoded: &str, plain: &str) -> bool {
    if !encoded.contains(['%', '+']) {
        return encoded.eq_ignore_ascii_case(plain);
    }
    let mut decoded = PercentDecoded(encoded.as_bytes());
    plain.bytes().all(|want| {
        decoded
            .next()
            .is_some_and(|got| got.eq_ignore_ascii_case(&want))
    }) && decoded.next().is_none()
}

/// Format the value of the `authorization` header once per token, so the hot
/// path only copies a prepared string into the header map.
pub fn bearer_header(token: &str) -> String {
    let mut value = String::with_capacity(7 + token.len());
    value.push_str("Bearer ");
    value.push_str(token);
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns(list: &[&str]) -> HostPatterns {
        HostPatterns::new(
            list.iter()
                .map(|p| HostPattern::parse(p).unwrap())
                .collect(),
        )
    }

    #[test]
    fn suffix_pattern_matches_subdomains_case_insensitively() {
        let p = patterns(&["*.openai.azure.com"]);
        for host in [
            "myres.openai.azure.com",
            "MyRes.OpenAI.Azure.COM",
            "a.b.openai.azure.com",
        ] {
            assert!(p.matches_bare(host), "{host}");
            assert!(p.matches_spelled(host), "{host}");
        }
    }

    #[test]
    fn without_clusters_a_port_or_trailing_dot_spelling_never_matches() {
        // Envoy's default virtual-host matching routes these elsewhere.
        let p = patterns(&["*.openai.azure.com", "myres.example"]);
        for host in [
            "myres.openai.azure.com:443",
            "myres.openai.azure.com.",
            "myres.openai.azure.com.:443",
            "myres.example:80",
            "myres.example.",
        ] {
            assert!(!p.matches_bare(host), "{host}");
            assert!(p.matches_spelled(host), "with clusters: {host}");
        }
    }

    #[test]
    fn lookalike_hosts_never_match_a_suffix_pattern() {
        let p = patterns(&["*.openai.azure.com"]);
        for host in [
            "openai.azure.com",
            ".openai.azure.com",
            "xopenai.azure.com",
            "openai.azure.com.evil.example",
            "myres.openai.azure.com.evil.example",
            "myres.openai.azure.co",
            "",
            ":443",
            "[::1]:443",
            ".",
        ] {
            assert!(!p.matches_bare(host), "{host}");
            assert!(!p.matches_spelled(host), "{host}");
        }
    }

    #[test]
    fn exact_pattern_matches_only_that_host() {
        let p = patterns(&["MyRes.openai.azure.com"]);
        assert!(p.matches_bare("myres.openai.azure.com"));
        assert!(p.matches_spelled("myres.openai.azure.com:8443"));
        assert!(!p.matches_bare("other.openai.azure.com"));
        assert!(!p.matches_bare("x.myres.openai.azure.com"));
    }

    #[test]
    fn malformed_patterns_are_refused_with_a_reason() {
        for bad in [
            "*.",
            "*openai.azure.com",
            "a.*.azure.com",
            "https://x.openai.azure.com",
            "x.openai.azure.com:443",
            "x..azure.com",
            "x.openai.azure.com/path",
            "",
        ] {
            assert!(HostPattern::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(HostPattern::parse("*"), Ok(HostPattern::Any));
    }

    #[test]
    fn patterns_display_as_written() {
        for text in ["*.openai.azure.com", "a.example", "*"] {
            assert_eq!(HostPattern::parse(text).unwrap().to_string(), text);
        }
        assert_eq!(
            HostPattern::parse("*.Openai.azure.com")
                .unwrap()
                .to_string(),
            "*.openai.azure.com"
        );
    }

    #[test]
    fn coverage_follows_what_each_pattern_matches() {
        let p = |t| HostPattern::parse(t).unwrap();
        assert!(p("*.azure.com").covers(&p("*.openai.azure.com")));
        assert!(p("*.openai.azure.com").covers(&p("myres.openai.azure.com")));
        assert!(!p("*.openai.azure.com").covers(&p("*.azure.com")));
        assert!(!p("*.openai.azure.com").covers(&p("openai.azure.com")));
        assert!(!p("myres.openai.azure.com").covers(&p("*.openai.azure.com")));
        assert!(p("*").covers(&p("*.openai.azure.com")));
        assert!(!p("*.openai.azure.com").covers(&p("*")));
        assert!(patterns(&["*.openai.azure.com", "a.example"])
            .covers(&patterns(&["a.example", "x.openai.azure.com"])));
        assert!(!patterns(&["*.openai.azure.com"]).covers(&patterns(&["a.example"])));
    }

    #[test]
    fn ports_are_removed_from_names_and_bracketed_addresses() {
        assert_eq!(
            host_without_port("myres.openai.azure.com:443"),
            "myres.openai.azure.com"
        );
        assert_eq!(
            host_without_port("myres.openai.azure.com"),
            "myres.openai.azure.com"
        );
        assert_eq!(host_without_port("[::1]:10000"), "[::1]");
        assert_eq!(host_without_port("127.0.0.1:10000"), "127.0.0.1");
    }

    #[test]
    fn the_api_key_query_parameter_is_read_decoded() {
        assert_eq!(
            api_key_param("/openai/realtime?api-version=x&api-key=k%2B1+2&deployment=d"),
            Some(b"k+1 2".to_vec())
        );
        assert_eq!(api_key_param("/x?API%2DKEY=k"), Some(b"k".to_vec()));
        assert_eq!(api_key_param("/x?api-key="), None);
        assert_eq!(api_key_param("/x?api-keys=k"), None);
        assert_eq!(api_key_param("/x"), None);
        assert_eq!(api_key_param("/x#?api-key=k"), None);
    }

    #[test]
    fn the_api_key_query_parameter_goes_and_nothing_else_changes() {
        for (path, expected) in [
            (
                "/openai/realtime?api-version=2024-10-01-preview&deployment=gpt-4o&api-key=SECRET",
                Some("/openai/realtime?api-version=2024-10-01-preview&deployment=gpt-4o"),
            ),
            (
                "/openai/v1/realtime?api-key=SECRET&model=gpt-4o",
                Some("/openai/v1/realtime?model=gpt-4o"),
            ),
            ("/x?api-key=a&api-key=b", Some("/x")),
            ("/x?API-Key=a&b=%20c&d", Some("/x?b=%20c&d")),
            ("/x?api%2Dkey=a&keep=1", Some("/x?keep=1")),
            ("/x?api-key&z=1#frag", Some("/x?z=1#frag")),
            ("/x?a=1&&b=2&api-key=k", Some("/x?a=1&&b=2")),
        ] {
            assert_eq!(without_api_key_param(path).as_deref(), expected, "{path}");
        }
        for untouched in [
            "/x",
            "/x?api-keys=1",
            "/x?my-api-key=1",
            "/x?x=api-key",
            "/api-key?a=1",
            "/x?",
        ] {
            assert_eq!(without_api_key_param(untouched), None, "{untouched}");
        }
    }

    #[test]
    fn a_parameter_name_is_compared_decoded_whatever_its_encoding() {
        for name in [
            "api-key",
            "API-KEY",
            "api%2Dkey",
            "%61pi-ke%79",
            "%41PI%2dKEY",
        ] {
            assert!(percent_decoded_eq_ignore_case(name, "api-key"), "{name}");
        }
        for name in [
            "api-ke",
            "api-keyy",
            "api-key%",
            "api-key%2",
            "api%2-key",
            "api+key",
            "api%20key",
            "",
            "%",
            "api-key%00",
        ] {
            assert!(!percent_decoded_eq_ignore_case(name, "api-key"), "{name}");
        }
    }

    #[cfg(not(target_arch = "wasm32"))]
    proptest::proptest! {
        #[test]
        fn comparing_in_place_agrees_with_decoding_first(name in "[aApPiIkKeEyY%2dD+0-9-]{0,12}") {
            proptest::prop_assert_eq!(
                percent_decoded_eq_ignore_case(&name, "api-key"),
                percent_decode(&name).eq_ignore_ascii_case(b"api-key")
            );
        }
    }

    #[test]
    fn bearer_header_prefixes_the_scheme() {
        assert_eq!(bearer_header("eyJ.a.b"), "Bearer eyJ.a.b");
    }
}

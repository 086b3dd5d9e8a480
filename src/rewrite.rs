//! Which requests get the token, and what is done to their headers.
//!
//! Matching runs on every request, so it allocates nothing: patterns are
//! lower-cased once at configuration time and compared byte-wise, ignoring
//! ASCII case, against the request's `:authority` with its port removed.

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
}

impl HostPattern {
    /// Parse one pattern. The error says what is wrong with it.
    pub fn parse(text: &str) -> Result<HostPattern, String> {
        let lower = text.trim().to_ascii_lowercase();
        let (suffix, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        if name.is_empty() {
            return Err("it matches every host".to_owned());
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

    fn matches(&self, host: &[u8]) -> bool {
        match self {
            HostPattern::Exact(name) => host.eq_ignore_ascii_case(name.as_bytes()),
            HostPattern::Suffix(suffix) => {
                let suffix = suffix.as_bytes();
                host.len() > suffix.len()
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
        }
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostPattern::Exact(name) => f.write_str(name),
            HostPattern::Suffix(suffix) => write!(f, "*{suffix}"),
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

    /// Does a request with this `:authority` get the token?
    pub fn matches(&self, authority: &str) -> bool {
        let host = host_without_port(authority).as_bytes();
        // A fully qualified name may end in a dot; it names the same host.
        let host = host.strip_suffix(b".").unwrap_or(host);
        !host.is_empty() && self.0.iter().any(|p| p.matches(host))
    }
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
    fn suffix_pattern_matches_subdomains_case_insensitively_and_ignores_the_port() {
        let p = patterns(&["*.openai.azure.com"]);
        for host in [
            "myres.openai.azure.com",
            "MyRes.OpenAI.Azure.COM",
            "myres.openai.azure.com:443",
            "a.b.openai.azure.com",
            "myres.openai.azure.com.",
        ] {
            assert!(p.matches(host), "{host}");
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
        ] {
            assert!(!p.matches(host), "{host}");
        }
    }

    #[test]
    fn exact_pattern_matches_only_that_host() {
        let p = patterns(&["MyRes.openai.azure.com"]);
        assert!(p.matches("myres.openai.azure.com"));
        assert!(p.matches("myres.openai.azure.com:8443"));
        assert!(!p.matches("other.openai.azure.com"));
        assert!(!p.matches("x.myres.openai.azure.com"));
    }

    #[test]
    fn malformed_patterns_are_refused_with_a_reason() {
        for bad in [
            "*",
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
    }

    #[test]
    fn patterns_display_as_written() {
        assert_eq!(
            HostPattern::parse("*.Openai.azure.com")
                .unwrap()
                .to_string(),
            "*.openai.azure.com"
        );
        assert_eq!(
            HostPattern::parse("a.example").unwrap().to_string(),
            "a.example"
        );
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
    fn bearer_header_prefixes_the_scheme() {
        assert_eq!(bearer_header("eyJ.a.b"), "Bearer eyJ.a.b");
    }
}

//! Plugin configuration: the JSON contract of DESIGN.md, checked into a typed
//! [`Config`] whose errors name the offending field and the fix.
//!
//! Parsing walks a `serde_json::Value` by hand rather than deriving: the error a
//! platform engineer sees in the Envoy log must say *which* field is wrong and
//! what to write instead, which serde's positional messages do not.

use std::fmt;

use serde_json::{Map, Value};

use crate::rewrite::{HostPattern, HostPatterns};

/// Defaults of the configuration contract.
pub const DEFAULT_CLUSTER: &str = "azure_imds";
pub const DEFAULT_AUTHORITY: &str = "169.254.169.254";
pub const DEFAULT_RESOURCE: &str = "https://cognitiveservices.azure.com";
pub const DEFAULT_HOSTS: [&str; 3] = [
    "*.openai.azure.com",
    "*.cognitiveservices.azure.com",
    "*.services.ai.azure.com",
];
/// Timeout of one token call.
pub const DEFAULT_FETCH_TIMEOUT_MS: u64 = 10_000;
pub const MAX_FETCH_TIMEOUT_MS: u64 = 60_000;
/// How long a request may wait for the first token before it gets a diagnosis.
pub const DEFAULT_TOKEN_WAIT_MS: u64 = 5_000;
/// How often, at most, a token the upstream rejected is dropped and refetched.
pub const DEFAULT_INVALIDATION_INTERVAL_MS: u64 = 60_000;
pub const MAX_INVALIDATION_INTERVAL_MS: u64 = 3_600_000;
/// Upper bound on `token_wait_timeout_ms`: beyond it a client times out first.
pub const MAX_TOKEN_WAIT_MS: u64 = 120_000;

/// A checked plugin configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub token_source: TokenSource,
    pub hosts: HostPatterns,
    /// App ID URI of the audience, without `/.default` (IMDS wants it bare).
    pub resource: String,
    /// Longest time a request is held while no usable token exists.
    pub token_wait_timeout_ms: u64,
    /// Minimum time between two invalidations of a rejected token.
    pub invalidation_interval_ms: u64,
}

/// Where tokens come from. Only IMDS today; the enum is the extension point
/// for App Service identity and client credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    Imds(ImdsSource),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImdsSource {
    /// Envoy cluster the token call is dispatched to.
    pub cluster: String,
    /// `:authority` of the token call.
    pub authority: String,
    pub identity: IdentitySelector,
    /// Timeout of one token call.
    pub timeout_ms: u64,
}

/// Which managed identity IMDS should issue a token for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentitySelector {
    /// No selector: the system-assigned identity, or the only user-assigned one.
    Default,
    ClientId(String),
    ObjectId(String),
    ResourceId(String),
}

impl IdentitySelector {
    /// The IMDS query parameter and its value, if any.
    pub fn query_param(&self) -> Option<(&'static str, &str)> {
        match self {
            IdentitySelector::Default => None,
            IdentitySelector::ClientId(v) => Some(("client_id", v)),
            IdentitySelector::ObjectId(v) => Some(("object_id", v)),
            IdentitySelector::ResourceId(v) => Some(("msi_res_id", v)),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            token_source: TokenSource::Imds(ImdsSource {
                cluster: DEFAULT_CLUSTER.to_owned(),
                authority: DEFAULT_AUTHORITY.to_owned(),
                identity: IdentitySelector::Default,
                timeout_ms: DEFAULT_FETCH_TIMEOUT_MS,
            }),
            hosts: HostPatterns::new(
                DEFAULT_HOSTS
                    .iter()
                    .filter_map(|p| HostPattern::parse(p).ok())
                    .collect(),
            ),
            resource: DEFAULT_RESOURCE.to_owned(),
            token_wait_timeout_ms: DEFAULT_TOKEN_WAIT_MS,
            invalidation_interval_ms: DEFAULT_INVALIDATION_INTERVAL_MS,
        }
    }
}

/// Why a configuration was refused. `Display` names the field and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    NotJson(String),
    NotAnObject {
        field: String,
    },
    UnknownField {
        field: String,
        expected: &'static [&'static str],
    },
    WrongType {
        field: String,
        expected: &'static str,
    },
    Invalid {
        field: String,
        problem: String,
        fix: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::NotJson(e) => write!(
                f,
                "configuration is not valid JSON ({e}); write a JSON object such as {{}} or {{\"resource\":\"{DEFAULT_RESOURCE}\"}}"
            ),
            ConfigError::NotAnObject { field } => {
                write!(f, "`{field}` must be a JSON object")
            }
            ConfigError::UnknownField { field, expected } => write!(
                f,
                "unknown field `{field}`; remove it or use one of: {}",
                expected.join(", ")
            ),
            ConfigError::WrongType { field, expected } => {
                write!(f, "`{field}` must be {expected}")
            }
            ConfigError::Invalid {
                field,
                problem,
                fix,
            } => write!(f, "`{field}` {problem}; {fix}"),
        }
    }
}

impl std::error::Error for ConfigError {}

const TOP_FIELDS: &[&str] = &[
    "token_source",
    "hosts",
    "resource",
    "token_wait_timeout_ms",
    "invalidation_interval_ms",
];
const SOURCE_FIELDS: &[&str] = &[
    "type",
    "cluster",
    "authority",
    "client_id",
    "object_id",
    "msi_res_id",
    "timeout_ms",
];

impl Config {
    /// Parse the bytes Envoy hands to `on_configure`. Empty means defaults.
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Config::default());
        }
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::NotJson(e.to_string()))?;
        Config::from_value(&value)
    }

    pub fn from_value(value: &Value) -> Result<Config, ConfigError> {
        let top = object(value, "configuration")?;
        reject_unknown(top, "", TOP_FIELDS)?;
        let mut config = Config::default();
        if let Some(source) = top.get("token_source") {
            config.token_source = parse_source(source)?;
        }
        if let Some(hosts) = top.get("hosts") {
            config.hosts = parse_hosts(hosts)?;
        }
        if let Some(resource) = top.get("resource") {
            config.resource = parse_resource(resource)?;
        }
        if let Some(wait) = top.get("token_wait_timeout_ms") {
            config.token_wait_timeout_ms = milliseconds(
                wait,
                "token_wait_timeout_ms",
                1,
                MAX_TOKEN_WAIT_MS,
                DEFAULT_TOKEN_WAIT_MS,
            )?;
        }
        if let Some(interval) = top.get("invalidation_interval_ms") {
            config.invalidation_interval_ms = milliseconds(
                interval,
                "invalidation_interval_ms",
                1_000,
                MAX_INVALIDATION_INTERVAL_MS,
                DEFAULT_INVALIDATION_INTERVAL_MS,
            )?;
        }
        Ok(config)
    }

    pub fn imds(&self) -> &ImdsSource {
        match &self.token_source {
            TokenSource::Imds(imds) => imds,
        }
    }

    /// A stable name for everything that decides *which* token is fetched.
    /// Shared-data records are keyed by it, so workers running an old and a
    /// new configuration side by side never hand each other tokens.
    pub fn token_fingerprint(&self) -> String {
        let imds = self.imds();
        let (selector, value) = imds.identity.query_param().unwrap_or(("system", ""));
        let canonical = format!(
            "imds\n{}\n{}\n{}={}\n{}",
            imds.cluster, imds.authority, selector, value, self.resource
        );
        format!("{:016x}", fnv1a64(canonical.as_bytes()))
    }
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn object<'a>(value: &'a Value, field: &str) -> Result<&'a Map<String, Value>, ConfigError> {
    value.as_object().ok_or_else(|| ConfigError::NotAnObject {
        field: field.to_owned(),
    })
}

fn reject_unknown(
    map: &Map<String, Value>,
    prefix: &str,
    known: &'static [&'static str],
) -> Result<(), ConfigError> {
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        Some(unknown) => Err(ConfigError::UnknownField {
            field: format!("{prefix}{unknown}"),
            expected: known,
        }),
        None => Ok(()),
    }
}

fn string<'a>(value: &'a Value, field: &str) -> Result<&'a str, ConfigError> {
    value.as_str().ok_or_else(|| ConfigError::WrongType {
        field: field.to_owned(),
        expected: "a string",
    })
}

fn non_empty<'a>(value: &'a Value, field: &str, fix: &str) -> Result<&'a str, ConfigError> {
    let s = string(value, field)?.trim();
    if s.is_empty() {
        return Err(ConfigError::Invalid {
            field: field.to_owned(),
            problem: "is empty".to_owned(),
            fix: fix.to_owned(),
        });
    }
    Ok(s)
}

fn parse_source(value: &Value) -> Result<TokenSource, ConfigError> {
    let map = object(value, "token_source")?;
    reject_unknown(map, "token_source.", SOURCE_FIELDS)?;
    if let Some(kind) = map.get("type") {
        let kind = string(kind, "token_source.type")?;
        if kind != "imds" {
            return Err(ConfigError::Invalid {
                field: "token_source.type".to_owned(),
                problem: format!("is \"{kind}\", which this version does not support"),
                fix: "use \"imds\" (the Azure Instance Metadata Service)".to_owned(),
            });
        }
    }
    let cluster = match map.get("cluster") {
        Some(v) => non_empty(
            v,
            "token_source.cluster",
            "name the Envoy cluster that reaches IMDS, e.g. \"azure_imds\"",
        )?
        .to_owned(),
        None => DEFAULT_CLUSTER.to_owned(),
    };
    let authority = match map.get("authority") {
        Some(v) => {
            let a = non_empty(
                v,
                "token_source.authority",
                "use the IMDS host, \"169.254.169.254\"",
            )?;
            if a.contains(['/', ' ', '?', '#']) {
                return Err(ConfigError::Invalid {
                    field: "token_source.authority".to_owned(),
                    problem: format!("is \"{a}\", which is not a host[:port]"),
                    fix: "write only the host, e.g. \"169.254.169.254\"".to_owned(),
                });
            }
            a.to_owned()
        }
        None => DEFAULT_AUTHORITY.to_owned(),
    };
    let mut selectors = Vec::new();
    for (name, make) in [
        ("client_id", IdentitySelector::ClientId as fn(String) -> _),
        ("object_id", IdentitySelector::ObjectId),
        ("msi_res_id", IdentitySelector::ResourceId),
    ] {
        if let Some(v) = map.get(name) {
            let field = format!("token_source.{name}");
            let s = non_empty(
                v,
                &field,
                "remove the field to use the VM's only identity, or give the identity's id",
            )?;
            if !s.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigError::Invalid {
                    field,
                    problem: "contains spaces or control characters".to_owned(),
                    fix: "copy the id from `az identity show` without surrounding text".to_owned(),
                });
            }
            selectors.push((name, make(s.to_owned())));
        }
    }
    if selectors.len() > 1 {
        let names: Vec<String> = selectors
            .iter()
            .map(|(n, _)| format!("token_source.{n}"))
            .collect();
        return Err(ConfigError::Invalid {
            field: names.join(" / "),
            problem: "are set together, but IMDS accepts only one identity selector".to_owned(),
            fix: "keep exactly one of client_id, object_id, msi_res_id".to_owned(),
        });
    }
    let identity = selectors
        .pop()
        .map_or(IdentitySelector::Default, |(_, s)| s);
    let timeout_ms = match map.get("timeout_ms") {
        Some(v) => milliseconds(
            v,
            "token_source.timeout_ms",
            100,
            MAX_FETCH_TIMEOUT_MS,
            DEFAULT_FETCH_TIMEOUT_MS,
        )?,
        None => DEFAULT_FETCH_TIMEOUT_MS,
    };
    Ok(TokenSource::Imds(ImdsSource {
        cluster,
        authority,
        identity,
        timeout_ms,
    }))
}

fn parse_hosts(value: &Value) -> Result<HostPatterns, ConfigError> {
    let items = value.as_array().ok_or_else(|| ConfigError::WrongType {
        field: "hosts".to_owned(),
        expected: "a list of host patterns such as [\"*.openai.azure.com\"]",
    })?;
    if items.is_empty() {
        return Err(ConfigError::Invalid {
            field: "hosts".to_owned(),
            problem: "is empty, so no request would ever be authorized".to_owned(),
            fix: "list at least one host, or remove the field for the Azure OpenAI defaults"
                .to_owned(),
        });
    }
    let mut patterns = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let field = format!("hosts[{i}]");
        let text = string(item, &field)?;
        let pattern = HostPattern::parse(text).map_err(|problem| ConfigError::Invalid {
            field,
            problem: format!("is \"{text}\": {problem}"),
            fix: "write an exact host (\"myres.openai.azure.com\") or a suffix pattern (\"*.openai.azure.com\")".to_owned(),
        })?;
        patterns.push(pattern);
    }
    Ok(HostPatterns::new(patterns))
}

fn parse_resource(value: &Value) -> Result<String, ConfigError> {
    let r = non_empty(
        value,
        "resource",
        &format!("remove it for \"{DEFAULT_RESOURCE}\""),
    )?;
    if let Some(bare) = r.strip_suffix("/.default") {
        return Err(ConfigError::Invalid {
            field: "resource".to_owned(),
            problem: format!("is \"{r}\", a v2 scope; IMDS wants the bare App ID URI"),
            fix: format!("write \"{bare}\""),
        });
    }
    let scheme_ok = r.starts_with("https://") || r.starts_with("api://");
    if !scheme_ok || r.contains(char::is_whitespace) {
        return Err(ConfigError::Invalid {
            field: "resource".to_owned(),
            problem: format!("is \"{r}\", which is not an App ID URI"),
            fix: format!("use an https:// URI such as \"{DEFAULT_RESOURCE}\""),
        });
    }
    Ok(r.to_owned())
}

fn milliseconds(
    value: &Value,
    field: &str,
    min: u64,
    max: u64,
    default: u64,
) -> Result<u64, ConfigError> {
    let ms = value.as_u64().ok_or_else(|| ConfigError::WrongType {
        field: field.to_owned(),
        expected: "a whole number of milliseconds",
    })?;
    if !(min..=max).contains(&ms) {
        return Err(ConfigError::Invalid {
            field: field.to_owned(),
            problem: format!("is {ms}"),
            fix: format!("use a value from {min} to {max} (default {default})"),
        });
    }
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        Config::parse(json.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn empty_object_and_empty_bytes_give_the_documented_defaults() {
        let from_object = Config::parse(b"{}").unwrap();
        let from_nothing = Config::parse(b"  ").unwrap();
        assert_eq!(from_object, from_nothing);
        let imds = from_object.imds();
        assert_eq!(imds.cluster, "azure_imds");
        assert_eq!(imds.authority, "169.254.169.254");
        assert_eq!(imds.identity, IdentitySelector::Default);
        assert_eq!(from_object.resource, "https://cognitiveservices.azure.com");
        assert!(from_object.hosts.matches("myres.openai.azure.com"));
        assert!(from_object
            .hosts
            .matches("myres.cognitiveservices.azure.com"));
        assert!(from_object.hosts.matches("proj.services.ai.azure.com"));
        assert_eq!(from_object.token_wait_timeout_ms, 5_000);
    }

    #[test]
    fn full_configuration_is_read_field_by_field() {
        let c = Config::parse(
            br#"{"token_source":{"type":"imds","cluster":"outbound|80||imds.azure.internal",
                 "authority":"imds.azure.internal","client_id":"1111-2222","timeout_ms":750},
                 "hosts":["myres.openai.azure.com"],"resource":"https://cognitiveservices.azure.us",
                 "token_wait_timeout_ms":2500}"#,
        )
        .unwrap();
        let imds = c.imds();
        assert_eq!(imds.cluster, "outbound|80||imds.azure.internal");
        assert_eq!(imds.authority, "imds.azure.internal");
        assert_eq!(
            imds.identity,
            IdentitySelector::ClientId("1111-2222".into())
        );
        assert!(c.hosts.matches("MyRes.OpenAI.Azure.com:443"));
        assert!(!c.hosts.matches("other.openai.azure.com"));
        assert_eq!(c.resource, "https://cognitiveservices.azure.us");
        assert_eq!(c.token_wait_timeout_ms, 2500);
    }

    #[test]
    fn each_alternative_selector_is_accepted_alone() {
        let o = Config::parse(br#"{"token_source":{"object_id":"oid-1"}}"#).unwrap();
        assert_eq!(
            o.imds().identity,
            IdentitySelector::ObjectId("oid-1".into())
        );
        let r = Config::parse(br#"{"token_source":{"msi_res_id":"/subscriptions/s/x"}}"#).unwrap();
        assert_eq!(
            r.imds().identity,
            IdentitySelector::ResourceId("/subscriptions/s/x".into())
        );
    }

    #[test]
    fn rejected_configurations_name_the_field_and_the_fix() {
        let table: &[(&str, &str, &str)] = &[
            (r#"{"resorce":"x"}"#, "unknown field `resorce`", "resource"),
            (
                r#"{"token_source":{"clientid":"x"}}"#,
                "unknown field `token_source.clientid`",
                "client_id",
            ),
            (
                r#"{"hosts":"*.openai.azure.com"}"#,
                "`hosts` must be a list",
                "*.openai.azure.com",
            ),
            (r#"{"hosts":[]}"#, "`hosts` is empty", "at least one host"),
            (
                r#"{"hosts":["*openai.azure.com"]}"#,
                "`hosts[0]`",
                "suffix pattern",
            ),
            (
                r#"{"hosts":["ok.example", "https://x.openai.azure.com"]}"#,
                "`hosts[1]`",
                "exact host",
            ),
            (r#"{"hosts":[7]}"#, "`hosts[0]` must be a string", ""),
            (
                r#"{"resource":"https://cognitiveservices.azure.com/.default"}"#,
                "`resource`",
                "write \"https://cognitiveservices.azure.com\"",
            ),
            (
                r#"{"resource":"cognitiveservices"}"#,
                "not an App ID URI",
                "https://",
            ),
            (
                r#"{"token_source":{"type":"workload"}}"#,
                "`token_source.type`",
                "\"imds\"",
            ),
            (
                r#"{"token_source":{"cluster":""}}"#,
                "`token_source.cluster` is empty",
                "azure_imds",
            ),
            (
                r#"{"token_source":{"cluster":5}}"#,
                "`token_source.cluster` must be a string",
                "",
            ),
            (
                r#"{"token_source":{"client_id":"a","object_id":"b"}}"#,
                "token_source.client_id / token_source.object_id",
                "exactly one",
            ),
            (
                r#"{"token_wait_timeout_ms":0}"#,
                "`token_wait_timeout_ms` is 0",
                "1 to 120000",
            ),
            (r#"{"token_wait_timeout_ms":"5s"}"#, "milliseconds", ""),
            (
                r#"{"token_source":{"timeout_ms":50}}"#,
                "`token_source.timeout_ms` is 50",
                "100 to 60000",
            ),
            (r#"[]"#, "`configuration` must be a JSON object", ""),
            (r#"{"hosts":"#, "not valid JSON", "{}"),
        ];
        for (json, field, fix) in table {
            let message = err(json);
            assert!(message.contains(field), "{json}: {message}");
            assert!(message.contains(fix), "{json}: {message}");
        }
    }

    #[test]
    fn fingerprint_changes_with_what_decides_the_token_and_only_that() {
        let base = Config::parse(b"{}").unwrap().token_fingerprint();
        let hosts = Config::parse(br#"{"hosts":["a.example"]}"#).unwrap();
        assert_eq!(hosts.token_fingerprint(), base);
        for other in [
            r#"{"resource":"https://ml.azure.com"}"#,
            r#"{"token_source":{"client_id":"c"}}"#,
            r#"{"token_source":{"object_id":"c"}}"#,
            r#"{"token_source":{"cluster":"other"}}"#,
        ] {
            let fp = Config::parse(other.as_bytes()).unwrap().token_fingerprint();
            assert_ne!(fp, base, "{other}");
        }
    }
}

//! The targets, as read (the shorthand already rewritten into `targets`):
//! each checked (name, hosts, paths, clusters, resource, cloud, policy) and
//! compiled into the plan, with the distinct tokens they use.

use super::defaults::*;
use super::raw::{RawClientKey, RawConfig, Written};
use super::{Config, Target, TokenSpec};
use crate::azure::{self, Cloud, Service};
use crate::fields::checks::milliseconds;
use crate::fields::errors::{invalid, ConfigError};
use crate::fields::Env;
use crate::policy::{sha256_hex, ClientKeys, ClientToken, OnTokenFailure, Policy};
use crate::rewrite::{HostPattern, HostPatterns};
use crate::source::Source;

impl<'a> TryFrom<(RawConfig, Env<'a>)> for Config {
    type Error = ConfigError;

    fn try_from((raw, env): (RawConfig, Env<'a>)) -> Result<Config, ConfigError> {
        let token_wait_timeout_ms = milliseconds(
            raw.token_wait_timeout_ms,
            "token_wait_timeout_ms",
            1,
            MAX_TOKEN_WAIT_MS,
            DEFAULT_TOKEN_WAIT_MS,
        )?;
        let invalidation_interval_ms = milliseconds(
            raw.invalidation_interval_ms,
            "invalidation_interval_ms",
            1_000,
            MAX_INVALIDATION_INTERVAL_MS,
            DEFAULT_INVALIDATION_INTERVAL_MS,
        )?;
        let written = raw.written;
        if let Written::Targets { beside: Some(key) } = written {
            return Err(invalid(
                format!("targets` and `{key}"),
                "are both set at the top level",
                format!("move `{key}` into each target that needs it (the shorthand and `targets` are exclusive)"),
            ));
        }
        let raw_targets = raw.targets.unwrap_or_default();
        if raw_targets.is_empty() {
            return Err(invalid(
                "targets",
                "is empty, so no request would ever be authorized",
                "list at least one target, or remove the field for the Azure OpenAI defaults",
            ));
        }
        if raw_targets.len() > MAX_TARGETS {
            return Err(invalid(
                "targets",
                format!("has {} entries", raw_targets.len()),
                format!("use at most {MAX_TARGETS}, with wildcard hosts where possible"),
            ));
        }
        let mut targets: Vec<Target> = Vec::with_capacity(raw_targets.len());
        let mut tokens: Vec<TokenSpec> = Vec::new();
        for (index, raw) in raw_targets.into_iter().enumerate() {
            let prefix = written.prefix(index);
            let prefetch = written.prefetch(index);
            let name = raw.name.unwrap_or_else(|| format!("target-{index}"));
            let field = |name: &str| format!("{prefix}{name}");
            let name = check_name(&name, &field("name"))?;
            if let Some(other) = targets.iter().find(|t| t.name == name) {
                return Err(invalid(
                    field("name"),
                    format!("is \"{name}\", which another target already has"),
                    format!(
                        "give each target its own name (\"{}\" is taken)",
                        other.name
                    ),
                ));
            }
            let clusters = check_clusters(raw.clusters.as_deref(), &field("clusters"))?;
            let hosts = check_hosts(raw.hosts.as_deref(), &field("hosts"), !clusters.is_empty())?;
            let paths = check_paths(raw.paths.as_deref(), &field("paths"))?;
            let source = Source::configure(raw.token_source, &field("token_source"), env)?;
            let resource = match raw.resource.as_deref() {
                Some(r) => check_resource(r, &field("resource"))?,
                None => default_resource(&hosts, &paths, &prefix)?
                    .unwrap_or_else(|| Cloud::audience(source.cloud()).to_owned()),
            };
            check_cloud(&source, &resource, &prefix, raw.resource.is_some())?;
            let spec = TokenSpec {
                source,
                resource,
                token_wait_timeout_ms,
                invalidation_interval_ms,
                label: name.clone(),
                prefetch,
            };
            let fingerprint = spec.fingerprint();
            let token = match tokens.iter().position(|t| t.fingerprint() == fingerprint) {
                Some(known) => {
                    tokens[known].prefetch |= prefetch;
                    known
                }
                None => {
                    tokens.push(spec);
                    tokens.len() - 1
                }
            };
            let policy = check_policy(
                raw.on_token_failure,
                raw.client_token,
                raw.client_keys,
                &prefix,
            )?;
            let target = Target {
                name,
                hosts,
                paths,
                clusters,
                token,
                policy,
            };
            if let Some((earlier, _)) = targets
                .iter()
                .enumerate()
                .find(|(_, earlier)| earlier.shadows(&target))
            {
                return Err(invalid(
                    prefix.trim_end_matches('.'),
                    format!(
                        "(\"{}\") can never match: targets[{earlier}] (\"{}\") comes first and matches every request it would",
                        target.name, targets[earlier].name
                    ),
                    "put the more specific target first, or remove it",
                ));
            }
            targets.push(target);
        }
        Ok(Config { targets, tokens })
    }
}

/// Names appear in metric labels and log lines.
fn check_name(name: &str, field: &str) -> Result<String, ConfigError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(name.to_owned())
    } else {
        // Repeated only if it is almost a name (a space, say): anything else
        // may be something pasted by mistake.
        let almost = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b' ' | b'-' | b'_' | b'.'));
        let problem = if almost {
            format!("is \"{name}\"")
        } else {
            format!("is not a name ({} characters)", name.chars().count())
        };
        Err(invalid(
            field,
            problem,
            "use 1 to 64 letters, digits, '-', '_' or '.', such as \"chat-east\"",
        ))
    }
}

fn check_clusters(clusters: Option<&[String]>, field: &str) -> Result<Vec<String>, ConfigError> {
    let Some(clusters) = clusters else {
        return Ok(Vec::new());
    };
    if clusters.is_empty() {
        return Err(invalid(
            field,
            "is empty, so no request could match",
            "name the Envoy clusters this target's requests are routed to, or remove the field",
        ));
    }
    for (i, cluster) in clusters.iter().enumerate() {
        if cluster.is_empty() || !cluster.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                format!("{field}[{i}]"),
                "is not an Envoy cluster name (it is empty, or has spaces or other characters Envoy's names never have)",
                "write the cluster name exactly as in the Envoy config (Istio: outbound|<port>||<host>)",
            ));
        }
    }
    if let Some(i) = clusters
        .iter()
        .position(|c| crate::rewrite::client_chosen(c))
    {
        return Err(invalid(
            format!("{field}[{i}]"),
            format!(
                "is \"{}\", an original-destination cluster: the client picks where its requests go",
                clusters[i]
            ),
            "name the cluster of a ServiceEntry or of the resource itself; never lend the identity to PassthroughCluster",
        ));
    }
    Ok(clusters.to_vec())
}

fn check_hosts(
    hosts: Option<&[String]>,
    field: &str,
    cluster_bound: bool,
) -> Result<HostPatterns, ConfigError> {
    let Some(hosts) = hosts else {
        return Ok(HostPatterns::new(
            DEFAULT_HOSTS
                .iter()
                .filter_map(|p| HostPattern::parse(p).ok())
                .collect(),
        ));
    };
    if hosts.is_empty() {
        return Err(invalid(
            field,
            "is empty, so no request would ever be authorized",
            "list at least one host, or remove the field for the Azure OpenAI defaults",
        ));
    }
    let mut patterns = Vec::with_capacity(hosts.len());
    for (i, text) in hosts.iter().enumerate() {
        let field = format!("{field}[{i}]");
        let pattern = HostPattern::parse(text).map_err(|problem| {
            invalid(
                &field,
                format!("is not a host pattern: {problem}"),
                "write an exact host (\"myres.openai.azure.com\") or a suffix pattern (\"*.openai.azure.com\")",
            )
        })?;
        if pattern == HostPattern::Any && !cluster_bound {
            return Err(invalid(
                field,
                "is \"*\", which matches every host",
                "allowed only in a target that names `clusters`: the cluster Envoy routes to then decides",
            ));
        }
        patterns.push(pattern);
    }
    Ok(HostPatterns::new(patterns))
}

fn check_paths(paths: Option<&[String]>, field: &str) -> Result<Vec<String>, ConfigError> {
    let Some(paths) = paths else {
        return Ok(Vec::new());
    };
    if paths.is_empty() {
        return Err(invalid(
            field,
            "is empty, so no request could match",
            "list path prefixes such as \"/api/projects/\", or remove the field for every path",
        ));
    }
    for (i, path) in paths.iter().enumerate() {
        let ok = path.starts_with('/')
            && path.len() <= 1024
            && path
                .bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b'?' | b'#'));
        if !ok {
            // Repeated only when it is a path without its leading '/'.
            let relative = path.contains('/')
                && path.len() <= 200
                && path
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.'));
            return Err(invalid(
                format!("{field}[{i}]"),
                if relative {
                    format!("is \"{path}\", which is not a path prefix")
                } else {
                    "is not a path prefix".to_owned()
                },
                "start it with '/', without query or fragment, such as \"/api/projects/\"",
            ));
        }
    }
    Ok(paths.to_vec())
}

fn check_resource(r: &str, field: &str) -> Result<String, ConfigError> {
    let r = r.trim();
    if r.is_empty() {
        return Err(invalid(
            field,
            "is empty",
            "remove it to have it derived from the hosts, or write an App ID URI",
        ));
    }
    if let Some(bare) = r.strip_suffix("/.default") {
        let fix = match crate::safe::audience(bare) {
            Some(bare) => format!("write \"{bare}\""),
            None => "write the App ID URI without /.default".to_owned(),
        };
        return Err(invalid(
            field,
            "is a v2 scope (it ends in /.default); IMDS wants the bare App ID URI",
            fix,
        ));
    }
    let scheme_ok = r.starts_with("https://") || r.starts_with("api://");
    if !scheme_ok || !r.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            field,
            "is not an App ID URI",
            format!("use an https:// URI such as \"{DEFAULT_RESOURCE}\""),
        ));
    }
    Ok(r.to_owned())
}

/// The audience a host pattern (and the target's paths) call for, if the
/// host is one the filter knows.
fn known_audience(pattern: &HostPattern, paths: &[String]) -> Option<Result<&'static str, String>> {
    let name = pattern.name()?;
    // A suffix pattern (`.openai.azure.com`) is looked up as a host under it.
    let probe = format!("x{name}");
    let Some((_, cloud, service)) = azure::host(&probe) else {
        return azure::sovereign_cloud(name).map(|cloud| Ok(Cloud::audience(Some(cloud))));
    };
    Some(match (cloud, service) {
        (Cloud::Public, Service::MachineLearning) => Ok(audience::AZURE_ML),
        (Cloud::Public, Service::Foundry) => {
            let projects = paths
                .iter()
                .filter(|p| p.starts_with(FOUNDRY_PROJECT_PATH))
                .count();
            match projects {
                0 => Ok(audience::COGNITIVE_SERVICES),
                n if n == paths.len() => Ok(audience::FOUNDRY),
                _ => Err(format!(
                    "paths under {FOUNDRY_PROJECT_PATH} (Foundry projects, {}) and other paths ({}) on {pattern}",
                    audience::FOUNDRY,
                    audience::COGNITIVE_SERVICES
                )),
            }
        }
        (cloud, _) => Ok(Cloud::audience(Some(cloud))),
    })
}

/// `resource` from the hosts and paths, by cloud and service (`None` when
/// no host names a cloud); hosts that call for different audiences in one
/// target are an error.
fn default_resource(
    hosts: &HostPatterns,
    paths: &[String],
    prefix: &str,
) -> Result<Option<String>, ConfigError> {
    let mut chosen: Option<(&'static str, &HostPattern)> = None;
    for pattern in hosts.patterns() {
        match known_audience(pattern, paths) {
            None => {}
            Some(Err(mixed)) => {
                return Err(invalid(
                    format!("{prefix}paths"),
                    format!("mix audiences: {mixed}"),
                    format!("split them into two targets, or set {prefix}resource"),
                ))
            }
            Some(Ok(audience)) => match chosen {
                Some((other, first)) if other != audience => {
                    return Err(invalid(
                        format!("{prefix}hosts"),
                        format!(
                            "mix hosts that take different audiences: {first} ({other}) and {pattern} ({audience})"
                        ),
                        format!("split them into one target per cloud or service, or set {prefix}resource"),
                    ))
                }
                Some(_) => {}
                None => chosen = Some((audience, pattern)),
            },
        }
    }
    Ok(chosen.map(|(a, _)| a.to_owned()))
}

/// A source signs in to one cloud; Entra refuses to issue it a token for an
/// audience of another. Both fields are named.
fn check_cloud(
    source: &Source,
    resource: &str,
    prefix: &str,
    explicit: bool,
) -> Result<(), ConfigError> {
    let (Some(from), Some(to)) = (source.cloud(), Cloud::of_audience(resource)) else {
        return Ok(());
    };
    if from == to {
        return Ok(());
    }
    let audience_field = if explicit {
        format!("{prefix}resource")
    } else {
        format!("{prefix}hosts")
    };
    Err(invalid(
        format!("{audience_field} / {prefix}token_source.authority"),
        format!(
            "ask for an audience of {} ({resource}) from an authority of {}",
            to.name(),
            from.name()
        ),
        format!(
            "use a token source of the resource's cloud (authority {}), or the audience of the source's cloud ({})",
            to.authority(),
            Cloud::audience(Some(from))
        ),
    ))
}
/// The policies of a target; `prefix` is where its fields live.
fn check_policy(
    on_token_failure: Option<OnTokenFailure>,
    client_token: Option<ClientToken>,
    client_keys: Option<Vec<RawClientKey>>,
    prefix: &str,
) -> Result<Policy, ConfigError> {
    let field = |name: &str| format!("{prefix}{name}");
    let on_token_failure = on_token_failure.unwrap_or_default();
    let client_keys = match client_keys {
        None => None,
        Some(list) if list.is_empty() => {
            return Err(invalid(
                field("client_keys"),
                "is empty, so every request would be refused",
                "list the gateway keys' names and SHA-256 hashes, or remove the field to let every caller through",
            ))
        }
        Some(list) => {
            if on_token_failure == OnTokenFailure::ForwardKey {
                return Err(invalid(
                    format!("{} / {}", field("client_keys"), field("on_token_failure")),
                    "are set together: forward_key would send a gateway key to Azure, which cannot use it",
                    "keep one: gateway keys, or the way back to Azure keys",
                ));
            }
            let mut entries: Vec<(String, [u8; 32])> = Vec::with_capacity(list.len());
            for (i, key) in list.into_iter().enumerate() {
                let at = |name: &str| format!("{}[{i}].{name}", field("client_keys"));
                let name = check_name(&key.name, &at("name"))?;
                // The value is not echoed: someone may have pasted the key itself.
                let digest = sha256_hex(key.sha256.trim()).ok_or_else(|| {
                    invalid(
                        at("sha256"),
                        format!("is not 64 hex digits (it has {} characters)", key.sha256.len()),
                        "write the key's SHA-256 in hex, never the key: printf %s \"$KEY\" | sha256sum | cut -d' ' -f1",
                    )
                })?;
                if entries.iter().any(|(n, _)| *n == name) {
                    return Err(invalid(
                        at("name"),
                        format!("is \"{name}\", which another client key already has"),
                        "give each client its own name: it is the `client` label of the metrics",
                    ));
                }
                if entries.iter().any(|(_, d)| *d == digest) {
                    return Err(invalid(
                        at("sha256"),
                        "is the hash of a key another client already has",
                        "give each client its own key, so its requests are told apart",
                    ));
                }
                entries.push((name, digest));
            }
            Some(ClientKeys::new(entries))
        }
    };
    Ok(Policy {
        on_token_failure,
        client_token: client_token.unwrap_or_default(),
        client_keys,
    })
}

impl Target {
    /// Does this target match every request `later` would? Then `later` can
    /// never match, since the first matching target wins.
    fn shadows(&self, later: &Target) -> bool {
        let clusters = match (self.clusters.is_empty(), later.clusters.is_empty()) {
            (true, true) => true,
            (false, false) => later.clusters.iter().all(|c| self.clusters.contains(c)),
            // A target bound to clusters matches port and dot spellings that
            // an unbound one refuses, and an unbound one any cluster.
            _ => false,
        };
        let paths = self.paths.is_empty()
            || (!later.paths.is_empty()
                && later
                    .paths
                    .iter()
                    .all(|p| self.paths.iter().any(|mine| p.starts_with(mine.as_str()))))
            || self.paths.iter().any(|p| p == "/");
        clusters && paths && self.hosts.covers(&later.hosts)
    }
}

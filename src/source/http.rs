//! `http`: a local service that hands out a key or a token (a vault agent,
//! a rotated key file behind a small server, a token proxy); the value is
//! sent as a bearer token or an `api-key`.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{
    unavailable, Configure, CredentialKind, Endpoint, Refusal, Step, TokenRequest, TokenSource,
    Verdict,
};
use crate::codes::code;
use crate::fields::checks::{check_authority, milliseconds, non_empty, timeout};
use crate::fields::env::Env;
use crate::fields::errors::{invalid, read, ConfigError};
use crate::token::{parse_credential, FailureClass, FetchFailure, Issued, Secret};

/// A local service that hands out a key or a token (a vault agent, a
/// rotated key file behind a small server, a token proxy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSource {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub credential: CredentialKind,
    /// Poll interval for a value that names no expiry.
    pub refresh_interval_ms: u64,
    pub timeout_ms: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    #[serde(rename = "type")]
    _kind: Option<String>,
    cluster: Option<String>,
    authority: Option<String>,
    path: Option<String>,
    credential: Option<CredentialKindRaw>,
    refresh_interval_ms: Option<u64>,
    timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum CredentialKindRaw {
    Bearer,
    ApiKey,
}

impl Configure for HttpSource {
    const KIND: &'static str = "http";

    fn configure(value: Value, field: &str, _env: Env<'_>) -> Result<Self, ConfigError> {
        check_http(read(value, &format!("{field}."))?, field)
    }
}

/// Poll interval of an `http` credential that names no expiry.
pub const DEFAULT_REFRESH_INTERVAL_MS: u64 = 300_000;

fn check_http(raw: RawHttp, field: &str) -> Result<HttpSource, ConfigError> {
    let sub = |name: &str| format!("{field}.{name}");
    let cluster = match raw.cluster {
        Some(c) => non_empty(
            &c,
            &sub("cluster"),
            "name the Envoy cluster of the key or token service, such as \"key_service\"",
        )?,
        None => {
            return Err(invalid(
                sub("cluster"),
                "is missing",
                "name the Envoy cluster of the key or token service, such as \"key_service\"",
            ))
        }
    };
    let path = match raw.path {
        Some(p) if p.starts_with('/') && p.bytes().all(|b| b.is_ascii_graphic()) => p,
        Some(_) => {
            return Err(invalid(
                sub("path"),
                "is not a path",
                "start it with '/', such as \"/key\"",
            ))
        }
        None => {
            return Err(invalid(
                sub("path"),
                "is missing",
                "give the path the service answers on, such as \"/key\"",
            ))
        }
    };
    let authority = match raw.authority {
        Some(a) => check_authority(
            &a,
            &sub("authority"),
            "write a host name such as \"localhost\"",
        )?,
        None => "localhost".to_owned(),
    };
    Ok(HttpSource {
        cluster,
        authority,
        path,
        credential: match raw.credential {
            None | Some(CredentialKindRaw::Bearer) => CredentialKind::Bearer,
            Some(CredentialKindRaw::ApiKey) => CredentialKind::ApiKey,
        },
        refresh_interval_ms: milliseconds(
            raw.refresh_interval_ms,
            &sub("refresh_interval_ms"),
            1_000,
            24 * 3600 * 1000,
            DEFAULT_REFRESH_INTERVAL_MS,
        )?,
        timeout_ms: timeout(raw.timeout_ms, field)?,
    })
}

impl TokenSource for HttpSource {
    fn cluster(&self) -> &str {
        &self.cluster
    }

    fn timeout_ms(&self) -> u64 {
        self.timeout_ms
    }

    fn credential(&self) -> CredentialKind {
        self.credential
    }

    fn identity_noun(&self) -> &'static str {
        "credential service"
    }

    fn reports_rotation(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!(
            "the credential service {}{} via cluster {}, sent as {}",
            self.authority,
            crate::safe::path_shown(&self.path),
            self.cluster,
            match self.credential {
                CredentialKind::Bearer => "a bearer token",
                CredentialKind::ApiKey => "an api-key",
            }
        )
    }

    fn fingerprint(&self) -> String {
        format!(
            "http\n{}\n{}{}\n{:?}\n{}",
            self.cluster, self.authority, self.path, self.credential, self.refresh_interval_ms
        )
    }

    fn token_request(&self, _resource: &str, _now_ms: u64, _nonce: u64, _: Option<Secret>) -> Step {
        Step::Call(TokenRequest {
            cluster: self.cluster.clone(),
            timeout_ms: self.timeout_ms,
            headers: vec![
                (":method", "GET".to_owned()),
                (":path", self.path.clone()),
                (":authority", self.authority.clone()),
                ("accept", "application/json".to_owned()),
            ],
            body: Vec::new(),
        })
    }

    fn parse_token(
        &self,
        status: Option<u16>,
        body: &[u8],
        now_ms: u64,
        resource: &str,
    ) -> Result<Issued, FetchFailure> {
        parse_credential(
            status,
            body,
            now_ms,
            self.refresh_interval_ms,
            (self.credential == CredentialKind::Bearer).then_some(resource),
        )
    }

    fn endpoint(&self, _cluster: &str) -> Endpoint {
        Endpoint {
            name: "The credential service",
            reach: format!(
                "pointing at the service that answers GET {}{}",
                self.authority,
                crate::safe::path_shown(&self.path)
            ),
            unreachable: format!(
                "Check that the credential service behind cluster \"{}\" is running and answers GET {}",
                self.cluster, crate::safe::path_shown(&self.path)
            ),
        }
    }

    fn refused(&self, r: &Refusal<'_>, _details: &mut Map<String, Value>) -> Verdict {
        let (said, class) = (r.said, r.class);
        if class == FailureClass::Transient {
            return unavailable("the credential service failed", said);
        }
        (
            401,
            code::TOKEN_REQUEST_REJECTED,
            format!(
                "The credential service refused GET {}{} (cluster \"{}\"){said}. Check its path and what it needs \
                 to hand out the credential.",
                self.authority, crate::safe::path_shown(&self.path), self.cluster
            ),
        )
    }

    fn credential_service(&self) -> Option<(&str, &str, &str)> {
        Some((&self.authority, &self.path, &self.cluster))
    }
}

//! Where tokens come from. Every source is a request builder and an answer
//! parser around the one lifecycle the agent runs (single flight, refresh
//! ahead, backoff, bounded waits): sources differ here and nowhere else.
//!
//! | source | file | calls | AZURE_FACTS |
//! |---|---|---|---|
//! | `imds` | `imds.rs` | `GET` IMDS | §1 |
//! | `app_service` | `app_service.rs` | `GET $IDENTITY_ENDPOINT` with `X-IDENTITY-HEADER` | §2 |
//! | `client_credentials` | `client_credentials.rs` | `POST` Entra's v2.0 token endpoint, secret or certificate assertion | §2 |
//! | `workload_identity` | `workload_identity.rs` | `GET` the projected service-account token, then `POST` it to Entra | §2 |
//! | `http` | `http.rs` | `GET` a local key or token service; the value is sent as a bearer token or an `api-key` | DESIGN |
//!
//! Each source is one file: its configuration (the JSON it takes and how it
//! is checked), its calls and answers, its fingerprint, its description and
//! the words of its diagnoses, behind [`TokenSource`]. The `sources!` list
//! below registers it: adding a source is one file and one line there.
//!
//! A fetch is an [`Exchange`]: one call, or two for workload identity (the
//! assertion first). Each step is pure: the time and a nonce come in, a
//! request or a result goes out. Secrets (the identity header, the client
//! secret, the signing key, assertions) live in [`Secret`]s or types whose
//! `Debug` says nothing about them.

use std::fmt;

use serde_json::{Map, Value};

use crate::azure::Cloud;
use crate::codes::code;
use crate::fields::checks::json_kind;
use crate::fields::env::Env;
use crate::fields::errors::{invalid, ConfigError};
use crate::token::{parse_response, FailureClass, FetchFailure, Issued, Secret};

pub mod entra;
mod identity;

pub use app_service::APP_SERVICE_API_VERSION;
#[cfg(test)]
use client_credentials::jti;
pub use client_credentials::{ClientCredential, SigningKey, ASSERTION_LIFETIME_S, JWT_BEARER};
pub use entra::token_url;
pub use identity::IdentitySelector;
pub use imds::{IMDS_API_VERSION, IMDS_PATH};
#[cfg(test)]
use jwt_simple::prelude::*;
pub use workload_identity::{parse_assertion, MAX_ASSERTION_BYTES};

/// One kind of token source: everything the rest of the filter asks of it.
/// The lifecycle, the agent and the diagnoses call these and never look at
/// which source it is.
pub trait TokenSource {
    /// The Envoy cluster of the token call.
    fn cluster(&self) -> &str;

    /// Timeout of one call.
    fn timeout_ms(&self) -> u64;

    /// How the credential is sent.
    fn credential(&self) -> CredentialKind {
        CredentialKind::Bearer
    }

    /// The identity this source signs in as, in words for a message.
    fn identity_noun(&self) -> &'static str;

    /// The application (client) id and tenant an Entra source signs in with.
    fn application(&self) -> Option<(&str, &str)> {
        None
    }

    /// How many calls one exchange makes (each within `timeout_ms`).
    fn calls(&self) -> u64 {
        1
    }

    /// Does a new value from this source replace a rotated one (a key
    /// service), so that a change is worth a log line of its own?
    fn reports_rotation(&self) -> bool {
        false
    }

    /// The cloud this source signs in to, when the configuration says (an
    /// Entra authority); a managed identity's is the machine's own.
    fn cloud(&self) -> Option<Cloud> {
        None
    }

    /// Who the token is for, in words, for log lines: no secrets.
    fn describe(&self) -> String;

    /// Everything that decides *which* token this source fetches (never a
    /// secret), one line per part, starting with the source's `type`.
    fn fingerprint(&self) -> String;

    /// Start a fetch of a token for `resource`.
    fn begin(&self, resource: &str, now_ms: u64, nonce: u64) -> (Exchange, Step) {
        (
            Exchange::Token,
            self.token_request(resource, now_ms, nonce, None),
        )
    }

    /// The call that returns the token itself; `assertion` is what an
    /// [`Exchange::Assertion`] call returned, for the sources that make one.
    fn token_request(
        &self,
        resource: &str,
        now_ms: u64,
        nonce: u64,
        assertion: Option<Secret>,
    ) -> Step;

    /// The token endpoint's answer, read.
    fn parse_token(
        &self,
        status: Option<u16>,
        body: &[u8],
        now_ms: u64,
        resource: &str,
    ) -> Result<Issued, FetchFailure> {
        parse_response(status, body, now_ms, resource)
    }

    /// The cluster of the call that fetches an assertion, if the source makes one.
    fn assertion_cluster(&self) -> Option<&str> {
        None
    }

    /// The endpoint behind `cluster`, in words for a diagnosis.
    fn endpoint(&self, cluster: &str) -> Endpoint;

    /// What a refusal of the token endpoint means: the status, the code
    /// and the message of the diagnosis. Fields worth an answer's `error`
    /// object go into `details`.
    fn refused(&self, refusal: &Refusal<'_>, details: &mut Map<String, Value>) -> Verdict;

    /// For a source that hands out a credential from a service of its own:
    /// the service's authority, path and cluster, to name it when Azure
    /// refuses what it handed out.
    fn credential_service(&self) -> Option<(&str, &str, &str)> {
        None
    }
}

/// How a source reads its configuration: `token_source` with this `type`.
pub trait Configure: Sized {
    /// The `type` that names the source in the configuration.
    const KIND: &'static str;

    /// Read and check the source's JSON object; `field` is where it lives
    /// (`targets[1].token_source`). Variables are read from `env` here,
    /// and only here.
    fn configure(value: Value, field: &str, env: Env<'_>) -> Result<Self, ConfigError>;
}

/// The token endpoint of a source, in words.
pub struct Endpoint {
    /// "IMDS", "the App Service identity endpoint", "Entra".
    pub name: &'static str,
    /// Where the cluster must point, for a missing cluster.
    pub reach: String,
    /// What usually stops the endpoint answering.
    pub unreachable: String,
}

/// A token endpoint's refusal, as a source's diagnosis reads it.
pub struct Refusal<'a> {
    pub status: u16,
    /// AADSTS numbers of an Entra answer.
    pub codes: &'a [u32],
    /// What the endpoint said, ready to follow a sentence: ` (400: "…")`.
    pub said: &'a str,
    pub class: FailureClass,
    pub resource: &'a str,
}

/// The status, code and message of a diagnosis.
pub type Verdict = (u16, &'static str, String);

/// The endpoint failed in a way worth retrying.
pub(crate) fn unavailable(why: &str, said: &str) -> Verdict {
    (
        503,
        code::TOKEN_ENDPOINT_UNAVAILABLE,
        format!("No token yet: {why}{said}. The filter retries with backoff; retry the request."),
    )
}

// Each source's module, declared outside `sources!` so that `cargo fmt`
// (which does not follow modules declared inside a macro) formats it.
pub mod app_service;
pub mod client_credentials;
pub mod http;
pub mod imds;
pub mod workload_identity;

/// Registers the sources: one line each, `Variant(module::Type)`, for a
/// module declared above. Declares the [`Source`] enum, its dispatch to
/// [`TokenSource`] and the reader of `token_source` by `type`.
macro_rules! sources {
    ($($variant:ident($module:ident::$ty:ident),)*) => {
        $(pub use $module::$ty;)*

        /// Where one token comes from, with everything needed to ask for it.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Source {
            $($variant($ty),)*
        }

        impl Source {
            /// The source behind its one trait.
            pub fn inner(&self) -> &dyn TokenSource {
                match self {
                    $(Source::$variant(s) => s,)*
                }
            }

            /// The `type` that names it in the configuration.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(Source::$variant(_) => <$ty as Configure>::KIND,)*
                }
            }
        }

        /// Every source's `type`, and how its configuration is read.
        const KINDS: &[(&str, fn(Value, &str, Env<'_>) -> Result<Source, ConfigError>)] = &[
            $((<$ty as Configure>::KIND, |value, field, env| {
                <$ty as Configure>::configure(value, field, env).map(Source::$variant)
            }),)*
        ];
    };
}

sources! {
    Imds(imds::ImdsSource),
    AppService(app_service::AppServiceSource),
    ClientCredentials(client_credentials::ClientCredentialsSource),
    WorkloadIdentity(workload_identity::WorkloadIdentitySource),
    Http(http::HttpSource),
}

impl Source {
    /// Read `token_source` (absent: `{}`, IMDS): `type` first, then the body
    /// with its path kept (a field-path library loses the path inside
    /// internally tagged enums).
    pub fn configure(
        map: Option<Map<String, Value>>,
        field: &str,
        env: Env<'_>,
    ) -> Result<Source, ConfigError> {
        let map = map.unwrap_or_default();
        let kind = match map.get("type") {
            None => imds::ImdsSource::KIND,
            Some(Value::String(kind)) => kind.as_str(),
            Some(other) => {
                return Err(ConfigError::WrongType {
                    field: format!("{field}.type"),
                    expected: "a string such as \"imds\"".to_owned(),
                    found: json_kind(other).to_owned(),
                })
            }
        };
        match KINDS.iter().find(|(k, _)| *k == kind) {
            Some((_, read)) => read(Value::Object(map), field, env),
            None => Err(invalid(
                format!("{field}.type"),
                "names a token source this version does not support",
                format!("use {}", kinds_in_words()),
            )),
        }
    }

    /// How the credential is sent.
    pub fn credential(&self) -> CredentialKind {
        self.inner().credential()
    }

    /// The identity this source signs in as, in words for a message.
    pub fn identity_noun(&self) -> &'static str {
        self.inner().identity_noun()
    }

    /// The application (client) id and tenant an Entra source signs in with.
    pub fn application(&self) -> Option<(&str, &str)> {
        self.inner().application()
    }

    /// The Envoy cluster of the token call.
    pub fn cluster(&self) -> &str {
        self.inner().cluster()
    }

    pub fn timeout_ms(&self) -> u64 {
        self.inner().timeout_ms()
    }

    /// How many calls one exchange makes (each within `timeout_ms`).
    pub fn calls(&self) -> u64 {
        self.inner().calls()
    }

    /// Does a changed value from this source mean a rotation worth telling?
    pub fn reports_rotation(&self) -> bool {
        self.inner().reports_rotation()
    }

    /// The cloud this source signs in to, when the configuration says.
    pub fn cloud(&self) -> Option<Cloud> {
        self.inner().cloud()
    }

    /// Who the token is for, in words, for log lines: no secrets.
    pub fn describe(&self) -> String {
        self.inner().describe()
    }

    /// What decides which token this source fetches (never a secret).
    pub fn fingerprint(&self) -> String {
        self.inner().fingerprint()
    }

    /// Start a fetch of a token for `resource`.
    pub fn begin(&self, resource: &str, now_ms: u64, nonce: u64) -> (Exchange, Step) {
        self.inner().begin(resource, now_ms, nonce)
    }

    /// A call of `exchange` was answered (`status` is `None` without an
    /// HTTP answer): the next call, or the result.
    pub fn answered(
        &self,
        exchange: Exchange,
        resource: &str,
        status: Option<u16>,
        body: &[u8],
        now_ms: u64,
        nonce: u64,
    ) -> (Exchange, Step) {
        let source = self.inner();
        match exchange {
            Exchange::Token => (
                Exchange::Token,
                Step::Done(source.parse_token(status, body, now_ms, resource)),
            ),
            Exchange::Assertion => match parse_assertion(status, body) {
                Ok(assertion) => (
                    Exchange::Token,
                    source.token_request(resource, now_ms, nonce, Some(assertion)),
                ),
                Err(failure) => (Exchange::Token, Step::Done(Err(failure))),
            },
        }
    }
}

/// `"imds", "app_service" … or "http"`: the registered types, in order.
fn kinds_in_words() -> String {
    let quoted: Vec<String> = KINDS.iter().map(|(k, _)| format!("\"{k}\"")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => quoted.join(""),
    }
}

/// How a request carries its credential upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CredentialKind {
    /// `authorization: Bearer <value>`.
    #[default]
    Bearer,
    /// `api-key: <value>`: for resources that still take keys.
    ApiKey,
}

/// RFC 3986 unreserved characters pass; everything else is %XX.
pub fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Which call of a fetch is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exchange {
    /// Workload identity: the service-account token.
    Assertion,
    /// The token endpoint.
    Token,
}

/// What a fetch needs next.
#[derive(Debug)]
pub enum Step {
    Call(TokenRequest),
    Done(Result<Issued, FetchFailure>),
}

/// A call for the glue to dispatch. `Debug` names the call but shows no
/// header value beyond the method, path and authority, and no body.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenRequest {
    pub cluster: String,
    pub timeout_ms: u64,
    /// Pseudo-headers and headers, in order.
    pub headers: Vec<(&'static str, String)>,
    /// Empty for a GET.
    pub body: Vec<u8>,
}

impl TokenRequest {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("", |(_, v)| v.as_str())
    }

    pub fn path(&self) -> &str {
        self.header(":path")
    }
}

impl fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(n, _)| *n).collect();
        write!(
            f,
            "TokenRequest({} {}{} via {}, headers {names:?}, body {} bytes)",
            self.header(":method"),
            self.header(":authority"),
            crate::safe::path_shown(self.path()),
            self.cluster,
            self.body.len()
        )
    }
}

#[cfg(test)]
mod tests;

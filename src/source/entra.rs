//! What the Entra sources share (`client_credentials`, `workload_identity`):
//! the application and its v2.0 token request, the authority and ids they are
//! configured with, and the words for Entra's refusals (AZURE_FACTS §2).

use serde_json::{json, Map, Value};

use super::{percent_encode, unavailable, Endpoint, Refusal, Step, TokenRequest, Verdict};
use crate::codes::{aadsts, code};
use crate::fields::checks::{check_authority, non_empty};
use crate::fields::env::{self, Env};
use crate::fields::errors::{invalid, ConfigError};
use crate::token::FailureClass;

pub const DEFAULT_ENTRA_CLUSTER: &str = "entra";
pub const DEFAULT_ENTRA_AUTHORITY: &str = "login.microsoftonline.com";
/// The assertion type of a signed client assertion or a federated token.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Entra authority hosts of the clouds (AZURE_FACTS §2; Germany closed in 2021).
pub const ENTRA_AUTHORITIES: [&str; 3] = [
    "login.microsoftonline.com",
    "login.microsoftonline.us",
    "login.chinacloudapi.cn",
];

/// `https://<authority>/<tenant>/oauth2/v2.0/token`: the client assertion's `aud`.
pub fn token_url(authority: &str, tenant: &str) -> String {
    format!("https://{authority}/{tenant}/oauth2/v2.0/token")
}

/// The Entra cluster and authority host; `injected` is the webhook's
/// `AZURE_AUTHORITY_HOST`, used when the configuration names none.
pub(crate) fn entra_endpoint(
    cluster: Option<String>,
    authority: Option<String>,
    field: &str,
    injected: Option<String>,
) -> Result<(String, String), ConfigError> {
    let sub = |name: &str| format!("{field}.{name}");
    let cluster = match cluster {
        Some(c) => non_empty(
            &c,
            &sub("cluster"),
            "name the Envoy cluster that reaches Entra over TLS, e.g. \"entra\"",
        )?,
        None => DEFAULT_ENTRA_CLUSTER.to_owned(),
    };
    let authority = match authority.or(injected) {
        Some(a) => check_authority(
            a.trim_end_matches('/'),
            &sub("authority"),
            &format!(
                "write the Entra host only: {}",
                ENTRA_AUTHORITIES.join(", ")
            ),
        )?,
        None => DEFAULT_ENTRA_AUTHORITY.to_owned(),
    };
    Ok((cluster, authority))
}

/// An Entra application's tenant and client ids: from the configuration,
/// else from `AZURE_TENANT_ID` / `AZURE_CLIENT_ID` (as the Azure SDKs and the
/// workload-identity webhook name them).
pub(crate) fn app_ids(
    tenant_id: Option<String>,
    client_id: Option<String>,
    field: &str,
    env: Env<'_>,
) -> Result<(String, String), ConfigError> {
    let tenant_id = id_from(
        tenant_id,
        env,
        env::AZURE_TENANT_ID,
        &format!("{field}.tenant_id"),
        "tenant",
    )?;
    let client_id = id_from(
        client_id,
        env,
        env::AZURE_CLIENT_ID,
        &format!("{field}.client_id"),
        "application (client)",
    )?;
    Ok((tenant_id, client_id))
}

/// A tenant or client id from the configuration, else from `var`.
fn id_from(
    value: Option<String>,
    env: Env<'_>,
    var: &str,
    field: &str,
    what: &str,
) -> Result<String, ConfigError> {
    let (id, from) = match value {
        Some(v) => (v, field.to_owned()),
        None => match env.var(var) {
            Some(v) => (v, format!("the environment variable {var}")),
            None => {
                return Err(invalid(
                    field,
                    format!("is not set, and the environment variable {var} is not available to the VM"),
                    format!(
                        "set {field} to the {what} id, or add {var} to vm_config.environment_variables.host_env_keys (Istio: vmConfig.env)"
                    ),
                ))
            }
        },
    };
    let id = id.trim().to_owned();
    let ok = (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'));
    if !ok {
        return Err(invalid(
            field,
            format!("({from}) is not a {what} id (a GUID, or for a tenant a domain name)"),
            format!("copy the {what} id from the Azure portal or `az`"),
        ));
    }
    Ok(id)
}

/// Entra as a token endpoint, in words.
pub(crate) fn endpoint(authority: &str) -> Endpoint {
    Endpoint {
        name: "Entra",
        reach: format!("pointing at {authority}:443 with TLS (SNI {authority})"),
        unreachable: format!(
            "Check the proxy's outbound access to {authority}:443 (firewall, egress proxy, DNS)"
        ),
    }
}

/// The application an Entra source signs in as: where its token requests
/// go, who it is, and for the words of a refusal, what its credential is.
pub(crate) struct EntraApp<'a> {
    pub cluster: &'a str,
    pub authority: &'a str,
    pub tenant: &'a str,
    pub client: &'a str,
    pub timeout_ms: u64,
    /// Where a client secret is kept.
    pub secret: Option<SecretPlace<'a>>,
    /// `x5t#S256` of a client certificate (of an SDS one: the last one read).
    pub thumbprint: Option<String>,
}

/// Where a client secret is kept, to name it in a refusal's fix.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SecretPlace<'a> {
    /// The environment variable of `client_secret_env`: read at start.
    Env(&'a str),
    /// The SDS generic secret of `client_secret_sds`: read at every exchange.
    Sds(&'a str),
}

impl SecretPlace<'_> {
    fn words(self) -> String {
        match self {
            SecretPlace::Env(var) => var.to_owned(),
            SecretPlace::Sds(name) => format!("the SDS generic secret \"{name}\""),
        }
    }

    /// What follows putting a new value there.
    fn then(self) -> &'static str {
        match self {
            SecretPlace::Env(_) => ", and restart the proxy",
            SecretPlace::Sds(_) => " (the filter reads it at the next exchange: no restart)",
        }
    }
}

/// What proves the application in a token request.
pub(crate) enum Proof<'a> {
    /// A client secret.
    Secret(&'a str),
    /// A client assertion: one signed with the application's certificate,
    /// or a federated (service-account) token.
    Assertion(&'a str),
}

impl EntraApp<'_> {
    /// The v2.0 client-credentials grant for a token for `resource`: a form
    /// POST to `/<tenant>/oauth2/v2.0/token` (AZURE_FACTS §2).
    pub(crate) fn token_request(&self, resource: &str, proof: Proof<'_>) -> Step {
        let scope = format!("{}/.default", resource.trim_end_matches('/'));
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", self.client),
            ("scope", &scope),
        ];
        match proof {
            Proof::Secret(secret) => form.push(("client_secret", secret)),
            Proof::Assertion(assertion) => form.extend([
                ("client_assertion_type", JWT_BEARER),
                ("client_assertion", assertion),
            ]),
        }
        let body = form
            .iter()
            .map(|(k, v)| format!("{k}={}", percent_encode(v)))
            .collect::<Vec<_>>()
            .join("&")
            .into_bytes();
        Step::Call(TokenRequest {
            cluster: self.cluster.to_owned(),
            timeout_ms: self.timeout_ms,
            headers: vec![
                (":method", "POST".to_owned()),
                (
                    ":path",
                    format!("/{}/oauth2/v2.0/token", percent_encode(self.tenant)),
                ),
                (":authority", self.authority.to_owned()),
                (
                    "content-type",
                    "application/x-www-form-urlencoded".to_owned(),
                ),
            ],
            body,
        })
    }
}

/// What Entra's refusal means, by its AADSTS codes.
pub(crate) fn refused(
    app: &EntraApp<'_>,
    r: &Refusal<'_>,
    details: &mut Map<String, Value>,
) -> Verdict {
    let (codes, said, class, resource) = (r.codes, r.said, r.class, r.resource);
    let (tenant, client, authority) = (app.tenant, app.client, app.authority);
    details.insert("application_id".into(), json!(client));
    details.insert("tenant_id".into(), json!(tenant));
    if class == FailureClass::Transient {
        return unavailable("Entra is temporarily unavailable", said);
    }
    let secret_env = app.secret.map_or_else(
        || "the client secret's variable".to_owned(),
        SecretPlace::words,
    );
    let then = app
        .secret
        .map_or(", and restart the proxy", SecretPlace::then);
    let has = |code: u32| codes.contains(&code);
    if has(aadsts::INVALID_SECRET) {
        return (
            401,
            code::CLIENT_SECRET_INVALID,
            format!(
                "Entra refused the client secret of application {client} in tenant {tenant} (AADSTS7000215){said}. \
                 The value in {secret_env} is not a current secret of this application (a secret's ID pasted \
                 instead of its value is a common cause): create one with `az ad app credential reset --id {client} \
                 --append` and put its value in {secret_env}."
            ),
        );
    }
    if has(aadsts::EXPIRED_SECRET) {
        return (
            401,
            code::CLIENT_SECRET_EXPIRED,
            format!(
                "The client secret of application {client} in tenant {tenant} has expired (AADSTS7000222){said}. \
                 Create a new one with `az ad app credential reset --id {client} --append`, put its value in \
                 {secret_env}{then}."
            ),
        );
    }
    if has(aadsts::APPLICATION_NOT_FOUND) {
        return (
            401,
            code::APPLICATION_NOT_FOUND,
            format!(
                "Entra has no application {client} in tenant {tenant} (AADSTS700016){said}. Check client_id \
                 (or AZURE_CLIENT_ID) and tenant_id: the application may be registered in another tenant, or \
                 have no service principal there."
            ),
        );
    }
    if has(aadsts::TENANT_NOT_FOUND) {
        return (
            401,
            code::TENANT_NOT_FOUND,
            format!(
                "Entra at {authority} has no tenant {tenant}, where application {client} was to sign in \
                 (AADSTS90002){said}. Check tenant_id (or AZURE_TENANT_ID), and that authority is the \
                 tenant's cloud ({}).",
                ENTRA_AUTHORITIES.join(", ")
            ),
        );
    }
    if has(aadsts::CERTIFICATE_NOT_REGISTERED) {
        let thumbprint = match &app.thumbprint {
            Some(thumbprint) => {
                details.insert("certificate_thumbprint_sha256".into(), json!(thumbprint));
                format!(" (x5t#S256 {thumbprint})")
            }
            None => String::new(),
        };
        return (
            401,
            code::CERTIFICATE_NOT_REGISTERED,
            format!(
                "Entra does not accept the certificate{thumbprint} for application {client} in tenant {tenant} \
                 (AADSTS700027){said}. Upload the certificate to the app registration (`az ad app credential \
                 reset --id {client} --cert @cert.pem --append`), or use the one that is registered."
            ),
        );
    }
    let federation = [
        aadsts::FEDERATION_SUBJECT_MISMATCH,
        aadsts::FEDERATION_ISSUER_MISMATCH,
    ]
    .into_iter()
    .find(|c| has(*c));
    if let Some(found) = federation {
        return (
            401,
            code::FEDERATED_CREDENTIAL_MISMATCH,
            format!(
                "No federated credential of application {client} matches the service-account token \
                 (AADSTS{found}){said}. Add one whose issuer is the cluster's OIDC issuer URL (`az aks show \
                 --query oidcIssuerProfile.issuerUrl`) and whose subject is \
                 system:serviceaccount:<namespace>:<service account>, audience api://AzureADTokenExchange \
                 (`az identity federated-credential create` for a managed identity)."
            ),
        );
    }
    if has(aadsts::ASSERTION_EXPIRED) {
        return (
            401,
            code::FEDERATED_TOKEN_EXPIRED,
            format!(
                "Entra says the service-account token has expired (AADSTS700024){said}. Kubelet rotates the \
                 projected token well before it expires: check that the token-file listener watches the token's \
                 directory (watched_directory) so Envoy serves the current file."
            ),
        );
    }
    (
        401,
        code::TOKEN_REQUEST_REJECTED,
        format!(
            "Entra refused the token request of application {client} in tenant {tenant}{said}; resource is \
             \"{}\". The AADSTS code names the cause.",
            resource
        ),
    )
}

//! Every diagnosis code the filter writes, in one table: the filter's own
//! answers (token endpoints, gateway keys, routing), the header codes of
//! Azure's answers, and the precise diagnoses read from Azure's bodies.
//! Each group's `ALL` and the whole table's [`EVERY`] are derived from the
//! table, so a new code is one line here and cannot be left out of a list.

/// Declares each group as a module of constants with its `ALL`, and
/// [`EVERY`]: every code of every group, in table order.
macro_rules! table {
    ($(
        $(#[$group_doc:meta])*
        $group:ident {
            $($(#[$doc:meta])* $name:ident = $value:literal;)*
        }
    )*) => {
        $(
            $(#[$group_doc])*
            pub mod $group {
                $($(#[$doc])* pub const $name: &str = $value;)*
                /// Every code of this group.
                pub const ALL: &[&str] = &[$($name),*];
            }
        )*
        /// Every code of the table, for the checks that each one is documented.
        pub const EVERY: &[&str] = &[$($($group::$name,)*)*];
    };
}

table! {
    /// Codes of the filter's own answers (README, "Diagnostics").
    code {
        MANAGED_IDENTITY_NOT_FOUND = "ManagedIdentityNotFound";
        MANAGED_IDENTITY_AMBIGUOUS = "ManagedIdentityAmbiguous";
        TOKEN_REQUEST_REJECTED = "TokenRequestRejected";
        TOKEN_ENDPOINT_UNAVAILABLE = "TokenEndpointUnavailable";
        TOKEN_ENDPOINT_UNREACHABLE = "TokenEndpointUnreachable";
        TOKEN_ENDPOINT_CLUSTER_MISSING = "TokenEndpointClusterMissing";
        TOKEN_RESPONSE_INVALID = "TokenResponseInvalid";
        TOKEN_AUDIENCE_MISMATCH = "TokenAudienceMismatch";
        TOKEN_WAIT_TIMEOUT = "TokenWaitTimeout";
        CLIENT_SECRET_INVALID = "ClientSecretInvalid";
        CLIENT_SECRET_EXPIRED = "ClientSecretExpired";
        APPLICATION_NOT_FOUND = "ApplicationNotFound";
        TENANT_NOT_FOUND = "TenantNotFound";
        CERTIFICATE_NOT_REGISTERED = "CertificateNotRegistered";
        FEDERATED_CREDENTIAL_MISMATCH = "FederatedCredentialMismatch";
        FEDERATED_TOKEN_EXPIRED = "FederatedTokenExpired";
        FEDERATED_TOKEN_UNAVAILABLE = "FederatedTokenUnavailable";
        /// The SDS generic secret of a service principal is missing, empty
        /// or unreadable at an exchange (native build).
        SDS_SECRET_UNAVAILABLE = "SdsSecretUnavailable";
        CLIENT_KEY_REQUIRED = "ClientKeyRequired";
        CLIENT_KEY_UNKNOWN = "ClientKeyUnknown";
        /// The filter could not write the credential into the request.
        CREDENTIAL_NOT_WRITTEN = "CredentialNotWritten";
        /// Envoy matched the route again after the filter's writes and sent
        /// the request to a cluster the filter had not checked.
        ROUTE_CHANGED_AFTER_REWRITE = "RouteChangedAfterRewrite";
        /// An Azure 403 to a request no target took: a host no target lists.
        HOST_NOT_IN_TARGETS = "HostNotInTargets";
        /// … a host spelled with a port or trailing dot, for a target
        /// without `clusters`.
        HOST_SPELLING_NOT_ROUTED = "HostSpellingNotRouted";
        /// … a request routed to a cluster whose destination the client picks.
        CLIENT_CHOSEN_DESTINATION = "ClientChosenDestination";
    }

    /// Header codes of Azure's answers, chosen from the status and what the
    /// filter knows.
    header {
        /// 401 to a request that carried the filter's token.
        UPSTREAM_UNAUTHORIZED = "UpstreamUnauthorized";
        /// 403 from the resource.
        UPSTREAM_FORBIDDEN = "UpstreamForbidden";
        /// 400 to a request that carried the filter's token.
        UPSTREAM_BAD_REQUEST = "UpstreamBadRequest";
    }

    /// Precise diagnoses of Azure's answers, read from the upstream body
    /// (`error.diagnosis`).
    diagnosis {
        ROLE_MISSING = "RoleMissing";
        TOKEN_REJECTED = "TokenRejected";
        KEY_AUTH_DISABLED = "KeyAuthDisabled";
        NETWORK_RULE = "NetworkRule";
        CUSTOM_SUBDOMAIN_REQUIRED = "CustomSubdomainRequired";
        TENANT_MISMATCH = "TenantMismatch";
        KEY_REJECTED = "KeyRejected";
    }
}

/// Entra's AADSTS numbers the filter explains (AZURE_FACTS §2).
pub mod aadsts {
    pub const INVALID_SECRET: u32 = 7_000_215;
    pub const EXPIRED_SECRET: u32 = 7_000_222;
    pub const APPLICATION_NOT_FOUND: u32 = 700_016;
    pub const TENANT_NOT_FOUND: u32 = 90_002;
    pub const CERTIFICATE_NOT_REGISTERED: u32 = 700_027;
    pub const FEDERATION_SUBJECT_MISMATCH: u32 = 70_021;
    pub const FEDERATION_ISSUER_MISMATCH: u32 = 700_211;
    pub const ASSERTION_EXPIRED: u32 = 700_024;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_listed_once_and_documented_in_the_readme() {
        let readme = include_str!("../README.md");
        for (i, code) in EVERY.iter().enumerate() {
            assert!(readme.contains(&format!("`{code}`")), "README lacks {code}");
            assert!(!EVERY[..i].contains(code), "{code} is listed twice");
        }
        assert_eq!(
            EVERY.len(),
            code::ALL.len() + header::ALL.len() + diagnosis::ALL.len()
        );
    }
}

//! What the identity rooms remember between requests: the App Service
//! managed-identity endpoint ([`crate::app_service`]), the Entra token
//! endpoint ([`crate::entra`]), the workload-identity OIDC issuer
//! ([`crate::credentials`]) and the reference key service ([`crate::keys`]).
//!
//! One value of [`IdentityState`] lives at the end of the world, behind the
//! same lock as everything else the emulator records.

use std::collections::{HashSet, VecDeque};

use jwt_simple::prelude::RS256KeyPair;
use rsa::RsaPublicKey;

use crate::credentials::fresh_id;
use crate::entra::EntraRequest;
use crate::{ImdsReply, ImdsRequest};

/// The service-account token issuer of an emulated AKS cluster. Its key is
/// made on first use: most tests never need it, and an RSA key takes time.
pub(crate) struct Issuer {
    pub(crate) url: String,
    pub(crate) key: Option<(RS256KeyPair, RsaPublicKey)>,
}

pub(crate) struct IdentityState {
    pub(crate) app_service_script: VecDeque<ImdsReply>,
    pub(crate) app_service_requests: Vec<ImdsRequest>,
    pub(crate) entra_script: VecDeque<ImdsReply>,
    pub(crate) entra_requests: Vec<EntraRequest>,
    /// `(client id, jti)` of every certificate assertion Entra accepted.
    pub(crate) seen_jtis: HashSet<(String, String)>,
    pub(crate) key_requests: usize,
    pub(crate) issuer: Issuer,
}

impl IdentityState {
    pub(crate) fn new() -> IdentityState {
        IdentityState {
            app_service_script: VecDeque::new(),
            app_service_requests: Vec::new(),
            entra_script: VecDeque::new(),
            entra_requests: Vec::new(),
            seen_jtis: HashSet::new(),
            key_requests: 0,
            issuer: Issuer {
                url: format!("https://oidc.emulator.local/{}", fresh_id()),
                key: None,
            },
        }
    }
}

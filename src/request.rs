//! What becomes of a request whose headers have arrived: decided here, from
//! the configuration, what the request carries, the agents' state and the
//! time; the glue reads the headers once and carries the decision out.
//!
//! ```text
//! no target ───────────────────────────────────────► Pass (why it looked like ours)
//! target refused after a re-route ─────────────────► Reply RouteChangedAfterRewrite
//! client_token: keep, its own valid Entra token ───► KeepClientToken (only the key goes)
//! client_keys, no or an unknown key ───────────────► Reply ClientKeyRequired / ClientKeyUnknown
//! forward_key, a failure known, it carries a key ──► ForwardKey
//! token usable ────────────────────────────────────► Authorize
//! no usable token ─────────────────────────────────► Park (the agent holds it)
//! ```

use crate::agent::{Admission, Agent};
use crate::config::Config;
use crate::diagnose::Diagnosis;
use crate::policy::{self, ClientToken, KeyCheck, OnTokenFailure};
use crate::rewrite;
use crate::route::{NearMiss, Routed};
use crate::source::CredentialKind;

/// The headers a decision reads, as the glue found them (bytes that are not
/// text are absent).
#[derive(Debug, Clone, Copy, Default)]
pub struct Arrival<'a> {
    pub authority: &'a str,
    pub api_key: Option<&'a [u8]>,
    pub authorization: Option<&'a [u8]>,
}

/// What to do with a request's headers.
#[derive(Debug, PartialEq)]
pub enum Decision<'a> {
    /// Not ours: untouched. `miss` says why it looked like a request a
    /// target meant (for the log); with `explain_403` (it carries a key, the
    /// only thing Azure's 403 AuthenticationTypeDisabled answers), an Azure
    /// 403 gets that reason as its diagnosis header.
    Pass {
        miss: Option<NearMiss>,
        explain_403: bool,
    },
    /// The application's own Entra token stays; only its key goes.
    KeepClientToken { target: u32, path: Option<String> },
    /// Answer it here.
    Reply { target: u32, diagnosis: Diagnosis },
    /// No token can be had now (`code`): it goes on with its own key.
    ForwardKey { target: u32, code: &'static str },
    /// Send it with this credential (and `path`, when its query held a key).
    Authorize {
        target: u32,
        kind: CredentialKind,
        credential: &'a str,
        generation: u64,
        client: Option<usize>,
        path: Option<String>,
    },
    /// Hold it until a token exists; with `kick`, wake this VM's root.
    /// What its wake-up needs is decided now: the `path` it leaves with
    /// (its query without the key), and whether it brought a key of its own
    /// (`forward_key` may send it on with it).
    Park {
        target: u32,
        client: Option<usize>,
        kick: bool,
        path: Option<String>,
        carries_key: bool,
    },
}

/// Per-target state the glue keeps between requests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refusal {
    /// The cluster a request of this target was checked for, and the one
    /// Envoy sent it to after the filter's writes.
    pub checked: String,
    pub taken: String,
}

/// Decide what becomes of a request. `refused[t]` is set once target `t`'s
/// requests were seen re-routed; `routed` answers the path and cluster.
pub fn decide<'a>(
    config: &Config,
    agents: &'a mut [Agent],
    refused: &[Option<Refusal>],
    arrival: &Arrival<'_>,
    routed: &mut dyn Routed,
    request: u32,
    now_ms: u64,
) -> Decision<'a> {
    let Some(index) = config.route(arrival.authority, routed) else {
        let miss = config.near_miss(arrival.authority, routed);
        let explain_403 = miss.is_some() && policy::carries_key(arrival.api_key, routed.path());
        return Decision::Pass { miss, explain_403 };
    };
    let Some(spec) = config.targets.get(index) else {
        return Decision::Pass {
            miss: None,
            explain_403: false,
        };
    };
    let target = index as u32;
    if let Some(Some(refusal)) = refused.get(index) {
        return Decision::Reply {
            target,
            diagnosis: Diagnosis::route_changed(&refusal.checked, &refusal.taken),
        };
    }
    let policy = &spec.policy;
    let resource = config
        .tokens
        .get(spec.token)
        .map_or("", |t| t.resource.as_str());
    if policy.client_token == ClientToken::Keep
        && policy::keeps_client_token(arrival.authorization, resource, now_ms / 1000)
    {
        return Decision::KeepClientToken {
            target,
            path: routed.path().and_then(rewrite::without_api_key_param),
        };
    }
    let mut client = None;
    if let Some(keys) = &policy.client_keys {
        let query = match arrival.api_key {
            Some(_) => None,
            None => routed.path().and_then(rewrite::api_key_param),
        };
        match keys.check(arrival.api_key.or(query.as_deref())) {
            KeyCheck::Known(known) => client = Some(known),
            check => {
                return Decision::Reply {
                    target,
                    diagnosis: Diagnosis::client_key(check == KeyCheck::Missing),
                }
            }
        }
    }
    let kind = config
        .tokens
        .get(spec.token)
        .map_or(CredentialKind::Bearer, |t| t.source.credential());
    let path = routed.path().and_then(rewrite::without_api_key_param);
    let carries_key = policy::carries_key(arrival.api_key, routed.path());
    let forwards_key = carries_key && policy.on_token_failure == OnTokenFailure::ForwardKey;
    let Some(agent) = agents.get_mut(spec.token) else {
        return Decision::Pass {
            miss: None,
            explain_403: false,
        };
    };
    // The way back to keys: with a failure already known, a request that
    // brought a key goes on with it at once instead of waiting.
    if forwards_key {
        if let Some(code) = agent.unavailable(now_ms) {
            return Decision::ForwardKey { target, code };
        }
    }
    match agent.admit(now_ms, request, target) {
        Admission::Authorize { bearer, generation } => Decision::Authorize {
            target,
            kind,
            credential: bearer,
            generation,
            client,
            path,
        },
        Admission::Park { kick } => Decision::Park {
            target,
            client,
            kick,
            path,
            carries_key,
        },
    }
}

/// After the filter's writes, Envoy matches the route again (a proxy-wasm
/// 0.2.1 header write clears the route cache). Once the request is on its
/// way, the cluster it went to is known: was it the one the filter checked
/// (`checked`, for a target bound to clusters), or, for a target without
/// `clusters`, one whose destination the client does not pick?
pub fn went_where_checked(checked: Option<&str>, taken: Option<&str>) -> bool {
    match (checked, taken) {
        (Some(checked), Some(taken)) => checked == taken,
        (None, Some(taken)) => !crate::rewrite::client_chosen(taken),
        // No cluster at all: Envoy answered itself (no route, no upstream).
        (_, None) => true,
    }
}

#[cfg(test)]
mod tests;

//! The end-to-end scenarios, told at the level of the decision.

use super::*;
use crate::agent::Agent;
use crate::diagnose::code;
use crate::store::{self, memory::MemoryStore};
use crate::token::{Secret, Token};

const NOW: u64 = 1_763_752_300_000;
const HOST: &str = "myres.openai.azure.com";
const CHAT: &str = "/openai/deployments/d/chat/completions?api-version=2024-10-21";

/// A request's path and routed cluster, as the glue would read them.
struct At {
    path: Option<String>,
    cluster: Option<String>,
    names_destination: bool,
}

impl Routed for At {
    fn path(&mut self) -> Option<&str> {
        self.path.as_deref()
    }
    fn cluster(&mut self) -> Option<&str> {
        self.cluster.as_deref()
    }
    fn names_destination(&self) -> bool {
        self.names_destination
    }
}

fn at(path: &str, cluster: &str) -> At {
    At {
        path: Some(path.to_owned()),
        cluster: Some(cluster.to_owned()),
        names_destination: false,
    }
}

/// The configuration and one agent per token; `with_token` installs a usable
/// token in each.
fn plan(json: &str, with_token: bool) -> (Config, Vec<Agent>) {
    let config = Config::parse(json.as_bytes()).unwrap();
    let mut store = MemoryStore::default();
    let agents = config
        .tokens
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let mut agent = Agent::new(spec.clone(), 1, i as u64);
            store::ensure_record(&mut store, agent.key()).unwrap();
            if with_token {
                let token = Token {
                    secret: Secret::new(format!("eyJ.token-{i}.sig")),
                    obtained_at_ms: NOW,
                    expires_at_ms: NOW + 3_600_000,
                    refresh_after_ms: None,
                };
                agent.fetched(NOW, &mut store, Ok(token));
            }
            agent
        })
        .collect();
    (config, agents)
}

fn with_key(authority: &str) -> Arrival<'_> {
    Arrival {
        authority,
        api_key: Some(b"app-key-123"),
        authorization: None,
    }
}

fn decide_one<'a>(
    config: &Config,
    agents: &'a mut [Agent],
    arrival: &Arrival<'_>,
    routed: &mut At,
) -> Decision<'a> {
    let refused = vec![None; config.targets.len()];
    decide(config, agents, &refused, arrival, routed, 7, NOW)
}

#[test]
fn a_request_to_a_listed_host_with_a_usable_token_is_authorized() {
    let (config, mut agents) = plan("{}", true);
    let decision = decide_one(&config, &mut agents, &with_key(HOST), &mut at(CHAT, "aoai"));
    assert!(
        matches!(decision, Decision::Authorize { credential, kind: CredentialKind::Bearer, path: None, .. }
            if credential == "Bearer eyJ.token-1.sig"),
        "{decision:?}"
    );
}

#[test]
fn a_cold_request_is_parked_and_the_first_one_kicks() {
    let (config, mut agents) = plan("{}", false);
    let first = decide_one(&config, &mut agents, &with_key(HOST), &mut at(CHAT, "aoai"));
    assert_eq!(
        first,
        Decision::Park {
            target: 1,
            client: None,
            kick: true,
            path: None,
            carries_key: true,
        }
    );
    let refused = vec![None; 2];
    let second = decide(
        &config,
        &mut agents,
        &refused,
        &with_key(HOST),
        &mut at(CHAT, "aoai"),
        8,
        NOW,
    );
    assert!(
        matches!(second, Decision::Park { kick: false, .. }),
        "{second:?}"
    );
    // What the wake-up needs is decided at arrival: the path without its key.
    let refused = vec![None; 2];
    let keyed = decide(
        &config,
        &mut agents,
        &refused,
        &Arrival {
            authority: HOST,
            api_key: None,
            authorization: None,
        },
        &mut at("/openai/realtime?api-key=k&deployment=d", "aoai"),
        9,
        NOW,
    );
    assert!(
        matches!(&keyed, Decision::Park { path: Some(p), carries_key: true, .. } if p == "/openai/realtime?deployment=d"),
        "{keyed:?}"
    );
}

#[test]
fn a_target_without_clusters_never_lends_to_a_cluster_the_client_picks() {
    let (config, mut agents) = plan("{}", true);
    for cluster in [
        "PassthroughCluster",
        "InboundPassthroughClusterIpv4",
        "InboundPassthroughCluster",
        "AllowAnyDynamicDNSCluster",
    ] {
        let decision = decide_one(
            &config,
            &mut agents,
            &with_key(HOST),
            &mut at(CHAT, cluster),
        );
        assert_eq!(
            decision,
            Decision::Pass {
                miss: Some(NearMiss::ClientChosenDestination),
                explain_403: true,
            },
            "{cluster}"
        );
    }
    let mut steered = at(CHAT, "outbound|443||myres.openai.azure.com");
    steered.names_destination = true;
    assert_eq!(
        decide_one(&config, &mut agents, &with_key(HOST), &mut steered),
        Decision::Pass {
            miss: Some(NearMiss::ClientChosenDestination),
            explain_403: true
        }
    );
    // No route at all: nothing to lend to.
    let mut nowhere = at(CHAT, "x");
    nowhere.cluster = None;
    assert!(matches!(
        decide_one(&config, &mut agents, &with_key(HOST), &mut nowhere),
        Decision::Pass { .. }
    ));
}

#[test]
fn a_path_that_resolves_outside_the_scope_gets_no_credential() {
    let json = r#"{"targets":[{"hosts":["myres.openai.azure.com"],"paths":["/openai/"]}]}"#;
    let (config, mut agents) = plan(json, true);
    for path in [
        "/openai/../internal/admin",
        "/openai/./../internal/admin",
        "/openai/%2e%2e/internal",
    ] {
        let decision = decide_one(&config, &mut agents, &with_key(HOST), &mut at(path, "aoai"));
        assert!(
            matches!(decision, Decision::Pass { .. }),
            "{path}: {decision:?}"
        );
    }
    let inside = decide_one(&config, &mut agents, &with_key(HOST), &mut at(CHAT, "aoai"));
    assert!(matches!(inside, Decision::Authorize { .. }), "{inside:?}");
}

#[test]
fn a_target_seen_re_routed_is_refused_with_both_clusters_named() {
    let json = r#"{"targets":[{"hosts":["*"],"clusters":["aoai"]}]}"#;
    let (config, mut agents) = plan(json, true);
    let refused = vec![Some(Refusal {
        checked: "aoai".into(),
        taken: "other".into(),
    })];
    let decision = decide(
        &config,
        &mut agents,
        &refused,
        &with_key(HOST),
        &mut at(CHAT, "aoai"),
        1,
        NOW,
    );
    let Decision::Reply { diagnosis, .. } = decision else {
        panic!("{decision:?}");
    };
    assert_eq!(diagnosis.code, code::ROUTE_CHANGED_AFTER_REWRITE);
    assert!(diagnosis.message.contains("\"other\"") && diagnosis.message.contains("\"aoai\""));
}

#[test]
fn the_cluster_after_the_rewrite_must_be_the_one_checked() {
    assert!(went_where_checked(Some("aoai"), Some("aoai")));
    assert!(!went_where_checked(Some("aoai"), Some("other")));
    assert!(went_where_checked(
        None,
        Some("outbound|443||myres.openai.azure.com")
    ));
    assert!(!went_where_checked(None, Some("PassthroughCluster")));
    assert!(went_where_checked(Some("aoai"), None));
}

#[test]
fn gateway_keys_admit_listed_callers_and_refuse_the_rest() {
    let digest = {
        use sha2::{Digest, Sha256};
        let d: [u8; 32] = Sha256::digest(b"team-a-key").into();
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let json = format!(
        r#"{{"hosts":["{HOST}"],"client_keys":[{{"name":"team-a","sha256":"{digest}"}}]}}"#
    );
    let (config, mut agents) = plan(&json, true);
    let known = Arrival {
        authority: HOST,
        api_key: Some(b"team-a-key"),
        authorization: None,
    };
    assert!(matches!(
        decide_one(&config, &mut agents, &known, &mut at(CHAT, "aoai")),
        Decision::Authorize {
            client: Some(0),
            ..
        }
    ));
    let by_query = Arrival {
        authority: HOST,
        api_key: None,
        authorization: None,
    };
    assert!(matches!(
        decide_one(
            &config,
            &mut agents,
            &by_query,
            &mut at("/openai/realtime?api-key=team-a-key", "aoai")
        ),
        Decision::Authorize {
            client: Some(0),
            path: Some(_),
            ..
        }
    ));
    for (arrival, expected) in [
        (with_key(HOST), code::CLIENT_KEY_UNKNOWN),
        (
            Arrival {
                authority: HOST,
                api_key: None,
                authorization: None,
            },
            code::CLIENT_KEY_REQUIRED,
        ),
    ] {
        match decide_one(&config, &mut agents, &arrival, &mut at(CHAT, "aoai")) {
            Decision::Reply { diagnosis, .. } => assert_eq!(diagnosis.code, expected),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_key_in_the_query_leaves_with_the_rest_of_the_query_intact() {
    let (config, mut agents) = plan("{}", true);
    let decision = decide_one(
        &config,
        &mut agents,
        &Arrival {
            authority: HOST,
            api_key: None,
            authorization: None,
        },
        &mut at(
            "/openai/realtime?api-version=x&api-key=k&deployment=d",
            "aoai",
        ),
    );
    assert!(
        matches!(&decision, Decision::Authorize { path: Some(p), .. } if p == "/openai/realtime?api-version=x&deployment=d"),
        "{decision:?}"
    );
}

#[test]
fn an_unlisted_azure_host_and_a_port_spelling_pass_with_their_reason() {
    let (config, mut agents) = plan(r#"{"hosts":["east.openai.azure.com"]}"#, true);
    assert_eq!(
        decide_one(
            &config,
            &mut agents,
            &with_key("west.openai.azure.com"),
            &mut at(CHAT, "aoai")
        ),
        Decision::Pass {
            miss: Some(NearMiss::UnlistedAzureHost),
            explain_403: true,
        }
    );
    assert_eq!(
        decide_one(
            &config,
            &mut agents,
            &with_key("east.openai.azure.com:443"),
            &mut at(CHAT, "aoai")
        ),
        Decision::Pass {
            miss: Some(NearMiss::Spelling),
            explain_403: true,
        }
    );
    assert_eq!(
        decide_one(
            &config,
            &mut agents,
            &with_key("api.example.com"),
            &mut at(CHAT, "aoai")
        ),
        Decision::Pass {
            miss: None,
            explain_403: false
        }
    );
    assert_eq!(
        crate::diagnose::near_miss_code(NearMiss::UnlistedAzureHost),
        code::HOST_NOT_IN_TARGETS
    );
    // Without a key Azure has nothing to refuse as a key: no header.
    let keyless = Arrival {
        authority: "west.openai.azure.com",
        api_key: None,
        authorization: None,
    };
    assert!(matches!(
        decide_one(&config, &mut agents, &keyless, &mut at(CHAT, "aoai")),
        Decision::Pass {
            miss: Some(_),
            explain_403: false
        }
    ));
}

#[test]
fn forward_key_sends_a_keyed_request_on_once_a_failure_is_known() {
    let (config, mut agents) = plan(r#"{"on_token_failure":"forward_key"}"#, false);
    // Before any attempt has ended, it waits like any other.
    assert!(matches!(
        decide_one(&config, &mut agents, &with_key(HOST), &mut at(CHAT, "aoai")),
        Decision::Park { .. }
    ));
    let mut store = MemoryStore::default();
    store::ensure_record(&mut store, agents[1].key()).unwrap();
    agents[1].fetched(NOW, &mut store, Err(crate::token::FetchFailure::NoResponse));
    assert_eq!(
        decide_one(&config, &mut agents, &with_key(HOST), &mut at(CHAT, "aoai")),
        Decision::ForwardKey {
            target: 1,
            code: code::TOKEN_ENDPOINT_UNREACHABLE
        }
    );
}

#[test]
fn an_applications_own_entra_token_for_the_audience_is_kept() {
    use base64::Engine;
    let claims = format!(
        r#"{{"aud":"https://cognitiveservices.azure.com","exp":{}}}"#,
        NOW / 1000 + 600
    );
    let jwt = format!(
        "eyJhbGciOiJSUzI1NiJ9.{}.c2ln",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims)
    );
    let bearer = format!("Bearer {jwt}");
    let (config, mut agents) = plan(r#"{"client_token":"keep"}"#, true);
    let arrival = Arrival {
        authority: HOST,
        api_key: Some(b"k"),
        authorization: Some(bearer.as_bytes()),
    };
    assert_eq!(
        decide_one(&config, &mut agents, &arrival, &mut at(CHAT, "aoai")),
        Decision::KeepClientToken {
            target: 1,
            path: None
        }
    );
}

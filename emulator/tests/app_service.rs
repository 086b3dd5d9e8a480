//! The App Service / Container Apps managed-identity endpoint over HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use aoai_emulator::{app_service_error, Emulator, Identity, ImdsReply, Settings, RESOURCE};
use common::{call, claims, is_uuid_like, Answer};

const HEADER: &str = "emulator-identity-header-0000";

fn token_path(extra: &str) -> String {
    format!("/msi/token?api-version=2019-08-01&resource=https%3A%2F%2Fcognitiveservices.azure.com{extra}")
}

fn get(emulator: &Emulator, path: &str, header: Option<&str>) -> Answer {
    let headers: Vec<(&str, &str)> = header
        .map(|h| ("X-IDENTITY-HEADER", h))
        .into_iter()
        .collect();
    call(emulator, "GET", "localhost:42356", path, &headers, "")
}

fn users_only(users: Vec<Identity>) -> Settings {
    Settings {
        system_identity: None,
        user_identities: users,
        ..Settings::default()
    }
}

#[test]
fn a_token_comes_with_expires_on_as_a_string_and_no_expires_in() {
    let emulator = Emulator::start(Settings {
        token_lifetime_s: 3600,
        ..Settings::default()
    })
    .unwrap();
    let answer = get(&emulator, &token_path(""), Some(HEADER));
    assert_eq!(answer.status, 200, "{}", answer.body);
    let body = answer.body.as_object().unwrap();
    let mut keys: Vec<_> = body.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "access_token",
            "client_id",
            "expires_on",
            "resource",
            "token_type"
        ]
    );
    let expires_on: u64 = body["expires_on"].as_str().unwrap().parse().unwrap();
    let token = body["access_token"].as_str().unwrap();
    assert_eq!(claims(token)["exp"].as_u64(), Some(expires_on));
    assert_eq!(claims(token)["aud"], RESOURCE);
    assert_eq!(body["resource"], RESOURCE);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["client_id"], Identity::system().client_id.as_str());
    assert_eq!(emulator.minted_tokens(), [token.to_owned()]);
    assert_eq!(emulator.tokens_minted(), 1);
    assert_eq!(emulator.app_service_requests()[0].status, 200);
    assert!(emulator.imds_requests().is_empty());
}

#[test]
fn a_missing_or_wrong_identity_header_is_a_401_in_the_platform_shape() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    for header in [None, Some("not-the-header")] {
        let answer = get(&emulator, &token_path(""), header);
        assert_eq!(answer.status, 401);
        assert_eq!(answer.body["statusCode"], 401);
        assert!(answer.body["message"]
            .as_str()
            .unwrap()
            .contains("X-IDENTITY-HEADER"));
        let correlation = answer.body["correlationId"].as_str().unwrap();
        assert!(is_uuid_like(correlation), "{correlation}");
        assert_eq!(answer.header("x-correlation-id"), Some(correlation));
    }
    assert_eq!(emulator.tokens_minted(), 0);
    let recorded: Vec<u16> = emulator
        .app_service_requests()
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(recorded, [401, 401]);
}

#[test]
fn an_api_version_other_than_2019_08_01_is_a_400() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    for path in [
        "/msi/token?api-version=2017-09-01&resource=https://cognitiveservices.azure.com",
        "/msi/token?resource=https://cognitiveservices.azure.com",
    ] {
        let answer = get(&emulator, path, Some(HEADER));
        assert_eq!(answer.status, 400, "{path}");
        assert_eq!(answer.body["statusCode"], 400);
        assert!(answer.body["message"]
            .as_str()
            .unwrap()
            .contains("2019-08-01"));
    }
}

#[test]
fn several_user_assigned_identities_and_none_chosen_cannot_be_loaded() {
    let emulator = Emulator::start(users_only(vec![
        Identity::user("first", 1),
        Identity::user("second", 2),
    ]))
    .unwrap();
    let answer = get(&emulator, &token_path(""), Some(HEADER));
    assert_eq!(answer.status, 400);
    assert_eq!(answer.body["statusCode"], 400);
    assert_eq!(
        answer.body["message"],
        "Unable to load the proper Managed Identity."
    );
    assert!(is_uuid_like(answer.body["correlationId"].as_str().unwrap()));
}

#[test]
fn a_lone_user_assigned_identity_is_not_chosen_by_default_unlike_imds() {
    let emulator = Emulator::start(users_only(vec![Identity::user("only", 1)])).unwrap();
    let answer = get(&emulator, &token_path(""), Some(HEADER));
    assert_eq!(answer.status, 400);
    assert_eq!(
        answer.body["message"],
        "Unable to load the proper Managed Identity."
    );
}

#[test]
fn no_identity_at_all_is_a_400_that_says_so() {
    let emulator = Emulator::start(users_only(Vec::new())).unwrap();
    let answer = get(&emulator, &token_path(""), Some(HEADER));
    assert_eq!(answer.status, 400);
    assert_eq!(
        answer.body["message"],
        "No managed identity is enabled for this app."
    );
}

#[test]
fn client_id_principal_id_object_id_and_mi_res_id_each_select_a_user_assigned_identity() {
    let (first, second) = (Identity::user("first", 1), Identity::user("second", 2));
    let emulator = Emulator::start(Settings {
        user_identities: vec![first.clone(), second.clone()],
        ..Settings::default()
    })
    .unwrap();
    let cases = [
        format!("&client_id={}", second.client_id),
        format!("&principal_id={}", second.object_id),
        format!("&object_id={}", second.object_id),
        format!("&mi_res_id={}", second.resource_id.to_uppercase()),
    ];
    for extra in &cases {
        let answer = get(&emulator, &token_path(extra), Some(HEADER));
        assert_eq!(answer.status, 200, "{extra}: {}", answer.body);
        assert_eq!(
            answer.body["client_id"],
            second.client_id.as_str(),
            "{extra}"
        );
        let token = answer.body["access_token"].as_str().unwrap();
        assert_eq!(claims(token)["oid"], second.object_id.as_str());
        assert_eq!(claims(token)["xms_mirid"], second.resource_id.as_str());
    }
}

#[test]
fn msi_res_id_is_imds_spelling_and_is_ignored_here() {
    let user = Identity::user("first", 1);
    let emulator = Emulator::start(Settings {
        user_identities: vec![user.clone()],
        ..Settings::default()
    })
    .unwrap();
    let answer = get(
        &emulator,
        &token_path(&format!("&msi_res_id={}", user.resource_id)),
        Some(HEADER),
    );
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.body["client_id"],
        Identity::system().client_id.as_str(),
        "the system identity answers, as if no selector were given"
    );
}

#[test]
fn an_unknown_or_doubled_selector_is_a_400() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let unknown = get(
        &emulator,
        &token_path("&client_id=00000000-0000-0000-0000-00000000dead"),
        Some(HEADER),
    );
    assert_eq!(unknown.status, 400);
    assert_eq!(
        unknown.body["message"],
        "Unable to load the proper Managed Identity."
    );
    let system = Identity::system();
    let doubled = get(
        &emulator,
        &token_path(&format!(
            "&client_id={}&principal_id={}",
            system.client_id, system.object_id
        )),
        Some(HEADER),
    );
    assert_eq!(doubled.status, 400);
}

#[test]
fn a_default_scope_as_resource_gets_the_platforms_vague_500() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let answer = get(
        &emulator,
        "/msi/token?api-version=2019-08-01&resource=https://cognitiveservices.azure.com/.default",
        Some(HEADER),
    );
    assert_eq!(answer.status, 500);
    assert_eq!(
        answer.body["message"],
        "An unexpected error occured while fetching the AAD Token."
    );
}

#[test]
fn scripted_replies_answer_in_order_and_then_tokens_again() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    emulator.script_app_service([
        app_service_error(503, "Service unavailable."),
        ImdsReply::Slow {
            delay_ms: 50,
            then: Box::new(ImdsReply::Token),
        },
    ]);
    let first = get(&emulator, &token_path(""), Some(HEADER));
    assert_eq!(first.status, 503);
    assert_eq!(first.body["statusCode"], 503);
    assert_eq!(first.body["message"], "Service unavailable.");
    assert_eq!(get(&emulator, &token_path(""), Some(HEADER)).status, 200);
    assert_eq!(get(&emulator, &token_path(""), Some(HEADER)).status, 200);
    let slow = &emulator.app_service_requests()[1];
    assert!(slow.at_ms - slow.arrived_ms >= 50);
    assert_eq!(emulator.tokens_minted(), 2);
}

#[test]
fn a_custom_identity_header_is_the_one_required() {
    let emulator = Emulator::start(Settings {
        identity_header: "rotated-header".into(),
        ..Settings::default()
    })
    .unwrap();
    assert_eq!(get(&emulator, &token_path(""), Some(HEADER)).status, 401);
    assert_eq!(
        get(&emulator, &token_path(""), Some("rotated-header")).status,
        200
    );
    let recorded = &emulator.app_service_requests()[1];
    assert_eq!(recorded.query["api-version"], "2019-08-01");
    assert!(recorded
        .headers
        .iter()
        .any(|(n, v)| n == "x-identity-header" && v == "rotated-header"));
}

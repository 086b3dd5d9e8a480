//! Property tests: the parsers that read what other parties wrote never panic,
//! whatever they are given. `make fuzz` runs 300 000 cases of each property;
//! `make test` runs the default number.
#![cfg(not(target_arch = "wasm32"))]

use aoai_msi_filter::config::Config;
use aoai_msi_filter::rewrite::HostPatterns;
use aoai_msi_filter::store::Record;
use aoai_msi_filter::token::{parse_response, FetchFailure, MAX_TOKEN_BYTES};
use aoai_msi_filter::upstream;
use proptest::prelude::*;
use serde_json::{json, Value};

const NOW_MS: u64 = 1_763_752_300_000;

/// JSON values of every shape, with strings that may hold anything.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
        "[0-9]{1,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Token responses close to real ones: the right keys, any values.
fn token_like() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("access_token"),
        Just("token_type"),
        Just("expires_on"),
        Just("expires_in"),
        Just("not_before"),
        Just("resource"),
        Just("error"),
        Just("error_description"),
    ];
    prop::collection::btree_map(key.prop_map(str::to_owned), any_json(), 0..8)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

/// Configurations close to real ones: the contract's keys, any values.
fn config_like() -> impl Strategy<Value = Value> {
    let source = prop::collection::btree_map(
        prop_oneof![
            Just("type"),
            Just("cluster"),
            Just("authority"),
            Just("client_id"),
            Just("object_id"),
            Just("msi_res_id"),
            Just("timeout_ms"),
        ]
        .prop_map(str::to_owned),
        any_json(),
        0..5,
    )
    .prop_map(|m| Value::Object(m.into_iter().collect()));
    let hosts = prop::collection::vec("[*.a-zA-Z0-9:/-]{0,24}".prop_map(Value::String), 0..4)
        .prop_map(Value::Array);
    (
        proptest::option::of(source),
        proptest::option::of(prop_oneof![hosts, any_json()]),
        proptest::option::of(any_json()),
        proptest::option::of(any_json()),
    )
        .prop_map(|(source, hosts, resource, wait)| {
            let mut m = serde_json::Map::new();
            if let Some(v) = source {
                m.insert("token_source".into(), v);
            }
            if let Some(v) = hosts {
                m.insert("hosts".into(), v);
            }
            if let Some(v) = resource {
                m.insert("resource".into(), v);
            }
            if let Some(v) = wait {
                m.insert("token_wait_timeout_ms".into(), v);
            }
            Value::Object(m)
        })
}

fn check_token_result(result: Result<aoai_msi_filter::token::Token, FetchFailure>) {
    if let Ok(token) = result {
        let value = token.secret.expose();
        assert!(!value.is_empty() && value.len() <= MAX_TOKEN_BYTES);
        assert!(value.bytes().all(|b| b.is_ascii_graphic()), "header-safe");
        assert!(token.expires_at_ms > NOW_MS);
    }
}

proptest! {
    #[test]
    fn token_parser_never_panics_on_arbitrary_bytes(status in prop::option::of(0u16..1000), body in prop::collection::vec(any::<u8>(), 0..512)) {
        check_token_result(parse_response(status, &body, NOW_MS));
    }

    #[test]
    fn token_parser_never_panics_on_token_shaped_json(status in prop_oneof![Just(200u16), 100u16..600], body in token_like()) {
        check_token_result(parse_response(Some(status), body.to_string().as_bytes(), NOW_MS));
    }

    #[test]
    fn config_parser_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = Config::parse(&bytes);
    }

    #[test]
    fn config_parser_never_panics_and_accepted_configs_are_sound(value in config_like()) {
        match Config::parse(value.to_string().as_bytes()) {
            Ok(config) => {
                prop_assert!(!config.hosts.patterns().is_empty());
                prop_assert!(!config.resource.ends_with("/.default"));
                prop_assert_eq!(config.token_fingerprint(), config.clone().token_fingerprint());
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn host_matching_never_panics(authority in ".{0,64}") {
        let _ = Config::default().hosts.matches(&authority);
        let _ = HostPatterns::new(vec![]).matches(&authority);
    }

    #[test]
    fn shared_records_of_any_bytes_decode_or_are_ignored(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = Record::decode(&bytes);
    }

    #[test]
    fn upstream_classifier_never_panics(status in 100u16..600, body in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        any_json().prop_map(|v| v.to_string().into_bytes()),
        any_json().prop_map(|v| json!({"error": v}).to_string().into_bytes()),
    ]) {
        let _ = upstream::classify(status, &body);
    }
}

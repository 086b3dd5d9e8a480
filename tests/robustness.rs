//! Property tests: the parsers that read what other parties wrote never panic,
//! whatever they are given, and what they let through has the shape it must
//! have. Covers the glue-facing decoders (header values, bodies, the queue
//! registry) and the sanitiser that stands between upstream text and the
//! commands operators paste. `make fuzz` runs 300 000 cases of each property;
//! `make test` runs `FUZZ_CASES`.
#![cfg(not(target_arch = "wasm32"))]

use aoai_msi_filter::annotate::{self, BodyMode, BodyStep, Facts, Inspection};
use aoai_msi_filter::claims::Claims;
use aoai_msi_filter::config::Config;
use aoai_msi_filter::rewrite::HostPatterns;
use aoai_msi_filter::store::{self, memory::MemoryStore, Record, SharedStore};
use aoai_msi_filter::token::{parse_response, same_audience, FetchFailure, MAX_TOKEN_BYTES};
use aoai_msi_filter::upstream::{self, MAX_ERROR_BODY};
use aoai_msi_filter::{safe, wire};
use proptest::prelude::*;
use serde_json::{json, Value};

const NOW_MS: u64 = 1_763_752_300_000;
const RESOURCE: &str = "https://cognitiveservices.azure.com";

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

fn check_token_result(result: Result<aoai_msi_filter::token::Issued, FetchFailure>) {
    if let Ok(issued) = result {
        let token = issued.token;
        let value = token.secret.expose();
        assert!(!value.is_empty() && value.len() <= MAX_TOKEN_BYTES);
        assert!(value.bytes().all(|b| b.is_ascii_graphic()), "header-safe");
        assert!(token.expires_at_ms > NOW_MS);
        if let Some(aud) = Claims::read(value).and_then(|c| c.aud) {
            assert!(
                same_audience(&aud, RESOURCE),
                "only the asked audience: {aud}"
            );
        }
    }
}

/// Bytes a header value may hold, hostile ones included.
fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..48),
        "[ -~]{0,40}".prop_map(String::into_bytes),
        Just(b"application/json".to_vec()),
        Just(b"application/json\xff".to_vec()),
        "[0-9]{1,7}".prop_map(String::into_bytes),
    ]
}

/// An Azure-shaped PermissionDenied message with anything between the backticks.
fn permission_denied_body() -> impl Strategy<Value = Vec<u8>> {
    (".{0,40}", ".{0,60}").prop_map(|(principal, action)| {
        json!({"error": {"code": "PermissionDenied", "message": format!(
            "The principal `{principal}` lacks the required data action `{action}` to perform `POST /x` operation."
        )}})
        .to_string()
        .into_bytes()
    })
}

/// The value following `flag ` in a command, up to the next space.
fn after<'a>(command: &'a str, flag: &str) -> &'a str {
    command
        .split_once(&format!("{flag} "))
        .and_then(|(_, rest)| rest.split(' ').next())
        .unwrap_or_default()
}

proptest! {
    #[test]
    fn token_parser_never_panics_on_arbitrary_bytes(status in prop::option::of(0u16..1000), body in prop::collection::vec(any::<u8>(), 0..512)) {
        check_token_result(parse_response(status, &body, NOW_MS, RESOURCE));
    }

    #[test]
    fn token_parser_never_panics_on_token_shaped_json(status in prop_oneof![Just(200u16), 100u16..600], body in token_like()) {
        let result = parse_response(Some(status), body.to_string().as_bytes(), NOW_MS, RESOURCE);
        if result.is_ok() {
            if let Some(resource) = body.get("resource") {
                prop_assert!(resource.as_str().is_some_and(|r| same_audience(r, RESOURCE)), "{resource}");
            }
        }
        check_token_result(result);
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
                // The record key depends on what decides the token, and only on that.
                let mut other_hosts = value.clone();
                other_hosts["hosts"] = json!(["other.example"]);
                let same = Config::from_value(&other_hosts).unwrap();
                prop_assert_eq!(same.token_fingerprint(), config.token_fingerprint());
                let mut other_resource = value.clone();
                other_resource["resource"] = json!(format!("{}x", config.resource.trim_end_matches('/')));
                let different = Config::from_value(&other_resource).unwrap();
                prop_assert_ne!(different.token_fingerprint(), config.token_fingerprint());
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

    #[test]
    fn header_decoders_never_panic_and_accept_only_what_they_promise(value in header_bytes()) {
        if let Some(status) = wire::status(&value) {
            prop_assert!((100..600).contains(&status));
        }
        if let Some(text) = wire::text(&value) {
            prop_assert!(text.bytes().all(|b| b.is_ascii_graphic() || b == b' ' || b == b'\t'));
        }
        if let Some(n) = wire::content_length(&value) {
            prop_assert_eq!(n.to_string().into_bytes().len() <= value.len(), true);
        }
        let _ = (wire::is_json(Some(&value)), wire::is_identity(Some(&value)));
        let _ = HostPatterns::new(vec![]).matches(&String::from_utf8_lossy(&value));
    }

    #[test]
    fn response_inspection_holds_only_what_it_rewrites_and_never_beyond_the_bound(
        content_type in prop::option::of(header_bytes()),
        encoding in prop::option::of(header_bytes()),
        length in prop::option::of(header_bytes()),
        chunks in prop::collection::vec(0usize..(MAX_ERROR_BODY * 2), 1..6),
    ) {
        let mode = BodyMode::choose(content_type.as_deref(), encoding.as_deref(), length.as_deref());
        if mode == BodyMode::Rewrite {
            prop_assert!(wire::is_json(content_type.as_deref()) && wire::is_identity(encoding.as_deref()));
        }
        let mut inspection = Inspection::new(403, mode);
        let mut buffered = 0usize;
        for (i, chunk) in chunks.iter().enumerate() {
            let end = i + 1 == chunks.len();
            // Envoy's buffer grows while the filter holds, and starts afresh when it passes.
            let size = buffered + chunk;
            let wanted = inspection.wants(size, end);
            prop_assert!(wanted <= size && wanted <= MAX_ERROR_BODY + 1);
            let step = inspection.body(&vec![b' '; wanted], size, end);
            match step {
                BodyStep::Hold => {
                    prop_assert_eq!(mode, BodyMode::Rewrite, "only a body to rewrite is held");
                    prop_assert!(size <= MAX_ERROR_BODY, "never held past the bound");
                    buffered = size;
                }
                BodyStep::Pass => buffered = 0,
                BodyStep::Explain { rewrite } => {
                    prop_assert!(end);
                    prop_assert_eq!(rewrite, mode == BodyMode::Rewrite);
                    prop_assert!(inspection.collected().len() <= MAX_ERROR_BODY);
                    break;
                }
            }
        }
    }

    #[test]
    fn suggested_commands_carry_only_validated_values(body in permission_denied_body(), host in ".{0,40}", oid in ".{0,40}") {
        let Some(failure) = upstream::classify(401, &body) else {
            return Ok(());
        };
        let claims = Claims { oid: Some(oid), ..Claims::default() };
        let facts = Facts { host: &host, token: Some(&claims) };
        let a = annotate::explain(&failure, &facts, &Config::default(), NOW_MS, None);
        let command = a.fields["fix_command"].as_str().unwrap();
        let assignee = after(command, "--assignee-object-id");
        prop_assert!(assignee == "<principal" || safe::guid(assignee).is_some(), "{command}");
        let name = after(command, "--name");
        prop_assert!(name == "<resource" || safe::dns_label(name).is_some(), "{command}");
        let line = a.log_line(401, &host);
        prop_assert!(!line.chars().any(char::is_control), "{line:?}");
    }

    #[test]
    fn a_garbled_queue_registry_is_repaired_by_the_next_registration(bytes in prop::collection::vec(any::<u8>(), 0..200), queue in any::<u32>()) {
        let mut shared = MemoryStore::default();
        shared.set("q", &bytes, None).unwrap();
        let _ = store::queues(&shared, "q", NOW_MS);
        store::register_queue(&mut shared, "q", queue, NOW_MS).unwrap();
        let live = store::queues(&shared, "q", NOW_MS).unwrap();
        prop_assert!(live.contains(&queue));
        prop_assert!(live.len() <= store::MAX_QUEUES);
    }
}

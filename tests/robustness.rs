//! Property tests: the parsers that read what other parties wrote never panic,
//! whatever they are given, and what they let through has the shape it must
//! have. Covers the glue-facing decoders (header values, bodies, the queue
//! registry) and the sanitiser that stands between upstream text and the
//! commands operators paste. `make fuzz` runs 300 000 cases of each property;
//! `make test` runs `FUZZ_CASES`.
#![cfg(not(target_arch = "wasm32"))]

use aoai_msi_filter::claims::Claims;
use aoai_msi_filter::config::Config;
use aoai_msi_filter::diagnose::annotate::{self, BodyMode, BodyStep, Facts, Inspection};
use aoai_msi_filter::diagnose::upstream::{self, MAX_ERROR_BODY};
use aoai_msi_filter::rewrite::HostPatterns;
use aoai_msi_filter::route::Routed;
use aoai_msi_filter::store::{self, memory::MemoryStore, Record, SharedStore};
use aoai_msi_filter::token::{parse_response, same_audience, FetchFailure, MAX_TOKEN_BYTES};
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
fn source_like() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(
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
        prop_oneof![any_json(), "[a-z0-9-]{1,12}".prop_map(Value::String)],
        0..4,
    )
    .prop_map(|m| Value::Object(m.into_iter().collect()))
}

/// Host patterns, mostly well formed, Azure and not, with odd ones among them.
fn host_list() -> impl Strategy<Value = Value> {
    let host = prop_oneof![
        Just("*.openai.azure.com".to_owned()),
        Just("*.openai.azure.us".to_owned()),
        Just("*.services.ai.azure.com".to_owned()),
        Just("*.inference.ml.azure.com".to_owned()),
        Just("*".to_owned()),
        "[a-z]{1,6}\\.openai\\.azure\\.(com|us|cn)",
        "[a-z]{1,6}\\.example",
        "[*.a-zA-Z0-9:/-]{0,24}",
    ];
    prop::collection::vec(host.prop_map(Value::String), 1..4).prop_map(Value::Array)
}

/// Configurations close to real ones: the contract's keys, any values.
fn config_like() -> impl Strategy<Value = Value> {
    let list = |strategy: BoxedStrategy<String>| {
        prop::collection::vec(strategy.prop_map(Value::String), 1..3).prop_map(Value::Array)
    };
    // Mostly valid values, so that the properties below see accepted configs.
    let target = (
        prop_oneof![3 => Just(None), 1 => "[a-z0-9 -]{0,8}".prop_map(Some)],
        prop_oneof![6 => host_list().prop_map(Some), 1 => Just(None), 1 => any_json().prop_map(Some)],
        prop_oneof![2 => Just(None), 1 => list(prop_oneof![Just("/api/projects/".to_owned()), "/?[a-z/]{0,8}"].boxed()).prop_map(Some)],
        prop_oneof![1 => Just(None), 1 => list(prop_oneof![3 => Just("aoai".to_owned()), 1 => "[a-z|0-9]{0,6}"].boxed()).prop_map(Some)],
        prop_oneof![4 => Just(None), 1 => source_like().prop_map(Some)],
    )
        .prop_map(|(name, hosts, paths, clusters, source)| {
            let mut m = serde_json::Map::new();
            for (key, value) in [
                ("name", name.map(Value::String)),
                ("hosts", hosts),
                ("paths", paths),
                ("clusters", clusters),
                ("token_source", source),
            ] {
                if let Some(v) = value {
                    m.insert(key.into(), v);
                }
            }
            Value::Object(m)
        });
    let shorthand = (
        prop_oneof![3 => Just(None), 1 => source_like().prop_map(Some)],
        prop_oneof![4 => host_list().prop_map(Some), 1 => Just(None), 1 => any_json().prop_map(Some)],
        prop_oneof![
            2 => Just(None),
            1 => Just(Some(json!("https://cognitiveservices.azure.us"))),
            1 => any_json().prop_map(Some)
        ],
        prop_oneof![3 => Just(None), 1 => any_json().prop_map(Some)],
    )
        .prop_map(|(source, hosts, resource, wait)| {
            let mut m = serde_json::Map::new();
            for (key, value) in [
                ("token_source", source),
                ("hosts", hosts),
                ("resource", resource),
                ("token_wait_timeout_ms", wait),
            ] {
                if let Some(v) = value {
                    m.insert(key.into(), v);
                }
            }
            Value::Object(m)
        });
    prop_oneof![
        shorthand,
        prop::collection::vec(target, 1..4).prop_map(|targets| json!({ "targets": targets })),
    ]
}

/// An authority spelled with a port, a trailing dot, or both.
fn respelled() -> impl Strategy<Value = String> {
    (
        prop_oneof![
            "[a-z]{1,6}\\.openai\\.azure\\.(com|us)",
            "[a-z]{1,6}\\.services\\.ai\\.azure\\.com",
            "[a-z]{1,6}\\.example",
        ],
        prop_oneof![Just(":443"), Just("."), Just(".:443"), Just(":8080")],
    )
        .prop_map(|(host, tail)| format!("{host}{tail}"))
}

/// A request whose path and routed cluster are given.
struct Given(String, String);

impl Routed for Given {
    fn path(&mut self) -> Option<&str> {
        Some(&self.0)
    }
    fn cluster(&mut self) -> Option<&str> {
        Some(&self.1)
    }
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
                prop_assert!(!config.targets.is_empty());
                for target in &config.targets {
                    prop_assert!(!target.hosts.patterns().is_empty());
                    prop_assert!(target.token < config.tokens.len());
                }
                let keys: std::collections::HashSet<String> =
                    config.tokens.iter().map(|t| t.fingerprint()).collect();
                prop_assert_eq!(keys.len(), config.tokens.len(), "tokens are distinct");
                for token in &config.tokens {
                    prop_assert!(!token.resource.ends_with("/.default"));
                }
                // For the shorthand: the record key depends on the source and
                // the resource, and on nothing else.
                if value.get("targets").is_none() {
                    let source = value.get("token_source").cloned().unwrap_or(json!({}));
                    for token in &config.tokens {
                        let alone = |resource: &str| {
                            Config::from_value(&json!({"hosts": ["other.example"], "resource": resource, "token_source": source}))
                                .unwrap()
                                .tokens[0]
                                .fingerprint()
                        };
                        prop_assert_eq!(alone(&token.resource), token.fingerprint());
                        prop_assert_ne!(alone(&format!("{}x", token.resource.trim_end_matches('/'))), token.fingerprint());
                    }
                }
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn a_respelled_host_never_reaches_a_target_that_does_not_follow_envoys_routing(
        value in config_like(),
        authority in respelled(),
        path in prop_oneof![Just("/api/projects/p/x".to_owned()), Just("/openai/x".to_owned())],
        cluster in prop_oneof![Just("aoai".to_owned()), Just("other".to_owned())],
    ) {
        if let Ok(config) = Config::parse(value.to_string().as_bytes()) {
            if let Some(target) = config.route(&authority, &mut Given(path, cluster.clone())) {
                let target = &config.targets[target];
                prop_assert!(
                    target.clusters.contains(&cluster),
                    "{authority} went to {} without a cluster check", target.name
                );
            }
        }
    }

    #[test]
    fn a_resolved_path_never_keeps_a_dot_segment_and_never_panics(path in "/[a-z./%2eE5cCfF\\\\;]{0,40}") {
        for decode in [false, true] {
            let resolved = aoai_msi_filter::scope::resolved(&path, decode);
            prop_assert!(resolved.starts_with('/'), "{path} -> {resolved}");
            for segment in resolved.split('/') {
                prop_assert!(segment != ".." && segment != ".", "{path} -> {resolved}");
            }
        }
        let _ = aoai_msi_filter::scope::in_scope(&path, &["/a/".to_owned()]);
    }

    #[test]
    fn host_matching_never_panics(authority in ".{0,64}") {
        let config = Config::default();
        let _ = config.route(&authority, &mut Given(authority.clone(), authority.clone()));
        let _ = config.near_miss(&authority, &mut Given(authority.clone(), authority.clone()));
        let _ = HostPatterns::new(vec![]).matches_bare(&authority);
        let _ = HostPatterns::new(vec![]).matches_spelled(&authority);
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
    fn header_maps_from_the_host_decode_exactly_or_not_at_all(
        pairs in prop::collection::vec((".{0,12}", prop::collection::vec(any::<u8>(), 0..24)), 0..8),
        noise in prop::collection::vec(any::<u8>(), 0..96),
        cut in any::<prop::sample::Index>(),
    ) {
        let borrowed: Vec<(&str, &[u8])> = pairs.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
        let bytes = wire::serialize_pairs(&borrowed);
        let back = wire::deserialize_pairs(&bytes);
        let expected: Vec<(&[u8], &[u8])> = borrowed.iter().map(|(n, v)| (n.as_bytes(), *v)).collect();
        prop_assert_eq!(back, Some(expected));
        // A map cut short never decodes; arbitrary bytes decode only when
        // they are exactly a map, which written back gives the same bytes.
        let short = &bytes[..cut.index(bytes.len())];
        prop_assert_eq!(wire::deserialize_pairs(short), None);
        if let Some(decoded) = wire::deserialize_pairs(&noise) {
            let mut again = (decoded.len() as u32).to_le_bytes().to_vec();
            for (n, v) in &decoded {
                again.extend((n.len() as u32).to_le_bytes());
                again.extend((v.len() as u32).to_le_bytes());
            }
            for (n, v) in &decoded {
                again.extend(*n);
                again.push(0);
                again.extend(*v);
                again.push(0);
            }
            prop_assert_eq!(again, noise);
        }
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
        let _ = HostPatterns::new(vec![]).matches_bare(&String::from_utf8_lossy(&value));
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
        let facts = Facts { host: &host, token: Some(&claims), source: None };
        let a = annotate::explain(&failure, &facts, RESOURCE, NOW_MS, None);
        let command = a.fields["fix_command"].as_str().unwrap();
        let assignee = after(command, "--assignee-object-id");
        prop_assert!(assignee == "<principal" || safe::guid(assignee).is_some(), "{command}");
        let name = after(command, "--name");
        prop_assert!(name == "<resource" || safe::dns_label(name).is_some(), "{command}");
        let line = a.log_line(401, &host);
        prop_assert!(!line.chars().any(char::is_control), "{line:?}");
    }

    #[test]
    fn credential_parser_never_panics_and_lets_through_only_header_safe_values(
        status in prop::option::of(prop_oneof![Just(200u16), 100u16..600]),
        body in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..256),
            token_like().prop_map(|v| {
                let mut v = v;
                if let Some(map) = v.as_object_mut() {
                    if let Some(t) = map.remove("access_token") {
                        map.insert("key".into(), t);
                    }
                }
                v.to_string().into_bytes()
            }),
        ],
        interval in 1_000u64..100_000,
    ) {
        let result = aoai_msi_filter::token::parse_credential(status, &body, NOW_MS, interval, Some(RESOURCE));
        check_token_result(result);
    }

    #[test]
    fn query_keys_are_found_and_removed_without_panicking(path in "/[a-z/]{0,8}(\\?([a-zA-Z%+=&#-]|api-key|API%2dKEY){0,12})?") {
        let found = aoai_msi_filter::rewrite::api_key_param(&path);
        match aoai_msi_filter::rewrite::without_api_key_param(&path) {
            Some(clean) => {
                prop_assert!(aoai_msi_filter::rewrite::api_key_param(&clean).is_none(), "{clean}");
                prop_assert!(aoai_msi_filter::rewrite::without_api_key_param(&clean).is_none(), "{clean}");
            }
            None => prop_assert!(found.is_none(), "{path}"),
        }
    }

    #[test]
    fn client_token_and_gateway_key_checks_never_panic(value in prop::collection::vec(any::<u8>(), 0..300), key in prop::option::of(prop::collection::vec(any::<u8>(), 0..64))) {
        let _ = aoai_msi_filter::policy::keeps_client_token(Some(&value), RESOURCE, NOW_MS / 1000);
        let keys = aoai_msi_filter::policy::ClientKeys::new(vec![("a".into(), [7u8; 32])]);
        let check = keys.check(key.as_deref());
        prop_assert_ne!(check, aoai_msi_filter::policy::KeyCheck::Known(0));
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

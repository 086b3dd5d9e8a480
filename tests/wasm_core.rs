//! The pure core, compiled to wasm and run under node (`make test-wasm`).
//! Same decisions as on the host, proven on the architecture Envoy runs.
#![cfg(all(target_arch = "wasm32", target_os = "unknown"))]

use aoai_msi_filter::agent::{Admission, Agent, Command};
use aoai_msi_filter::config::Config;
use aoai_msi_filter::route::Routed;
use aoai_msi_filter::source::Step;
use aoai_msi_filter::store::{self, memory::MemoryStore};
use aoai_msi_filter::token::{parse_response, FetchFailure, Secret, Token};
use wasm_bindgen_test::wasm_bindgen_test;

const NOW_MS: u64 = 1_763_752_300_000;

#[wasm_bindgen_test]
fn configuration_errors_name_the_field_in_wasm() {
    let e = Config::parse(br#"{"hosts":["*openai.azure.com"]}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`hosts[0]`"), "{e}");
    let e = Config::parse(br#"{"resource":"https://cognitiveservices.azure.com/.default"}"#)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("write \"https://cognitiveservices.azure.com\""),
        "{e}"
    );
    assert_eq!(Config::parse(b"{}").unwrap(), Config::default());
    let e = Config::parse(br#"{"targets":[{},{"paths":["x"]}]}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`targets[1].paths[0]`"), "{e}");
}

/// A request whose path and routed cluster are given.
struct Given(&'static str, &'static str);

impl Routed for Given {
    fn path(&mut self) -> Option<&str> {
        Some(self.0)
    }
    fn cluster(&mut self) -> Option<&str> {
        Some(self.1)
    }
}

#[wasm_bindgen_test]
fn routing_in_wasm_refuses_lookalikes_and_respellings() {
    let config = Config::default();
    let mut request = Given("/openai/x", "any");
    assert_eq!(
        config.route("MyRes.openai.azure.com", &mut request),
        Some(1)
    );
    for host in [
        "myres.openai.azure.com:443",
        "myres.openai.azure.com.",
        "openai.azure.com.evil.example",
        "xopenai.azure.com",
    ] {
        assert_eq!(config.route(host, &mut request), None, "{host}");
    }
    let mut project = Given("/api/projects/p/threads", "any");
    assert_eq!(
        config.route("acct.services.ai.azure.com", &mut project),
        Some(0)
    );
}

#[wasm_bindgen_test]
fn imds_answers_with_string_times_parse_in_wasm() {
    let body = br#"{"access_token":"eyJ.a.b","expires_on":"1763838699","expires_in":"86399","token_type":"Bearer"}"#;
    let token = parse_response(
        Some(200),
        body,
        NOW_MS,
        "https://cognitiveservices.azure.com",
    )
    .unwrap()
    .token;
    assert_eq!(token.expires_at_ms, 1_763_838_699_000);
    assert!(!format!("{token:?}").contains("eyJ.a.b"));
    let spec = &Config::default().tokens[1];
    let (_, step) = spec.source.begin(&spec.resource, NOW_MS, 7);
    let Step::Call(request) = step else {
        panic!("an IMDS fetch starts with a call: {step:?}");
    };
    assert!(request
        .path()
        .contains("resource=https%3A%2F%2Fcognitiveservices.azure.com"));
    assert_eq!(
        parse_response(None, b"", NOW_MS, "https://cognitiveservices.azure.com").unwrap_err(),
        FetchFailure::NoResponse
    );
}

#[wasm_bindgen_test]
fn skew_margin_boundary_holds_to_the_millisecond_in_wasm() {
    let token = Token {
        secret: Secret::new("t".into()),
        obtained_at_ms: 0,
        expires_at_ms: 86_400_000,
        refresh_after_ms: None,
    };
    assert!(token.usable(86_100_000 - 1));
    assert!(!token.usable(86_100_000));
    assert!(token.refresh_due(43_200_000));
}

#[wasm_bindgen_test]
fn one_fetch_for_many_vms_in_wasm() {
    let spec = Config::default().tokens[1].clone();
    let mut shared = MemoryStore::default();
    store::ensure_record(&mut shared, &Agent::record_key(&spec)).unwrap();
    let mut vms: Vec<Agent> = (0..4)
        .map(|vm| Agent::new(spec.clone(), vm, u64::from(vm)))
        .collect();
    let mut leaders = Vec::new();
    for (i, vm) in vms.iter_mut().enumerate() {
        assert!(matches!(
            vm.admit(NOW_MS, i as u32, 0),
            Admission::Park { .. }
        ));
        let commands = vm.sync(NOW_MS, &mut shared);
        if commands.iter().any(|c| matches!(c, Command::Dispatch(_))) {
            leaders.push(i);
        }
    }
    assert_eq!(leaders.len(), 1, "single flight: {leaders:?}");
    let token = Token {
        secret: Secret::new("tok".into()),
        obtained_at_ms: NOW_MS,
        expires_at_ms: NOW_MS + 3_600_000,
        refresh_after_ms: None,
    };
    vms[leaders[0]].fetched(NOW_MS + 5, &mut shared, Ok(token));
    for vm in vms.iter_mut() {
        vm.sync(NOW_MS + 6, &mut shared);
        assert!(matches!(
            vm.admit(NOW_MS + 7, 99, 0),
            Admission::Authorize {
                bearer: "Bearer tok",
                ..
            }
        ));
    }
}

#[wasm_bindgen_test]
fn gateway_keys_and_http_credentials_are_decided_in_wasm() {
    use aoai_msi_filter::policy::KeyCheck;
    // sha256("foo\n")
    let config = Config::parse(
        br#"{"client_keys":[{"name":"team-a","sha256":"b5bb9d8014a0f9b1d61e21e796d78dccdf1352f23cd32812f4850b878ae4944c"}]}"#,
    )
    .unwrap();
    let keys = config.targets[0].policy.client_keys.as_ref().unwrap();
    assert_eq!(keys.check(Some(b"foo\n")), KeyCheck::Known(0));
    assert_eq!(keys.check(Some(b"foo")), KeyCheck::Unknown);
    let issued = aoai_msi_filter::token::parse_credential(
        Some(200),
        br#"{"key":"k"}"#,
        NOW_MS,
        60_000,
        None,
    )
    .unwrap();
    assert_eq!(issued.token.refresh_after_ms, Some(NOW_MS + 60_000));
    assert_eq!(issued.token.secret.fingerprint().len(), 6);
}

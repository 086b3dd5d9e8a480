//! A real client: the openai Python SDK (pinned, in the project venv) calls
//! through Envoy and shows the filter's explanations in its exceptions.
#![cfg(not(target_arch = "wasm32"))]
// Test helpers: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use serde_json::Value;
use support::*;

/// Run the SDK once against Envoy; what it returned or raised.
fn sdk_call(envoy: &Envoy, max_retries: u32) -> Value {
    let result = openai_sdk_call(envoy, max_retries);
    println!("openai {}: {}", result["sdk"], result);
    result
}

/// The SDK calls http://127.0.0.1:<port>: a host with a port, so the target
/// binds to the cluster Envoy routes it to (the harness's `upstream`).
const LOCAL_HOSTS: &str = r#"{"targets": [{"name": "local", "hosts": ["127.0.0.1", "localhost"], "clusters": ["upstream"]}]}"#;

#[test]
fn a_successful_call_returns_the_completion() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let envoy = Envoy::start(LOCAL_HOSTS, &emulator, 2);
    let result = sdk_call(&envoy, 0);
    assert_eq!(result["ok"], true, "{result}");
    assert!(result["content"]
        .as_str()
        .unwrap()
        .contains("Hello from the openai SDK"));
    let seen = emulator.upstream_requests();
    assert_eq!(
        seen[0].verdict,
        Verdict::Ok,
        "the SDK's key was replaced by a token"
    );
}

#[test]
fn a_missing_role_raises_an_exception_that_says_how_to_grant_it() {
    let emulator = Emulator::start(Settings {
        role_holders: Default::default(),
        ..Settings::default()
    })
    .unwrap();
    let envoy = Envoy::start(LOCAL_HOSTS, &emulator, 2);
    let result = sdk_call(&envoy, 0);
    assert_eq!(result["ok"], false);
    assert_eq!(result["status"], 401);
    assert_eq!(result["diagnosis_header"], "UpstreamUnauthorized");
    // The SDK prints `Error code: 401 - <error.message>`: the explanation
    // must be in the message; code and diagnosis are in `e.body`.
    let printed = result["printed"].as_str().unwrap();
    let oid = aoai_emulator::Identity::system().object_id;
    for needle in [
        "lacks the required data action",
        "[aoai-msi-filter]",
        "Cognitive Services OpenAI User",
        &format!("az role assignment create --assignee-object-id {oid}"),
        "minutes to hours",
    ] {
        assert!(printed.contains(needle), "{needle} in: {printed}");
    }
    assert_eq!(
        result["body"]["code"], "PermissionDenied",
        "the upstream code is kept"
    );
    assert_eq!(result["body"]["diagnosis"], "RoleMissing");
    assert_eq!(result["body"]["principal_id"], oid);
}

#[test]
fn a_key_sent_to_an_unlisted_host_gets_azures_own_answer_untouched() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let envoy = Envoy::start(r#"{"hosts": ["myres.openai.azure.com"]}"#, &emulator, 2);
    let result = sdk_call(&envoy, 0);
    assert_eq!(result["status"], 403);
    assert_eq!(
        result["diagnosis_header"],
        Value::Null,
        "not the filter's request"
    );
    let printed = result["printed"].as_str().unwrap();
    assert!(
        printed.contains("Key based authentication is disabled"),
        "{printed}"
    );
    assert!(!printed.contains("[aoai-msi-filter]"), "{printed}");
    assert_eq!(result["body"]["code"], "AuthenticationTypeDisabled");
}

#[test]
fn an_unreachable_token_endpoint_raises_a_503_naming_the_cause() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let closed = closed_port();
    let config = r#"{"targets": [{"hosts": ["127.0.0.1"], "clusters": ["upstream"]}], "token_wait_timeout_ms": 500}"#;
    let envoy = Envoy::start_yaml(&envoy_yaml(config, closed.port, emulator.port()), 2);
    let result = sdk_call(&envoy, 0);
    assert_eq!(result["status"], 503);
    assert_eq!(result["diagnosis_header"], "TokenEndpointUnreachable");
    let printed = result["printed"].as_str().unwrap();
    assert!(printed.contains("did not answer"), "{printed}");
    assert!(printed.contains("169.254.169.254"), "{printed}");
    assert_eq!(result["body"]["code"], "TokenEndpointUnreachable");
}

#[test]
fn a_token_from_another_tenant_raises_an_exception_naming_the_tenant_and_who_can_reach_the_resource(
) {
    let other_tenant = "5e1f0c2d-0000-4000-8000-00000000beef";
    let emulator = Emulator::start(Settings {
        resource_tenant: other_tenant.to_owned(),
        ..Settings::default()
    })
    .unwrap();
    let envoy = Envoy::start(LOCAL_HOSTS, &emulator, 2);
    let result = sdk_call(&envoy, 0);
    assert_eq!(result["ok"], false);
    assert_eq!(result["status"], 400, "Azure's status is kept: {result}");
    assert_eq!(result["diagnosis_header"], "UpstreamBadRequest");
    assert_eq!(
        result["body"]["code"],
        "Tenant provided in token does not match resource token"
    );
    assert_eq!(result["body"]["diagnosis"], "TenantMismatch");
    assert_eq!(result["body"]["token_tenant"], aoai_emulator::TENANT_ID);
    let printed = result["printed"].as_str().unwrap();
    for needle in [
        &format!("Token tenant {}", aoai_emulator::TENANT_ID),
        "[aoai-msi-filter]",
        "belongs to another tenant",
        "managed identity receives tokens only from its own tenant",
        "client_credentials",
    ] {
        assert!(printed.contains(needle), "{needle} in: {printed}");
    }
    let seen = emulator.upstream_requests();
    assert_eq!(seen[0].verdict, Verdict::TenantMismatch);
}

#[test]
fn a_permission_denied_that_names_no_principal_still_names_the_identity_from_its_token() {
    let emulator = Emulator::start(Settings {
        role_holders: Default::default(),
        permission_denied_names_principal: false,
        ..Settings::default()
    })
    .unwrap();
    let envoy = Envoy::start(LOCAL_HOSTS, &emulator, 2);
    let result = sdk_call(&envoy, 0);
    assert_eq!(result["status"], 401);
    assert_eq!(result["body"]["diagnosis"], "RoleMissing");
    let oid = aoai_emulator::Identity::system().object_id;
    let printed = result["printed"].as_str().unwrap();
    for needle in [
        "Principal does not have access to API/Operation.",
        &format!("the managed identity (principal id {oid}"),
        &format!("--assignee-object-id {oid}"),
        "Cognitive Services OpenAI User",
    ] {
        assert!(printed.contains(needle), "{needle} in: {printed}");
    }
    assert_eq!(result["body"]["principal_id"], oid);
}

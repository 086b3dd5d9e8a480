//! Each data plane over HTTP: the host (and, on `*.services.ai.azure.com`,
//! the path) decides the audience a token must carry, and what was judged is
//! recorded with the audience that arrived and the one expected.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;

use aoai_emulator::{
    Emulator, Identity, Settings, Verdict, AI_RESOURCE, CHINA_RESOURCE, ML_RESOURCE, RESOURCE,
    US_GOV_RESOURCE,
};
use serde_json::Value;

const ML_HOST: &str = "ep1.eastus2.inference.ml.azure.com";
const FOUNDRY_HOST: &str = "acct.services.ai.azure.com";

/// One HTTP/1.1 exchange with the emulator, `Host` set as given.
fn call(
    emulator: &Emulator,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut stream = TcpStream::connect(emulator.addr()).unwrap();
    let body = "{\"input_data\":{\"data\":[[1,2],[3,4]]},\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";
    let mut request = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n", body.len());
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let answer = String::from_utf8(answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn unauthorized_for(audience: &str) -> String {
    format!("Unauthorized. Access token is missing, invalid, audience is incorrect ({audience}), or have expired.")
}

#[test]
fn a_token_for_the_wrong_audience_is_refused_naming_the_audience_the_host_takes() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let token = bearer(&emulator.mint(RESOURCE, 600));
    let (status, body) = call(
        &emulator,
        "POST",
        ML_HOST,
        "/score",
        &[("authorization", &token)],
    );
    assert_eq!(status, 401);
    assert_eq!(body["statusCode"], 401);
    assert_eq!(body["message"], unauthorized_for(ML_RESOURCE));
    let seen = emulator.upstream_requests();
    assert_eq!(seen[0].verdict, Verdict::WrongAudience);
    assert_eq!(seen[0].token_aud.as_deref(), Some(RESOURCE));
    assert_eq!(seen[0].expected_audience.as_deref(), Some(ML_RESOURCE));
    assert_eq!(
        seen[0].token_oid, None,
        "only verified tokens name a caller"
    );
}

#[test]
fn ml_scoring_answers_a_role_holder_with_one_result_per_row() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let token = bearer(&emulator.mint(ML_RESOURCE, 600));
    let (status, body) = call(
        &emulator,
        "POST",
        &format!("{ML_HOST}:443"),
        "/score",
        &[("authorization", &token)],
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"].as_array().map(Vec::len), Some(2));
    let oid = Identity::system().object_id;
    assert_eq!(body["x_emulator_caller"], oid.as_str());
    let seen = emulator.upstream_requests();
    assert_eq!(seen[0].verdict, Verdict::Ok);
    assert_eq!(seen[0].token_oid.as_deref(), Some(oid.as_str()));
    assert_eq!(seen[0].token_aud.as_deref(), Some(ML_RESOURCE));
}

#[test]
fn ml_scoring_refuses_a_principal_without_the_role_naming_the_score_action() {
    let emulator = Emulator::start(Settings {
        role_holders: HashSet::new(),
        ..Settings::default()
    })
    .unwrap();
    let token = bearer(&emulator.mint(ML_RESOURCE, 600));
    let (status, body) = call(
        &emulator,
        "POST",
        ML_HOST,
        "/score",
        &[("authorization", &token)],
    );
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "PermissionDenied");
    let oid = Identity::system().object_id;
    assert_eq!(
        body["error"]["message"],
        format!("The principal `{oid}` lacks the required data action `Microsoft.MachineLearningServices/workspaces/onlineEndpoints/score/action` to perform `POST /score` operation.")
    );
    assert_eq!(
        emulator.upstream_requests()[0].verdict,
        Verdict::PermissionDenied
    );
}

#[test]
fn ml_scoring_refuses_keys_while_local_auth_is_off() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let (status, body) = call(
        &emulator,
        "POST",
        ML_HOST,
        "/score",
        &[("api-key", "emulator-key-0000")],
    );
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "AuthenticationTypeDisabled");
}

#[test]
fn a_foundry_project_path_needs_ai_azure_com_while_openai_paths_on_the_same_host_need_cognitiveservices(
) {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let ai = bearer(&emulator.mint(AI_RESOURCE, 600));
    let cognitive = bearer(&emulator.mint(RESOURCE, 600));
    let project = "/api/projects/p1/assistants";
    let chat = "/openai/v1/chat/completions";

    let (status, body) = call(
        &emulator,
        "GET",
        FOUNDRY_HOST,
        project,
        &[("authorization", &ai)],
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(
        body["x_emulator_caller"],
        Identity::system().object_id.as_str()
    );

    let (status, body) = call(
        &emulator,
        "POST",
        FOUNDRY_HOST,
        project,
        &[("authorization", &cognitive)],
    );
    assert_eq!(status, 401);
    assert_eq!(body["message"], unauthorized_for(AI_RESOURCE));

    let (status, body) = call(
        &emulator,
        "POST",
        FOUNDRY_HOST,
        chat,
        &[("authorization", &cognitive)],
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");

    let (status, body) = call(
        &emulator,
        "POST",
        FOUNDRY_HOST,
        chat,
        &[("authorization", &ai)],
    );
    assert_eq!(status, 401);
    assert_eq!(body["message"], unauthorized_for(RESOURCE));

    let expected: Vec<_> = emulator
        .upstream_requests()
        .into_iter()
        .map(|r| r.expected_audience)
        .collect();
    assert_eq!(
        expected,
        [AI_RESOURCE, AI_RESOURCE, RESOURCE, RESOURCE].map(|a| Some(a.to_owned()))
    );
}

#[test]
fn a_foundry_project_refuses_a_principal_without_the_role() {
    let emulator = Emulator::start(Settings {
        role_holders: HashSet::new(),
        ..Settings::default()
    })
    .unwrap();
    let ai = bearer(&emulator.mint(AI_RESOURCE, 600));
    let (status, body) = call(
        &emulator,
        "GET",
        FOUNDRY_HOST,
        "/api/projects/p1",
        &[("authorization", &ai)],
    );
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "PermissionDenied");
}

#[test]
fn government_and_china_hosts_take_the_audience_of_their_cloud() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let path = "/openai/deployments/gpt/chat/completions";
    for (host, audience) in [
        ("gov.openai.azure.us", US_GOV_RESOURCE),
        ("GOV.cognitiveservices.azure.us.", US_GOV_RESOURCE),
        ("cn.openai.azure.cn", CHINA_RESOURCE),
        ("cn.cognitiveservices.azure.cn:443", CHINA_RESOURCE),
    ] {
        let right = bearer(&emulator.mint(audience, 600));
        let public = bearer(&emulator.mint(RESOURCE, 600));
        let (status, body) = call(&emulator, "POST", host, path, &[("authorization", &right)]);
        assert_eq!(status, 200, "{host}: {body}");
        let (status, body) = call(&emulator, "POST", host, path, &[("authorization", &public)]);
        assert_eq!(status, 401, "{host}");
        assert_eq!(body["message"], unauthorized_for(audience), "{host}");
    }
}

#[test]
fn local_and_public_cloud_hosts_take_the_configured_audience() {
    let emulator = Emulator::start(Settings {
        accepted_audience: US_GOV_RESOURCE.into(),
        ..Settings::default()
    })
    .unwrap();
    let token = bearer(&emulator.mint(US_GOV_RESOURCE, 600));
    let path = "/openai/v1/chat/completions";
    for host in [
        "127.0.0.1:8080",
        "east.openai.azure.com",
        "east.cognitiveservices.azure.com",
    ] {
        let (status, body) = call(&emulator, "POST", host, path, &[("authorization", &token)]);
        assert_eq!(status, 200, "{host}: {body}");
    }
}

#[test]
fn echoed_paths_record_the_audience_that_arrived_and_expect_none() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let token = bearer(&emulator.mint(ML_RESOURCE, 600));
    for (method, path) in [("GET", "/anything"), ("GET", "/score")] {
        let (status, body) = call(
            &emulator,
            method,
            ML_HOST,
            path,
            &[("authorization", &token)],
        );
        assert_eq!(status, 200);
        assert_eq!(body["echo"]["path"], path);
    }
    for seen in emulator.upstream_requests() {
        assert_eq!(seen.verdict, Verdict::Echoed);
        assert_eq!(seen.token_aud.as_deref(), Some(ML_RESOURCE));
        assert_eq!(seen.expected_audience, None);
    }
}

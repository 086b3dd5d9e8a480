//! The Azure OpenAI surface beyond chat over HTTP: tenant and principal-less
//! refusals, uploads recorded by length and SHA-256, the v1 and deployment
//! routes, and streamed answers that leave one event at a time.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{SystemTime, UNIX_EPOCH};

use aoai_emulator::{Emulator, Identity, Settings, Verdict, RESOURCE, TENANT_ID};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const OTHER_TENANT: &str = "0b0e0000-0000-4000-8000-00000000bad0";

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Send one HTTP/1.1 request to the emulator as `Host: east.openai.azure.com`.
fn send(
    emulator: &Emulator,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> BufReader<TcpStream> {
    let mut stream = TcpStream::connect(emulator.addr()).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: east.openai.azure.com\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    BufReader::new(stream)
}

/// The status line and headers of an answer.
fn read_head(reader: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            return (status, headers);
        }
        let (name, value) = trimmed.split_once(':').unwrap();
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
}

/// The next chunk of a chunked body; `None` after the last.
fn read_chunk(reader: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let size = usize::from_str_radix(line.trim(), 16).unwrap();
    let mut chunk = vec![0; size];
    reader.read_exact(&mut chunk).unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    (size > 0).then_some(chunk)
}

fn exchange(
    emulator: &Emulator,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Answer {
    let mut reader = send(emulator, method, path, headers, body);
    let (status, headers) = read_head(&mut reader);
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        while let Some(chunk) = read_chunk(&mut reader) {
            body.extend(chunk);
        }
    } else {
        reader.read_to_end(&mut body).unwrap();
    }
    Answer {
        status,
        headers,
        body,
    }
}

fn post_json(emulator: &Emulator, path: &str, auth: (&str, &str), body: Value) -> Answer {
    exchange(
        emulator,
        "POST",
        path,
        &[auth, ("content-type", "application/json")],
        body.to_string().as_bytes(),
    )
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn chat_body() -> Value {
    json!({"messages": [{"role": "user", "content": "hi"}]})
}

#[test]
fn a_token_from_another_tenant_is_refused_with_400_naming_that_tenant() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    emulator.configure(|s| s.token_tenant = OTHER_TENANT.into());
    let token = bearer(&emulator.mint(RESOURCE, 600));
    let answer = post_json(
        &emulator,
        "/openai/deployments/gpt/chat/completions?api-version=2024-10-21",
        ("authorization", &token),
        chat_body(),
    );
    assert_eq!(answer.status, 400);
    assert_eq!(
        answer.json(),
        json!({"error": {"code": "Tenant provided in token does not match resource token", "message": format!("Token tenant {OTHER_TENANT} does not match resource tenant.")}})
    );
    let seen = &emulator.upstream_requests()[0];
    assert_eq!(seen.verdict, Verdict::TenantMismatch);
    assert_eq!(
        seen.token_oid.as_deref(),
        Some(Identity::system().object_id.as_str()),
        "the token verified: only its tenant is wrong"
    );
    assert_eq!(seen.query, "api-version=2024-10-21");
}

#[test]
fn imds_issues_tokens_in_the_configured_tenant() {
    let emulator = Emulator::start(Settings {
        token_tenant: OTHER_TENANT.into(),
        ..Settings::default()
    })
    .unwrap();
    let answer = exchange(
        &emulator,
        "GET",
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://cognitiveservices.azure.com",
        &[("metadata", "true")],
        b"",
    );
    assert_eq!(answer.status, 200);
    let token = answer.json()["access_token"].as_str().unwrap().to_owned();
    let refused = post_json(
        &emulator,
        "/openai/v1/chat/completions",
        ("authorization", &bearer(&token)),
        chat_body(),
    );
    assert_eq!(refused.status, 400);
    emulator.configure(|s| s.resource_tenant = OTHER_TENANT.into());
    let accepted = post_json(
        &emulator,
        "/openai/v1/chat/completions",
        ("authorization", &bearer(&token)),
        chat_body(),
    );
    assert_eq!(accepted.status, 200, "{}", accepted.json());
    assert_ne!(TENANT_ID, OTHER_TENANT);
}

#[test]
fn permission_denied_may_name_no_principal() {
    let emulator = Emulator::start(Settings {
        role_holders: HashSet::new(),
        permission_denied_names_principal: false,
        ..Settings::default()
    })
    .unwrap();
    let token = bearer(&emulator.mint(RESOURCE, 600));
    let answer = post_json(
        &emulator,
        "/openai/v1/responses",
        ("authorization", &token),
        json!({"model": "gpt-4o", "input": "hi"}),
    );
    assert_eq!(answer.status, 401);
    assert_eq!(
        answer.json(),
        json!({"error": {"code": "PermissionDenied", "message": "Principal does not have access to API/Operation."}})
    );
    assert_eq!(
        emulator.upstream_requests()[0].verdict,
        Verdict::PermissionDenied
    );
}

#[test]
fn permission_denied_names_the_responses_write_action_by_default() {
    let emulator = Emulator::start(Settings {
        role_holders: HashSet::new(),
        ..Settings::default()
    })
    .unwrap();
    let token = bearer(&emulator.mint(RESOURCE, 600));
    let answer = post_json(
        &emulator,
        "/openai/v1/responses",
        ("authorization", &token),
        json!({"model": "gpt-4o", "input": "hi"}),
    );
    let oid = Identity::system().object_id;
    assert_eq!(
        answer.json()["error"]["message"],
        format!("The principal `{oid}` lacks the required data action `Microsoft.CognitiveServices/accounts/OpenAI/responses/write` to perform `POST /openai/v1/responses` operation.")
    );
}

/// A multipart body of `size` bytes of file content after a `purpose` field.
fn multipart(size: usize) -> Vec<u8> {
    let mut body = b"--emulatorboundary\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nassistants\r\n--emulatorboundary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n".to_vec();
    body.extend((0..size).map(|i| (i % 251) as u8));
    body.extend_from_slice(b"\r\n--emulatorboundary--\r\n");
    body
}

#[test]
fn a_multi_mib_upload_is_recorded_by_its_length_and_sha256() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let token = bearer(&emulator.mint(RESOURCE, 600));
    let body = multipart(25 * 1024 * 1024);
    let sha = format!("{:x}", Sha256::digest(&body));
    let content_type = "multipart/form-data; boundary=emulatorboundary";
    for path in ["/openai/files?api-version=2024-10-21", "/openai/v1/files"] {
        let answer = exchange(
            &emulator,
            "POST",
            path,
            &[("authorization", &token), ("content-type", content_type)],
            &body,
        );
        assert_eq!(answer.status, 200, "{path}: {}", answer.json());
        let file = answer.json();
        assert_eq!(file["object"], "file");
        assert!(file["id"].as_str().unwrap().starts_with("file-"));
        assert_eq!(file["bytes"], body.len());
        assert_eq!(file["purpose"], "assistants");
        assert_eq!(file["filename"], "big.bin");
        assert_eq!(file["x_emulator_sha256"], sha.as_str());
    }
    let transcription = exchange(
        &emulator,
        "POST",
        "/openai/deployments/whisper/audio/transcriptions?api-version=2024-10-21",
        &[("authorization", &token), ("content-type", content_type)],
        &body,
    );
    assert_eq!(transcription.status, 200);
    assert_eq!(transcription.json()["x_emulator_bytes"], body.len());
    assert!(transcription.json()["text"].is_string());
    let seen = emulator.upstream_requests();
    assert_eq!(seen.len(), 3);
    for request in &seen {
        assert_eq!(request.verdict, Verdict::Ok);
        assert_eq!(request.body_len, body.len());
        assert_eq!(request.body_sha256, sha);
        assert!(!request.websocket);
    }
    assert_eq!(seen[1].query, "", "the v1 path takes no api-version");
}

#[test]
fn keys_are_refused_on_every_route_while_local_auth_is_off_and_taken_when_on() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let routes = [
        ("POST", "/openai/v1/responses"),
        ("POST", "/openai/v1/embeddings"),
        ("POST", "/openai/deployments/emb/embeddings"),
        ("POST", "/openai/deployments/whisper/audio/transcriptions"),
        ("POST", "/openai/deployments/dalle/images/generations"),
        ("POST", "/openai/files"),
        ("POST", "/openai/v1/files"),
        ("GET", "/openai/v1/models"),
    ];
    let key = ("api-key", "emulator-key-0000");
    for (method, path) in routes {
        let answer = exchange(&emulator, method, path, &[key], b"{}");
        assert_eq!(answer.status, 403, "{path}");
        assert_eq!(
            answer.json()["error"]["code"],
            "AuthenticationTypeDisabled",
            "{path}"
        );
    }
    emulator.configure(|s| s.local_auth_disabled = false);
    for (method, path) in routes {
        let answer = exchange(&emulator, method, path, &[key], b"{}");
        assert_eq!(answer.status, 200, "{path}");
        assert_eq!(answer.json()["x_emulator_caller"], "api-key", "{path}");
    }
}

#[test]
fn the_new_routes_check_the_token_audience() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let wrong = bearer(&emulator.mint("https://ai.azure.com", 600));
    let answer = exchange(
        &emulator,
        "GET",
        "/openai/v1/models",
        &[("authorization", &wrong)],
        b"",
    );
    assert_eq!(answer.status, 401);
    assert_eq!(answer.json()["statusCode"], 401);
    assert_eq!(
        emulator.upstream_requests()[0].verdict,
        Verdict::WrongAudience
    );
}

#[test]
fn responses_embeddings_images_and_models_answer_openai_shaped_bodies() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let token = bearer(&emulator.mint(RESOURCE, 600));
    let auth = ("authorization", token.as_str());

    let response = post_json(
        &emulator,
        "/openai/v1/responses",
        auth,
        json!({"model": "gpt-4.1", "input": "hello"}),
    )
    .json();
    assert_eq!(response["object"], "response");
    assert_eq!(response["model"], "gpt-4.1");
    assert_eq!(response["status"], "completed");
    let text = response["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap();
    assert!(text.ends_with("hello"), "{text}");

    let embeddings = post_json(
        &emulator,
        "/openai/v1/embeddings",
        auth,
        json!({"model": "text-embedding-3-large", "input": ["a", "b", "c"]}),
    )
    .json();
    assert_eq!(embeddings["object"], "list");
    assert_eq!(embeddings["model"], "text-embedding-3-large");
    assert_eq!(embeddings["data"].as_array().map(Vec::len), Some(3));

    let by_deployment = post_json(
        &emulator,
        "/openai/deployments/emb/embeddings?api-version=2024-10-21",
        auth,
        json!({"input": "a"}),
    )
    .json();
    assert_eq!(by_deployment["model"], "emb");
    assert_eq!(by_deployment["data"][0]["object"], "embedding");

    let images = post_json(
        &emulator,
        "/openai/deployments/dalle/images/generations?api-version=2024-10-21",
        auth,
        json!({"prompt": "a cat", "n": 2}),
    )
    .json();
    assert_eq!(images["data"].as_array().map(Vec::len), Some(2));
    assert!(images["data"][0]["url"].is_string());

    let models = exchange(&emulator, "GET", "/openai/v1/models", &[auth], b"").json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["object"], "model");
}

/// One server-sent event as it arrived: its `event:` name, its data, and
/// when the chunk that completed it was read.
struct Arrived {
    name: Option<String>,
    data: String,
    at_ms: u64,
}

/// Post `body` and read the streamed answer event by event.
fn stream(emulator: &Emulator, path: &str, token: &str, body: Value) -> (Answer, Vec<Arrived>) {
    let auth = bearer(token);
    let mut reader = send(
        emulator,
        "POST",
        path,
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body.to_string().as_bytes(),
    );
    let (status, headers) = read_head(&mut reader);
    let mut pending = String::new();
    let mut events = Vec::new();
    while let Some(chunk) = read_chunk(&mut reader) {
        let at_ms = now_ms();
        pending.push_str(&String::from_utf8(chunk).unwrap());
        while let Some((event, rest)) = pending.split_once("\n\n") {
            let mut name = None;
            let mut data = String::new();
            for line in event.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    name = Some(value.to_owned());
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data.push_str(value);
                }
            }
            events.push(Arrived { name, data, at_ms });
            pending = rest.to_owned();
        }
    }
    assert!(pending.is_empty(), "an unfinished event: {pending:?}");
    let answer = Answer {
        status,
        headers,
        body: Vec::new(),
    };
    (answer, events)
}

fn sent_ms(event: &Arrived) -> u64 {
    serde_json::from_str::<Value>(&event.data).unwrap()["x_emulator_sent_ms"]
        .as_u64()
        .unwrap()
}

#[test]
fn a_streamed_chat_completion_sends_its_chunks_one_at_a_time_then_done() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let token = emulator.mint(RESOURCE, 600);
    for path in [
        "/openai/deployments/gpt/chat/completions?api-version=2024-10-21",
        "/openai/v1/chat/completions",
    ] {
        let body = json!({
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": "stream please"}],
            "stream": true,
            "x_emulator_stream": {"chunks": 4, "interval_ms": 150}
        });
        let (answer, events) = stream(&emulator, path, &token, body);
        assert_eq!(answer.status, 200);
        assert_eq!(answer.header("content-type"), Some("text/event-stream"));
        assert_eq!(events.len(), 5, "{path}: 4 chunks and [DONE]");
        assert_eq!(events[4].data, "[DONE]");
        let chunks: Vec<Value> = events[..4]
            .iter()
            .map(|e| serde_json::from_str(&e.data).unwrap())
            .collect();
        let mut text = String::new();
        for (i, chunk) in chunks.iter().enumerate() {
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["x_emulator_index"], i);
            text.push_str(chunk["choices"][0]["delta"]["content"].as_str().unwrap());
        }
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
        assert!(text.ends_with("stream please"), "{text}");
        let sent: Vec<u64> = events[..4].iter().map(sent_ms).collect();
        assert!(sent.windows(2).all(|w| w[0] <= w[1]), "{sent:?}");
        assert!(
            events[0].at_ms < sent[3],
            "{path}: the first chunk arrived before the last was sent"
        );
    }
}

#[test]
fn a_streamed_response_sends_text_deltas_then_completed() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let token = emulator.mint(RESOURCE, 600);
    let body = json!({
        "model": "gpt-4.1",
        "input": "tell me",
        "stream": true,
        "x_emulator_stream": {"chunks": 3, "interval_ms": 10}
    });
    let (answer, events) = stream(&emulator, "/openai/v1/responses", &token, body);
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-type"), Some("text/event-stream"));
    let names: Vec<Option<&str>> = events.iter().map(|e| e.name.as_deref()).collect();
    assert_eq!(
        names,
        [
            Some("response.output_text.delta"),
            Some("response.output_text.delta"),
            Some("response.output_text.delta"),
            Some("response.completed")
        ]
    );
    let data: Vec<Value> = events
        .iter()
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect();
    for (i, event) in data.iter().enumerate() {
        assert_eq!(event["x_emulator_index"], i);
    }
    let deltas: String = data[..3]
        .iter()
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(data[3]["type"], "response.completed");
    assert_eq!(
        data[3]["response"]["output"][0]["content"][0]["text"],
        deltas.as_str()
    );
}

#[test]
fn a_chat_completion_without_stream_is_one_json_body() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let token = bearer(&emulator.mint(RESOURCE, 600));
    let answer = post_json(
        &emulator,
        "/openai/v1/chat/completions",
        ("authorization", &token),
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": false}),
    );
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["object"], "chat.completion");
    assert_eq!(answer.json()["model"], "gpt-4o");
}

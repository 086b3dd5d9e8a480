//! The realtime WebSocket handshake: judged like any data-plane request
//! (bearer token, else `api-key` header, else `api-key` query parameter),
//! refused without an upgrade, accepted with a real RFC 6455 session.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;

use aoai_emulator::{Emulator, Identity, Settings, Verdict, RESOURCE};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error, Message};

fn url(emulator: &Emulator, path_and_query: &str) -> String {
    format!("ws://{}{path_and_query}", emulator.addr())
}

/// Open a WebSocket to `path_and_query` with these extra headers.
async fn connect(
    emulator: &Emulator,
    path_and_query: &str,
    headers: &[(&'static str, &str)],
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    Error,
> {
    let mut request = url(emulator, path_and_query).into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(*name, value.parse().unwrap());
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(socket, _)| socket)
}

async fn next_json<S>(socket: &mut S) -> Value
where
    S: StreamExt<Item = Result<Message, Error>> + Unpin,
{
    loop {
        match socket.next().await.unwrap().unwrap() {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected message {other:?}"),
        }
    }
}

/// The status of a refused handshake.
fn refused_status(result: Result<impl Sized, Error>) -> (u16, Option<Value>) {
    match result {
        Err(Error::Http(response)) => (
            response.status().as_u16(),
            response
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice(b).ok()),
        ),
        Err(other) => panic!("expected an HTTP refusal, got {other:?}"),
        Ok(_) => panic!("expected the handshake to be refused"),
    }
}

#[tokio::test]
async fn a_bearer_token_opens_a_session_that_says_created_then_echoes_text() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let token = format!("Bearer {}", emulator.mint(RESOURCE, 600));
    let mut socket = connect(
        &emulator,
        "/openai/v1/realtime?model=gpt-realtime",
        &[("authorization", &token)],
    )
    .await
    .unwrap();
    let created = next_json(&mut socket).await;
    assert_eq!(created["type"], "session.created");
    assert_eq!(created["session"]["model"], "gpt-realtime");
    let oid = Identity::system().object_id;
    assert_eq!(created["x_emulator_caller"], oid.as_str());

    let sent = json!({"type": "session.update", "session": {}}).to_string();
    socket
        .send(Message::Text(sent.clone().into()))
        .await
        .unwrap();
    let echo = next_json(&mut socket).await;
    assert_eq!(echo, json!({"type": "echo", "data": sent}));
    socket.close(None).await.unwrap();
    while let Some(Ok(_)) = socket.next().await {}

    let seen = emulator.upstream_requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].verdict, Verdict::Ok);
    assert!(seen[0].websocket);
    assert_eq!(seen[0].path, "/openai/v1/realtime");
    assert_eq!(seen[0].query, "model=gpt-realtime");
    assert_eq!(seen[0].token_oid.as_deref(), Some(oid.as_str()));
}

#[tokio::test]
async fn the_preview_path_names_the_deployment_and_chooses_the_realtime_subprotocol() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let token = format!("Bearer {}", emulator.mint(RESOURCE, 600));
    let mut request = url(
        &emulator,
        "/openai/realtime?api-version=2024-10-01-preview&deployment=gpt-4o-realtime-preview",
    )
    .into_client_request()
    .unwrap();
    request
        .headers_mut()
        .insert("authorization", token.parse().unwrap());
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "realtime, openai-beta.realtime-v1".parse().unwrap(),
    );
    let (mut socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some("realtime")
    );
    let created = next_json(&mut socket).await;
    assert_eq!(created["session"]["model"], "gpt-4o-realtime-preview");
}

#[tokio::test]
async fn a_key_in_the_query_is_refused_with_403_while_local_auth_is_off() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let result = connect(
        &emulator,
        "/openai/v1/realtime?model=gpt-realtime&api-key=emulator-key-0000",
        &[],
    )
    .await;
    let (status, body) = refused_status(result);
    assert_eq!(status, 403);
    assert_eq!(
        body.expect("the refusal's JSON body")["error"]["code"],
        "AuthenticationTypeDisabled"
    );
    let seen = emulator.upstream_requests();
    assert_eq!(seen[0].verdict, Verdict::KeyAuthDisabled);
    assert!(seen[0].websocket);
    assert_eq!(
        seen[0].query,
        "model=gpt-realtime&api-key=emulator-key-0000"
    );
}

#[tokio::test]
async fn a_key_in_the_query_or_header_is_accepted_when_local_auth_is_on() {
    let emulator = Emulator::start(Settings {
        local_auth_disabled: false,
        ..Settings::default()
    })
    .unwrap();
    let mut socket = connect(
        &emulator,
        "/openai/realtime?api-version=2024-10-01-preview&deployment=rt&api-key=emulator-key-0000",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(next_json(&mut socket).await["x_emulator_caller"], "api-key");

    let mut socket = connect(
        &emulator,
        "/openai/v1/realtime?model=rt",
        &[("api-key", "emulator-key-0000")],
    )
    .await
    .unwrap();
    assert_eq!(next_json(&mut socket).await["x_emulator_caller"], "api-key");

    let wrong = connect(&emulator, "/openai/v1/realtime?model=rt&api-key=nope", &[]).await;
    assert_eq!(refused_status(wrong).0, 401);
}

#[tokio::test]
async fn a_token_without_the_role_is_refused_before_any_upgrade() {
    let emulator = Emulator::start(Settings {
        role_holders: HashSet::new(),
        ..Settings::default()
    })
    .unwrap();
    let token = format!("Bearer {}", emulator.mint(RESOURCE, 600));
    let result = connect(
        &emulator,
        "/openai/v1/realtime?model=rt",
        &[("authorization", &token)],
    )
    .await;
    let (status, body) = refused_status(result);
    assert_eq!(status, 401);
    let body = body.expect("the refusal's JSON body");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("Microsoft.CognitiveServices/accounts/OpenAI/deployments/realtime/action"),
        "{message}"
    );
}

#[test]
fn a_plain_get_to_a_realtime_path_is_answered_400_not_upgraded() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let token = emulator.mint(RESOURCE, 600);
    for path in [
        "/openai/v1/realtime?model=rt",
        "/openai/realtime?api-version=2024-10-01-preview&deployment=rt",
    ] {
        let mut stream = TcpStream::connect(emulator.addr()).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nhost: east.openai.azure.com\r\nauthorization: Bearer {token}\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 "), "{path}: {head}");
        let body: Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            body,
            json!({"statusCode": 400, "message": "Invalid websocket upgrade request"})
        );
    }
    for seen in emulator.upstream_requests() {
        assert_eq!(seen.verdict, Verdict::NotWebSocket);
        assert!(!seen.websocket);
    }
}

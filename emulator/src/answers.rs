//! The bodies Azure OpenAI answers a request it let through, shaped as
//! OpenAI's API reference shows them (enough for the openai SDKs to parse),
//! with `x_emulator_*` fields that tell a test what the emulator saw: the
//! caller (`oid` or `api-key`), and for uploads the length and SHA-256 of
//! the body as received.

use axum::response::Response;
use jwt_simple::reexports::ct_codecs::{Base64, Encoder};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::incoming::Incoming;
use crate::{json_response, now_ms, streaming};

/// What the emulated model says to `prompt`.
fn reply_to(prompt: &str) -> String {
    format!("Hello from the Azure OpenAI emulator. You said: {prompt}")
}

/// A chat completion for the first message, streamed when asked.
pub(crate) fn chat(model: &str, caller: &str, request: &Value) -> Response {
    let prompt = request
        .pointer("/messages/0/content")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let content = reply_to(prompt);
    let created = now_ms() / 1000;
    let id = format!("chatcmpl-emulator-{created}");
    if streaming::wanted(request) {
        return streaming::chat(&id, model, caller, &content, request);
    }
    json_response(
        200,
        json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_emulator",
            "prompt_filter_results": [],
            "choices": [{
                "index": 0,
                "finish_reason": "stop",
                "logprobs": null,
                "message": {"role": "assistant", "content": content, "refusal": null},
                "content_filter_results": {}
            }],
            "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
            "x_emulator_caller": caller
        }),
    )
}

/// The text of a Responses API `input`: a string, or the first item's
/// content (a string or a list of `input_text` parts).
fn input_text(request: &Value) -> String {
    let input = request.get("input");
    if let Some(text) = input.and_then(Value::as_str) {
        return text.to_owned();
    }
    let content = input.and_then(|i| i.pointer("/0/content"));
    if let Some(text) = content.and_then(Value::as_str) {
        return text.to_owned();
    }
    content
        .and_then(Value::as_array)
        .map(|parts| {
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<String>()
        })
        .unwrap_or_default()
}

/// A Responses API answer (`POST /openai/v1/responses`), streamed when asked.
pub(crate) fn response(model: &str, caller: &str, request: &Value) -> Response {
    let text = reply_to(&input_text(request));
    let created = now_ms() / 1000;
    let id = format!("resp_emulator{created}");
    let item_id = format!("msg_emulator{created}");
    let completed = json!({
        "id": id,
        "object": "response",
        "created_at": created,
        "status": "completed",
        "model": model,
        "output": [{
            "type": "message",
            "id": item_id,
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]
        }],
        "parallel_tool_calls": true,
        "tool_choice": "auto",
        "tools": [],
        "usage": {"input_tokens": 9, "output_tokens": 12, "total_tokens": 21},
        "x_emulator_caller": caller
    });
    if streaming::wanted(request) {
        return streaming::response(&item_id, &text, completed, request);
    }
    json_response(200, completed)
}

/// Eight numbers in [0, 1] drawn from the SHA-256 of `text`: the same text
/// always embeds the same way.
fn embedding_of(text: &str) -> Vec<f32> {
    Sha256::digest(text.as_bytes())
        .iter()
        .take(8)
        .map(|b| f32::from(*b) / 255.0)
        .collect()
}

/// One embedding per input (a string or a list of them), as floats or, when
/// `encoding_format` is `base64` (what openai-python asks by default), as
/// base64 of little-endian `f32`s.
pub(crate) fn embeddings(model: &str, caller: &str, request: &Value) -> Value {
    let inputs: Vec<String> = match request.get("input") {
        Some(Value::Array(items)) => items.iter().map(|i| i.to_string()).collect(),
        Some(Value::String(text)) => vec![text.clone()],
        _ => vec![String::new()],
    };
    let base64 = request.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let vector = embedding_of(input);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
                json!(Base64::encode_to_string(bytes).unwrap_or_default())
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": inputs.len(), "total_tokens": inputs.len()},
        "x_emulator_caller": caller
    })
}

/// A transcription of a multipart upload: the emulator hears only its size.
pub(crate) fn transcription(caller: &str, incoming: &Incoming) -> Value {
    json!({
        "text": format!("Hello from the Azure OpenAI emulator. It received {} bytes.", incoming.body_len),
        "x_emulator_bytes": incoming.body_len,
        "x_emulator_sha256": incoming.body_sha256,
        "x_emulator_caller": caller
    })
}

/// `n` generated images (default 1, at most 10): URLs, or base64 when
/// `response_format` is `b64_json` (the only form `gpt-image-*` gives).
pub(crate) fn images(deployment: &str, caller: &str, request: &Value) -> Value {
    let prompt = request
        .get("prompt")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let n = request
        .get("n")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .clamp(1, 10);
    let created = now_ms() / 1000;
    let base64 = request.get("response_format").and_then(Value::as_str) == Some("b64_json")
        || deployment.starts_with("gpt-image");
    let data: Vec<Value> = (0..n)
        .map(|i| {
            if base64 {
                let bytes = format!("emulated image {i} of: {prompt}");
                json!({"b64_json": Base64::encode_to_string(bytes).unwrap_or_default(), "revised_prompt": prompt})
            } else {
                json!({"url": format!("https://emulator.invalid/images/{created}-{i}.png"), "revised_prompt": prompt})
            }
        })
        .collect();
    json!({"created": created, "data": data, "x_emulator_caller": caller})
}

/// The value of the multipart form field `name` (text before the next CRLF),
/// looked for in what was kept of the body.
fn form_field(body: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let after = text.split_once(&format!("name=\"{name}\""))?.1;
    let value = after.split_once("\r\n\r\n")?.1;
    Some(value.split("\r\n").next().unwrap_or_default().to_owned())
}

/// The file name of the first file part, looked for in what was kept of the body.
fn file_name(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let after = text.split_once("filename=\"")?.1;
    Some(after.split('"').next().unwrap_or_default().to_owned())
}

/// An uploaded file (`POST /openai/files`, `/openai/v1/files`): `bytes` is
/// the length of the whole request body as received.
pub(crate) fn file(caller: &str, incoming: &Incoming) -> Value {
    let id: String = incoming.body_sha256.chars().take(24).collect();
    json!({
        "id": format!("file-{id}"),
        "object": "file",
        "bytes": incoming.body_len,
        "created_at": now_ms() / 1000,
        "filename": file_name(&incoming.body).unwrap_or_default(),
        "purpose": form_field(&incoming.body, "purpose").unwrap_or_default(),
        "status": "processed",
        "x_emulator_sha256": incoming.body_sha256,
        "x_emulator_caller": caller
    })
}

/// The models the emulated resource offers (`GET /openai/v1/models`).
pub(crate) fn models(caller: &str) -> Value {
    let data: Vec<Value> = [
        "gpt-4o-mini",
        "gpt-4o",
        "gpt-4o-realtime-preview",
        "text-embedding-3-small",
        "whisper",
        "dall-e-3",
    ]
    .iter()
    .map(|id| json!({"id": id, "object": "model", "created": 1_700_000_000, "owned_by": "system"}))
    .collect();
    json!({"object": "list", "data": data, "x_emulator_caller": caller})
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORM: &[u8] = b"--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"train.jsonl\"\r\nContent-Type: application/octet-stream\r\n\r\n{}\r\n--b--\r\n";

    #[test]
    fn a_form_field_and_the_file_name_are_read_from_a_multipart_body() {
        assert_eq!(form_field(FORM, "purpose").as_deref(), Some("fine-tune"));
        assert_eq!(file_name(FORM).as_deref(), Some("train.jsonl"));
        assert_eq!(form_field(FORM, "model"), None);
    }

    #[test]
    fn the_input_of_a_response_may_be_text_or_message_parts() {
        assert_eq!(input_text(&json!({"input": "hi"})), "hi");
        assert_eq!(
            input_text(&json!({"input": [{"role": "user", "content": "hey"}]})),
            "hey"
        );
        assert_eq!(
            input_text(
                &json!({"input": [{"role": "user", "content": [{"type": "input_text", "text": "yo"}]}]})
            ),
            "yo"
        );
    }

    #[test]
    fn embeddings_answer_one_vector_per_input_in_the_format_asked() {
        let floats = embeddings("m", "oid", &json!({"input": ["a", "b"]}));
        assert_eq!(floats["data"].as_array().map(Vec::len), Some(2));
        assert_eq!(floats["data"][1]["index"], 1);
        assert_eq!(
            floats["data"][0]["embedding"].as_array().map(Vec::len),
            Some(8)
        );
        let packed = embeddings(
            "m",
            "oid",
            &json!({"input": "a", "encoding_format": "base64"}),
        );
        let text = packed["data"][0]["embedding"].as_str().unwrap();
        assert_eq!(text.len(), 44, "32 bytes of f32s in base64");
    }
}

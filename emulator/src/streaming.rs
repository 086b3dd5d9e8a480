//! Answers streamed as server-sent events, as Azure OpenAI streams chat
//! completions and responses when the request says `"stream": true`.
//!
//! Each event is produced when its time comes and handed to the server as
//! its own body frame, so it leaves as soon as it is made: a proxy that
//! buffers the stream shows up as events that arrive together.
//!
//! **Pacing**, per request, from an extra body field
//! `"x_emulator_stream": {"chunks": n, "interval_ms": m}` (default 5 and 20):
//! `n` content events (chat: `chat.completion.chunk`s; responses:
//! `response.output_text.delta`s), the first at once and each next one `m`
//! ms after the previous one; the closing events follow the last content
//! event without a wait (chat: a usage chunk when
//! `stream_options.include_usage`, then `data: [DONE]`; responses:
//! `response.completed`). Every JSON event carries `x_emulator_index` (0, 1,
//! … in the order sent, closing events included) and `x_emulator_sent_ms`
//! (Unix epoch milliseconds when it was handed to the server).

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::now_ms;

/// Whether a request body asks for a streamed answer.
pub(crate) fn wanted(request: &Value) -> bool {
    request.get("stream").and_then(Value::as_bool) == Some(true)
}

/// How many content events to send, and how far apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pacing {
    pub(crate) chunks: usize,
    pub(crate) interval: Duration,
}

impl Pacing {
    /// The most content events one answer sends, whatever it asks.
    const MAX_CHUNKS: u64 = 100_000;

    /// The pacing a request asks for in `x_emulator_stream`, else the default.
    pub(crate) fn of(request: &Value) -> Pacing {
        let asked = |field: &str, default: u64| {
            request
                .pointer(&format!("/x_emulator_stream/{field}"))
                .and_then(Value::as_u64)
                .unwrap_or(default)
        };
        Pacing {
            chunks: asked("chunks", 5).min(Self::MAX_CHUNKS) as usize,
            interval: Duration::from_millis(asked("interval_ms", 20)),
        }
    }
}

/// One event of the stream, sent after `wait`.
struct Event {
    wait: Duration,
    /// The SSE `event:` field (responses name their events; chat does not).
    name: Option<String>,
    /// The JSON data, or `None` for `data: [DONE]`.
    data: Option<Value>,
}

impl Event {
    fn render(self, index: usize) -> Bytes {
        let mut text = String::new();
        if let Some(name) = &self.name {
            text.push_str(&format!("event: {name}\n"));
        }
        match self.data {
            Some(mut data) => {
                if let Some(fields) = data.as_object_mut() {
                    fields.insert("x_emulator_index".into(), json!(index));
                    fields.insert("x_emulator_sent_ms".into(), json!(now_ms()));
                }
                text.push_str(&format!("data: {data}\n\n"));
            }
            None => text.push_str("data: [DONE]\n\n"),
        }
        Bytes::from(text)
    }
}

/// `text` cut into `n` consecutive pieces of nearly equal length (by
/// characters); some are empty when `n` exceeds its length.
fn pieces(text: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    (0..n)
        .map(|i| {
            let from = chars.len() * i / n;
            let to = chars.len() * (i + 1) / n;
            chars.get(from..to).unwrap_or_default().iter().collect()
        })
        .collect()
}

/// The wait before content event `i`: none for the first.
fn wait_before(i: usize, pacing: Pacing) -> Duration {
    if i == 0 {
        Duration::ZERO
    } else {
        pacing.interval
    }
}

/// A `text/event-stream` answer that sends `events` one by one, each when
/// its wait is over.
fn event_stream(events: Vec<Event>) -> Response {
    let frames = futures_util::stream::iter(events.into_iter().enumerate()).then(
        |(index, event)| async move {
            if !event.wait.is_zero() {
                tokio::time::sleep(event.wait).await;
            }
            Ok::<Bytes, Infallible>(event.render(index))
        },
    );
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(frames),
    )
        .into_response()
}

/// A chat completion streamed as `chat.completion.chunk`s, then `[DONE]`.
pub(crate) fn chat(id: &str, model: &str, caller: &str, text: &str, request: &Value) -> Response {
    let pacing = Pacing::of(request);
    let created = now_ms() / 1000;
    let chunk = |choices: Value| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_emulator",
            "choices": choices,
            "x_emulator_caller": caller,
        })
    };
    let last = pacing.chunks.saturating_sub(1);
    let mut events: Vec<Event> = pieces(text, pacing.chunks)
        .into_iter()
        .enumerate()
        .map(|(i, piece)| {
            let delta = if i == 0 {
                json!({"role": "assistant", "content": piece})
            } else {
                json!({"content": piece})
            };
            let finish = if i == last {
                json!("stop")
            } else {
                Value::Null
            };
            Event {
                wait: wait_before(i, pacing),
                name: None,
                data: Some(chunk(json!([{
                    "index": 0,
                    "delta": delta,
                    "logprobs": null,
                    "finish_reason": finish,
                    "content_filter_results": {}
                }]))),
            }
        })
        .collect();
    if request.pointer("/stream_options/include_usage") == Some(&Value::Bool(true)) {
        let mut usage = chunk(json!([]));
        if let Some(fields) = usage.as_object_mut() {
            fields.insert(
                "usage".into(),
                json!({"prompt_tokens": 9, "completion_tokens": pacing.chunks, "total_tokens": 9 + pacing.chunks}),
            );
        }
        events.push(Event {
            wait: Duration::ZERO,
            name: None,
            data: Some(usage),
        });
    }
    events.push(Event {
        wait: Duration::ZERO,
        name: None,
        data: None,
    });
    event_stream(events)
}

/// A response streamed as `response.output_text.delta` events, then
/// `response.completed` carrying `completed` (the whole response object).
pub(crate) fn response(item_id: &str, text: &str, completed: Value, request: &Value) -> Response {
    let pacing = Pacing::of(request);
    let mut events: Vec<Event> = pieces(text, pacing.chunks)
        .into_iter()
        .enumerate()
        .map(|(i, piece)| Event {
            wait: wait_before(i, pacing),
            name: Some("response.output_text.delta".into()),
            data: Some(json!({
                "type": "response.output_text.delta",
                "sequence_number": i,
                "item_id": item_id,
                "output_index": 0,
                "content_index": 0,
                "delta": piece,
            })),
        })
        .collect();
    events.push(Event {
        wait: Duration::ZERO,
        name: Some("response.completed".into()),
        data: Some(json!({
            "type": "response.completed",
            "sequence_number": pacing.chunks,
            "response": completed,
        })),
    });
    event_stream(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_defaults_to_five_chunks_twenty_ms_apart() {
        assert_eq!(
            Pacing::of(&json!({"stream": true})),
            Pacing {
                chunks: 5,
                interval: Duration::from_millis(20)
            }
        );
        assert_eq!(
            Pacing::of(&json!({"x_emulator_stream": {"chunks": 2, "interval_ms": 300}})),
            Pacing {
                chunks: 2,
                interval: Duration::from_millis(300)
            }
        );
    }

    #[test]
    fn only_a_literal_true_asks_for_a_stream() {
        assert!(wanted(&json!({"stream": true})));
        assert!(!wanted(&json!({"stream": "true"})));
        assert!(!wanted(&Value::Null));
    }

    #[test]
    fn pieces_put_the_text_back_together_in_order() {
        let text = "Hello from the emulator";
        for n in [1, 3, 5, 40] {
            let cut = pieces(text, n);
            assert_eq!(cut.len(), n);
            assert_eq!(cut.concat(), text, "{n}");
        }
        assert!(pieces(text, 0).is_empty());
    }

    #[test]
    fn an_event_renders_as_one_sse_record_stamped_with_its_index() {
        let event = Event {
            wait: Duration::ZERO,
            name: Some("response.completed".into()),
            data: Some(json!({"type": "response.completed"})),
        };
        let text = String::from_utf8(event.render(7).to_vec()).unwrap();
        let (head, data) = text.split_once("\ndata: ").unwrap();
        assert_eq!(head, "event: response.completed");
        assert!(data.ends_with("\n\n"));
        let data: Value = serde_json::from_str(data.trim_end()).unwrap();
        assert_eq!(data["x_emulator_index"], 7);
        assert!(data["x_emulator_sent_ms"].as_u64().unwrap() > 0);
    }
}

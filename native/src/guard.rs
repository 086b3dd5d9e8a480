//! The one place the module catches a panic: every hook Envoy calls runs its
//! body through [`guarded`], so a panic never unwinds into Envoy, and the
//! request in hand fails closed.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use aoai_msi_filter::diagnose::DIAGNOSIS_HEADER;
use aoai_msi_filter::worker::Level;

use crate::abi;
use crate::host;

/// The diagnosis of a request whose hook panicked: answered 500, never
/// forwarded half-handled.
pub const PANIC_CODE: &str = "FilterFailed";

/// What a hook does when its body panicked.
pub enum OnPanic<T> {
    /// A request-side hook: answer the request (Envoy's filter pointer) with
    /// the local 500 `FilterFailed` of [`failed_reply`], and return this
    /// status (the request goes no further).
    FailRequest(*mut c_void, T),
    /// Any other hook: return this. An answer passes unannotated; a
    /// configuration or bookkeeping step is left undone.
    Return(T),
}

/// The local reply to a request whose hook panicked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedReply {
    pub status: u32,
    pub headers: [(&'static str, &'static str); 2],
    pub body: String,
    /// Envoy's response code details (`%RESPONSE_CODE_DETAILS%`).
    pub details: &'static str,
}

pub fn failed_reply() -> FailedReply {
    FailedReply {
        status: 500,
        headers: [
            (DIAGNOSIS_HEADER, PANIC_CODE),
            ("content-type", "application/json"),
        ],
        body: format!(
            "{{\"error\":{{\"code\":\"{PANIC_CODE}\",\"message\":\"aoai-msi-filter failed on this request (see the Envoy log); it was not forwarded.\"}}}}"
        ),
        details: "aoai_msi_filter_failed",
    }
}

/// Where a failed hook's line and reply go: Envoy, or a test's recorder.
trait Outlet {
    fn log(&self, line: &str);
    fn reply(&self, envoy: *mut c_void, reply: &FailedReply);
}

/// Envoy's log and local replies.
struct ToEnvoy;

impl Outlet for ToEnvoy {
    fn log(&self, line: &str) {
        host::log(Level::Critical, line);
    }

    fn reply(&self, envoy: *mut c_void, reply: &FailedReply) {
        let headers: Vec<abi::ModuleHeader> = reply
            .headers
            .iter()
            .map(|(name, value)| abi::ModuleHeader::of(name.as_bytes(), value.as_bytes()))
            .collect();
        // SAFETY: the live filter of the hook that failed; buffers alive for the call.
        unsafe {
            abi::envoy_dynamic_module_callback_http_send_response(
                envoy,
                reply.status,
                headers.as_ptr(),
                headers.len(),
                abi::ModuleBuffer::of(reply.body.as_bytes()),
                abi::ModuleBuffer::of(reply.details.as_bytes()),
            )
        };
    }
}

/// Run the body of hook `hook`; a panic is logged and ends the hook as
/// `on_panic` says.
pub fn guarded<T>(hook: &str, on_panic: OnPanic<T>, body: impl FnOnce() -> T) -> T {
    guarded_to(&ToEnvoy, hook, on_panic, body)
}

fn guarded_to<T>(
    out: &impl Outlet,
    hook: &str,
    on_panic: OnPanic<T>,
    body: impl FnOnce() -> T,
) -> T {
    let panic = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(value) => return value,
        Err(panic) => panic,
    };
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    // Logging itself must not panic again across the boundary.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        out.log(&format!("panic in {hook}: {what}"))
    }));
    match on_panic {
        OnPanic::Return(value) => value,
        OnPanic::FailRequest(envoy, status) => {
            if catch_unwind(AssertUnwindSafe(|| out.reply(envoy, &failed_reply()))).is_err() {
                // Neither answered nor safe to let through: stop here rather
                // than unwind into Envoy.
                std::process::abort();
            }
            status
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::panic::panic_any;

    /// Records what a failed hook logged and answered.
    #[derive(Default)]
    struct Recorder {
        lines: RefCell<Vec<String>>,
        replies: RefCell<Vec<(usize, FailedReply)>>,
        /// Its log panics too.
        log_panics: bool,
    }

    impl Outlet for Recorder {
        fn log(&self, line: &str) {
            self.lines.borrow_mut().push(line.to_owned());
            if self.log_panics {
                panic_any("the log failed as well");
            }
        }

        fn reply(&self, envoy: *mut c_void, reply: &FailedReply) {
            self.replies
                .borrow_mut()
                .push((envoy as usize, reply.clone()));
        }
    }

    const FILTER: usize = 0x5eed;
    const STOP: u32 = 3;

    fn request_side(out: &Recorder, body: impl FnOnce() -> u32) -> u32 {
        guarded_to(
            out,
            "request_headers",
            OnPanic::FailRequest(FILTER as *mut c_void, STOP),
            body,
        )
    }

    #[test]
    fn a_panicking_request_hook_answers_500_filter_failed_and_stops_the_request() {
        let out = Recorder::default();
        // Nothing unwinds out of the guard: the outer catch sees a value.
        let status = catch_unwind(AssertUnwindSafe(|| {
            request_side(&out, || panic_any(String::from("boom")))
        }));
        assert_eq!(status.ok(), Some(STOP));
        let replies = out.replies.borrow();
        assert_eq!(replies.len(), 1, "one local reply");
        let (filter, reply) = &replies[0];
        assert_eq!(*filter, FILTER, "to the request of the hook that failed");
        assert_eq!(reply.status, 500);
        assert_eq!(
            reply.headers,
            [
                ("x-aoai-msi-diagnosis", "FilterFailed"),
                ("content-type", "application/json")
            ]
        );
        let body: serde_json::Value = serde_json::from_str(&reply.body).expect("JSON body");
        assert_eq!(body["error"]["code"], "FilterFailed");
        assert!(body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not forwarded")));
        assert_eq!(reply.details, "aoai_msi_filter_failed");
        assert_eq!(
            *out.lines.borrow(),
            ["panic in request_headers: boom".to_owned()]
        );
    }

    #[test]
    fn a_panicking_response_hook_lets_the_answer_pass_without_a_local_reply() {
        let out = Recorder::default();
        const CONTINUE: u32 = 0;
        let status = catch_unwind(AssertUnwindSafe(|| {
            guarded_to(&out, "response_headers", OnPanic::Return(CONTINUE), || {
                panic_any("boom")
            })
        }));
        assert_eq!(status.ok(), Some(CONTINUE));
        assert!(out.replies.borrow().is_empty(), "no local reply");
        assert_eq!(
            *out.lines.borrow(),
            ["panic in response_headers: boom".to_owned()]
        );
    }

    #[test]
    fn a_hook_that_does_not_panic_returns_its_own_value_untouched() {
        let out = Recorder::default();
        assert_eq!(request_side(&out, || 0), 0);
        assert!(out.replies.borrow().is_empty());
        assert!(out.lines.borrow().is_empty());
    }

    #[test]
    fn a_log_that_panics_too_still_fails_the_request_closed_without_unwinding() {
        let out = Recorder {
            log_panics: true,
            ..Recorder::default()
        };
        let status = catch_unwind(AssertUnwindSafe(|| request_side(&out, || panic_any(42u8))));
        assert_eq!(status.ok(), Some(STOP));
        assert_eq!(out.replies.borrow().len(), 1);
        // A payload that is not text is logged without it.
        assert_eq!(
            *out.lines.borrow(),
            ["panic in request_headers: ".to_owned()]
        );
    }
}

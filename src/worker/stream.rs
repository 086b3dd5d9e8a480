//! One request through a worker: what it matched, how it left, and what its
//! answer needs explained. The host adapter calls these from its request
//! callbacks, with the request in hand being this one.

use super::host::{say, Host};
use super::{write_credential, Held, Released, Worker};
use crate::agent::Replacement;
use crate::diagnose::annotate::{self, BodyMode, BodyStep, Facts, Inspection};
use crate::diagnose::upstream::{self, UpstreamFailure};
use crate::diagnose::{self, Diagnosis, DIAGNOSIS_HEADER};
use crate::metrics as m;
use crate::policy::FALLBACK_HEADER;
use crate::request::{self, Arrival, Decision, Refusal};
use crate::rewrite::{API_KEY_HEADER, AUTHORIZATION_HEADER};
use crate::route::{NearMiss, Routed, ORIGINAL_DST_HEADER};
use crate::safe;
use crate::wire;

/// What the host does with the callback's headers or body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Hold it: the worker lets it go (or answers it) later.
    Pause,
}

/// One request's state, from its headers to the end of its answer.
#[derive(Debug)]
pub struct Stream {
    id: u32,
    /// `:authority` as the application sent it (kept for matched requests).
    host: String,
    /// The target the request matched, if any: only then is it ours.
    target: Option<u32>,
    parked: bool,
    /// Generation of the token this request left with, if it got one.
    authorized: Option<u64>,
    /// The gateway client its key named (`client_keys`), if any.
    client: Option<usize>,
    /// It went on with its own key, for want of a token: the diagnosis code.
    fallback: Option<&'static str>,
    inspection: Option<Inspection>,
    /// The cluster Envoy routed it to when the filter decided.
    checked: Option<String>,
    /// No target took it, though it looked like one a target meant, and it
    /// carried a key: an Azure 403 gets this reason as its diagnosis.
    near_miss: Option<NearMiss>,
}

/// What routing may ask beyond the host: the path, and the routed cluster
/// (read from the host at most once, and only if a target asks).
struct Lookups<'a, H> {
    host: &'a H,
    /// `:path`, read with the other request headers.
    path: Option<&'a str>,
    /// The routed cluster, read from the host at most once.
    cluster: Option<Option<String>>,
    /// The request carries `x-envoy-original-dst-host`.
    names_destination: bool,
}

impl<H: Host> Routed for Lookups<'_, H> {
    fn path(&mut self) -> Option<&str> {
        self.path
    }

    fn cluster(&mut self) -> Option<&str> {
        let host = self.host;
        self.cluster
            .get_or_insert_with(|| routed_cluster(host))
            .as_deref()
    }

    fn names_destination(&self) -> bool {
        self.names_destination
    }
}

fn routed_cluster<H: Host>(h: &H) -> Option<String> {
    h.routed_cluster()
        .and_then(|bytes| String::from_utf8(bytes).ok())
}

impl Stream {
    pub fn new(id: u32) -> Stream {
        Stream {
            id,
            host: String::new(),
            target: None,
            parked: false,
            authorized: None,
            client: None,
            fallback: None,
            inspection: None,
            checked: None,
            near_miss: None,
        }
    }

    /// The request's headers, as the host gave them (names lower-case).
    pub fn request_headers<H: Host>(
        &mut self,
        w: &Worker,
        h: &H,
        headers: &[(&[u8], &[u8])],
    ) -> Flow {
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| *n == name.as_bytes())
                .map(|(_, v)| *v)
        };
        // An authority that is not plain text matches nothing.
        let arrival = Arrival {
            authority: header(":authority")
                .and_then(wire::text)
                .unwrap_or_default(),
            api_key: header(API_KEY_HEADER),
            authorization: header(AUTHORIZATION_HEADER),
        };
        let mut lookups = Lookups {
            host: h,
            path: header(":path").and_then(wire::text),
            cluster: None,
            names_destination: header(ORIGINAL_DST_HEADER).is_some(),
        };
        let now = h.now_ms();
        let Ok(mut agents) = w.agents.try_borrow_mut() else {
            return Flow::Continue;
        };
        let refused = w.refused.try_borrow();
        let decision = request::decide(
            &w.config,
            &mut agents,
            refused.as_ref().map_or(&[][..], |r| r.as_slice()),
            &arrival,
            &mut lookups,
            self.id,
            now,
        );
        drop(refused);
        // What the filter checked: the response tells where Envoy really sent it.
        self.checked = lookups.cluster.take().flatten();
        match decision {
            Decision::Pass { miss, explain_403 } => {
                drop(agents);
                w.passed_through.set(w.passed_through.get() + 1);
                if let Some(miss) = miss {
                    w.note_near_miss(h, arrival.authority, miss);
                }
                self.near_miss = miss.filter(|_| explain_403);
                Flow::Continue
            }
            Decision::Reply { target, diagnosis } => {
                drop(agents);
                self.target = Some(target);
                w.reply(h, target, &diagnosis);
                Flow::Pause
            }
            Decision::KeepClientToken { target, path } => {
                drop(agents);
                self.matched(target, arrival.authority);
                let kind = crate::source::CredentialKind::Bearer;
                if let Err(status) = write_credential(h, kind, None, path.as_deref()) {
                    w.reply(h, target, &Diagnosis::credential_not_written(status.0));
                    return Flow::Pause;
                }
                w.count_kept(target);
                Flow::Continue
            }
            Decision::ForwardKey { target, code } => {
                drop(agents);
                self.matched(target, arrival.authority);
                self.fallback = Some(code);
                w.note_fallback(h, target, code);
                Flow::Continue
            }
            Decision::Authorize {
                target,
                kind,
                credential,
                generation,
                client,
                path,
            } => {
                let written = write_credential(h, kind, Some(credential), path.as_deref());
                drop(agents);
                self.matched(target, arrival.authority);
                if let Err(status) = written {
                    w.reply(h, target, &Diagnosis::credential_not_written(status.0));
                    return Flow::Pause;
                }
                self.authorized = Some(generation);
                self.client = client;
                w.count_authorized(target, client);
                Flow::Continue
            }
            Decision::Park {
                target,
                client,
                kick,
                path,
                carries_key,
            } => {
                let key = w
                    .config
                    .targets
                    .get(target as usize)
                    .and_then(|t| agents.get(t.token))
                    .map(|a| a.key().as_bytes().to_vec());
                drop(agents);
                self.matched(target, arrival.authority);
                self.parked = true;
                self.client = client;
                if let Ok(mut held) = w.held.try_borrow_mut() {
                    held.insert(
                        self.id,
                        Held {
                            client,
                            path,
                            carries_key,
                            ..Held::default()
                        },
                    );
                }
                w.report_waiting(h);
                if let (true, Some(key)) = (kick, key) {
                    let _ = h.enqueue(w.queue, &key);
                }
                Flow::Pause
            }
        }
    }

    fn matched(&mut self, target: u32, authority: &str) {
        self.target = Some(target);
        self.host = authority.to_owned();
    }

    /// A body chunk or the trailers must not release a request whose headers
    /// still wait for a token: Envoy would continue the headers unrewritten.
    /// (Envoy holds them itself while headers pause, unless the plugin sets
    /// allow_on_headers_stop_iteration; this is the safety net.)
    pub fn request_body_or_trailers(&self, w: &Worker) -> Flow {
        if self.parked && w.holds(self.id) {
            Flow::Pause
        } else {
            Flow::Continue
        }
    }

    /// The answer's headers.
    pub fn response_headers<H: Host>(&mut self, w: &Worker, h: &H) -> Flow {
        let Some(target) = self.target else {
            // Answers to requests no target matched are not ours: untouched,
            // but for the one hint users need most. A 403 to a key sent to an
            // Azure AI host that no target took is Azure refusing the key
            // (AuthenticationTypeDisabled): say why the filter did not step in.
            if let Some(miss) = self.near_miss {
                if response_status(h) == Some(403) {
                    let code = diagnose::near_miss_code(miss);
                    let _ = h.set_response_header(DIAGNOSIS_HEADER, Some(code));
                }
            }
            return Flow::Continue;
        };
        if self.parked {
            // Let go by the worker: learn how (the token it left with, or
            // its own key).
            let released = w
                .held
                .try_borrow_mut()
                .ok()
                .and_then(|mut held| held.get_mut(&self.id).and_then(|h| h.released.take()));
            match released {
                Some(Released::Authorized(generation)) => self.authorized = Some(generation),
                Some(Released::FellBack(code)) => self.fallback = Some(code),
                None => {}
            }
        }
        if let Some(code) = self.fallback {
            // Sent with the application's own key: the answer is its own,
            // marked so the fallback is visible where the app looks.
            let _ = h.set_response_header(FALLBACK_HEADER, Some(code));
            return Flow::Continue;
        }
        if self.authorized.is_some() && !self.went_where_checked(w, h, target) {
            let code = diagnose::code::ROUTE_CHANGED_AFTER_REWRITE;
            let _ = h.set_response_header(DIAGNOSIS_HEADER, Some(code));
            return Flow::Continue;
        }
        let Some(status) = response_status(h) else {
            return Flow::Continue;
        };
        let Some(code) = annotate::header_code(status, self.authorized.is_some()) else {
            return Flow::Continue;
        };
        // Local replies of the filter itself carry their diagnosis already.
        if h.response_header(DIAGNOSIS_HEADER).is_some() {
            return Flow::Continue;
        }
        let _ = h.set_response_header(DIAGNOSIS_HEADER, Some(code));
        let mode = BodyMode::choose(
            h.response_header("content-type").as_deref(),
            h.response_header("content-encoding").as_deref(),
            h.response_header("content-length").as_deref(),
        );
        if mode == BodyMode::Rewrite {
            // The body may change length; Envoy then sends it chunked.
            let _ = h.set_response_header("content-length", None);
        }
        self.inspection = Some(Inspection::new(status, mode));
        Flow::Continue
    }

    /// Does the response body matter to this request (an answer being read
    /// for its diagnosis)? When not, a host need not measure the body.
    pub fn reads_response_body(&self) -> bool {
        self.inspection.is_some()
    }

    /// A chunk of the answer's body (`size` bytes buffered so far).
    pub fn response_body<H: Host>(
        &mut self,
        w: &Worker,
        h: &H,
        size: usize,
        end_of_stream: bool,
    ) -> Flow {
        let Some(inspection) = self.inspection.as_mut() else {
            return Flow::Continue;
        };
        let wanted = inspection.wants(size, end_of_stream);
        let chunk = if wanted > 0 {
            h.response_body(wanted)
        } else {
            Vec::new()
        };
        match inspection.body(&chunk, size, end_of_stream) {
            BodyStep::Hold => Flow::Pause,
            BodyStep::Pass => Flow::Continue,
            BodyStep::Explain { rewrite } => {
                if let (Some(inspection), Some(target)) = (self.inspection.take(), self.target) {
                    self.explain(w, h, target, &inspection, rewrite, size);
                }
                Flow::Continue
            }
        }
    }

    /// The request is gone: the worker forgets it (the one place it does).
    pub fn finish<H: Host>(&self, w: &Worker, h: &H) {
        if !self.parked {
            return;
        }
        if let Ok(mut agents) = w.agents.try_borrow_mut() {
            for agent in agents.iter_mut() {
                agent.forget(self.id);
            }
        }
        w.report_waiting(h);
        if let Ok(mut held) = w.held.try_borrow_mut() {
            held.remove(&self.id);
        }
    }

    /// The upstream rejected the token this request carried: ask for a
    /// replacement (the worker fetches it), and learn what became of it.
    fn token_rejected<H: Host>(
        &self,
        w: &Worker,
        h: &H,
        token: usize,
        generation: u64,
    ) -> Option<Replacement> {
        let (replacement, commands) = match w.agents.try_borrow_mut() {
            Ok(mut agents) => {
                agents
                    .get_mut(token)?
                    .invalidate(h.now_ms(), &mut h.store(), generation)
            }
            Err(_) => return None,
        };
        // Only a kick, metrics and log lines: safe from a request.
        w.execute(h, token, commands);
        Some(replacement)
    }

    /// Explain an upstream authorization failure: metric, log line, and, when
    /// the body is held for it, the annotated body.
    fn explain<H: Host>(
        &self,
        w: &Worker,
        h: &H,
        target: u32,
        inspection: &Inspection,
        rewrite: bool,
        size: usize,
    ) {
        let body = inspection.collected();
        let Some(failure) = upstream::classify(inspection.status, body) else {
            return;
        };
        let Some(token) = w.config.targets.get(target as usize).map(|t| t.token) else {
            return;
        };
        // Read the token's claims before a rejection changes the record.
        let (claims, resource, source) = match w.agents.try_borrow() {
            Ok(agents) => match agents.get(token) {
                Some(agent) => (
                    agent.claims().cloned(),
                    agent.spec().resource.clone(),
                    agent.spec().source.clone(),
                ),
                None => return,
            },
            Err(_) => return,
        };
        let replacement = match (&failure, self.authorized) {
            (
                UpstreamFailure::TokenRejected { .. } | UpstreamFailure::KeyRejected,
                Some(generation),
            ) => self.token_rejected(w, h, token, generation),
            _ => None,
        };
        let facts = Facts {
            host: &self.host,
            token: self.authorized.and(claims.as_ref()),
            source: Some(&source),
        };
        let now = h.now_ms();
        let annotation = annotate::explain(&failure, &facts, &resource, now, replacement);
        let name = w.target_name(target);
        w.metric_add(
            h,
            m::UPSTREAM_AUTH_FAILURES,
            &[name, annotation.diagnosis],
            1,
        );
        if w.allow_log(annotation.diagnosis, now) {
            say!(
                h,
                Warn,
                "target {name}: {}",
                annotation.log_line(inspection.status, &self.host)
            );
        }
        if rewrite {
            if let Some(annotated) = annotate::annotated_body(body, &annotation, name) {
                if let Err(status) = h.replace_response_body(size, annotated.as_bytes()) {
                    say!(
                        h,
                        Warn,
                        "cannot annotate the response body (host status {})",
                        status.0
                    );
                }
            }
        }
    }

    /// Envoy matched the route again after the filter's writes: did the
    /// request go where the filter checked? If not, the target is refused
    /// from now on, and this answer says why.
    fn went_where_checked<H: Host>(&self, w: &Worker, h: &H, target: u32) -> bool {
        let taken = routed_cluster(h);
        if request::went_where_checked(self.checked.as_deref(), taken.as_deref()) {
            return true;
        }
        let refusal = Refusal {
            checked: safe::free_text(self.checked.as_deref().unwrap_or("(none)"), 200),
            taken: safe::free_text(taken.as_deref().unwrap_or("(none)"), 200),
        };
        let name = w.target_name(target);
        say!(
            h,
            Error,
            "target {name}: Envoy sent a request to cluster \"{}\" after the filter had checked \"{}\" and \
             replaced its api-key with the token (a route matches on the api-key or authorization header, \
             or on the api-key query parameter). Every further request of this target is refused \
             ({}) until the routes match on host and path only and the configuration is reloaded",
            refusal.taken,
            refusal.checked,
            diagnose::code::ROUTE_CHANGED_AFTER_REWRITE
        );
        w.metric_add(h, m::ROUTE_CHANGES, &[name], 1);
        if let Ok(mut refused) = w.refused.try_borrow_mut() {
            if let Some(slot) = refused.get_mut(target as usize) {
                slot.get_or_insert(refusal);
            }
        }
        false
    }
}

/// `:status` of the answer to the request in hand.
fn response_status<H: Host>(h: &H) -> Option<u16> {
    h.response_header(":status")
        .as_deref()
        .and_then(wire::status)
}

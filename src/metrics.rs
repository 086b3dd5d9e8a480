//! The filter's metrics: names, kinds, labels. Envoy shows them as
//! `wasmcustom.<name>` in `/stats` and `<name>` in `/stats/prometheus`.
//!
//! proxy-wasm metrics have no labels of their own, so labels are written into
//! the stat name as `;key=value` and turned into Prometheus labels by the
//! `stats_tags` of the shipped Envoy configs ([`STATS_TAGS`]). Without them
//! the labels stay part of the name. `target` is the target a request
//! matched; a token's own metrics carry the first target that uses it.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

pub const TOKEN_FETCHES: Metric = Metric {
    name: "aoai_msi_token_fetches_total",
    kind: Kind::Counter,
    labels: &["target", "source", "outcome"],
    help: "Token calls, by source (imds) and outcome (ok, status_<code>, no_response, invalid_body, wrong_audience, dispatch_failed).",
};
pub const TOKEN_FETCH_DURATION: Metric = Metric {
    name: "aoai_msi_token_fetch_duration_milliseconds",
    kind: Kind::Histogram,
    labels: &["target"],
    help: "Time from dispatching a token call to its answer.",
};
pub const TOKEN_EXPIRES_IN: Metric = Metric {
    name: "aoai_msi_token_expires_in_seconds",
    kind: Kind::Gauge,
    labels: &["target"],
    help: "Seconds until the current token expires (0 without one).",
};
pub const TOKEN_REFRESHES: Metric = Metric {
    name: "aoai_msi_token_refreshes_total",
    kind: Kind::Counter,
    labels: &["target"],
    help: "Background refreshes started while a usable token was serving requests.",
};
pub const TOKEN_INVALIDATIONS: Metric = Metric {
    name: "aoai_msi_token_invalidations_total",
    kind: Kind::Counter,
    labels: &["target"],
    help: "Replacement tokens asked for because Azure OpenAI rejected the current one.",
};
pub const REQUESTS_AUTHORIZED: Metric = Metric {
    name: "aoai_msi_requests_authorized_total",
    kind: Kind::Counter,
    labels: &["target", "client"],
    help: "Requests a target matched, sent with its credential; `client` is the gateway key's name when the target has client_keys.",
};
pub const REQUESTS_PASSED_THROUGH: Metric = Metric {
    name: "aoai_msi_requests_passed_through_total",
    kind: Kind::Counter,
    labels: &[],
    help: "Requests no target matched, left untouched.",
};
pub const REQUESTS_WAITING: Metric = Metric {
    name: "aoai_msi_requests_waiting",
    kind: Kind::Gauge,
    labels: &["target"],
    help: "Requests held right now until a token exists.",
};
pub const LOCAL_REPLIES: Metric = Metric {
    name: "aoai_msi_local_replies_total",
    kind: Kind::Counter,
    labels: &["target", "code"],
    help: "Requests the filter answered itself, by diagnosis code.",
};
pub const UPSTREAM_AUTH_FAILURES: Metric = Metric {
    name: "aoai_msi_upstream_auth_failures_total",
    kind: Kind::Counter,
    labels: &["target", "diagnosis"],
    help: "Authorization failures from Azure OpenAI that the filter explained, by diagnosis.",
};

pub const KEY_FALLBACKS: Metric = Metric {
    name: "aoai_msi_key_fallbacks_total",
    kind: Kind::Counter,
    labels: &["target", "diagnosis"],
    help: "Requests sent on with their own api-key because no token could be had (on_token_failure: forward_key), by the diagnosis they would have got.",
};
pub const CREDENTIAL_ROTATIONS: Metric = Metric {
    name: "aoai_msi_credential_rotations_total",
    kind: Kind::Counter,
    labels: &["target"],
    help: "Times an http source handed out a different value than the one serving.",
};
pub const CLIENT_TOKENS_KEPT: Metric = Metric {
    name: "aoai_msi_client_tokens_kept_total",
    kind: Kind::Counter,
    labels: &["target"],
    help: "Requests that kept the application's own Entra token (client_token: keep).",
};

pub const NOTIFICATION_QUEUES: Metric = Metric {
    name: "aoai_msi_notification_queues",
    kind: Kind::Gauge,
    labels: &[],
    help: "Notification queues of live VMs (workers and main thread), renewed by heartbeat; queues of VMs that went away drop out.",
};

pub const ROUTE_CHANGES: Metric = Metric {
    name: "aoai_msi_route_changes_total",
    kind: Kind::Counter,
    labels: &["target"],
    help: "Requests Envoy sent, after the filter's header writes, to a cluster other than the one the filter checked; the target is refused from then on.",
};

pub const ALL: [Metric; 15] = [
    TOKEN_FETCHES,
    TOKEN_FETCH_DURATION,
    TOKEN_EXPIRES_IN,
    TOKEN_REFRESHES,
    TOKEN_INVALIDATIONS,
    REQUESTS_AUTHORIZED,
    REQUESTS_PASSED_THROUGH,
    REQUESTS_WAITING,
    LOCAL_REPLIES,
    UPSTREAM_AUTH_FAILURES,
    KEY_FALLBACKS,
    CREDENTIAL_ROTATIONS,
    CLIENT_TOKENS_KEPT,
    NOTIFICATION_QUEUES,
    ROUTE_CHANGES,
];

/// Envoy `stats_config.stats_tags` entries that turn `;key=value` into labels.
pub const STATS_TAGS: [(&str, &str); 6] = [
    ("target", "(;target=([^;]*))"),
    ("source", "(;source=([^;]*))"),
    ("outcome", "(;outcome=([^;]*))"),
    ("code", "(;code=([^;]*))"),
    ("diagnosis", "(;diagnosis=([^;]*))"),
    ("client", "(;client=([^;]*))"),
];

impl Metric {
    /// The stat name for these label values, in the order of `labels`. An
    /// empty value leaves its label out (`client` of a target without
    /// gateway keys).
    pub fn stat_name(&self, values: &[&str]) -> String {
        let mut name = self.name.to_owned();
        for (label, value) in self.labels.iter().zip(values) {
            if value.is_empty() {
                continue;
            }
            name.push(';');
            name.push_str(label);
            name.push('=');
            // `.` separates Envoy's stat name segments and `;` labels: neither
            // may appear in a value.
            name.extend(value.chars().map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            }));
        }
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_written_into_the_stat_name_in_order() {
        assert_eq!(
            TOKEN_FETCHES.stat_name(&["chat", "imds", "status_500"]),
            "aoai_msi_token_fetches_total;target=chat;source=imds;outcome=status_500"
        );
        assert_eq!(
            REQUESTS_PASSED_THROUGH.stat_name(&[]),
            "aoai_msi_requests_passed_through_total"
        );
        assert_eq!(
            LOCAL_REPLIES.stat_name(&["t-1.x", "a;b=c"]),
            "aoai_msi_local_replies_total;target=t-1_x;code=a_b_c"
        );
        assert_eq!(
            REQUESTS_AUTHORIZED.stat_name(&["gw", "team-a"]),
            "aoai_msi_requests_authorized_total;target=gw;client=team-a"
        );
        assert_eq!(
            REQUESTS_AUTHORIZED.stat_name(&["chat", ""]),
            "aoai_msi_requests_authorized_total;target=chat",
            "no client label without gateway keys"
        );
    }

    #[test]
    fn every_label_has_a_stats_tag_extractor() {
        for metric in ALL {
            for label in metric.labels {
                assert!(STATS_TAGS.iter().any(|(tag, _)| tag == label), "{label}");
            }
        }
    }

    #[test]
    fn the_readme_documents_every_metric() {
        let readme = include_str!("../README.md");
        for metric in ALL {
            assert!(readme.contains(metric.name), "README lacks {}", metric.name);
        }
    }
}

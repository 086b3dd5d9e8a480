//! The single-target shorthand (DESIGN.md: `hosts`, `resource`,
//! `token_source` and the policies at the top level) is `targets` written
//! short. It is rewritten on the JSON value into the `targets` it stands for
//! before the typed read, so a target's keys are declared once
//! ([`RawTarget`](super::raw::RawTarget)); errors still name each field where
//! the user wrote it ([`Written::as_written`]).

use serde_json::{json, Map, Value};

use super::defaults::{DEFAULT_TARGET, FOUNDRY_PROJECT_PATH, FOUNDRY_TARGET};
use super::raw::{Written, SHORTHAND};

/// The configuration with the shorthand rewritten into the `targets` it
/// stands for, and how the targets were written. A value that is not an
/// object is left for the typed read to refuse.
pub(crate) fn rewrite(value: Value) -> (Value, Written) {
    let Value::Object(mut top) = value else {
        return (value, Written::default());
    };
    // `null` means absent, as for every optional key.
    let mut shorthand = Map::new();
    for key in SHORTHAND {
        if let Some(v) = top.remove(key).filter(|v| !v.is_null()) {
            shorthand.insert(key.to_owned(), v);
        }
    }
    if top.get("targets").is_some_and(|t| !t.is_null()) {
        let beside = SHORTHAND.into_iter().find(|k| shorthand.contains_key(*k));
        return (Value::Object(top), Written::Targets { beside });
    }
    let named = |name: &str, mut target: Map<String, Value>| {
        target.insert("name".to_owned(), json!(name));
        Value::Object(target)
    };
    let (targets, written) =
        if shorthand.contains_key("hosts") || shorthand.contains_key("resource") {
            (vec![named(DEFAULT_TARGET, shorthand)], Written::Shorthand)
        } else {
            let mut foundry = shorthand.clone();
            foundry.insert("hosts".to_owned(), json!(["*.services.ai.azure.com"]));
            foundry.insert("paths".to_owned(), json!([FOUNDRY_PROJECT_PATH]));
            (
                vec![
                    named(FOUNDRY_TARGET, foundry),
                    named(DEFAULT_TARGET, shorthand),
                ],
                Written::Defaults,
            )
        };
    top.insert("targets".to_owned(), Value::Array(targets));
    (Value::Object(top), written)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::raw::RawTarget;
    use crate::fields::errors::read;
    use crate::fields::ConfigError;

    #[test]
    fn the_shorthand_keys_are_a_targets_keys_but_its_name_paths_and_clusters() {
        // serde lists RawTarget's keys when it meets one it does not know.
        let Err(ConfigError::UnknownField { expected, .. }) =
            read::<RawTarget>(json!({"not_a_key": 0}), "")
        else {
            panic!("an unknown key is refused");
        };
        let mut declared: Vec<&str> = expected.split(", ").collect();
        declared.sort_unstable();
        let mut shorthand: Vec<&str> = SHORTHAND.into_iter().collect();
        shorthand.extend(["name", "paths", "clusters"]);
        shorthand.sort_unstable();
        assert_eq!(declared, shorthand);
    }

    #[test]
    fn the_shorthand_becomes_the_targets_it_stands_for() {
        let (value, written) = rewrite(json!({
            "hosts": ["a.openai.azure.com"], "client_token": "keep", "token_wait_timeout_ms": 1
        }));
        assert_eq!(written, Written::Shorthand);
        assert_eq!(
            value,
            json!({"targets": [{"name": "default", "hosts": ["a.openai.azure.com"], "client_token": "keep"}],
                   "token_wait_timeout_ms": 1})
        );
        let (value, written) = rewrite(json!({"token_source": {"client_id": "c"}, "hosts": null}));
        assert_eq!(written, Written::Defaults);
        assert_eq!(
            value,
            json!({"targets": [
                {"name": "foundry-projects", "hosts": ["*.services.ai.azure.com"],
                 "paths": ["/api/projects/"], "token_source": {"client_id": "c"}},
                {"name": "default", "token_source": {"client_id": "c"}}]})
        );
        assert!(!written.prefetch(0) && written.prefetch(1));
        assert_eq!(written.prefix(1), "");
    }

    #[test]
    fn targets_are_left_as_written_and_a_shorthand_key_beside_them_is_remembered() {
        let (value, written) = rewrite(json!({"targets": [], "resource": "r", "hosts": null}));
        assert_eq!(
            written,
            Written::Targets {
                beside: Some("resource")
            }
        );
        assert_eq!(value, json!({"targets": []}));
        assert_eq!(written.prefix(2), "targets[2].");
        assert_eq!(rewrite(json!([1])), (json!([1]), Written::default()));
    }

    #[test]
    fn errors_name_the_shorthands_fields_where_they_were_written() {
        let message = |json: Value| {
            crate::config::Config::from_value(&json)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            message(json!({"hostz": "x"})),
            "unknown field `hostz`; remove it or use one of: targets, token_source, hosts, \
             resource, on_token_failure, client_token, client_keys, token_wait_timeout_ms, \
             invalidation_interval_ms"
        );
        assert!(message(json!({"hosts": [5]})).starts_with("`hosts[0]` must be a string"));
        assert!(message(json!({"client_keys": [{"name": "a"}]}))
            .starts_with("`client_keys[0]` missing field"));
        assert!(message(json!({"targets": [{"hosts": [5]}]}))
            .starts_with("`targets[0].hosts[0]` must be a string"));
    }
}

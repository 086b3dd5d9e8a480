//! Errors that name a configuration field by its full path
//! (`targets[1].token_source.tenant_id`) and say what to write instead, and
//! the one reader that produces them from serde's messages.

use std::fmt;

use serde::Deserialize;
use serde_json::Value;

use crate::azure::audience::COGNITIVE_SERVICES as DEFAULT_RESOURCE;

/// Why a configuration was refused. `Display` names the field by its full
/// path and says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    NotJson(String),
    UnknownField {
        field: String,
        expected: String,
    },
    WrongType {
        field: String,
        expected: String,
        found: String,
    },
    Invalid {
        field: String,
        problem: String,
        fix: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::NotJson(e) => write!(
                f,
                "configuration is not valid JSON ({e}); write a JSON object such as {{}} or {{\"resource\":\"{DEFAULT_RESOURCE}\"}}"
            ),
            ConfigError::UnknownField { field, expected } => {
                write!(f, "unknown field `{field}`; remove it or use one of: {expected}")
            }
            ConfigError::WrongType {
                field,
                expected,
                found,
            } => write!(f, "`{field}` must be {expected} (it is {found})"),
            ConfigError::Invalid {
                field,
                problem,
                fix,
            } => write!(f, "`{field}` {problem}; {fix}"),
        }
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// The same error, its field renamed (the shorthand's fields are read
    /// inside `targets` but named where they stand, at the top level).
    pub(crate) fn with_field(self, rename: impl FnOnce(String) -> String) -> ConfigError {
        match self {
            ConfigError::NotJson(e) => ConfigError::NotJson(e),
            ConfigError::UnknownField { field, expected } => ConfigError::UnknownField {
                field: rename(field),
                expected,
            },
            ConfigError::WrongType {
                field,
                expected,
                found,
            } => ConfigError::WrongType {
                field: rename(field),
                expected,
                found,
            },
            ConfigError::Invalid {
                field,
                problem,
                fix,
            } => ConfigError::Invalid {
                field: rename(field),
                problem,
                fix,
            },
        }
    }
}

pub(crate) fn invalid(
    field: impl Into<String>,
    problem: impl Into<String>,
    fix: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

/// Read `T` from `value`, naming errors by `prefix` + the path inside.
pub(crate) fn read<T: for<'de> Deserialize<'de>>(
    value: Value,
    prefix: &str,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| serde_error(prefix, &e))
}

/// A serde error, with its path, as a [`ConfigError`].
fn serde_error(prefix: &str, e: &serde_path_to_error::Error<serde_json::Error>) -> ConfigError {
    let path = e.path().to_string();
    let field = match (prefix.is_empty(), path == ".") {
        (true, true) => "configuration".to_owned(),
        (true, false) => path,
        (false, true) => prefix.trim_end_matches('.').to_owned(),
        (false, false) => format!("{prefix}{path}"),
    };
    let message = e.inner().to_string();
    // serde_json appends " at line L column C"; the path says where.
    let message = message
        .rsplit_once(" at line ")
        .map_or(message.as_str(), |(m, _)| m)
        .to_owned();
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (name, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let expected = expected
            .trim_start_matches(", expected one of ")
            .trim_start_matches(", expected ")
            .replace('`', "");
        // A key is shown only if it is shaped like one: a secret pasted as
        // a key is not repeated.
        let parent = match field.strip_suffix(name) {
            Some(parent) => parent.trim_end_matches('.').to_owned(),
            None if field == "configuration" => String::new(),
            None => field,
        };
        let name = if field_name_shown(name) {
            name
        } else {
            "<a key that is not a field name>"
        };
        let field = if parent.is_empty() {
            name.to_owned()
        } else {
            format!("{parent}.{name}")
        };
        return ConfigError::UnknownField { field, expected };
    }
    // A list where an object belongs: serde reads structs from sequences too.
    if message.starts_with("invalid length") && message.contains("expected struct") {
        return ConfigError::WrongType {
            field,
            expected: "a JSON object".to_owned(),
            found: "a list".to_owned(),
        };
    }
    if let Some(rest) = message.strip_prefix("invalid type: ") {
        if let Some((found, expected)) = rest.split_once(", expected ") {
            return ConfigError::WrongType {
                expected: expected_words(&field, expected),
                found: json_kind_of(found).to_owned(),
                field,
            };
        }
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        let (value, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let expected = expected
            .trim_start_matches(", expected one of ")
            .trim_start_matches(", expected ")
            .replace('`', "\"");
        // A misspelt word is repeated; anything else may be a pasted secret.
        let word = (1..=30).contains(&value.len())
            && value.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
        let problem = if word {
            format!("is \"{value}\"")
        } else {
            "is not one of the words it takes".to_owned()
        };
        return invalid(field, problem, format!("use {expected}"));
    }
    invalid(
        field,
        without_quoted(&message),
        "see the configuration table in the README",
    )
}

/// Is `name` shaped like a configuration key (so that repeating it cannot
/// repeat a secret pasted where a key belongs)?
fn field_name_shown(name: &str) -> bool {
    (1..=40).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
}

/// serde's description of a value it did not expect (`string "…"`,
/// `integer `5``), reduced to the kind of value: the value itself may be a
/// secret pasted into the wrong field.
fn json_kind_of(found: &str) -> &'static str {
    let word = found.split([' ', '`', '"']).next().unwrap_or(found);
    match word {
        "string" | "character" => "a string",
        "integer" => "an integer",
        "floating" => "a number",
        "boolean" => "true or false",
        "map" => "an object",
        "sequence" => "a list",
        "null" | "unit" => "null",
        _ => "a value of another type",
    }
}

/// serde's message with every quoted value (`"…"`, `` `…` ``) taken out.
fn without_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quote: Option<char> = None;
    for c in message.chars() {
        match (quote, c) {
            (None, '"' | '`') => {
                quote = Some(c);
                out.push('…');
            }
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, c) => out.push(c),
        }
    }
    out
}

/// What a field must be, in the words of the README rather than serde's.
fn expected_words(field: &str, serde_says: &str) -> String {
    let last = field
        .rsplit(['.', '['])
        .next()
        .unwrap_or(field)
        .trim_end_matches(']');
    match last {
        "hosts" => "a list of host patterns such as [\"*.openai.azure.com\"]".to_owned(),
        "paths" => "a list of path prefixes such as [\"/api/projects/\"]".to_owned(),
        "clusters" => "a list of Envoy cluster names such as [\"aoai_east\"]".to_owned(),
        "targets" => {
            "a list of targets such as [{\"hosts\":[\"myres.openai.azure.com\"]}]".to_owned()
        }
        "token_source" | "configuration" => "a JSON object".to_owned(),
        name if name.ends_with("_ms") => "a whole number of milliseconds".to_owned(),
        _ if serde_says == "u64" => "a whole number".to_owned(),
        // serde names the Rust type it reads ("struct RawTarget"): the user
        // wrote JSON.
        _ if serde_says.starts_with("struct ") => "a JSON object".to_owned(),
        _ => serde_says.to_owned(),
    }
}

//! AKS workload identity without the token-file listener: in Envoy's own
//! process the module can read the projected service-account token itself.
//!
//! The webhook sets `AZURE_FEDERATED_TOKEN_FILE` in the pod; when Envoy's
//! environment has it, the assertion call of a `workload_identity` source
//! (a GET of `assertion_path` on `assertion_cluster`) is answered from that
//! file, read anew for every exchange (Kubernetes rotates it by swapping the
//! `..data` symlink, which the path follows). Without the variable the call
//! goes to the cluster, as in the wasm build.

use std::io::Read;
use std::path::{Path, PathBuf};

use aoai_msi_filter::config::Config;
use aoai_msi_filter::source::{Source, TokenRequest, MAX_ASSERTION_BYTES};

/// The variable the workload-identity webhook sets to the token's path.
pub const TOKEN_FILE_VARIABLE: &str = "AZURE_FEDERATED_TOKEN_FILE";

/// Where the token file is, from the environment (`env` reads a variable).
pub fn token_file(env: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    env(TOKEN_FILE_VARIABLE)
        .filter(|path| !path.trim().is_empty())
        .map(PathBuf::from)
}

/// Is `request` the assertion call of one of `config`'s workload-identity
/// sources?
pub fn is_assertion_call(config: &Config, request: &TokenRequest) -> bool {
    let path = request
        .headers
        .iter()
        .find(|(name, _)| *name == ":path")
        .map(|(_, value)| value.as_str());
    config.tokens.iter().any(|token| match &token.source {
        Source::WorkloadIdentity(source) => {
            source.assertion_cluster == request.cluster
                && path == Some(source.assertion_path.as_str())
        }
        _ => false,
    })
}

/// The token file's bytes: at most one byte more than an assertion may
/// have, so an oversized file is refused by the same check as an oversized
/// answer of the listener.
pub fn read_token(file: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(file)?
        .take(MAX_ASSERTION_BYTES as u64 + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aoai_msi_filter::source::parse_assertion;

    const ASSERTION: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2EifQ.c2lnbmF0dXJl";

    fn config(token_source: &str) -> Config {
        let json = format!(r#"{{"token_source":{token_source}}}"#);
        let env = |name: &str| match name {
            "AZURE_TENANT_ID" => Some("72f988bf-0000-4000-8000-00000000e1a0".to_owned()),
            "AZURE_CLIENT_ID" => Some("c11e0000-0000-4000-8000-0000000000aa".to_owned()),
            _ => None,
        };
        Config::parse_with_env(json.as_bytes(), &env).expect("valid configuration")
    }

    fn get(cluster: &str, path: &str) -> TokenRequest {
        TokenRequest {
            cluster: cluster.to_owned(),
            timeout_ms: 1_000,
            headers: vec![
                (":method", "GET".to_owned()),
                (":path", path.to_owned()),
                (":authority", "federated-token".to_owned()),
            ],
            body: Vec::new(),
        }
    }

    /// A file of its own under the system's temporary directory.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, bytes: &[u8]) -> TempFile {
            let path =
                std::env::temp_dir().join(format!("aoai-msi-native-{}-{name}", std::process::id()));
            std::fs::write(&path, bytes).expect("temporary file");
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn the_variable_names_the_file_and_an_empty_one_names_none() {
        let set = |name: &str| {
            (name == TOKEN_FILE_VARIABLE).then(|| "/var/run/secrets/azure/tokens/t".to_owned())
        };
        assert_eq!(
            token_file(set),
            Some(PathBuf::from("/var/run/secrets/azure/tokens/t"))
        );
        assert_eq!(token_file(|_| Some(" ".to_owned())), None);
        assert_eq!(token_file(|_| None), None);
    }

    #[test]
    fn only_the_assertion_call_of_a_workload_identity_source_is_read_from_the_file() {
        let workload = config(
            r#"{"type":"workload_identity","cluster":"entra","assertion_cluster":"federated_token"}"#,
        );
        assert!(is_assertion_call(&workload, &get("federated_token", "/")));
        // Its token exchange, another cluster or path: over the network.
        assert!(!is_assertion_call(&workload, &get("entra", "/")));
        assert!(!is_assertion_call(
            &workload,
            &get("federated_token", "/other")
        ));
        // Other sources never read the file.
        let imds = config(r#"{"type":"imds","cluster":"federated_token"}"#);
        assert!(!is_assertion_call(&imds, &get("federated_token", "/")));
    }

    #[test]
    fn the_file_read_is_what_the_listener_would_have_served() {
        let file = TempFile::new("token", format!("{ASSERTION}\n").as_bytes());
        let bytes = read_token(&file.0).expect("readable");
        let assertion = parse_assertion(Some(200), &bytes).expect("an assertion");
        assert_eq!(assertion.expose(), ASSERTION);
        // Rotated in place: the next exchange reads the new token.
        let rotated = ASSERTION.replace("c2lnbmF0dXJl", "bmV3c2lnbmF0dXJl");
        std::fs::write(&file.0, &rotated).expect("rotate");
        let bytes = read_token(&file.0).expect("readable");
        assert_eq!(
            parse_assertion(Some(200), &bytes)
                .expect("an assertion")
                .expose(),
            rotated
        );
    }

    #[test]
    fn an_oversized_or_missing_file_is_refused() {
        let big = TempFile::new("big", &vec![b'a'; MAX_ASSERTION_BYTES * 2]);
        let bytes = read_token(&big.0).expect("readable");
        assert_eq!(bytes.len(), MAX_ASSERTION_BYTES + 1, "read no further");
        assert!(parse_assertion(Some(200), &bytes).is_err());
        assert!(read_token(Path::new("/nonexistent/aoai-msi/token")).is_err());
    }
}

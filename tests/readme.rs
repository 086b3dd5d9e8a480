//! README.md holds to what the code does. Every JSON plugin configuration in
//! it is accepted by the filter's own parser and by a real Envoy
//! (`--mode validate`, with the clusters and environment it names), and the
//! figures and program output it quotes are checked against their source:
//! the shipped configs, the test suites, the Makefile, and what the openai SDK
//! really prints through Envoy.
#![cfg(not(target_arch = "wasm32"))]
// Test helpers: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use serde_json::Value;
use support::*;

/// ```json blocks of README.md that are not plugin configurations, each named
/// by a text only it contains, and why it is not checked as one. Every other
/// ```json block is a plugin configuration and must pass the filter and Envoy;
/// an entry that matches no block, or several, fails the test.
const NOT_PLUGIN_CONFIGURATIONS: &[(&str, &str)] = &[(
    "\"client_secret_sds\"",
    "native build only, with an SDS file of its own: the wasm filter refuses it by design \
     (tests/e2e.rs), and tests/secrets.rs runs the same shape in a real Envoy with the native module",
)];

/// The fenced blocks whose info string names JSON (`json`, `jsonc`, …).
fn json_blocks(readme: &str) -> Vec<Fenced> {
    fenced_blocks(readme)
        .into_iter()
        .filter(|b| b.info.to_ascii_lowercase().starts_with("json"))
        .collect()
}

/// The Envoy config a README snippet is validated in: the filter with the
/// snippet as its configuration, a cluster for every name it gives (targets'
/// `clusters`, token endpoints, the token-file listener), and the variables
/// the snippet makes the filter read passed to the VM (`host_env_keys`).
fn envoy_config_for(json: &str, clusters: &[String], env: &[(String, String)]) -> String {
    let mut all: Vec<&str> = clusters.iter().map(String::as_str).collect();
    if !all.contains(&"upstream") {
        all.push("upstream");
    }
    let keys: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    let ports: Vec<(&str, u16)> = all.iter().map(|c| (*c, 9)).collect();
    Plugin {
        wasm: &wasm(),
        extra: "",
        config: json,
        env_keys: &keys,
    }
    .envoy_yaml_all_to_upstream(&ports)
}

#[test]
fn every_json_plugin_configuration_in_the_readme_passes_the_filter_and_envoy_validation() {
    let readme = readme();
    let blocks = json_blocks(&readme);
    for (needle, why) in NOT_PLUGIN_CONFIGURATIONS {
        let matching = blocks.iter().filter(|b| b.text.contains(needle)).count();
        assert_eq!(
            matching, 1,
            "NOT_PLUGIN_CONFIGURATIONS entry {needle:?} ({why}) must name exactly one ```json block"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut checked = Vec::new();
    for block in &blocks {
        if NOT_PLUGIN_CONFIGURATIONS
            .iter()
            .any(|(needle, _)| block.text.contains(needle))
        {
            continue;
        }
        let at = format!("README.md:{}", block.line);
        if let Err(e) = serde_json::from_str::<Value>(&block.text) {
            failures.push(format!("{at}: not JSON: {e}"));
            continue;
        }
        let (parsed, env) = parse_with_stand_in_env(&block.text);
        let config = match parsed {
            Ok(config) => config,
            Err(e) => {
                failures.push(format!("{at}: the filter refuses it: {e}"));
                continue;
            }
        };
        let clusters = clusters_named_by(&config);
        let path = dir.path().join(format!("readme-{}.yaml", block.line));
        std::fs::write(&path, envoy_config_for(&block.text, &clusters, &env)).unwrap();
        let (ok, out) = validate_with_env(&path, &env);
        let refused = out
            .lines()
            .find(|l| l.contains("invalid plugin configuration"));
        match (ok, refused) {
            (true, None) => {}
            (_, Some(line)) => failures.push(format!("{at}: Envoy validation: {line}")),
            (false, None) => failures.push(format!(
                "{at}: Envoy validation failed:\n{}",
                out.lines().rev().take(15).collect::<Vec<_>>().join("\n")
            )),
        }
        let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        checked.push(format!(
            "{at}: {} target(s), clusters {clusters:?}, environment {names:?}",
            config.targets.len()
        ));
    }
    println!("{}", checked.join("\n"));
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    // Counted: a block is either checked or listed above with a reason.
    assert_eq!(
        checked.len() + NOT_PLUGIN_CONFIGURATIONS.len(),
        blocks.len(),
        "every ```json block is checked or listed in NOT_PLUGIN_CONFIGURATIONS"
    );
    assert!(
        checked.len() >= 7,
        "the README's plugin configurations were found ({})",
        checked.len()
    );
}

#[test]
fn json_in_the_readme_is_fenced_as_json_so_the_check_above_sees_it() {
    for block in fenced_blocks(&readme()) {
        if block.info.to_ascii_lowercase().starts_with("json") {
            continue;
        }
        let value = serde_json::from_str::<Value>(&block.text);
        assert!(
            !matches!(value, Ok(Value::Object(_))),
            "README.md:{}: a JSON object fenced as ```{}: fence it as ```json",
            block.line,
            block.info
        );
    }
}

#[test]
fn the_fence_reader_finds_blocks_their_info_and_their_lines() {
    let text = "a\n```json\n{\"x\": 1}\n```\n\n```\nplain\n```\n  ```sh\necho\n  ```\n";
    let blocks = fenced_blocks(text);
    assert_eq!(blocks.len(), 3);
    assert_eq!(
        (
            blocks[0].info.as_str(),
            blocks[0].line,
            blocks[0].text.as_str()
        ),
        ("json", 2, "{\"x\": 1}\n")
    );
    assert_eq!(
        (blocks[1].info.as_str(), blocks[1].text.as_str()),
        ("", "plain\n")
    );
    assert_eq!((blocks[2].info.as_str(), blocks[2].line), ("sh", 9));
}

/// The gateway keys the README shows (`<team>: key <key> sha256 <hash>`
/// lines): each hash is the key's, and the `client_keys` snippet lists
/// exactly those hashes, by team.
#[test]
fn the_readmes_gateway_key_hashes_are_the_sha256_of_the_keys_shown_beside_them() {
    let readme = readme();
    let mut shown = Vec::new();
    for line in readme.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let [team, "key", key, "sha256", hash] = words[..] {
            if let Some(team) = team.strip_suffix(':') {
                assert_eq!(
                    sha256_hex_of(key),
                    hash,
                    "README: the hash shown for {team}'s key is not its SHA-256"
                );
                shown.push((team.to_owned(), hash.to_owned()));
            }
        }
    }
    assert!(shown.len() >= 2, "the example keys and hashes: {shown:?}");
    let snippet = json_blocks(&readme)
        .into_iter()
        .find(|b| b.text.contains("\"client_keys\""))
        .expect("the client_keys snippet");
    let value: Value = serde_json::from_str(&snippet.text).unwrap();
    let listed: Vec<(String, String)> = value["targets"][0]["client_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["name"].as_str().unwrap().to_owned(),
                k["sha256"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(listed, shown, "the snippet lists the hashes shown above it");
}

fn number_word(word: &str) -> Option<usize> {
    const WORDS: [&str; 13] = [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve",
    ];
    let word = word.to_ascii_lowercase();
    WORDS
        .iter()
        .position(|w| *w == word)
        .or_else(|| word.parse().ok())
}

/// "<N> distinct tokens serve the <M> targets" of the egress gateway is what
/// the filter makes of `envoy/egress-gateway.yaml`; and `foundry` shares
/// `eastus`'s token, as the README says.
#[test]
fn the_readmes_token_count_for_the_egress_gateway_is_what_its_config_makes() {
    let readme = readme();
    let sentence = "distinct tokens serve the";
    let at = readme
        .find(sentence)
        .expect("the egress gateway's token count");
    let before = readme[..at].split_whitespace().last().unwrap();
    let after = readme[at + sentence.len()..]
        .split_whitespace()
        .next()
        .unwrap();
    let (tokens, targets) = (number_word(before).unwrap(), number_word(after).unwrap());
    let (_, doc) = shipped_configs()
        .into_iter()
        .find(|(path, _)| path.ends_with("egress-gateway.yaml"))
        .unwrap();
    let configs = plugin_configs(&doc);
    assert_eq!(configs.len(), 1);
    let (parsed, _) = parse_with_stand_in_env(&configs[0]);
    let config = parsed.unwrap();
    assert_eq!(
        (config.tokens.len(), config.targets.len()),
        (tokens, targets),
        "README: \"{before} {sentence} {after} targets\""
    );
    let token_of = |name: &str| {
        config
            .targets
            .iter()
            .find(|t| t.name == name)
            .unwrap()
            .token
    };
    assert!(readme.contains("`foundry` shares `eastus`'s token"));
    assert_eq!(token_of("foundry"), token_of("eastus"));
}

/// `make test-fuzz`'s "<N> × 50 000 inputs" and `make fuzz`'s "<N> × 300 000":
/// N is the number of properties in tests/robustness.rs (every test there is
/// one), and the case counts are the Makefile's.
#[test]
fn the_readmes_property_counts_are_the_robustness_suites() {
    let suite = std::fs::read_to_string(repo().join("tests/robustness.rs")).unwrap();
    let properties = suite
        .lines()
        .filter(|l| l.trim() == "#[test]" || l.trim() == "#[tokio::test]")
        .count();
    assert!(suite.contains("proptest! {"));
    let makefile = std::fs::read_to_string(repo().join("Makefile")).unwrap();
    let cases: u64 = makefile
        .lines()
        .find_map(|l| l.strip_prefix("FUZZ_CASES ?="))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(makefile.contains("FUZZ_CASES=300000"));
    let grouped = |n: u64| {
        let digits = n.to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(' ');
            }
            out.push(c);
        }
        out
    };
    let readme = readme();
    for wanted in [
        format!("{properties} × {} inputs", grouped(cases)),
        format!("`make fuzz` runs {properties} × {}", grouped(300_000)),
    ] {
        assert!(
            readme.contains(&wanted),
            "README must say \"{wanted}\" (tests/robustness.rs has {properties} properties)"
        );
    }
}

/// The README gives the module's size as "about 1 MB" (`make build` prints
/// the exact one): true while it stays between 0.75 and 1.25 MB.
#[test]
fn the_module_is_about_the_size_the_readme_gives() {
    let readme = readme();
    assert!(readme.contains("about 1 MB"));
    let bytes = std::fs::metadata(wasm()).unwrap().len();
    assert!(
        (750_000..1_250_000).contains(&bytes),
        "{bytes} bytes is no longer \"about 1 MB\": update README.md (Limitations, Deploying)"
    );
}

/// README: `envoy --mode validate` does not catch a `token_source.cluster`
/// that does not exist; it shows at request time. Should validation start to
/// catch it, the README must say so.
#[test]
fn validation_passes_a_token_cluster_that_does_not_exist_as_the_readme_says() {
    assert!(readme().contains("does not catch a `token_source.cluster`"));
    let dir = tempfile::tempdir().unwrap();
    let config = r#"{"token_source": {"type": "imds", "cluster": "no_such_cluster"}}"#;
    let (ok, out) = validate(&write_envoy_config(&dir, "missing.yaml", config));
    assert!(ok, "validation now refuses it; update README.md:\n{out}");
}

/// README: what validation cannot see, the filter says at start-up, once,
/// at critical level, naming the cluster (the token is fetched at start-up).
#[test]
fn a_token_cluster_that_does_not_exist_is_named_at_critical_level_at_start_up() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let config = r#"{"token_source": {"type": "imds", "cluster": "no_such_cluster"}}"#;
    let envoy = Envoy::start(config, &emulator, 2);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let critical = loop {
        let lines: Vec<String> = envoy
            .log()
            .lines()
            .filter(|l| l.contains("[critical]") && l.contains("\"no_such_cluster\""))
            .map(str::to_owned)
            .collect();
        if !lines.is_empty() || std::time::Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(!critical.is_empty(), "{}", envoy.log_tail());
    assert!(critical[0].contains("envoy --mode validate` does not check it"));
}

/// The README line that starts with `prefix`, inside a fenced block.
fn quoted_line(readme: &str, prefix: &str) -> String {
    fenced_blocks(readme)
        .iter()
        .flat_map(|b| b.text.lines().map(str::to_owned).collect::<Vec<_>>())
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("README quotes no line starting {prefix:?}"))
}

/// What the SDK printed for an exception, as Python prints it uncaught.
fn printed(result: &Value) -> String {
    format!(
        "openai.{}: {}",
        result["exception"].as_str().unwrap(),
        result["printed"].as_str().unwrap()
    )
}

/// The SDK version the README names is the one `make test` installs, and
/// the exceptions it quotes are, byte for byte, what that SDK prints
/// through Envoy.
#[test]
fn the_openai_sdk_exceptions_quoted_in_the_readme_are_what_the_sdk_prints() {
    let readme = readme();
    let makefile = std::fs::read_to_string(repo().join("Makefile")).unwrap();
    let version = makefile
        .lines()
        .find_map(|l| l.strip_prefix("OPENAI_VERSION :="))
        .unwrap()
        .trim();
    assert!(
        readme.contains(&format!("openai Python SDK ({version},")),
        "README names the SDK the Makefile pins ({version})"
    );

    // The binding of tests/sdk.rs: the SDK calls http://127.0.0.1:<port>.
    let local = r#"{"targets": [{"name": "local", "hosts": ["127.0.0.1", "localhost"], "clusters": ["upstream"]}]}"#;
    let emulator = Emulator::start(Settings {
        role_holders: Default::default(),
        ..Settings::default()
    })
    .unwrap();
    let envoy = Envoy::start(local, &emulator, 1);
    let result = openai_sdk_call(&envoy, 0);
    assert_eq!(result["sdk"], version);
    assert_eq!(
        quoted_line(&readme, "openai.AuthenticationError: Error code: 401"),
        printed(&result)
    );
    drop(envoy);

    let closed = closed_port();
    let config = r#"{"targets": [{"hosts": ["127.0.0.1"], "clusters": ["upstream"]}], "token_wait_timeout_ms": 500}"#;
    let envoy = Envoy::start_yaml(&envoy_yaml(config, closed.port, emulator.port()), 1);
    let result = openai_sdk_call(&envoy, 0);
    assert_eq!(
        quoted_line(&readme, "openai.InternalServerError: Error code: 503"),
        printed(&result)
    );
}

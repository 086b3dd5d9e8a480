use super::*;

fn err(json: &str) -> String {
    Config::parse(json.as_bytes()).unwrap_err().to_string()
}

fn parse(json: &str) -> Config {
    Config::parse(json.as_bytes()).unwrap_or_else(|e| panic!("{json}: {e}"))
}

fn resource_of(c: &Config, target: usize) -> &str {
    &c.token_of(target).unwrap().resource
}

#[test]
fn empty_object_and_empty_bytes_mean_foundry_projects_then_the_three_suffixes() {
    let from_object = parse("{}");
    assert_eq!(from_object, Config::parse(b"  ").unwrap());
    assert_eq!(from_object, Config::default());
    let names: Vec<&str> = from_object
        .targets
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(names, ["foundry-projects", "default"]);
    let foundry = &from_object.targets[0];
    assert_eq!(
        foundry.hosts.patterns()[0].to_string(),
        "*.services.ai.azure.com"
    );
    assert_eq!(foundry.paths, ["/api/projects/"]);
    assert_eq!(resource_of(&from_object, 0), "https://ai.azure.com");
    assert_eq!(
        resource_of(&from_object, 1),
        "https://cognitiveservices.azure.com"
    );
    let hosts: Vec<String> = from_object.targets[1]
        .hosts
        .patterns()
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(hosts, DEFAULT_HOSTS);
    assert_eq!(from_object.tokens.len(), 2, "two audiences, two tokens");
    assert!(
        !from_object.tokens[0].prefetch,
        "the Foundry token is fetched on first use"
    );
    assert!(
        from_object.tokens[1].prefetch,
        "the Azure OpenAI token at start-up"
    );
    let imds = from_object.tokens[1].imds().unwrap();
    assert_eq!(imds.cluster, "azure_imds");
    assert_eq!(imds.authority, "169.254.169.254");
    assert_eq!(imds.identity, IdentitySelector::Default);
    assert_eq!(from_object.tokens[1].token_wait_timeout_ms, 5_000);
}

#[test]
fn the_shorthand_is_read_field_by_field() {
    let c = parse(
        r#"{"token_source":{"type":"imds","cluster":"outbound|80||imds.azure.internal",
             "authority":"imds.azure.internal","client_id":"1111-2222","timeout_ms":750},
             "hosts":["myres.openai.azure.com"],"resource":"https://cognitiveservices.azure.us",
             "token_wait_timeout_ms":2500}"#,
    );
    assert_eq!(c.targets.len(), 1);
    assert_eq!(c.targets[0].name, "default");
    let token = c.token_of(0).unwrap();
    let imds = token.imds().unwrap();
    assert_eq!(imds.cluster, "outbound|80||imds.azure.internal");
    assert_eq!(imds.authority, "imds.azure.internal");
    assert_eq!(
        imds.identity,
        IdentitySelector::ClientId("1111-2222".into())
    );
    assert_eq!(imds.timeout_ms, 750);
    assert!(c.targets[0].hosts.matches_bare("MyRes.OpenAI.Azure.com"));
    assert!(!c.targets[0].hosts.matches_bare("other.openai.azure.com"));
    assert_eq!(token.resource, "https://cognitiveservices.azure.us");
    assert_eq!(token.token_wait_timeout_ms, 2500);
}

#[test]
fn a_shorthand_identity_applies_to_both_default_targets() {
    let c = parse(r#"{"token_source":{"client_id":"c1"}}"#);
    assert_eq!(c.targets.len(), 2);
    for token in &c.tokens {
        assert_eq!(
            token.imds().unwrap().identity,
            IdentitySelector::ClientId("c1".into())
        );
    }
    // An explicit resource without hosts means one target with the default hosts.
    let c = parse(r#"{"resource":"https://ai.azure.com"}"#);
    assert_eq!(c.targets.len(), 1);
    assert_eq!(resource_of(&c, 0), "https://ai.azure.com");
}

#[test]
fn each_alternative_selector_is_accepted_alone() {
    let o = parse(r#"{"token_source":{"object_id":"oid-1"}}"#);
    assert_eq!(
        o.tokens[0].imds().unwrap().identity,
        IdentitySelector::ObjectId("oid-1".into())
    );
    let r = parse(r#"{"token_source":{"msi_res_id":"/subscriptions/s/x"}}"#);
    assert_eq!(
        r.tokens[0].imds().unwrap().identity,
        IdentitySelector::ResourceId("/subscriptions/s/x".into())
    );
}

#[test]
fn the_contracts_targets_example_compiles_into_targets_and_distinct_tokens() {
    let c = parse(
        r#"{"targets":[
            {"name":"chat","hosts":["east.openai.azure.com"],"clusters":["aoai_east"],
             "token_source":{"type":"imds","client_id":"id-1"}},
            {"name":"agents","hosts":["*.services.ai.azure.com"],"paths":["/api/projects/"]},
            {"name":"scoring","hosts":["*.inference.ml.azure.com"]},
            {"name":"gov","hosts":["*.openai.azure.us"]},
            {"name":"west","hosts":["west.openai.azure.com"],"token_source":{"client_id":"id-1"}}
          ],
          "token_wait_timeout_ms": 5000}"#,
    );
    let names: Vec<&str> = c.targets.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["chat", "agents", "scoring", "gov", "west"]);
    assert_eq!(c.targets[0].clusters, ["aoai_east"]);
    let resources: Vec<&str> = (0..5).map(|t| resource_of(&c, t)).collect();
    assert_eq!(
        resources,
        [
            "https://cognitiveservices.azure.com",
            "https://ai.azure.com",
            "https://ml.azure.com",
            "https://cognitiveservices.azure.us",
            "https://cognitiveservices.azure.com",
        ]
    );
    // chat and west: same identity and audience, one token.
    assert_eq!(c.targets[0].token, c.targets[4].token);
    assert_eq!(c.tokens.len(), 4);
    assert_eq!(
        c.tokens[c.targets[4].token].label, "chat",
        "named after its first target"
    );
}

#[test]
fn resource_defaults_follow_the_cloud_and_the_service() {
    for (hosts, paths, expected) in [
        (
            r#"["*.openai.azure.us"]"#,
            None,
            "https://cognitiveservices.azure.us",
        ),
        (
            r#"["x.cognitiveservices.azure.us"]"#,
            None,
            "https://cognitiveservices.azure.us",
        ),
        (
            r#"["*.openai.azure.cn"]"#,
            None,
            "https://cognitiveservices.azure.cn",
        ),
        (
            r#"["*.cognitiveservices.azure.cn"]"#,
            None,
            "https://cognitiveservices.azure.cn",
        ),
        (
            r#"["ep.eastus.inference.ml.azure.com"]"#,
            None,
            "https://ml.azure.com",
        ),
        (
            r#"["*.services.ai.azure.com"]"#,
            Some(r#"["/api/projects/p1/"]"#),
            "https://ai.azure.com",
        ),
        (
            r#"["*.services.ai.azure.com"]"#,
            Some(r#"["/models/"]"#),
            "https://cognitiveservices.azure.com",
        ),
        (
            r#"["*.services.ai.azure.com"]"#,
            None,
            "https://cognitiveservices.azure.com",
        ),
        (
            r#"["127.0.0.1", "*.openai.azure.us"]"#,
            None,
            "https://cognitiveservices.azure.us",
        ),
        (
            r#"["localhost"]"#,
            None,
            "https://cognitiveservices.azure.com",
        ),
    ] {
        let paths = paths
            .map(|p| format!(r#","paths":{p}"#))
            .unwrap_or_default();
        let c = parse(&format!(r#"{{"targets":[{{"hosts":{hosts}{paths}}}]}}"#));
        assert_eq!(resource_of(&c, 0), expected, "{hosts} {paths}");
    }
}

#[test]
fn rejected_configurations_name_the_full_field_path_and_the_fix() {
    let table: &[(&str, &str, &str)] = &[
        (r#"{"resorce":"x"}"#, "unknown field `resorce`", "resource"),
        (
            r#"{"token_source":{"clientid":"x"}}"#,
            "unknown field `token_source.clientid`",
            "client_id",
        ),
        (
            r#"{"targets":[{},{"token_source":{"type":"imds","tenant_id":"x"}}]}"#,
            "unknown field `targets[1].token_source.tenant_id`",
            "client_id",
        ),
        (
            r#"{"targets":[{"hosts":["a.example"],"cluster":["x"]}]}"#,
            "unknown field `targets[0].cluster`",
            "clusters",
        ),
        (
            r#"{"hosts":"*.openai.azure.com"}"#,
            "`hosts` must be a list of host patterns",
            "*.openai.azure.com",
        ),
        (r#"{"hosts":[]}"#, "`hosts` is empty", "at least one host"),
        (
            r#"{"hosts":["*openai.azure.com"]}"#,
            "`hosts[0]`",
            "suffix pattern",
        ),
        (
            r#"{"hosts":["ok.example", "https://x.openai.azure.com"]}"#,
            "`hosts[1]`",
            "exact host",
        ),
        (r#"{"hosts":[7]}"#, "`hosts[0]` must be a string", "integer"),
        (
            r#"{"hosts":["*"]}"#,
            "`hosts[0]` is \"*\"",
            "only in a target that names `clusters`",
        ),
        (
            r#"{"resource":"https://cognitiveservices.azure.com/.default"}"#,
            "`resource`",
            "write \"https://cognitiveservices.azure.com\"",
        ),
        (
            r#"{"resource":"cognitiveservices"}"#,
            "not an App ID URI",
            "https://",
        ),
        (
            r#"{"token_source":{"type":"workload"}}"#,
            "`token_source.type`",
            "\"imds\"",
        ),
        (
            r#"{"token_source":{"cluster":""}}"#,
            "`token_source.cluster` is empty",
            "azure_imds",
        ),
        (
            r#"{"token_source":{"cluster":5}}"#,
            "`token_source.cluster` must be a string",
            "",
        ),
        (
            r#"{"token_source":{"client_id":"a","object_id":"b"}}"#,
            "token_source.client_id / token_source.object_id",
            "exactly one",
        ),
        (
            r#"{"token_wait_timeout_ms":0}"#,
            "`token_wait_timeout_ms` is 0",
            "1 to 120000",
        ),
        (r#"{"token_wait_timeout_ms":"5s"}"#, "milliseconds", ""),
        (
            r#"{"token_source":{"timeout_ms":50}}"#,
            "`token_source.timeout_ms` is 50",
            "100 to 60000",
        ),
        (r#"[]"#, "`configuration` must be a JSON object", ""),
        (r#"{"hosts":"#, "not valid JSON", "{}"),
        (
            r#"{"targets":[{"hosts":["a.example"]},{"hosts":["b.example"],"paths":["api/x"]}]}"#,
            "`targets[1].paths[0]` is \"api/x\"",
            "start it with '/'",
        ),
        (
            r#"{"targets":[{"hosts":["a.example"],"clusters":[]}]}"#,
            "`targets[0].clusters` is empty",
            "name the Envoy clusters",
        ),
        (
            r#"{"targets":[]}"#,
            "`targets` is empty",
            "at least one target",
        ),
        (
            r#"{"targets":[{"hosts":["a.example"]}],"hosts":["b.example"]}"#,
            "`targets` and `hosts`",
            "move `hosts` into each target",
        ),
        (
            r#"{"targets":[{"name":"a b","hosts":["a.example"]}]}"#,
            "`targets[0].name` is \"a b\"",
            "letters, digits",
        ),
        (
            r#"{"targets":[{"name":"x","hosts":["a.example"]},{"name":"x","hosts":["b.example"]}]}"#,
            "`targets[1].name` is \"x\"",
            "its own name",
        ),
        (
            r#"{"targets":[{"hosts":["east.openai.azure.com","*.openai.azure.us"]}]}"#,
            "`targets[0].hosts` mix hosts that take different audiences",
            "or set targets[0].resource",
        ),
        (
            r#"{"targets":[{"hosts":["*.services.ai.azure.com"],"paths":["/api/projects/","/openai/"]}]}"#,
            "`targets[0].paths` mix audiences",
            "split them into two targets",
        ),
        (
            r#"{"targets":[{"name":"all","hosts":["*.openai.azure.com"]},{"name":"east","hosts":["east.openai.azure.com"]}]}"#,
            "`targets[1]` (\"east\") can never match: targets[0] (\"all\")",
            "more specific target first",
        ),
    ];
    for (json, field, fix) in table {
        let message = err(json);
        assert!(message.contains(field), "{json}: {message}");
        assert!(message.contains(fix), "{json}: {message}");
    }
}

#[test]
fn a_later_target_is_kept_when_the_earlier_does_not_cover_it() {
    // Different paths, clusters, or a port spelling only the bound one takes.
    for json in [
        r#"{"targets":[{"hosts":["*.services.ai.azure.com"],"paths":["/api/projects/"]},{"hosts":["*.services.ai.azure.com"]}]}"#,
        r#"{"targets":[{"hosts":["*.openai.azure.com"],"clusters":["a"]},{"hosts":["*.openai.azure.com"],"clusters":["b"]}]}"#,
        r#"{"targets":[{"hosts":["*.openai.azure.com"]},{"hosts":["*.openai.azure.com"],"clusters":["a"]}]}"#,
        r#"{"targets":[{"hosts":["east.openai.azure.com"]},{"hosts":["*.openai.azure.com"]}]}"#,
    ] {
        assert_eq!(parse(json).targets.len(), 2, "{json}");
    }
    // A bound target covering the same clusters and more hosts does shadow.
    let e = err(
        r#"{"targets":[{"hosts":["*"],"clusters":["a","b"]},{"hosts":["x.example"],"clusters":["b"]}]}"#,
    );
    assert!(e.contains("can never match"), "{e}");
}

#[test]
fn fingerprint_changes_with_what_decides_the_token_and_only_that() {
    let base = parse(r#"{"hosts":["a.example"]}"#).tokens[0].fingerprint();
    let same = parse(r#"{"hosts":["b.example"],"token_source":{"timeout_ms":900}}"#);
    assert_eq!(same.tokens[0].fingerprint(), base);
    for other in [
        r#"{"hosts":["a.example"],"resource":"https://ml.azure.com"}"#,
        r#"{"hosts":["a.example"],"token_source":{"client_id":"c"}}"#,
        r#"{"hosts":["a.example"],"token_source":{"object_id":"c"}}"#,
        r#"{"hosts":["a.example"],"token_source":{"cluster":"other"}}"#,
    ] {
        assert_ne!(parse(other).tokens[0].fingerprint(), base, "{other}");
    }
}

#[test]
fn an_http_source_reads_its_service_and_how_the_value_is_sent() {
    let c = parse(
        r#"{"targets":[{"name":"legacy","hosts":["*"],"clusters":["aoai"],
            "token_source":{"type":"http","cluster":"key_service","path":"/key","credential":"api_key"}}]}"#,
    );
    let Source::Http(http) = &c.tokens[0].source else {
        panic!("{:?}", c.tokens[0].source)
    };
    assert_eq!(http.cluster, "key_service");
    assert_eq!(http.path, "/key");
    assert_eq!(http.authority, "localhost");
    assert_eq!(http.credential, CredentialKind::ApiKey);
    assert_eq!(http.refresh_interval_ms, DEFAULT_REFRESH_INTERVAL_MS);
    let bearer = parse(
        r#"{"hosts":["myres.openai.azure.com"],"token_source":{"type":"http","cluster":"tokens","path":"/token",
            "authority":"token-proxy","refresh_interval_ms":60000}}"#,
    );
    let Source::Http(http) = &bearer.tokens[0].source else {
        panic!()
    };
    assert_eq!(http.credential, CredentialKind::Bearer);
    assert_eq!(http.refresh_interval_ms, 60_000);
    assert_ne!(c.tokens[0].fingerprint(), bearer.tokens[0].fingerprint());
}

#[test]
fn policies_are_read_per_target_and_default_to_todays_behaviour() {
    let hash_a = "b5bb9d8014a0f9b1d61e21e796d78dccdf1352f23cd32812f4850b878ae4944c";
    let c = parse(&format!(
        r#"{{"targets":[
            {{"name":"gw","hosts":["a.openai.azure.com"],"client_keys":[{{"name":"team-a","sha256":"{hash_a}"}}]}},
            {{"name":"mig","hosts":["b.openai.azure.com"],"on_token_failure":"forward_key","client_token":"keep"}},
            {{"name":"plain","hosts":["c.openai.azure.com"]}}]}}"#
    ));
    let keys = c.targets[0].policy.client_keys.as_ref().unwrap();
    assert_eq!(keys.names().collect::<Vec<_>>(), ["team-a"]);
    assert_eq!(
        keys.check(Some(b"foo\n")),
        crate::policy::KeyCheck::Known(0),
        "sha256(\"foo\\n\")"
    );
    assert_eq!(
        c.targets[1].policy.on_token_failure,
        OnTokenFailure::ForwardKey
    );
    assert_eq!(c.targets[1].policy.client_token, ClientToken::Keep);
    assert_eq!(c.targets[2].policy, Policy::default());
    // The shorthand takes them too, for every target it stands for.
    let short = parse(r#"{"on_token_failure":"forward_key"}"#);
    assert!(short
        .targets
        .iter()
        .all(|t| t.policy.on_token_failure == OnTokenFailure::ForwardKey));
}

#[test]
fn bad_policies_and_http_sources_name_the_field_and_never_echo_a_key() {
    let hash = "b5bb9d8014a0f9b1d61e21e796d78dccdf1352f23cd32812f4850b878ae4944c";
    let cases = [
        (
            r#"{"targets":[{"hosts":["*.openai.azure.com"],"on_token_failure":"fallback"}]}"#.to_owned(),
            "`targets[0].on_token_failure` is \"fallback\"; use \"reject\" or \"forward_key\"",
        ),
        (
            r#"{"client_token":"trust"}"#.to_owned(),
            "`client_token` is \"trust\"; use \"replace\" or \"keep\"",
        ),
        (
            r#"{"client_keys":[]}"#.to_owned(),
            "`client_keys` is empty",
        ),
        (
            r#"{"client_keys":[{"name":"a","sha256":"sk-my-actual-secret-key"}]}"#.to_owned(),
            "`client_keys[0].sha256` is not 64 hex digits (it has 23 characters); write the key's SHA-256",
        ),
        (
            format!(r#"{{"client_keys":[{{"name":"a","sha256":"{hash}"}},{{"name":"a","sha256":"{}"}}]}}"#, hash.replace('b', "c")),
            "`client_keys[1].name` is \"a\", which another client key already has",
        ),
        (
            format!(r#"{{"client_keys":[{{"name":"a","sha256":"{hash}"}},{{"name":"b","sha256":"{}"}}]}}"#, hash.to_uppercase()),
            "`client_keys[1].sha256` is the hash of a key another client already has",
        ),
        (
            format!(r#"{{"client_keys":[{{"name":"a","sha256":"{hash}"}}],"on_token_failure":"forward_key"}}"#),
            "`client_keys / on_token_failure` are set together",
        ),
        (
            r#"{"client_keys":[{"name":"a","hash":"x"}]}"#.to_owned(),
            "unknown field `client_keys[0].hash`",
        ),
        (
            r#"{"targets":[{"hosts":["*"],"clusters":["c"]}],"client_token":"keep"}"#.to_owned(),
            "`targets` and `client_token` are both set at the top level",
        ),
        (
            r#"{"token_source":{"type":"http","path":"/key"}}"#.to_owned(),
            "`token_source.cluster` is missing",
        ),
        (
            r#"{"token_source":{"type":"http","cluster":"k"}}"#.to_owned(),
            "`token_source.path` is missing",
        ),
        (
            r#"{"token_source":{"type":"http","cluster":"k","path":"/key","credential":"header"}}"#.to_owned(),
            "`token_source.credential` is \"header\"; use \"bearer\" or \"api_key\"",
        ),
        (
            r#"{"token_source":{"type":"http","cluster":"k","path":"/key","refresh_interval_ms":10}}"#.to_owned(),
            "`token_source.refresh_interval_ms` is 10; use a value from 1000 to 86400000",
        ),
    ];
    for (json, expected) in cases {
        let message = err(&json);
        assert!(
            message.contains(expected),
            "{json}\n  got: {message}\n  want: {expected}"
        );
        assert!(!message.contains("sk-my-actual-secret-key"), "{message}");
    }
}

/// Values a careless operator may paste into the wrong field: an Entra client
/// secret, a PEM private key, a JWT, an Azure OpenAI key, an OpenAI key.
const PASTED_SECRETS: [(&str, &str); 5] = [
    ("Xy8Q~Zq3.abcDEF_ghiJKL-mnoPQRstuVWXyz0123", "abcDEF_ghiJKL"),
    (
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\n-----END PRIVATE KEY-----",
        "MIIEvQIBADAN",
    ),
    (
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlc2lnbmF0dXJl",
        "eyJzdWIiOiJ4In0",
    ),
    ("0123456789abcdef0123456789abcdef", "0123456789abcdef"),
    ("sk-proj-AbC123xyzQRS456tuvWXY789", "AbC123xyzQRS"),
];

/// Every field a configuration can carry, as a JSON template in which `$`
/// stands for the pasted value (as a JSON string).
fn every_field() -> Vec<String> {
    let mut fields: Vec<String> = [
        r#"{"hosts":[$]}"#,
        r#"{"resource":$}"#,
        r#"{"token_wait_timeout_ms":$}"#,
        r#"{"invalidation_interval_ms":$}"#,
        r#"{"on_token_failure":$}"#,
        r#"{"client_token":$}"#,
        r#"{"client_keys":[{"name":$,"sha256":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}]}"#,
        r#"{"client_keys":[{"name":"a","sha256":$}]}"#,
        r#"{"targets":[{"name":$,"hosts":["a.openai.azure.com"]}]}"#,
        r#"{"targets":[{"hosts":["a.openai.azure.com"],"paths":[$]}]}"#,
        r#"{"targets":[{"hosts":["a.openai.azure.com"],"clusters":[$]}]}"#,
        r#"{"token_source":{"type":$}}"#,
    ]
    .iter()
    .map(|t| (*t).to_owned())
    .collect();
    let sources: [(&str, &[&str]); 5] = [
        (
            "imds",
            &[
                "cluster",
                "authority",
                "client_id",
                "object_id",
                "msi_res_id",
                "timeout_ms",
            ],
        ),
        (
            "app_service",
            &[
                "cluster",
                "client_id",
                "object_id",
                "principal_id",
                "mi_res_id",
                "timeout_ms",
            ],
        ),
        (
            "client_credentials",
            &[
                "cluster",
                "authority",
                "tenant_id",
                "client_id",
                "client_secret_env",
                "client_certificate_env",
                "client_secret",
                "timeout_ms",
            ],
        ),
        (
            "workload_identity",
            &[
                "cluster",
                "authority",
                "tenant_id",
                "client_id",
                "assertion_cluster",
                "assertion_authority",
                "assertion_path",
                "timeout_ms",
            ],
        ),
        (
            "http",
            &[
                "cluster",
                "authority",
                "path",
                "credential",
                "refresh_interval_ms",
                "timeout_ms",
            ],
        ),
    ];
    for (kind, names) in sources {
        let base = if kind == "http" {
            r#""cluster":"keys","path":"/key","#
        } else {
            ""
        };
        for name in names {
            fields.push(format!(
                r#"{{"token_source":{{{base}"type":"{kind}","{name}":$}}}}"#
            ));
        }
    }
    fields
}

#[test]
fn a_secret_pasted_into_any_field_is_never_repeated_in_the_error() {
    let env = |name: &str| match name {
        "IDENTITY_ENDPOINT" => Some("http://localhost:42356/msi/token".to_owned()),
        "IDENTITY_HEADER" | "AZURE_CLIENT_SECRET" => Some("environment-secret".to_owned()),
        "AZURE_TENANT_ID" => Some("72f988bf-0000-4000-8000-00000000e1a0".to_owned()),
        "AZURE_CLIENT_ID" => Some("c11e0000-0000-4000-8000-0000000000aa".to_owned()),
        _ => None,
    };
    let mut refused = 0;
    for template in every_field() {
        for (secret, tell) in PASTED_SECRETS {
            let json = template.replace('$', &serde_json::to_string(secret).unwrap());
            let Err(e) = Config::parse_with_env(json.as_bytes(), &env) else {
                continue;
            };
            refused += 1;
            let message = e.to_string();
            assert!(
                !message.contains(tell) && !message.contains(secret),
                "{template} with a pasted secret repeated it: {message}"
            );
        }
    }
    // Also where a key belongs.
    for (secret, tell) in PASTED_SECRETS {
        let json = format!("{{{}:1}}", serde_json::to_string(secret).unwrap());
        let message = err(&json);
        assert!(!message.contains(tell), "{message}");
        assert!(message.contains("unknown field"), "{message}");
        refused += 1;
    }
    assert!(refused > 120, "the sweep refused {refused} configurations");
}

#[test]
fn values_that_cannot_be_secrets_are_still_named_in_errors() {
    // Valid host patterns, cluster and target names, and enum words stay
    // in the message: they are what the operator must find.
    let message = err(
        r#"{"targets":[{"name":"east","hosts":["*.openai.azure.com"]},{"name":"east","hosts":["b.openai.azure.com"]}]}"#,
    );
    assert!(message.contains("\"east\""), "{message}");
    let message = err(r#"{"hosts":["a.openai.azure.us","b.openai.azure.com"]}"#);
    assert!(message.contains("a.openai.azure.us"), "{message}");
    let message = err(r#"{"on_token_failure":"forward"}"#);
    assert!(message.contains("\"forward_key\""), "{message}");
    let message = err(
        r#"{"token_source":{"type":"client_credentials","tenant_id":"t","client_id":"c","client_secret_env":"MY_SP_SECRET"}}"#,
    );
    assert!(message.contains("MY_SP_SECRET"), "{message}");
}

#[test]
fn a_target_whose_hosts_name_no_cloud_takes_the_audience_of_its_sources_cloud() {
    let sp = |authority: &str, resource: &str| {
        format!(
            r#"{{"targets":[{{"name":"gov","hosts":["*"],"clusters":["gov"]{resource},
              "token_source":{{"type":"client_credentials","cluster":"entra_us","authority":"{authority}",
                "tenant_id":"72f988bf-0000-4000-8000-00000000e1a0","client_id":"c11e0000-0000-4000-8000-0000000000aa",
                "client_secret_env":"GOV_SP_SECRET"}}}}]}}"#
        )
    };
    let env = |name: &str| (name == "GOV_SP_SECRET").then(|| "s".to_owned());
    for (authority, audience) in [
        (
            "login.microsoftonline.us",
            "https://cognitiveservices.azure.us",
        ),
        (
            "login.chinacloudapi.cn",
            "https://cognitiveservices.azure.cn",
        ),
        (
            "login.microsoftonline.com",
            "https://cognitiveservices.azure.com",
        ),
    ] {
        let c = Config::parse_with_env(sp(authority, "").as_bytes(), &env).unwrap();
        assert_eq!(resource_of(&c, 0), audience, "{authority}");
    }
    // A source of one cloud and an audience of another: both fields named.
    let e = Config::parse_with_env(
        sp(
            "login.microsoftonline.us",
            r#","resource":"https://cognitiveservices.azure.com""#,
        )
        .as_bytes(),
        &env,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("targets[0].resource / targets[0].token_source.authority"),
        "{e}"
    );
    assert!(
        e.contains("Azure US Government") && e.contains("the public cloud"),
        "{e}"
    );
    let e = Config::parse_with_env(
        sp("login.microsoftonline.us", "")
            .replace(r#""hosts":["*"]"#, r#""hosts":["*.openai.azure.com"]"#)
            .as_bytes(),
        &env,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("targets[0].hosts / targets[0].token_source.authority"),
        "{e}"
    );
    // A managed identity's cloud is the machine's: nothing to compare.
    assert!(Config::parse(br#"{"hosts":["*.openai.azure.us"]}"#).is_ok());
}

#[test]
fn the_plan_names_forward_key_targets_per_token_and_dense_counter_slots() {
    let hash = "a".repeat(64);
    let c = parse(&format!(
        r#"{{"targets":[
            {{"name":"gw","hosts":["a.openai.azure.com"],"client_keys":[{{"name":"x","sha256":"{hash}"}},{{"name":"y","sha256":"{}"}}]}},
            {{"name":"mig","hosts":["b.openai.azure.com"],"on_token_failure":"forward_key"}},
            {{"name":"other","hosts":["c.openai.azure.us"],"on_token_failure":"forward_key"}}
        ]}}"#,
        "b".repeat(64)
    ));
    assert_eq!(c.tokens.len(), 2);
    assert_eq!(c.forward_key_targets(0), vec![1]);
    assert_eq!(c.forward_key_targets(1), vec![2]);
    assert_eq!(c.forward_key_targets(7), Vec::<u32>::new());
    assert_eq!(
        c.slots(),
        Slots {
            first: vec![0, 3, 4],
            count: 5
        }
    );
}

/// Routing: the first matching target wins ([`Config::route`]).
mod routing {
    use super::*;
    use crate::route::{NearMiss, Routed};

    /// A request with a fixed path and cluster that counts what was asked.
    #[derive(Default)]
    struct Fixed {
        path: Option<String>,
        cluster: Option<String>,
        asked_path: usize,
        asked_cluster: usize,
    }

    impl Routed for Fixed {
        fn path(&mut self) -> Option<&str> {
            self.asked_path += 1;
            self.path.as_deref()
        }
        fn cluster(&mut self) -> Option<&str> {
            self.asked_cluster += 1;
            self.cluster.as_deref()
        }
    }

    fn request(path: &str, cluster: &str) -> Fixed {
        Fixed {
            path: Some(path.to_owned()),
            cluster: Some(cluster.to_owned()),
            ..Fixed::default()
        }
    }

    fn config(json: &str) -> Config {
        Config::parse(json.as_bytes()).unwrap()
    }

    fn name(c: &Config, target: Option<usize>) -> Option<&str> {
        target.map(|t| c.targets[t].name.as_str())
    }

    #[test]
    fn the_first_matching_target_wins_and_no_match_is_none() {
        let c = config(
            r#"{"targets":[
                {"name":"east","hosts":["east.openai.azure.com"]},
                {"name":"all","hosts":["*.openai.azure.com"]}]}"#,
        );
        let mut r = request("/", "aoai");
        assert_eq!(
            name(&c, c.route("east.openai.azure.com", &mut r)),
            Some("east")
        );
        assert_eq!(
            name(&c, c.route("west.openai.azure.com", &mut r)),
            Some("all")
        );
        assert_eq!(c.route("api.example.com", &mut r), None);
        assert_eq!(r.asked_path, 0, "no target has paths");
    }

    #[test]
    fn default_targets_send_foundry_project_paths_to_their_own_target() {
        let c = Config::default();
        let mut projects = request("/api/projects/p1/threads?api-version=v1", "x");
        let mut openai = request("/openai/deployments/d/chat/completions", "x");
        assert_eq!(
            name(&c, c.route("acct.services.ai.azure.com", &mut projects)),
            Some("foundry-projects")
        );
        assert_eq!(
            name(&c, c.route("acct.services.ai.azure.com", &mut openai)),
            Some("default")
        );
        let mut plain = request("/openai/x", "x");
        assert_eq!(
            name(&c, c.route("myres.openai.azure.com", &mut plain)),
            Some("default")
        );
        assert_eq!(
            plain.asked_path, 0,
            "an openai.azure.com request never reads its path"
        );
    }

    #[test]
    fn clusters_bind_a_target_to_where_envoy_routes() {
        let c = config(
            r#"{"targets":[{"name":"east","hosts":["*.openai.azure.com"],"clusters":["aoai_east"]}]}"#,
        );
        let mut routed = request("/", "aoai_east");
        let mut elsewhere = request("/", "catch_all");
        let mut unrouted = Fixed::default();
        assert_eq!(
            name(&c, c.route("east.openai.azure.com", &mut routed)),
            Some("east")
        );
        assert_eq!(c.route("east.openai.azure.com", &mut elsewhere), None);
        assert_eq!(c.route("east.openai.azure.com", &mut unrouted), None);
        // Bound to its cluster, the target may ignore port and dot spellings.
        let mut routed = request("/", "aoai_east");
        assert_eq!(
            name(&c, c.route("east.openai.azure.com.:443", &mut routed)),
            Some("east")
        );
    }

    #[test]
    fn port_and_dot_spellings_without_clusters_match_nothing_and_are_near_misses() {
        let c = Config::default();
        for host in ["myres.openai.azure.com:443", "myres.openai.azure.com."] {
            let mut r = request("/", "aoai");
            assert_eq!(c.route(host, &mut r), None, "{host}");
            assert_eq!(
                c.near_miss(host, &mut r),
                Some(NearMiss::Spelling),
                "{host}"
            );
        }
        let only_east = config(r#"{"hosts":["east.openai.azure.com"]}"#);
        let mut r = request("/", "aoai");
        assert_eq!(
            only_east.near_miss("west.openai.azure.com", &mut r),
            Some(NearMiss::UnlistedAzureHost)
        );
        assert_eq!(only_east.near_miss("api.example.com", &mut r), None);
        assert_eq!(
            only_east.near_miss("openai.azure.com.evil.example", &mut r),
            None
        );
    }

    #[test]
    fn an_unbound_target_never_matches_a_cluster_the_client_picks() {
        let c = Config::default();
        for cluster in ["PassthroughCluster", "InboundPassthroughClusterIpv6"] {
            let mut r = request("/openai/x", cluster);
            assert_eq!(c.route("myres.openai.azure.com", &mut r), None, "{cluster}");
            assert_eq!(
                c.near_miss("myres.openai.azure.com", &mut r),
                Some(NearMiss::ClientChosenDestination)
            );
        }
        let mut unrouted = Fixed::default();
        assert_eq!(c.route("myres.openai.azure.com", &mut unrouted), None);
    }

    #[test]
    fn any_host_is_allowed_only_where_the_cluster_decides() {
        let c = config(r#"{"targets":[{"hosts":["*"],"clusters":["azure_openai"]}]}"#);
        let mut routed = request("/", "azure_openai");
        assert_eq!(c.route("127.0.0.1:10000", &mut routed), Some(0));
        let mut other = request("/", "other");
        assert_eq!(c.route("127.0.0.1:10000", &mut other), None);
    }
}

#[test]
fn a_target_that_is_not_an_object_is_called_a_json_object_not_a_rust_type() {
    let message = err(r#"{"targets": [5]}"#);
    assert!(message.contains("targets[0]"), "{message}");
    assert!(message.contains("a JSON object"), "{message}");
    assert!(!message.contains("struct"), "{message}");
    assert!(!message.contains("Raw"), "{message}");
}
